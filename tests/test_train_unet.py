"""`python -m medti.train --method unet` (issue 15): full U-Net fine-tuning in the same loop. Checked here: one
AdamW step equals a reference step on diffusers' UNet2DConditionModel with the same batch, noise and timesteps;
model.safetensors reads back through minisd.load and diffusers' from_single_file; --trainable attention leaves the
other weights bit-identical; --ema is the moving average of the weights step by step; a run killed with SIGKILL
and resumed (EMA included) ends with the same bytes; a bf16 run keeps fp32 masters; training lowers the held-out
loss; bad flags are one line."""
import dataclasses
import json

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file
from test_sd1_pipeline import sd1_pipeline
from test_train import kill_and_resume, secret_data  # noqa: F401  (secret_data: the fixture)
from test_train_lora import heldout

import convert_diffusers
import minisd
from conftest import rel_err
from medti.dataset.folder import load_dataset
from medti.train import main
from medti.training.config import TrainConfig, check
from medti.training.demo import phantoms
from medti.training.objective import cache_latents
from medti.training.trainer import get_batch, loop, setup, start_or_resume

PROMPT = "a scan of sks"


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """A tiny random SD1 diffusers folder, its official-file config, and 3 phantom images."""
    tmp = tmp_path_factory.mktemp("unet-ft")
    pipe = sd1_pipeline(tmp / "sd1", 4, seed=30)
    state, config = convert_diffusers.convert_folder(tmp / "sd1")
    convert_diffusers.write_outputs(state, config, tmp / "sd1.safetensors", tmp / "sd1.json")
    return tmp, pipe, phantoms(tmp / "data", 3, seed=0)


def config(tmp, data, out, **extra) -> TrainConfig:
    return TrainConfig(**{"model": str(tmp / "sd1"), "data": str(data), "method": "unet", "instance_prompt": PROMPT,
                          "lr": "1e-3", "max_steps": 1, "resolution": 32, "preview_every": 0, "save_every": 1,
                          "checkpointing": "off", "save_dtype": "fp32", "out": str(out), **extra})


def start(cfg: TrainConfig):
    s = setup(cfg, check(cfg))
    s.out.mkdir(parents=True, exist_ok=True)
    return s


def test_one_step_equals_a_diffusers_adamw_step(sd1, tmp_path):
    """Our step vs diffusers' UNet with the same weights, batch, noise and timesteps and torch's AdamW (the
    diffusers text-to-image recipe's optimizer, weight decay 0 as ours). Gradients: within 1e-4 of the largest
    (float rounding through two implementations). Updated weights: within 1 % of one step (lr), where the gradient
    is above noise (|g| > 1e-6, 100x AdamW's eps): AdamW's first step is lr * g / (|g| + eps), so a gradient of pure
    rounding noise moves a weight by up to +-lr at random, in both implementations alike. The tiny UNet has such
    weights: with 32 channels in 32 groups each GroupNorm normalises one channel, so the biases added just before
    it (in_layers.2 and emb_layers.1) have a gradient of exactly 0 in exact arithmetic."""
    tmp, pipe, data = sd1
    s = start(config(tmp, data, tmp_path / "run"))
    latents, noise, t, texts = get_batch(s, 0, 0)
    with torch.no_grad():
        context = s.sd.text(texts)
    ref = UNet2DConditionModel.from_pretrained(tmp / "sd1", subfolder="unet")
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pred = ref(sched.add_noise(latents, noise, t), t, encoder_hidden_states=context).sample
    ref_loss = torch.nn.functional.mse_loss(pred, noise)
    ref_loss.backward()
    ref_grads = convert_diffusers.convert_unet({k: p.grad for k, p in ref.named_parameters()})
    torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.0).step()
    loop(s, start_or_resume(s))
    record = json.loads((s.out / "log.jsonl").read_text().splitlines()[-1])
    assert abs(record["loss"] - ref_loss.item()) <= 1e-5 * ref_loss.item()
    grads = {k.removeprefix("unet."): p.grad for k, p in s.method.params.items()}
    largest = max(g.abs().max().item() for g in ref_grads.values())
    grad_err = max((grads[k] - g).abs().max().item() for k, g in ref_grads.items()) / largest
    theirs, ours = convert_diffusers.convert_unet(ref.state_dict()), s.sd.unet.state_dict()
    worst = max((ours[k] - theirs[k])[ref_grads[k].abs() > 1e-6].abs().max().item() for k in ref_grads
                if (ref_grads[k].abs() > 1e-6).any())
    print(f"unet step: gradient error {grad_err:.1e} of the largest; update error {worst / 1e-3:.1e} of lr")
    assert grad_err <= 1e-4 and worst <= 1e-2 * 1e-3


def test_saved_model_reads_back_in_minisd_and_diffusers(sd1, tmp_path):
    tmp, _, data = sd1
    out = tmp_path / "run"
    assert main(["--model", str(tmp / "sd1"), "--data", str(data), "--method", "unet", "--instance-prompt", PROMPT,
                 "--lr", "1e-3", "--max-steps", "2", "--save-every", "2", "--resolution", "32", "--preview-every",
                 "0", "--save-dtype", "fp32", "--out", str(out)]) == 0
    assert {p.name for p in out.glob("*.safetensors")} == {"model.safetensors", "state.safetensors"}   # no copies
    file = out / "model.safetensors"
    ours = minisd.load(file, config=str(tmp / "sd1.json"))
    state = {k.removeprefix("unet."): v for k, v in load_file(out / "state.safetensors").items()
             if k.startswith("unet.")}
    assert all(torch.equal(ours.unet.state_dict()[k], v) for k, v in state.items())   # what trained, saved as is
    theirs = UNet2DConditionModel.from_single_file(str(file), config=str(tmp / "sd1"), subfolder="unet")
    converted = convert_diffusers.convert_unet(theirs.state_dict())
    assert all(torch.equal(ours.unet.state_dict()[k], v) for k, v in converted.items())


