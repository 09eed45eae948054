"""Generate images with SD2 and learned embeddings: `python -m medti.generate`.

    python -m medti.generate --model sd2-base --embeddings embeddings/ \\
        --prompt "chexpert_healthy :0.25 AND chexpert_cardiomegaly :0.75" --n 4 --seed 0 --out out/

Image i uses its own generator seeded with seed + i, so any image can be remade alone, whatever the batch or the
number of processes. Each PNG carries its parameters in a `parameters` text chunk (the A1111 convention) and one
line in DIR/manifest.jsonl. Every user mistake is reported in one line before any sampling starts.

Sharding: under `torchrun --nproc_per_node N -m medti.generate -- ...` (the `--` keeps torchrun from reading
`--n` as an abbreviation of its own options; it drops the `--`), or any launcher that sets RANK and
WORLD_SIZE) rank r makes the images i with i % N == r and logs them to its own DIR/manifest.part<r>.jsonl; whichever
process finishes last (or a later `--resume`) merges the parts into manifest.jsonl. No process group is needed.
"""
import argparse
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import minisd
from minisd.packing import can_pack, pack_convs
from minisd.sampling import SAMPLERS, UNSUPPORTED
from minisd.schedule import SPACINGS

from . import embeddings as emb
from .files import safetensors_bytes, write_atomic
from .hashes import sha256_of
from .images import ImageError, contact_sheet, load_image, load_mask, save_png, to_pil
from .pipeline import InitImage, SampleSettings, compile_for_inference, decode, sample
from .prompts import PromptError, check_length, parse

# every spacing some sampler offers, in a stable order for --help
ALL_SPACINGS = list(dict.fromkeys(name for names in SPACINGS.values() for name in names))
# A1111's "Schedule type" for our spacings where it has the same one: Karras, and "Uniform" = k-diffusion's
# DiscreteSchedule (our "kdiffusion"). diffusers' linspace/leading/trailing have no A1111 name.
A1111_SCHEDULES = {"karras": "Karras", "kdiffusion": "Uniform"}


