"""Generate images with SD2 and learned embeddings: `python -m medti.generate`.

    python -m medti.generate --model sd2-base --embeddings embeddings/ \\
        --prompt "<healthy> :0.25 AND <cardiomegaly> :0.75" --n 4 --seed 0 --out out/

Image i uses its own generator seeded with seed + i, so any image can be remade alone, whatever the batch.
Each PNG carries its parameters in a `parameters` text chunk (the A1111 convention) and gets one line in
DIR/manifest.jsonl. Every user mistake is reported in one line before any sampling starts.
"""
import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

import minisd
from minisd.load import sha256_of
from minisd.sampling import SAMPLERS, SPACINGS, Denoiser, GuidedDenoiser, draw, initial_sigma, step_schedule

from . import embeddings as emb
from .prompts import PromptError, check_length, parse

SAMPLER_NAMES = {"euler_a": "Euler a", "euler": "Euler"}   # as A1111 writes them in `parameters`


class UsageError(ValueError):
    """A user mistake, printed as one line."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m medti.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sd2-base", help="preset name or .safetensors file")
    p.add_argument("--config", help="preset name or JSON config (needed for a file outside the presets)")
    p.add_argument("--embeddings", action="append", default=[], help="embedding files or folders (repeatable)")
    p.add_argument("--prompt", required=True, help='terms joined by AND, each with an optional ":weight"')
    p.add_argument("--negative", default="", help="negative prompt (the unconditional term); empty by default")
    p.add_argument("--n", type=int, default=1, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--cfg", type=float, default=2.0, help="classifier-free guidance scale")
    p.add_argument("--size", type=int, help="square image size in pixels (default: the model's native size)")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default="euler_a")
    p.add_argument("--sigmas", choices=SPACINGS, default="linspace", help="step schedule")
    p.add_argument("--batch", type=int, default=0, help="UNet rows per call (0: all terms of one image at once)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument("--out", required=True, help="output folder")
    return p


def check_args(args) -> tuple[int, int]:
    """Validate what can be checked without the model; returns (width, height) or None for native."""
    for name in ("n", "steps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1")
    if args.batch < 0:
        raise UsageError("--batch must be 0 (all at once) or positive")
    for name in ("size", "width", "height"):
        value = getattr(args, name)
        if value is not None and (value < 64 or value % 64):
            raise UsageError(f"--{name} {value}: must be a multiple of 64 (SD2 latents are 1/8 size, UNet needs /8)")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write there ({e.strerror})") from None
    return args.width or args.size, args.height or args.size


def conditioning(sd, prompt: str, negative: str):
    """Parse the composable prompt and encode every term and the negative prompt once.
    Returns (terms [(text, weight)], conds [K, 77, width], uncond [1, 77, width])."""
    terms = parse(prompt)
    for text in [t for t, _ in terms] + [negative]:
        unknown = [w for w in re.findall(r"<[^<>\s]+>", text) if w not in sd.tokenizer.placeholders]
        if unknown:
            raise UsageError(f"prompt token {unknown[0]} matches no loaded embedding; load it with --embeddings "
                             f"(loaded: {', '.join(sd.tokenizer.placeholders) or 'none'})")
    check_length(terms + [(negative, 1.0)], lambda text: len(sd.tokenizer.encode(text)))
    with torch.no_grad():
        conds = emb.encode(sd, [t for t, _ in terms])
        uncond = emb.encode(sd, [negative])
    return terms, conds, uncond


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] -> 8-bit RGB, rounding as diffusers' numpy_to_pil does."""
    array = ((image.float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def save_png(path: Path, image: Image.Image, parameters: str):
    """Atomic write: a half-written PNG never appears under the final name."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)


def parameters_text(args, seed: int, width: int, height: int, model_hash: str, embeddings: dict) -> str:
    """A1111's `parameters` layout: prompt, "Negative prompt: ...", then "key: value" pairs."""
    pairs = [f"Steps: {args.steps}", f"Sampler: {SAMPLER_NAMES[args.sampler]}", f"Schedule: {args.sigmas}",
             f"CFG scale: {args.cfg}", f"Seed: {seed}", f"Size: {width}x{height}", f"Model hash: {model_hash[:10]}",
             f"Model: {Path(str(args.model)).name}"]
    if embeddings:
        pairs.append("Embeddings: " + ", ".join(sorted(embeddings)))
    return f"{args.prompt}\nNegative prompt: {args.negative}\n" + ", ".join(pairs)


@torch.no_grad()
def sample_image(sd, model, seed: int, width: int, height: int, sigmas, timesteps, sampler, spacing, dtype, device):
    generator = [torch.Generator().manual_seed(seed)]   # CPU generator: the same numbers on any device
    shape = torch.zeros(1, 4, height // 8, width // 8, dtype=dtype, device=device)
    x = draw(generator, shape) * initial_sigma(sigmas, spacing)
    latents = SAMPLERS[sampler](model, x, sigmas, timesteps, generator)
    image = sd.vae.decode(latents / sd.scale_factor)
    if not torch.isfinite(image).all():   # fp16 VAE overflow: redo the decode in fp32
        image = sd.vae.float().decode(latents.float() / sd.scale_factor)
        sd.vae.to(dtype)
    return latents, image[0]


def run(args) -> list[Path]:
    width, height = check_args(args)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(
        args.dtype, torch.float16 if str(args.device).startswith("cuda") else torch.float32)
    loaded = emb.read_all(args.embeddings) if args.embeddings else {}
    sd = minisd.load(args.model, config=args.config, dtype=dtype, device=args.device)
    emb.attach(sd, loaded)
    width, height = width or sd.config.resolution, height or sd.config.resolution
    terms, conds, uncond = conditioning(sd, args.prompt, args.negative)
    model_hash = sha256_of(sd.path)
    sigmas, timesteps = step_schedule(args.steps, args.sigmas)
    model = GuidedDenoiser(Denoiser(sd.unet, sd.prediction), conds, uncond, [w for _, w in terms], args.cfg,
                           args.batch)
    out, written = Path(args.out), []
    start = time.perf_counter()
    for i in range(args.n):
        seed = args.seed + i
        _, image = sample_image(sd, model, seed, width, height, sigmas, timesteps, args.sampler, args.sigmas,
                                dtype, args.device)
        path = out / f"{i:05d}.png"
        save_png(path, to_pil(image), parameters_text(args, seed, width, height, model_hash, loaded))
        record = {"file": path.name, "prompt": args.prompt, "negative": args.negative, "seed": seed,
                  "steps": args.steps, "cfg": args.cfg, "sampler": args.sampler, "sigmas": args.sigmas,
                  "width": width, "height": height, "model": str(args.model), "model_sha256": model_hash,
                  "embeddings": {token: e.source for token, e in loaded.items()}}
        with open(out / "manifest.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        written.append(path)
        elapsed = time.perf_counter() - start
        print(f"[{i + 1}/{args.n}] {path}  ({elapsed / (i + 1):.1f} s/image, "
              f"ETA {elapsed / (i + 1) * (args.n - i - 1):.0f} s)", file=sys.stderr)
    return written


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (UsageError, PromptError, minisd.LoadError, emb.EmbeddingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
