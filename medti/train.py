"""Textual inversion: learn a token's vectors from a folder of images. `python -m medti.train`.

    python -m medti.train --model sd2-base --data cxr/cardiomegaly --token "<cardiomegaly>" \\
        --preprocess cxr --out runs/cardiomegaly

The frozen UNet and text tower never change; only a [vectors, width] fp32 tensor is trained, spliced into the
token embeddings wherever the token appears in the training prompt (the token alone, or --template lines).
One visible loop below: draw a micro-batch, loss, backward, (skip a non-finite step), optimizer step, log, save,
preview. `python -m medti.train --demo` runs all of it offline on a tiny random model (see medti/demo.py).
"""
import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import minisd
from minisd.load import sha256_of

from . import embeddings as emb
from .data import PREPROCESS, DataError, load_dataset
from .images import contact_sheet, plot_curve, save_png, to_pil
from .inversion import (
    denoising_loss,
    draw_batch,
    enable_checkpointing,
    initial_vectors,
    load_state,
    lr_at,
    parse_lr,
    sample_indices,
    save_state,
    step_generator,
)
from .pipeline import decode, sample


def flag(default, help_text: str):
    return field(default=default, metadata={"help": help_text})


@dataclass
class TrainConfig:
    """Every flag of `python -m medti.train` (the CLI is generated from these fields)."""
    model: str = flag("sd2-base", "preset name or .safetensors file")
    config: str = flag("", "preset name or JSON config, for a file outside the presets")
    data: str = flag("", "folder of training images (searched recursively)")
    token: str = flag("", 'the placeholder to learn, e.g. "<cardiomegaly>"; not an existing word')
    vectors: int = flag(64, "vectors per token (at most 75: they must fit in the 77-token prompt)")
    init: str = flag("*", 'word(s) whose token embeddings start the vectors, or "random"')
    lr: str = flag("0.005", 'constant, or A1111\'s schedule "0.005:1000, 0.001"')
    max_steps: int = flag(50000, "optimizer steps (the study: 50,000; 100,000 for prostate MRI)")
    batch: int = flag(1, "images per micro-batch")
    grad_accum: int = flag(1, "micro-batches per optimizer step")
    resolution: int = flag(0, "training image size; 0: the model's native size")
    preprocess: str = flag("center", "center | cxr | upsample | none")
    channels: str = flag("", 'e.g. "t2w,adc,dwi": stack per-case gray images into RGB')
    latents: str = flag("once", "once (sampled once) | random (resampled every use) | mean")
    flip: bool = flag(False, "random horizontal flips; off: laterality matters in medical images")
    strict: bool = flag(False, "an unreadable or odd training file is an error (default: listed, skipped)")
    template: str = flag("", 'file of prompt templates, one per line, "{}" = the token')
    dtype: str = flag("", "fp16 | bf16 | fp32; default fp16 on CUDA, fp32 on CPU")
    device: str = flag("", "default cuda if available, else cpu")
    seed: int = flag(0, "all randomness derives from it: CPU runs are bit-reproducible")
    save_every: int = flag(500, "steps between saves of the embedding and the resumable state")
    preview_every: int = flag(500, "0: no previews")
    preview_steps: int = flag(100, "sampler steps of the preview images (the study used 100)")
    checkpointing: str = flag("auto", "gradient checkpointing: on | off | auto (on with CUDA, where memory is "
                                      "short; off on the CPU, where it only costs time)")
    resume: bool = flag(False, "continue the run in --out from its last save")
    out: str = flag("", "output folder")
    demo: bool = flag(False, "a self-contained offline run on a tiny random model")


