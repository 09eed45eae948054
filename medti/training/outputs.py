"""What a training run writes, for medti/training/trainer.py's loop: a log line per step (log.jsonl) and the progress
line, the method's file at each save (with its best-by-validation copy, the resumable state and the loss plot),
and the preview images. `s` is the trainer's Session. Under torchrun only rank 0 writes (medti.training.distributed):
the others hold the same tensors."""
import math
import sys

import torch

from ..files.images import contact_sheet, save_png, to_pil
from ..files.plots import plot_curve
from ..generation.pipeline import SampleSettings, decode, sample
from . import TrainError
from .distributed import main_process
from .optim import precision
from .state import log_line, read_log, save_state
from .validation import keep_best


def report(s, record: dict):
    """Append the step's record to log.jsonl (a line per step: a crash loses at most the line being written) and
    print progress about 100 times per run."""
    if not main_process():
        return
    with open(s.out / "log.jsonl", "a") as f:
        f.write(log_line(record))
    step, total, rate = record["step"], s.cfg.max_steps, record["it_s"]
    if step % max(1, total // 100) == 0 or step == total:
        eta = (total - step) / rate / 60 if rate else math.inf   # it_s is rounded: 0 for a step over 30 min
        print(f"step {step}/{total}  loss {record['loss']:.4f}  lr {record['lr']:g}  {rate:.2f} it/s  "
              f"ETA {eta:.1f} min", file=sys.stderr)


def save(s, step: int, val_loss: float | None):
    """The method's file (atomic; also a copy per step), the best one by validation loss, resumable state and the
    loss plot. Never a NaN: non-finite steps are skipped before they reach what trains, and this is checked once
    more here. The best file is written before the state: a crash between them resumes from the save before and
    redoes both."""
    if not main_process():
        return
    if not all(torch.isfinite(p).all() for p in s.method.params.values()):
        raise TrainError(f"step {step}: what trains is not finite; nothing was saved over the last good file")
    meta = {**s.meta, "step": str(step)}
    s.method.write(s.out / f"{s.name}.safetensors", meta)
    if s.method.copies:
        s.method.write(s.out / f"{s.name}-{step}.safetensors", meta)
    if val_loss is not None:
        s.best = keep_best(s.best, step, val_loss, s.method.write, meta, s.out / f"{s.name}-best.safetensors")
    save_state(s.out / "state.safetensors", s.method.params, s.optimizer, s.scaler.state_dict(), step, s.settings,
               s.method.buffers)
    records = read_log(s.out / "log.jsonl")
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    plot_curve([r["step"] for r in records], [r["loss"] for r in records], s.out / "loss.png",
               f"{s.cfg.token}: training loss over {step} steps", validation=val)


@torch.no_grad()
def preview(s, step: int):
    """Four images of the method's prompt (TI: the token alone) from fixed seeds, with the study's sampler settings
    (Euler a, CFG 2). An image that is not finite (fp16 overflow) is not written: a warning says so, and training
    goes on."""
    if not main_process():
        return
    sd, size = s.sd, s.cfg.resolution
    sd.vae.to(s.plan.device)   # the VAE visits the device only for previews
    with precision(s.method, s.plan.device):
        cond, uncond = s.method.context([s.method.prompt]), sd.text([""])
        latents = sample(sd, cond, uncond, [1.0], range(4),
                         SampleSettings(width=size, height=size, steps=s.cfg.preview_steps, cfg=2.0))
    images = decode(sd, latents) if torch.isfinite(latents).all() else None   # a NaN latent is not decoded
    sd.vae.to("cpu")
    if images is None or not torch.isfinite(images).all():
        print(f"warning: step {step}: the preview is not finite; no preview written", file=sys.stderr)
        return
    save_png(s.out / f"preview-{step:06d}.png", contact_sheet([to_pil(i) for i in images], 4),
             f"{s.method.prompt} (training step {step})")
