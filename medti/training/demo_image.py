"""`python -m medti.train --demo --condition dinov2`: DiNO-Diffusion's pipeline, offline, in a few minutes on a CPU.

As the textual-inversion demo (medti/training/demo.py), whose tiny random model and phantoms it reuses, plus a tiny
RANDOM DINOv2-with-registers encoder written as a transformers release folder (config.json,
preprocessor_config.json, model.safetensors): the UNet is trained on each phantom's own global tokens, with the
projection the width difference needs (48 into 64, as ViT-B's 768 into SD2's 1024). It ends by measuring the
denoising loss on held-out phantoms, each conditioned on its own tokens, with the starting and the trained model,
and prints the commands to try next: variations of a held-out phantom, and the audit of those variations against
the training phantoms. What it shows: every stage runs end to end and the model learns to use the condition. What
it cannot show: image quality, or what a real DINO encoder's tokens carry (both need the official weights).
"""
import dataclasses
import json
import shlex
import sys
from pathlib import Path

import torch

import minisd
from minisd.dino import DINOv2Reg, DINOv2RegConfig
from minisd.dino_load import load_encoder
from minisd.dino_prepare import IMAGENET_MEAN, IMAGENET_STD
from minisd.image_conditioning import attach

from ..dataset.folder import load_dataset
from ..files.atomic import claim_folder, safetensors_bytes, write_atomic
from .command import resumed_config
from .config import TrainConfig, check_out, check_settings
from .demo import DEMO_SETS, heldout_loss, phantoms, tiny_model
from .objective import cache_latents, to_uint8
from .trainer import train

# DINOv2 with 4 registers, shrunk: 48 wide (not the tiny UNet's 64, so the projection trains as it does for SD2),
# 2 layers, 56 px input (4 x 4 patches of 14); its images prepared as the facebook/dinov2-with-registers-* releases
# state it (BitImageProcessor: shortest edge, centre crop, bicubic, ImageNet mean and std).
ENCODER = DINOv2RegConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=56)
PROCESSOR = {"image_processor_type": "BitImageProcessor", "size": {"shortest_edge": 64},
             "crop_size": {"height": 56, "width": 56}, "do_center_crop": True, "resample": 3,
             "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)}
# The settings the image demo gives one value whatever the user typed, beyond the text demo's
IMAGE_SETS = ("method", "condition", "encoder")


def tiny_encoder(folder: Path, seed: int) -> Path:
    """Write a random tiny DINOv2-with-registers release folder and return it. Weights ~ N(0, 0.2^2), layer norms
    at their identity start: random, yet each phantom gets tokens of its own (the default init leaves the class
    and register tokens all zero, the same for every image)."""
    torch.manual_seed(seed)
    model = DINOv2Reg(ENCODER)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name and name.endswith("weight") else torch.randn_like(p) * 0.2)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "dinov2_with_registers", **dataclasses.asdict(ENCODER)}
    write_atomic(folder / "config.json", json.dumps(config, indent=1).encode())
    write_atomic(folder / "preprocessor_config.json", json.dumps(PROCESSOR, indent=1).encode())
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    write_atomic(folder / "model.safetensors", safetensors_bytes(state))   # the same bytes on every run
    return folder


def image_settings(cfg: TrainConfig, out: Path) -> TrainConfig:
    """The user's settings with the demo's model, encoder, data and sizes. lr: 1e-4 unless typed (the U-Net
    fine-tune's 1e-5 moves a tiny random model too little in 300 steps to show)."""
    val = cfg.val or ("" if cfg.val_fraction else str(out / "phantoms-held-out"))
    return dataclasses.replace(cfg, model=str(out / "model" / "tiny-random.safetensors"), val=val,
                               config=str(out / "model" / "tiny-random.json"), data=str(out / "phantoms"),
                               method="unet", condition="dinov2", encoder=str(out / "encoder"), lr=cfg.lr or "1e-4",
                               max_steps=min(cfg.max_steps, 300), save_every=100, preview_every=100,
                               preview_steps=min(cfg.preview_steps, 20), resolution=64, out=str(out))


def measure(cfg: TrainConfig, trained: Path, held_out: Path) -> tuple:
    """The held-out loss of the starting model and of the trained one, each phantom under its own tokens, and of the
    trained one under the next phantom's tokens: the gap between the last two is what the condition tells it."""
    images = load_dataset(held_out, 64).images
    start = minisd.load(cfg.model, config=cfg.config)
    attach(start, cfg.encoder, load_encoder(cfg.encoder), cfg.seed)   # the projection as training began
    latents = cache_latents(start, images, False, 0)["mean"] * start.scale_factor
    sd = minisd.load(trained, config=cfg.config, encoder=cfg.encoder)
    own = sd.image(to_uint8(images))
    return (heldout_loss(start, start.image(to_uint8(images)), latents), heldout_loss(sd, own, latents),
            heldout_loss(sd, own.roll(1, 0), latents))


def next_commands(cfg: TrainConfig, out: Path) -> list:
    """Variations of the first held-out phantom with the trained model, then their audit against the training
    phantoms (the held-out source found with --sources)."""
    source = out / "phantoms-held-out" / "phantom000.png"
    generate = ["python", "-m", "medti.generate", "--model", str(out / "model.safetensors"), "--config", cfg.config,
                "--encoder", cfg.encoder, "--condition-image", str(source), "--n", "4", "--steps",
                str(cfg.preview_steps), "--grid", "--out", str(out / "variations")]
    audit = ["python", "-m", "medti.audit", "--train", cfg.data, "--synthetic", str(out / "variations"), "--sources",
             str(out / "phantoms-held-out"), "--out", str(out / "audit")]
    return [shlex.join(generate), shlex.join(audit)]


def run_image_demo(cfg: TrainConfig, typed=(), argv: list | None = None) -> tuple:
    """Make the model, encoder and phantoms, train in --out, measure the held-out loss; returns (starting model,
    trained, trained under another phantom's tokens)."""
    out = Path(cfg.out or "demo-dino")
    run_cfg = resumed_config(image_settings(cfg, out), {*typed, *DEMO_SETS, *IMAGE_SETS})
    # The user's flags first: nothing is written for a mistake in them. The encoder folder is written only after
    # that, so a release name stands in for it here (check_condition accepts a known name without reading anything).
    plan = check_settings(dataclasses.replace(run_cfg, encoder="facebook/dinov2-with-registers-small"))
    with claim_folder(out):
        check_out(run_cfg)
        tiny_model(out / "model", run_cfg.seed)   # all deterministic: a resumed demo rewrites the same bytes
        tiny_encoder(out / "encoder", run_cfg.seed)
        phantoms(out / "phantoms", 24, run_cfg.seed)
        held_out = phantoms(out / "phantoms-held-out", 8, run_cfg.seed + 1)
        print("tiny RANDOM-weight model of the SD2 architecture and RANDOM DINOv2-with-registers encoder (not real "
              "models); phantom images in", out / "phantoms", file=sys.stderr)
        trained = train(run_cfg, plan, argv)
    before, after, other = measure(run_cfg, trained, held_out)
    print(f"held-out denoising loss, each phantom under its own tokens: starting model {before:.4f} -> trained "
          f"{after:.4f} ({100 * (after - before) / before:+.1f} %); trained, under another phantom's tokens: "
          f"{other:.4f}")
    print(f"written: {trained}, {out / 'log.jsonl'}, {out / 'loss.png'}, {out}/preview-*.png")
    print("next, variations of a held-out phantom, then their audit:\n  " + "\n  ".join(next_commands(run_cfg, out)))
    return before, after, other
