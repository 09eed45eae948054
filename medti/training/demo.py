"""`python -m medti.train --demo`: the whole textual-inversion pipeline, offline, in about two minutes on a CPU.

It builds a tiny model of the SD2 architecture with RANDOM weights (not a real model: its images are noise-like
patterns), makes a small set of phantom images (textured discs on a noisy background), trains a token on them,
writes the embedding, log, loss plot and previews, and measures the denoising loss on held-out phantoms with the
initial and the learned vectors. What it shows: every stage runs end to end and the learned token lowers the loss.
What it cannot show: image quality, which needs the official weights and a GPU (docs/training.md
has the real command).

The demo is a user of the trainer (medti/training/trainer.py), as `python -m medti.train` is; the trainer knows nothing
of it. Everything goes into --out (default demo-run): the run's files at the top, as a real run writes them, and the
demo's inputs in model/, phantoms/ and phantoms-held-out/.
"""
import dataclasses
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import minisd
from minisd.load import state_dict

from ..dataset.folder import load_dataset
from ..files import embedding_file as emb
from ..files.atomic import claim_folder, safetensors_bytes, write_atomic
from .command import resumed_config
from .config import TrainConfig, check_out, check_settings
from .objective import cache_latents, diffusion_loss, initial_vectors
from .trainer import train

# SD2's block structure, shrunk: 2 UNet levels, a 4-level VAE (8x, as SD2), a 3-block 64-wide text tower with the
# full CLIP vocabulary so real prompts tokenize.
TINY = {"unet": {"model_channels": 32, "channel_mult": [1, 2], "attention_resolutions": [1, 2],
                 "num_head_channels": 16, "context_dim": 64},
        "vae": {"ch": 32, "ch_mult": [1, 2, 2, 2]},
        "text": {"width": 64, "layers": 4, "heads": 4},
        "resolution": 64}


def tiny_model(folder: Path, seed: int = 0, sharpen: float = 8.0) -> tuple:
    """Write a random tiny model (file + JSON config) and return their paths.

    Why sharpen: with plain random weights the cross-attention is nearly uniform over the 77 text positions, so
    the prompt barely changes the UNet's output (4th digit of the loss) and there is nothing to learn. Scaling
    the cross-attention keys makes the attention peaked, and scaling its output makes the text's contribution
    count; the model then responds to its prompt as a trained one does."""
    torch.manual_seed(seed)
    sd = minisd.build(minisd.load_config(TINY), device="cpu")
    with torch.no_grad():
        for name, p in sd.unet.named_parameters():
            if "attn2.to_k" in name:
                p.mul_(sharpen)
            if "attn2.to_out" in name:
                p.mul_(sharpen / 2)
    state = {k: v.contiguous() for k, v in state_dict(sd).items()}
    folder.mkdir(parents=True, exist_ok=True)
    # our writer, not safetensors' save_file: the same weights give the same bytes (and sha256) on every run
    write_atomic(folder / "tiny-random.safetensors", safetensors_bytes(state))
    write_atomic(folder / "tiny-random.json", json.dumps(TINY, indent=1).encode())
    return folder / "tiny-random.safetensors", folder / "tiny-random.json"


