"""What a training run writes, for medti/training/trainer.py's loop: a log line per step (log.jsonl) and the progress
line, the method's file at each save (with its best-by-validation copy, the resumable state and the loss plot);
the previews are medti/training/previews.py's. `s` is the trainer's Session. Under torchrun only rank 0 writes
(medti.training.distributed): the others hold the same tensors."""
import sys

import torch

from ..files.plots import plot_curve
from . import TrainError
from .distributed import main_process
from .state import log_line, read_log, save_state
from .validation import keep_best


def report(s, record: dict):
    """Append the step's record to log.jsonl (a line per step: a crash loses at most the line being written) and
    print progress about 100 times per run, and at a session's first step (medti.training.progress: s.clock)."""
    if not main_process():
        return
    with open(s.out / "log.jsonl", "a") as f:
        f.write(log_line(record))
    step, total = record["step"], s.cfg.max_steps
    if step % max(1, total // 100) == 0 or step in (total, s.clock.first + 1):
        print(f"step {step}/{total}  loss {record['loss']:.4f}  lr {record['lr']:g}  {s.clock.per_s:.2f} it/s  "
              f"{s.clock.eta(step, total, s.cfg.preview_every)}", file=sys.stderr)


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