class UsageError(ValueError):
    """A user mistake, printed as one line."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m medti.generate", description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--model", default="sd2-base", help="preset name or .safetensors file")
    add("--config", help="preset name or JSON config (needed for a file outside the presets)")
    add("--embeddings", action="append", default=[], help="embedding files or folders (repeatable)")
    add("--prompt", help='terms joined by AND, each with an optional ":weight" (":0.3", ":30%%", ":-1")')
    add("--negative", default="", help="negative prompt (the unconditional term); empty by default")
    add("--sweep", nargs=2, metavar=("A", "B"), help='interpolation grid "A :1-w AND B :w", one column per weight')
    add("--weights", default="0,0.25,0.5,0.75,1", help="--sweep weights w, comma-separated")
    add("--n", type=int, default=1, help="number of images (with --sweep: rows, one seed each)")
    add("--seed", type=int, default=0, help="image i uses seed + i")
    add("--steps", type=int, default=100)
    add("--cfg", type=float, default=2.0, help="classifier-free guidance scale")
    add("--size", type=int, help="square image size in pixels (default: the model's native size)")
    add("--width", type=int)
    add("--height", type=int)
    add("--sampler", choices=list(SAMPLERS), default="euler_a",
        help="euler_a (the study's), euler, dpmpp_2m (DPM++ 2M; with --sigmas karras A1111's DPM++ 2M Karras, "
             "good at 20-30 steps), ddim (eta 0)")
    add("--sigmas", choices=ALL_SPACINGS, default="linspace",
        help="step schedule: diffusers' linspace|leading|trailing for the sampler's scheduler, kdiffusion "
             "(A1111's default), karras (euler, dpmpp_2m)")
    add("--batch", type=int, default=0, help="UNet rows per call; 0: one image (all its terms) per call")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--dtype", choices=["fp32", "fp16", "bf16"], help="default fp16 on CUDA, fp32 on CPU")
    add("--compile", action="store_true",
        help="torch.compile the UNet and VAE decoder first (minutes per network and batch shape on a CPU; "
             "see the README's Benchmark for whether it pays on yours)")
    add("--no-pack", action="store_true",
        help="on the CPU, run plain nn.Conv2d; by default each conv weight is laid out for oneDNN once "
             "(minisd.packing: faster, same results, a second copy of the conv weights in memory)")
    add("--init-image", help="start from this image (img2img; with --mask: inpainting)")
    add("--mask", help="white = repaint; any size and mode, resized to the image")
    add("--mask-blur", type=float, default=0, help="Gaussian blur radius in pixels before binarising the mask")
    add("--strength", type=float, default=1.0, help="1: start from pure noise; < 1: keep that much of the init")
    add("--save-latents", action="store_true", help="also write each final latent as NNNNN.safetensors")
    add("--grid", action="store_true", help="also write grid.png, a contact sheet of all images")
    add("--resume", action="store_true", help="continue a run in --out, skipping images its manifest holds")
    add("--out", required=True, help="output folder")
    return p


def check_args(args):
    """Everything that can be checked before the model is loaded."""
    if (args.prompt is None) == (args.sweep is None):
        raise UsageError("give either --prompt or --sweep A B")
    for name in ("n", "steps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1")
    if args.batch < 0 or args.mask_blur < 0:
        raise UsageError("--batch and --mask-blur must not be negative")
    if not 0 < args.strength <= 1:
        raise UsageError(f"--strength {args.strength}: must be in (0, 1]")
    family = SAMPLERS[args.sampler].family
    if args.sigmas not in SPACINGS[family] or (args.sampler, args.sigmas) in UNSUPPORTED:
        offered = [name for name in SPACINGS[family] if (args.sampler, name) not in UNSUPPORTED]
        raise UsageError(f"--sigmas {args.sigmas} is not offered with --sampler {args.sampler}; "
                         f"use one of {', '.join(offered)}")
    if (args.mask or args.strength < 1) and not args.init_image:
        raise UsageError("--mask and --strength < 1 need --init-image")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write there ({e.strerror})") from None
    if not args.resume and (list(out.glob("manifest*.jsonl")) or list(out.glob("[0-9]*.png"))):
        raise UsageError(f"--out {out} already holds a run; pass --resume to continue it or choose another folder")


@dataclass
class Job:
    index: int
    seed: int
    prompt: str
    weights: list

    @property
    def file(self) -> str:
        return f"{self.index:05d}.png"


def plan(args) -> tuple[list, list]:
    """(term texts, jobs). --sweep A B: row r (seed + r) has one image per weight w, prompt "A :1-w AND B :w"."""
    if args.sweep is None:
        terms = parse(args.prompt)
        weights = [w for _, w in terms]
        return [t for t, _ in terms], [Job(i, args.seed + i, args.prompt, weights) for i in range(args.n)]
    a, b = args.sweep
    if any(re.search(r"\bAND\b", text) for text in (a, b)):
        raise UsageError("--sweep takes two single terms (no AND); their weights come from --weights")
    try:
        ws = [float(w) for w in args.weights.split(",")]
    except ValueError:
        raise UsageError(f"--weights {args.weights!r}: expected numbers separated by commas") from None
    jobs = [Job(r * len(ws) + c, args.seed + r, f"{a} :{1 - w:g} AND {b} :{w:g}", [1 - w, w])
            for r in range(args.n) for c, w in enumerate(ws)]
    return [a, b], jobs


def conditioning(sd, texts: list, negative: str):
    """Encode the term texts and the negative prompt once: ([K, 77, width], [1, 77, width])."""
    for text in texts + [negative]:
        unknown = [w for w in re.findall(r"<[^<>\s]+>", text) if w not in sd.tokenizer.placeholders]
        if unknown:
            raise UsageError(f"prompt token {unknown[0]} matches no loaded embedding; load it with --embeddings "
                             f"(loaded: {', '.join(sd.tokenizer.placeholders) or 'none'})")
    check_length([(t, 1.0) for t in texts + [negative]], lambda text: len(sd.tokenizer.encode(text)))
    with torch.no_grad():
        return emb.encode(sd, texts), emb.encode(sd, [negative])


def record(args, job: Job, width: int, height: int, model_hash: str, loaded: dict) -> dict:
    """One manifest line. Deterministic (no times), so a resumed run can check it continues the same run."""
    return {"file": job.file, "prompt": job.prompt, "negative": args.negative, "seed": job.seed,
            "steps": args.steps, "cfg": args.cfg, "sampler": args.sampler, "sigmas": args.sigmas,
            "width": width, "height": height, "model": str(args.model), "model_sha256": model_hash,
            "embeddings": {token: sha256_of(e.source) if e.source else "" for token, e in sorted(loaded.items())},
            "init_image": args.init_image, "mask": args.mask, "mask_blur": args.mask_blur, "strength": args.strength}


def parameters_text(rec: dict) -> str:
    """A1111's `parameters` layout: prompt, "Negative prompt: ...", then "key: value" pairs."""
    schedule = A1111_SCHEDULES.get(rec["sigmas"])
    pairs = [f"Steps: {rec['steps']}", f"Sampler: {SAMPLERS[rec['sampler']].a1111}",
             *([f"Schedule type: {schedule}"] if schedule else []), f"Sigmas: {rec['sigmas']}",
             f"CFG scale: {rec['cfg']}", f"Seed: {rec['seed']}", f"Size: {rec['width']}x{rec['height']}",
             f"Model hash: {rec['model_sha256'][:10]}", f"Model: {Path(rec['model']).name}"]
    if rec["embeddings"]:
        pairs.append("Embeddings: " + ", ".join(rec["embeddings"]))
    if rec["init_image"]:
        pairs.append(f"Denoising strength: {rec['strength']}")
    return f"{rec['prompt']}\nNegative prompt: {rec['negative']}\n" + ", ".join(pairs)