class TrainError(ValueError):
    """A user mistake or a run that cannot go on, in one line."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m medti.train", description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(TrainConfig):
        name, help_text = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if isinstance(f.default, bool):
            p.add_argument(name, action="store_true", help=help_text)
        else:
            p.add_argument(name, type=type(f.default), default=f.default, help=help_text)
    return p


def check(cfg: TrainConfig) -> list:
    """One-line errors for what can be checked before anything is loaded; returns the lr schedule."""
    if not cfg.data or not Path(cfg.data).is_dir():
        raise TrainError(f"--data {cfg.data!r}: not a folder of training images")
    if not cfg.token or any(c in cfg.token for c in "/\\ \t") or not cfg.token.strip("<>"):
        raise TrainError(f"--token {cfg.token!r}: give a placeholder such as \"<cardiomegaly>\" (no spaces or slashes)")
    if not 1 <= cfg.vectors <= 75:
        raise TrainError(f"--vectors {cfg.vectors}: must be 1..75 (the prompt holds 75 tokens between start and end)")
    for name in ("max_steps", "batch", "grad_accum", "save_every", "preview_steps"):
        if getattr(cfg, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.latents not in ("once", "random", "mean") or cfg.preprocess not in PREPROCESS:
        raise TrainError(f"--latents once|random|mean and --preprocess {'|'.join(PREPROCESS)}")
    if cfg.checkpointing not in ("on", "off", "auto"):
        raise TrainError(f"--checkpointing {cfg.checkpointing!r}: on, off or auto")
    if not cfg.out:
        raise TrainError("--out: name an output folder")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "state.safetensors").exists() and not cfg.resume:
        raise TrainError(f"--out {out} holds a run already; pass --resume to continue it or choose another folder")
    if cfg.resume and not (out / "state.safetensors").exists():
        raise TrainError(f"--resume: {out} has no state.safetensors to continue from")
    try:
        return parse_lr(cfg.lr)
    except ValueError as e:
        raise TrainError(str(e)) from None


def training_prompts(cfg: TrainConfig) -> list:
    """The token alone (the study's recipe), or one prompt per --template line with "{}" replaced by the token."""
    if not cfg.template:
        return [cfg.token]
    try:
        lines = [line.strip() for line in Path(cfg.template).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise TrainError(f"--template {cfg.template}: cannot read it ({e})") from None
    bad = next((line for line in lines if "{}" not in line), None)
    if not lines or bad is not None:
        raise TrainError(f"--template {cfg.template}: every line needs a {{}} for the token" +
                         (f" (not {bad!r})" if bad else " (the file is empty)"))
    return [line.replace("{}", cfg.token) for line in lines]


@torch.no_grad()
def cache_latents(sd, images, flip: bool, seed: int) -> dict:
    """Encode every training image once (and its mirror image with --flip): the VAE posterior's mean and
    log-variance, plus one sample drawn now for --latents once. Kept on the CPU in fp32, unscaled."""
    param = next(sd.vae.parameters())
    if flip:
        images = torch.cat([images, images.flip(-1)])   # rows N.. are the mirrored copies
    means, logvars = [], []
    for chunk in images.split(4):
        mean, logvar = sd.vae.encode(chunk.to(param))
        means.append(mean.float().cpu())
        logvars.append(logvar.float().cpu())
    mean, logvar = torch.cat(means), torch.cat(logvars)
    once = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed))
    return {"mean": mean, "logvar": logvar, "once": once}


@torch.no_grad()
def preview(sd, cfg: TrainConfig, vectors, step: int, out: Path, device):
    """Four images of the token alone from fixed seeds, with the study's sampler settings (Euler a, CFG 2)."""
    sd.vae.to(device)   # the VAE visits the device only for previews
    cond = emb.encode(sd, [cfg.token], override={cfg.token: vectors})
    uncond = emb.encode(sd, [""])
    size = cfg.resolution
    latents = sample(sd, cond, uncond, [1.0], range(4), width=size, height=size, cfg=2.0, steps=cfg.preview_steps)
    images = [to_pil(image) for image in decode(sd, latents)]
    sd.vae.to("cpu")
    save_png(out / f"preview-{step:06d}.png", contact_sheet(images, 4), f"{cfg.token} (training step {step})")


def save(sd, cfg: TrainConfig, vectors, optimizer, scaler, step: int, meta: dict, out: Path, settings: dict):
    """Embedding (atomic; also a copy per step), resumable state and the loss plot. Never a NaN: non-finite
    steps are skipped before they reach the vectors, and this is checked once more here."""
    if not torch.isfinite(vectors).all():
        raise TrainError(f"step {step}: the vectors are not finite; nothing was saved over the last good file")
    name = cfg.token.strip("<>")
    learned = emb.Embedding(cfg.token, vectors.detach().float().cpu().clone(), {**meta, "step": str(step)})
    emb.write(out / f"{name}.safetensors", learned)
    emb.write(out / f"{name}-{step}.safetensors", learned)
    save_state(out / "state.safetensors", vectors, optimizer, scaler.state_dict(), step, settings)
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    plot_curve(losses, out / "loss.png", f"{cfg.token}: training loss (moving average) over {step} steps")


