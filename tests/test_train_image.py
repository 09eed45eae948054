"""`python -m medti.train --method unet --condition dinov2 --encoder E` (DiNO-Diffusion's image-conditioned
training): one step equals a hand-written step on diffusers' UNet2DConditionModel whose encoder_hidden_states are
transformers' DINOv2 tokens of the batch's images through the projection, with the condition dropout drawn by
ImageConditioning.drop after the step's other draws; the cached tokens are the encoder's tokens of the trained
images, mirrored rows too; the projection trains and is saved (`image_proj.*`, the `image_condition` metadata) so
that minisd.load reads the file back; training lowers the held-out loss; a run killed with SIGKILL and resumed ends
with the same bytes; bad input is one line.

Tolerances, each the one of the piece it rests on: tokens 1e-6 of their scale (test_image_conditioning.py: both
sides run the same float32 operations), the loss 1e-5 of itself and gradients 1e-4 of the largest (test_train_unet.py:
float rounding through two UNet implementations)."""
import copy
import json

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors import safe_open
from safetensors.torch import load_file
from test_image_conditioning import encoder_release, reference_tokens
from test_train import kill_and_resume
from transformers import CLIPVisionConfig

import convert_diffusers
import minisd
from conftest import TINY_CONFIG, rel_err, write_official
from medti.dataset.folder import load_dataset
from medti.train import main
from medti.training.config import TrainConfig, check
from medti.training.demo import phantoms, tiny_model
from medti.training.objective import diffusion_loss, epoch_order, step_generator, to_uint8
from medti.training.trainer import get_batch, loop, setup, start_or_resume
from minisd.dino_load import load_encoder
from minisd.image_conditioning import attach