def batches(jobs: list, per_call: int) -> list:
    """Consecutive jobs with the same term weights, at most per_call per UNet batch."""
    groups = []
    for job in jobs:
        if groups and len(groups[-1]) < per_call and groups[-1][0].weights == job.weights:
            groups[-1].append(job)
        else:
            groups.append([job])
    return groups


def read_records(out: Path) -> dict:
    """file -> record, from the merged manifest and any per-rank parts (of this run or of one that died)."""
    records = {}
    for path in [out / "manifest.jsonl", *sorted(out.glob("manifest.part*.jsonl"))]:
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    if (out / rec["file"]).is_file():
                        records[rec["file"]] = rec
    return records


def merge(out: Path, planned: dict, grid_columns: int | None) -> bool:
    """If every planned image is done, write manifest.jsonl (sorted, atomically), drop the parts, make the grid."""
    records = read_records(out)
    if not set(planned) <= set(records):
        return False
    tmp = out / f".manifest.{os.getpid()}.tmp"
    tmp.write_text("".join(json.dumps(records[f]) + "\n" for f in sorted(planned)))
    os.replace(tmp, out / "manifest.jsonl")
    for part in out.glob("manifest.part*.jsonl"):
        part.unlink(missing_ok=True)
    if grid_columns is not None:
        save_png(out / "grid.png", contact_sheet([out / f for f in sorted(planned)], grid_columns))
    return True


def run(args):
    check_args(args)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = args.device
    if device == "cuda" and world > 1:
        device = f"cuda:{os.environ.get('LOCAL_RANK', rank)}"
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(
        args.dtype, torch.float16 if str(device).startswith("cuda") else torch.float32)
    texts, jobs = plan(args)
    loaded = emb.read_all(args.embeddings) if args.embeddings else {}
    sd = minisd.load(args.model, config=args.config, dtype=dtype, device=device)
    emb.attach(sd, loaded)
    if args.compile:
        compile_for_inference(sd)   # inductor's freezing packs the conv weights itself
    elif not args.no_pack and can_pack(sd.unet):
        pack_convs(sd.unet), pack_convs(sd.vae)
    width = args.width or args.size or sd.config.resolution
    height = args.height or args.size or sd.config.resolution
    for name, value in (("width", width), ("height", height)):
        if value < sd.config.size_multiple or value % sd.config.size_multiple:
            flag = name if getattr(args, name) else "size" if args.size else "config's resolution"
            raise UsageError(f"--{flag} {value}: must be a multiple of {sd.config.size_multiple} for this model")
    init = load_image(args.init_image, width, height) if args.init_image else None
    mask = load_mask(args.mask, width, height, args.mask_blur) if args.mask else None
    if sd.config.inpainting and mask is None:
        raise UsageError("the inpainting model (9 input channels) needs --init-image and --mask")
    conds, uncond = conditioning(sd, texts, args.negative)
    settings = SampleSettings(width=width, height=height, steps=args.steps, cfg=args.cfg, sampler=args.sampler,
                              sigmas=args.sigmas, batch=args.batch)
    init_image = InitImage(init, mask, args.strength) if init is not None else None
    model_hash = sha256_of(sd.path)
    out = Path(args.out)
    planned = {job.file: record(args, job, width, height, model_hash, loaded) for job in jobs}
    done = read_records(out)
    changed = [f for f in done if f in planned and done[f] != planned[f]]
    if changed:
        raise UsageError(f"--out {out}: {changed[0]} was made with other parameters; --resume continues the same run")
    todo = [job for job in jobs if job.index % world == rank and job.file not in done]
    per_call = max(1, args.batch // (len(texts) + 1)) if args.batch else 1
    start, part, finished = time.perf_counter(), out / f"manifest.part{rank}.jsonl", 0
    for group in batches(todo, per_call):
        latents = sample(sd, conds, uncond, group[0].weights, [job.seed for job in group], settings, init_image)
        for job, latent, image in zip(group, latents, decode(sd, latents), strict=True):
            rec = planned[job.file]
            if args.save_latents:   # scaled latent, as the sampler ends; divide by scale_factor to decode
                write_atomic(out / f"{job.index:05d}.safetensors", safetensors_bytes(
                    {"latent": latent.float()}, {"scale_factor": sd.scale_factor, "file": job.file}))
            save_png(out / job.file, to_pil(image), parameters_text(rec))
            with open(part, "a") as f:
                f.write(json.dumps(rec) + "\n")
        finished += len(group)
        rate = (time.perf_counter() - start) / finished
        print(f"[rank {rank}] {finished}/{len(todo)} images, {rate:.1f} s/image, "
              f"ETA {rate * (len(todo) - finished):.0f} s", file=sys.stderr)
    columns = len(jobs) // args.n if args.sweep else 0
    merge(out, planned, columns if args.grid else None)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (UsageError, PromptError, ImageError, minisd.LoadError, emb.EmbeddingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