def test_trainable_attention_leaves_the_rest_bit_identical(sd1, tmp_path):
    tmp, _, data = sd1
    s = start(config(tmp, data, tmp_path / "run", trainable="attention", max_steps=2))
    loop(s, start_or_resume(s))
    fresh = minisd.load(tmp / "sd1")
    for name, value in s.sd.unet.state_dict().items():
        same = torch.equal(value, fresh.unet.state_dict()[name])
        assert same != (".attn1." in name or ".attn2." in name), name   # attention moved, nothing else did
    for ours, theirs in ((s.sd.vae, fresh.vae), (s.sd.text.tower, fresh.text.tower)):
        assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(),
                                                     strict=True))


def test_ema_is_the_moving_average_of_the_weights(sd1, tmp_path):
    """--ema 0.5 over 3 steps, by hand: e_0 = w_0, e_k = 0.5 e_(k-1) + 0.5 w_k after step k; --train-text: the
    text tower's weights train (and average) too."""
    tmp, _, data = sd1
    cfg = config(tmp, data, tmp_path / "run", ema=0.5, max_steps=3, save_every=3, train_text=True)
    s = start(cfg)
    expected = {n: p.detach().clone() for n, p in s.method.params.items()}
    start_values = {n: e.clone() for n, e in expected.items()}
    for k in range(1, 4):
        s.cfg = dataclasses.replace(cfg, max_steps=k)
        loop(s, k - 1)
        expected = {n: 0.5 * e + 0.5 * s.method.params[n].detach() for n, e in expected.items()}
    moved = [n for n, p in s.method.params.items() if not torch.equal(p, start_values[n])]
    assert any(n.startswith("text.") for n in moved) and any(n.startswith("unet.") for n in moved)
    err = max(rel_err(s.method.buffers[f"ema.{n}"], expected[n]) for n in moved)
    assert err <= 1e-6, err   # lerp vs the formula: float rounding only
    assert not any(torch.equal(expected[n], s.method.params[n]) for n in moved)


def unet_args(folder, model, cfg, out, *extra):
    return ["--model", str(model), "--config", str(cfg), "--data", str(folder / "train"), "--method", "unet",
            "--instance-prompt", PROMPT, "--resolution", "64", "--preview-every", "0", "--out", str(out), *extra]


def test_killed_and_resumed_unet_run_is_bit_identical(secret_data, tmp_path):  # noqa: F811
    folder, model, cfg = secret_data
    extra = ["--max-steps", "12", "--save-every", "3", "--seed", "5", "--ema", "0.9", "--lr", "1e-4"]
    args = unet_args(folder, model, cfg, tmp_path / "unused", *extra)
    out = tmp_path / "killed"
    kill_and_resume(args[:args.index("--out")] + args[args.index("--out") + 2:], tmp_path / "whole", out, 4)
    for name in ("model.safetensors", "state.safetensors"):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_bf16_run_keeps_fp32_masters(secret_data, tmp_path):  # noqa: F811
    """--dtype bf16 on the CPU: the frozen parts in bf16, the UNet's weights (the masters) in fp32 under autocast;
    the saved file is fp16 by default."""
    folder, model, cfg = secret_data
    s = start(TrainConfig(model=str(model), config=str(cfg), data=str(folder / "train"), method="unet",
                          instance_prompt=PROMPT, dtype="bf16", max_steps=2, save_every=2, resolution=64,
                          preview_every=0, checkpointing="off", out=str(tmp_path / "run")))
    loop(s, start_or_resume(s))
    assert {p.dtype for p in s.method.params.values()} == {torch.float32}
    assert next(s.sd.vae.parameters()).dtype == torch.bfloat16
    assert {v.dtype for v in load_file(tmp_path / "run" / "model.safetensors").values()} == {torch.float16}


def test_unet_training_lowers_held_out_loss(secret_data, tmp_path):  # noqa: F811
    """Learning, as for TI and LoRA: 100 steps, held-out loss of the fine-tuned model vs the base model, paired on
    three draw sets; bar 5 % (the draw-set spread is ~0.5 %). Measured: see the printed gains."""
    folder, model, cfg = secret_data
    out = tmp_path / "run"
    assert main(unet_args(folder, model, cfg, out, "--max-steps", "100", "--save-every", "100", "--lr", "1e-4",
                          "--save-dtype", "fp32", "--checkpointing", "off")) == 0
    base, tuned = minisd.load(model, config=cfg), minisd.load(out / "model.safetensors", config=cfg)
    latents = cache_latents(base, load_dataset(folder / "held-out", 64).images, False, 0)["mean"] * base.scale_factor
    gains = [(heldout(base, latents, seed) - heldout(tuned, latents, seed)) / heldout(base, latents, seed)
             for seed in (1, 2, 3)]
    print("held-out loss improvements:", [f"{100 * g:.2f} %" for g in gains])
    assert min(gains) > 0.05, gains


@pytest.mark.parametrize("extra, words", [
    (["--ema", "1"], "--ema 1"), (["--trainable", "conv"], "--trainable 'conv'"),
    (["--save-dtype", "fp8"], "--save-dtype 'fp8'"), (["--rank", "8"], "--rank is for --method lora, not unet"),
    (["--token", "<t>"], "--token is for --method ti, not unet"),
])
def test_bad_unet_flags_are_one_line(secret_data, tmp_path, capsys, extra, words):  # noqa: F811
    folder, model, cfg = secret_data
    assert main(unet_args(folder, model, cfg, tmp_path / "run", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and words in err, err
    assert not (tmp_path / "run").exists()