SEED = 3   # a seed whose first batch of 4 drops some conditions and keeps others at --condition-dropout 0.5


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The demo's tiny model (context 64), phantoms to train on and held-out ones, and two DINOv2 releases: 48 wide
    (a projection into 64) and 64 wide (none)."""
    tmp = tmp_path_factory.mktemp("image-train")
    model, config = tiny_model(tmp / "model")
    encoder_release(tmp / "enc48", width=48)
    encoder_release(tmp / "enc64", width=64)
    # another network's release: a CLIP image tower (a folder that is no DINO release)
    CLIPVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp / "clip")
    return {"tmp": tmp, "model": model, "config": config, "data": phantoms(tmp / "data", 6, seed=0),
            "held": phantoms(tmp / "held", 4, seed=1), "enc48": tmp / "enc48", "enc64": tmp / "enc64"}


def image_args(f, out, *extra, encoder="enc48"):
    return ["--model", str(f["model"]), "--config", str(f["config"]), "--data", str(f["data"]), "--method", "unet",
            "--condition", "dinov2", "--encoder", str(f[encoder]), "--resolution", "64", "--preview-every", "0",
            "--save-dtype", "fp32", "--out", str(out), *extra]


def test_one_step_equals_a_hand_written_diffusers_step(tiny, tmp_path):
    """Our step vs diffusers' UNet with the same weights: the context is the reference encoder's tokens of the
    batch's images, through a copy of the projection's start, rows zeroed by ImageConditioning.drop on the step's
    generator after the draws a text run makes (timesteps, noise, its prompt choice)."""
    refs, _ = tiny
    model = write_official(tmp_path / "tiny.safetensors", **refs)
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_CONFIG))
    ref_encoder = encoder_release(tmp_path / "enc", width=48)
    data = phantoms(tmp_path / "data", 4, seed=0)
    cfg = TrainConfig(model=str(model), config=str(tmp_path / "tiny.json"), data=str(data), method="unet",
                      condition="dinov2", encoder=str(tmp_path / "enc"), condition_dropout=0.5, batch=4, lr="1e-3",
                      max_steps=1, resolution=32, preview_every=0, save_every=1, checkpointing="off",
                      save_dtype="fp32", seed=SEED, out=str(tmp_path / "run"))
    s = setup(cfg, check(cfg))
    proj = copy.deepcopy(s.sd.image.proj)   # the projection's start, trained alongside the reference UNet
    rows = epoch_order(SEED, 0, 4).tolist()   # get_batch's draws, by hand
    g = step_generator(SEED, 0, 0)
    t = torch.randint(0, 1000, (4,), generator=g)
    noise = torch.randn((4, 4, 8, 8), generator=g)
    torch.randint(0, 1, (4,), generator=g)   # a text run's prompt choice (one prompt), before the dropout
    tokens, _ = reference_tokens(ref_encoder, tmp_path / "enc", to_uint8(load_dataset(data, 32).images[rows]))
    context = s.sd.image.drop(proj(tokens), 0.5, g)
    latents, noise_ours, t_ours, conds = get_batch(s, 0, 0)
    dropped = [c is None for c in conds]
    assert torch.equal(noise_ours, noise) and torch.equal(t_ours, t) and any(dropped) and not all(dropped)
    assert dropped == [not row.any().item() for row in context]
    ref, sched = copy.deepcopy(refs["unet"]), DDPMScheduler(beta_start=0.00085, beta_end=0.012,
                                                             beta_schedule="scaled_linear")
    pred = ref(sched.add_noise(latents, noise, t), t, encoder_hidden_states=context).sample
    target = noise if s.sd.prediction == "eps" else sched.get_velocity(latents, noise, t)
    ref_loss = torch.nn.functional.mse_loss(pred, target)
    ref_loss.backward()
    ref_grads = {**{f"unet.{k}": g for k, g in convert_diffusers.convert_unet(
        {k: p.grad for k, p in ref.named_parameters()}).items()}, "image.weight": proj.weight.grad,
        "image.bias": proj.bias.grad}
    s.out.mkdir(parents=True)
    loop(s, start_or_resume(s))
    record = json.loads((s.out / "log.jsonl").read_text().splitlines()[-1])
    assert abs(record["loss"] - ref_loss.item()) <= 1e-5 * ref_loss.item()
    assert ref_grads.keys() == s.method.params.keys()
    largest = max(g.abs().max().item() for g in ref_grads.values())
    err = max((s.method.params[k].grad - g).abs().max().item() for k, g in ref_grads.items()) / largest
    print(f"image-conditioned step: gradient error {err:.1e} of the largest")
    assert err <= 1e-4 and proj.weight.grad.abs().max() > 0


def test_cached_tokens_are_the_encoders_tokens_mirrored_rows_too(files, tmp_path):
    f = files
    ref_encoder = encoder_release(tmp_path / "enc", width=48)   # the same release as f["enc48"] (seeded)
    cfg = TrainConfig(model=str(f["model"]), config=str(f["config"]), data=str(f["data"]), method="unet",
                      condition="dinov2", encoder=str(f["enc48"]), flip=True, preview_every=0,
                      out=str(tmp_path / "run"))
    s = setup(cfg, check(cfg))
    images = to_uint8(load_dataset(f["data"], 64).images)
    theirs, _ = reference_tokens(ref_encoder, f["enc48"], torch.cat([images, images.flip(-1)]))
    assert s.cache["tokens"].shape == (12, 5, 48) and rel_err(s.cache["tokens"], theirs) < 1e-6


def test_projection_is_trained_saved_and_loaded_back(files, tmp_path):
    """--ema: the saved file holds the EMA of the UNet and of the projection (image_proj.*), which minisd.load reads
    with the encoder folder given again; an encoder as wide as the context saves no projection."""
    f, out = files, tmp_path / "run"
    assert main(image_args(f, out, "--max-steps", "2", "--save-every", "2", "--ema", "0.5", "--lr", "1e-3")) == 0
    state = load_file(out / "state.safetensors")
    sd = minisd.load(out / "model.safetensors", config=str(f["config"]), encoder=str(f["enc48"]))
    assert sd.image.cfg.projection and sd.image.cfg.encoder == "enc48"
    assert torch.equal(sd.image.proj.weight, state["buffer.ema.image.weight"])
    assert not torch.equal(state["image.weight"], state["buffer.ema.image.weight"])   # the EMA, not the weights
    assert torch.equal(sd.unet.state_dict()["out.2.bias"], state["buffer.ema.unet.out.2.bias"])
    with safe_open(out / "model.safetensors", "pt") as file:
        assert json.loads(file.metadata()["image_condition"])["width"] == 48
    assert main(image_args(f, tmp_path / "same", "--max-steps", "1", "--save-every", "1", encoder="enc64")) == 0
    assert not any(k.startswith("image_proj.") for k in load_file(tmp_path / "same" / "model.safetensors"))
    sd = minisd.load(tmp_path / "same" / "model.safetensors", config=str(f["config"]), encoder=str(f["enc64"]))
    assert sd.image.proj is None


def held_out_loss(sd, images, seed: int, draws: int = 32) -> float:
    """Mean denoising loss over `draws` (t, noise) pairs per held-out image, conditioned on its own tokens, from a
    generator no training step uses."""
    g, total = torch.Generator().manual_seed(seed), 0.0
    with torch.no_grad():
        latents = sd.vae.encode(images)[0] * sd.scale_factor
        for latent, context in zip(latents, sd.image(to_uint8(images)), strict=True):
            t = torch.randint(0, 1000, (draws,), generator=g)
            noise = torch.randn((draws, *latent.shape), generator=g)
            total += diffusion_loss(sd, context.expand(draws, *context.shape), latent.expand(draws, *latent.shape),
                                    noise, t).item()
    return total / len(latents)


def test_image_conditioned_training_lowers_held_out_loss(files, tmp_path):
    """300 steps at lr 1e-4: the held-out loss of the trained model vs its start (the base model, the same encoder
    and the projection's start from the same seed), paired on three draw sets; bar 5 %."""
    f, out = files, tmp_path / "run"
    assert main(image_args(f, out, "--max-steps", "300", "--save-every", "300", "--lr", "1e-4", "--batch", "2")) == 0
    base = minisd.load(f["model"], config=f["config"])
    attach(base, str(f["enc48"]), load_encoder(f["enc48"]), 0)
    tuned = minisd.load(out / "model.safetensors", config=str(f["config"]), encoder=str(f["enc48"]))
    images = load_dataset(f["held"], 64).images
    gains = [1 - held_out_loss(tuned, images, seed) / held_out_loss(base, images, seed) for seed in (1, 2, 3)]
    print("held-out loss improvements:", [f"{100 * g:.2f} %" for g in gains])
    assert min(gains) > 0.05, gains


def test_killed_and_resumed_run_is_bit_identical(files, tmp_path):
    args = image_args(files, tmp_path / "unused", "--max-steps", "9", "--save-every", "3", "--ema", "0.9", "--flip",
                      "--latents", "random", "--condition-dropout", "0.5", "--val-fraction", "0.34")
    args = args[:args.index("--out")] + args[args.index("--out") + 2:]
    kill_and_resume(args, tmp_path / "whole", tmp_path / "killed", 4)
    for name in ("model.safetensors", "state.safetensors", "model-best.safetensors"):
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_resume_refuses_another_encoder_or_dropout(files, tmp_path, capsys):
    """A flag typed again with another value is refused by the recorded command; an encoder folder whose weights
    changed under the same name, by the run's settings (the encoder's sha256)."""
    encoder_release(tmp_path / "enc", width=48)
    out, args = tmp_path / "run", image_args(files, tmp_path / "run", "--max-steps", "1", "--save-every", "1")
    assert main([str(tmp_path / "enc") if a == str(files["enc48"]) else a for a in args]) == 0
    encoder_release(tmp_path / "enc", width=48, layers=1)   # another network under the same folder name
    for extra, words in ((["--encoder", str(files["enc48"])], "--encoder"),
                         (["--condition-dropout", "0.2"], "--condition-dropout"), ([], "the weights of --encoder")):
        capsys.readouterr()
        assert main(["--resume", "--out", str(out), "--max-steps", "2", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "--resume" in err and words in err, err


@pytest.mark.parametrize("extra, words", [
    (["--encoder", ""], "--condition dinov2: give --encoder"),
    (["--encoder", "model"], "--encoder model: neither a folder of a DINO release"),
    (["--encoder", "{clip}"], 'clip/config.json: model_type "clip_vision_model": another network'),
    (["--encoder", "{model}"], "model: no config.json"),
    (["--condition-dropout", "1.5"], "--condition-dropout 1.5: a probability in [0, 1]"),
    (["--condition-dropout", "nan"], "--condition-dropout nan"),
    (["--condition", "clip"], "--condition 'clip': dinov2"),
    (["--token", "<t>"], "--token with --condition dinov2: an image-conditioned run has no prompt"),
    (["--instance-prompt", "a scan"], "--instance-prompt with --condition dinov2"),
    (["--captions"], "--captions with --condition dinov2"),
    (["--template", "t.txt"], "--template with --condition dinov2"),
    (["--class-prompt", "a scan"], "--class-prompt with --condition dinov2"),
    (["--train-text"], "--train-text with --condition dinov2"),
    (["--method", "ti"], "--condition dinov2 trains the UNet on image tokens: use --method unet, not ti"),
    (["--method", "lora"], "use --method unet, not lora"),
])
def test_bad_image_flags_are_one_line(files, tmp_path, capsys, extra, words):
    args = image_args(files, tmp_path / "run")
    i = args.index(extra[0]) if extra[0] in args else len(args)
    named = {"{clip}": files["tmp"] / "clip", "{model}": files["model"].parent}   # the SD model's folder: no DINO's
    value = [str(named.get(v, v)) for v in extra[1:]]
    args = args[:i] + [extra[0], *value] + args[i + 1 + (i < len(args)):]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and words in err, err
    assert not (tmp_path / "run").exists()


def test_encoder_without_condition_is_one_line(files, tmp_path, capsys):
    args = image_args(files, tmp_path / "run", "--instance-prompt", "a scan")
    i = args.index("--condition")
    assert main(args[:i] + args[i + 2:]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--encoder is for an image-conditioned run: add --condition dinov2" in err, err