def run(cfg: TrainConfig) -> Path:
    """Train; returns the path of the learned embedding."""
    schedule = check(cfg)
    out = Path(cfg.out)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(
        cfg.dtype, torch.float16 if device.type == "cuda" else torch.float32)
    prompts = training_prompts(cfg)
    sd = minisd.load(cfg.model, config=cfg.config or None, dtype=dtype, device=device)
    cfg = dataclasses.replace(cfg, resolution=cfg.resolution or sd.config.resolution)
    if cfg.resolution % sd.config.size_multiple:
        raise TrainError(f"--resolution {cfg.resolution}: must be a multiple of {sd.config.size_multiple}")

    # data -> cached latents; the VAE then leaves the device
    try:
        data = load_dataset(cfg.data, cfg.resolution, cfg.preprocess,
                            [c.strip() for c in cfg.channels.split(",")] if cfg.channels else None, cfg.strict)
    except DataError as e:
        raise TrainError(str(e)) from None
    if data.skipped:
        print(f"warning: skipped {len(data.skipped)} file(s): " +
              "; ".join(f"{name} ({why})" for name, why in data.skipped), file=sys.stderr)
    cache = cache_latents(sd, data.images, cfg.flip, cfg.seed)
    sd.vae.to("cpu")

    # the one trainable tensor, spliced in wherever the token appears
    start_vectors = initial_vectors(sd, cfg.init, cfg.vectors, cfg.seed)
    try:
        emb.attach(sd, {cfg.token: emb.Embedding(cfg.token, start_vectors, {})})
    except emb.EmbeddingError as e:
        raise TrainError(f"--token {cfg.token}: {str(e).split(': ', 1)[-1]}") from None
    longest = max(len(sd.tokenizer.encode(p)) for p in prompts)
    if longest > 75:
        raise TrainError(f"a training prompt holds {longest} tokens with {cfg.vectors} vectors; at most 75 fit")
    vectors = torch.nn.Parameter(start_vectors.to(device))
    optimizer = torch.optim.AdamW([vectors], lr=lr_at(schedule, 0), weight_decay=0.0)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    # Checkpointing recomputes each block's activations in the backward pass: same gradients, ~1/3 more UNet
    # work (tools/benchmark.py section 3), far less activation memory (tools/memory_estimate.py).
    if cfg.checkpointing == "on" or (cfg.checkpointing == "auto" and device.type == "cuda"):
        enable_checkpointing(sd)
    # What a resumed run must share. Left out: data (its identity is its fingerprint, not where it lies) and
    # checkpointing (it changes memory and time, not results).
    settings = {k: v for k, v in dataclasses.asdict(cfg).items()
                if k not in ("max_steps", "save_every", "preview_every", "preview_steps", "resume", "device", "out",
                             "data", "checkpointing")}
    settings["data_fingerprint"] = data.fingerprint
    meta = {"token": cfg.token, "vectors": str(cfg.vectors), "base_model": str(sd.preset or cfg.model),
            "base_sha256": sha256_of(sd.path), "init": cfg.init, "lr": cfg.lr, "data_sha256": data.fingerprint}
    step = 0
    if cfg.resume:
        step, scaler_state, before = load_state(out / "state.safetensors", vectors, optimizer)
        if before != settings:
            changed = sorted(k for k in settings.keys() | before.keys() if before.get(k) != settings.get(k))
            raise TrainError(f"--resume: {out} was trained with other settings ({', '.join(changed)})")
        if scaler_state:   # empty unless training in fp16
            scaler.load_state_dict(scaler_state)
        lines = (out / "log.jsonl").read_text().splitlines()   # drop log lines after the last save
        (out / "log.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= step))
    else:
        (out / "log.jsonl").write_text("")

    # the loop
    skipped_in_a_row, skipped, began, first = 0, 0, time.perf_counter(), step
    while step < cfg.max_steps:
        lr = lr_at(schedule, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            picks = sample_indices(cfg.seed, (step * cfg.grad_accum + micro) * cfg.batch, cfg.batch, len(data.images))
            latents, noise, t, texts = draw_batch(cache, step_generator(cfg.seed, step, micro), picks, cfg.latents,
                                                  cfg.flip, prompts)
            loss = denoising_loss(sd, cfg.token, vectors, texts, (latents * sd.scale_factor).to(device),
                                  noise.to(device), t.to(device)) / cfg.grad_accum
            scaler.scale(loss).backward()
            loss_sum += loss.item()
        scaler.unscale_(optimizer)
        grad_norm = vectors.grad.norm().item()
        finite = torch.isfinite(torch.tensor([loss_sum, grad_norm])).all()
        if finite:
            scaler.step(optimizer)
            skipped_in_a_row = 0
        else:   # skip: the vectors stay as they were (with fp16 the scaler also lowers its scale)
            skipped_in_a_row, skipped = skipped_in_a_row + 1, skipped + 1
            print(f"warning: step {step}: non-finite loss or gradient, step skipped", file=sys.stderr)
            if skipped_in_a_row == 10:
                raise TrainError(f"10 steps in a row had a non-finite loss or gradient (last: step {step}); try a "
                                 "lower --lr, --dtype fp32 or bf16, or a model with fp32 attention (upcast)")
        scaler.update()
        step += 1
        rate = (step - first) / (time.perf_counter() - began)
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm,
                                "vector_norm": vectors.detach().norm(dim=1).mean().item(), "it_s": round(rate, 3),
                                "skipped": not finite}) + "\n")
        if step % max(1, cfg.max_steps // 100) == 0 or step == cfg.max_steps:
            print(f"step {step}/{cfg.max_steps}  loss {loss_sum:.4f}  lr {lr:g}  {rate:.2f} it/s  "
                  f"ETA {(cfg.max_steps - step) / rate / 60:.1f} min", file=sys.stderr)
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            save(sd, cfg, vectors, optimizer, scaler, step, meta, out, settings)
        if cfg.preview_every and step % cfg.preview_every == 0:
            preview(sd, cfg, vectors.detach(), step, out, device)
    print(f"done: {step} steps ({skipped} skipped as non-finite in this session)", file=sys.stderr)
    return out / f"{cfg.token.strip('<>')}.safetensors"


def main(argv=None) -> int:
    cfg = TrainConfig(**vars(build_parser().parse_args(argv)))
    try:
        if cfg.demo:
            from .demo import run_demo
            run_demo(cfg)
        else:
            print(run(cfg))
    except (TrainError, minisd.LoadError, emb.EmbeddingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