def phantoms(folder: Path, n: int, seed: int, size: int = 64) -> Path:
    """n gray PNGs: a striped disc of random position and radius on a noisy background."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:size, 0:size]
    for i in range(n):
        (cy, cx), r = rng.uniform(0.35, 0.65, 2) * size, rng.uniform(0.15, 0.3) * size
        disc = (y - cy) ** 2 + (x - cx) ** 2 < r ** 2
        stripes = 0.5 + 0.5 * np.sin((x + y) * 0.9)
        image = 0.25 + 0.08 * rng.standard_normal((size, size)) + disc * (0.35 + 0.35 * stripes)
        Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8), mode="L").save(folder / f"phantom{i:03d}.png")
    return folder


@torch.no_grad()
def heldout_loss(sd, contexts, latents, draws: int = 64, seed: int = 123_456) -> float:
    """Mean denoising loss over fixed (image, t, noise) draws from a generator no training step uses: image i under
    contexts[i], or under the one context when contexts holds one ([1, T, C]: a prompt)."""
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(draws):
        i = int(torch.randint(0, len(latents), (), generator=g))
        t = torch.randint(0, 1000, (1,), generator=g)
        noise = torch.randn(latents[i:i + 1].shape, generator=g)
        context = contexts if len(contexts) == 1 else contexts[i:i + 1]
        total += diffusion_loss(sd, context, latents[i:i + 1], noise, t).item()
    return total / draws


# The settings demo_settings gives one value whatever the user typed (the model, data and sizes of the demo in
# --out), as opposed to those it only caps (--vectors, --max-steps) or fills in when not typed (--token, --val).
DEMO_SETS = ("model", "config", "data", "resolution", "save_every", "preview_every", "out")


def demo_settings(cfg: TrainConfig, out: Path) -> TrainConfig:
    """The user's settings with the demo's model, data and a size that runs in minutes on a CPU. Validation on the
    held-out phantoms, unless the user chose --val or --val-fraction."""
    val = cfg.val or ("" if cfg.val_fraction else str(out / "phantoms-held-out"))
    return dataclasses.replace(cfg, model=str(out / "model" / "tiny-random.safetensors"), val=val,
                               config=str(out / "model" / "tiny-random.json"), data=str(out / "phantoms"),
                               token=cfg.token or "<phantom>", vectors=min(cfg.vectors, 8),
                               max_steps=min(cfg.max_steps, 300), save_every=100, preview_every=100,
                               preview_steps=min(cfg.preview_steps, 20), resolution=64, out=str(out))


def next_command(cfg: TrainConfig, learned: Path) -> str:
    """The generate command to try next, with the demo's model and the embedding it learned."""
    # 20 steps, as the demo's previews: on a random tiny model more steps show nothing more, and take minutes
    words = ["python", "-m", "medti.generate", "--model", cfg.model, "--config", cfg.config, "--embeddings",
             str(learned), "--prompt", cfg.token, "--n", "4", "--steps", str(cfg.preview_steps), "--grid",
             "--out", str(Path(cfg.out) / "generated")]
    return shlex.join(words)


def run_demo(cfg: TrainConfig, typed=(), argv: list | None = None) -> tuple:
    """Make the model and phantoms, train in --out, measure the held-out loss; returns (before, after). `typed`:
    the names of the settings typed on the command line, which --resume takes as typed (the others are the run's,
    from its command.private.json); `argv`: the flags as typed, recorded there."""
    out = Path(cfg.out or "demo-run")
    # what the demo sets itself counts as typed: the same for every run in this --out
    run_cfg = resumed_config(demo_settings(cfg, out), {*typed, *DEMO_SETS})
    plan = check_settings(run_cfg)   # the user's flags first: nothing is written for a mistake in them
    with claim_folder(out):
        check_out(run_cfg)           # a used --out needs --resume, as for any run
        tiny_model(out / "model", run_cfg.seed)   # both deterministic: a resumed demo rewrites the same bytes
        phantoms(out / "phantoms", 24, run_cfg.seed)
        held_out = phantoms(out / "phantoms-held-out", 8, run_cfg.seed + 1)
        print("tiny RANDOM-weight model of the SD2 architecture (not a real model); phantom images in",
              out / "phantoms", file=sys.stderr)
        learned_path = train(run_cfg, plan, argv)

    sd = minisd.load(run_cfg.model, config=run_cfg.config)
    learned = emb.read(learned_path)
    emb.attach(sd, {learned.token: emb.Embedding(learned.token, torch.zeros_like(learned.vectors), {})})
    init = initial_vectors(sd, run_cfg.init, run_cfg.vectors, run_cfg.seed)
    latents = cache_latents(sd, load_dataset(held_out, 64).images, False, 0)["mean"] * sd.scale_factor
    before = heldout_loss(sd, sd.text([learned.token], override={learned.token: init}), latents)
    after = heldout_loss(sd, sd.text([learned.token], override={learned.token: learned.vectors}), latents)
    print(f"held-out denoising loss: initial vectors {before:.4f} -> learned {after:.4f} "
          f"({100 * (after - before) / before:+.1f} %)")
    best = out / f"{learned.token.strip('<>')}-best.safetensors"
    if best.exists():   # validation was on (always, unless the user's --val-fraction left no best yet)
        meta = emb.read(best).meta
        print(f"validation loss at each save: best at step {meta['step']} ({float(meta['val_loss']):.4f}), kept "
              f"as {best}")
    print(f"written: {learned_path}, {out / 'log.jsonl'}, {out / 'loss.png'}, {out}/preview-*.png")
    print(f"next, generate with the demo's model and embedding:\n  {next_command(run_cfg, learned_path)}")
    return before, after
