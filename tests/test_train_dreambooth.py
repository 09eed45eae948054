"""DreamBooth's prior preservation (issue 15) in `python -m medti.train --method lora|unet --class-prompt ...
--class-images N|DIR`: the loss equals diffusers' train_dreambooth.py formulation computed in the test on diffusers'
UNet with the same weights; the instance half of every batch is exactly what it would be without prior
preservation; the N class images are made once and reused on resume, which stays bit-identical; bad flags are
one line."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from test_train_unet import PROMPT, config, sd1, start  # noqa: F401  (sd1: the fixture)

from medti.train import main
from medti.training.dreambooth import prior_preservation_loss
from medti.training.trainer import get_batch, loop, start_or_resume

CLASS = "a scan"


def test_prior_preservation_loss_equals_diffusers_formulation(sd1, tmp_path):  # noqa: F811
    """diffusers examples/dreambooth/train_dreambooth.py (with_prior_preservation): one UNet batch of instance then
    class rows, `model_pred, model_pred_prior = torch.chunk(model_pred, 2)`, loss = MSE(instance) +
    prior_loss_weight * MSE(prior). Same weights, latents, noise, timesteps and text; bound 1e-5 relative (float
    rounding through two UNet implementations)."""
    tmp, pipe, data = sd1
    s = start(config(tmp, data, tmp_path / "run", method="lora", save_dtype="fp16", batch=2, class_prompt=CLASS,
                    class_images="2"))
    latents, noise, t, texts = get_batch(s, 0, 0)
    assert latents.shape[0] == 4 and texts == [PROMPT] * 2 + [CLASS] * 2
    with torch.no_grad():
        context = s.sd.text(texts)
        ours = prior_preservation_loss(s.sd, context, latents, noise, t, 2, 0.7)
        ref = UNet2DConditionModel.from_pretrained(tmp / "sd1", subfolder="unet")
        sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        pred = ref(sched.add_noise(latents, noise, t), t, encoder_hidden_states=context).sample
    instance, prior = torch.chunk(pred, 2)
    target, target_prior = torch.chunk(noise, 2)
    expected = F.mse_loss(instance, target) + 0.7 * F.mse_loss(prior, target_prior)
    assert abs(ours.item() - expected.item()) <= 1e-5 * expected.item(), (ours.item(), expected.item())
    plain = F.mse_loss(instance, target)
    assert abs(ours.item() - plain.item()) > 1e-3 * plain.item()   # the prior term is really there


def test_instance_rows_are_unchanged_and_class_images_made_once(sd1, tmp_path):  # noqa: F811
    tmp, _, data = sd1
    base = config(tmp, data, tmp_path / "plain", method="lora", save_dtype="fp16", latents="random", flip=True,
                  seed=3)
    plain = start(base)
    prior = start(dataclasses.replace(base, out=str(tmp_path / "prior"), class_prompt=CLASS, class_images="3"))
    for step in (0, 5):
        a, b = get_batch(plain, step, 0), get_batch(prior, step, 0)
        assert torch.equal(a[0], b[0][:1]) and torch.equal(a[1], b[1][:1]) and torch.equal(a[2], b[2][:1])
    made = sorted((tmp_path / "prior" / "class-images").iterdir())
    assert [p.name for p in made] == ["00000.png", "00001.png", "00002.png"]
    stamps = [p.stat().st_mtime_ns for p in made]
    start(dataclasses.replace(base, out=str(tmp_path / "prior"), class_prompt=CLASS, class_images="3"))
    assert [p.stat().st_mtime_ns for p in made] == stamps   # read back, not made again


def test_resumed_dreambooth_run_is_bit_identical(sd1, tmp_path):  # noqa: F811
    tmp, _, data = sd1
    args = ["--model", str(tmp / "sd1"), "--data", str(data), "--method", "lora", "--instance-prompt", PROMPT,
            "--class-prompt", CLASS, "--class-images", "2", "--resolution", "32", "--preview-every", "0",
            "--save-every", "2", "--lr", "1e-3"]
    assert main([*args, "--max-steps", "4", "--out", str(tmp_path / "whole")]) == 0
    assert main([*args, "--max-steps", "2", "--out", str(tmp_path / "cut")]) == 0
    assert main([*args, "--max-steps", "4", "--out", str(tmp_path / "cut"), "--resume"]) == 0
    for name in ("lora.safetensors", "state.safetensors"):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_class_images_from_a_folder(sd1, tmp_path):  # noqa: F811
    tmp, _, data = sd1
    s = start(config(tmp, data, tmp_path / "run", method="unet", class_prompt=CLASS, class_images=str(data)))
    assert len(s.prior["mean"]) == 3 and not (tmp_path / "run" / "class-images").exists()
    loop(s, start_or_resume(s))


@pytest.mark.parametrize("extra, words", [
    (["--token", "<t>", "--class-prompt", CLASS, "--class-images", "2"], "--class-prompt is DreamBooth's"),
    (["--method", "lora", "--instance-prompt", PROMPT, "--class-prompt", CLASS], "needs --class-images"),
    (["--method", "lora", "--instance-prompt", PROMPT, "--class-images", "2"], "needs --class-prompt"),
    (["--method", "lora", "--instance-prompt", PROMPT, "--class-prompt", CLASS, "--class-images", "nowhere"],
     "--class-images nowhere"),
    (["--method", "lora", "--instance-prompt", PROMPT, "--class-prompt", CLASS, "--class-images", "2",
      "--prior-weight", "-1"], "--prior-weight -1"),
])
def test_bad_dreambooth_flags_are_one_line(sd1, tmp_path, capsys, extra, words):  # noqa: F811
    tmp, _, data = sd1
    assert main(["--model", str(tmp / "sd1"), "--data", str(data), "--out", str(tmp_path / "run"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and words in err, err
    assert not (tmp_path / "run").exists()
