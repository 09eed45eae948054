"""What a run leaves to resume from: state.safetensors (the trained tensors, AdamW's moments, the step and the
settings) and the log (log.jsonl), each written atomically.
"""
import json
import math
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError

from minisd.errors import arg, excerpt, spoken
from minisd.tensorfile import open_safetensors

from ..files.atomic import safetensors_bytes, write_atomic
from ..files.pseudonyms import model_name
from . import TrainError

# The settings that hold a path; the state file keeps only its last component (a preset or a count stays as it is):
# the folders above are the user's file system, and may name a patient. The model file is told apart by its sha256.
PATHS = ("model", "config", "class_images", "template", "slice_mask", "encoder")


def _key(kind: str, name: str) -> str:
    """A trained tensor's entries in state.safetensors: `name`, `exp_avg.name`, ... Textual inversion's one tensor,
    "vectors", keeps the bare `exp_avg`, `exp_avg_sq`, `adam_step` of the files earlier runs saved, so they resume."""
    return name if kind == "" else kind if name == "vectors" else f"{kind}.{name}"


def _named(params) -> dict:
    return params if isinstance(params, dict) else {"vectors": params}   # one tensor: textual inversion's vectors


def save_state(path, params, optimizer, scaler: dict, step: int, settings: dict, buffers: dict | None = None):
    """Everything a resumed run needs, pickle-free: the trained tensors (`params`: {name: Parameter}, or TI's one
    tensor), their AdamW moments and step, state that is no parameter (`buffers`: an EMA), the grad scaler's state
    and the run's settings (to refuse resuming a different run). The random draws need no state
    (step_generator). Atomic."""
    tensors = {f"buffer.{name}": t.detach().cpu().contiguous() for name, t in (buffers or {}).items()}
    for name, param in _named(params).items():
        state = optimizer.state[param]
        tensors[_key("", name)] = param.detach().cpu().contiguous()
        if state:
            tensors |= {_key("exp_avg", name): state["exp_avg"].cpu().contiguous(),
                        _key("exp_avg_sq", name): state["exp_avg_sq"].cpu().contiguous(),
                        _key("adam_step", name): torch.as_tensor(state["step"]).reshape(1).float().cpu()}
    write_atomic(path, safetensors_bytes(tensors, {"step": step, "scaler": json.dumps(scaler, sort_keys=True),
                                                   "settings": json.dumps(settings, sort_keys=True)}))


def _damaged(path, e: Exception) -> TrainError:
    return TrainError(f"{arg('resume')}: {path} is damaged ({type(e).__name__}: {excerpt(e, 80)}); start a new run in "
                      f"another {arg('out')} (what each save learned is in its <name>-<step>.safetensors there)")


def stored(settings: dict) -> dict:
    """The settings as state.safetensors keeps them: each of PATHS by its last component."""
    return {k: (model_name(v) if k in PATHS else v) for k, v in settings.items()}


def as_stored_now(before: dict, now: dict, val) -> dict:
    """Settings saved by an earlier release as this one saves them, so that its runs still resume: full paths
    (stored()), held-out images by path (`val`: the ValidationSet, its paths and pseudonyms), no model_sha256 (the
    path was compared instead; this run's is taken)."""
    before = stored(before)
    if "model_sha256" in now:
        before.setdefault("model_sha256", now["model_sha256"])
    held = before.get("validation")
    if val and isinstance(held, dict) and isinstance(held.get("files"), list):
        renamed = dict(zip(val.paths, val.names, strict=True))
        before["validation"] = {**held, "files": [renamed.get(f, f) for f in held["files"]]}
    return before


def read_state(path) -> tuple:
    """(step, grad scaler state, settings, tensors) of a state file, checked for nothing but being readable. A file
    that is truncated, not safetensors or missing an entry (a crash during a copy, a disk full before our atomic
    writes existed) is a TrainError: it cannot be repaired, but the per-save copies are still there."""
    try:
        with open_safetensors(path) as f:
            meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        return int(meta["step"]), json.loads(meta["scaler"]), json.loads(meta["settings"]), tensors
    except (SafetensorError, OSError, KeyError, ValueError) as e:   # JSONDecodeError is a ValueError
        raise _damaged(path, e) from None


def restore_state(path, tensors: dict, params, optimizer, buffers: dict | None = None):
    """Put a state file's tensors (read_state) back: the trained tensors, their AdamW state and `buffers`."""
    params = _named(params)
    try:
        saved = {name: tensors[_key("", name)] for name in params}
        kept = {name: tensors[f"buffer.{name}"] for name in buffers or {}}
    except KeyError as e:
        raise _damaged(path, e) from None
    for name, param in params.items():
        if saved[name].shape != param.shape:
            raise TrainError(f"{arg('resume')}: {path} holds {name} of shape {list(saved[name].shape)}, this run "
                             f"trains {list(param.shape)}; resume with the run's own settings "
                             f"({_same(name, saved[name])}the same model) or start a new run in another {arg('out')}")
        with torch.no_grad():
            param.copy_(saved[name])
        if _key("exp_avg", name) in tensors:
            # the step count lives on the CPU, except for the fused kernel, which reads it where the weight is
            step = tensors[_key("adam_step", name)].reshape(())
            optimizer.state[param] = {"step": step.to(param.device) if optimizer.defaults["fused"] else step,
                                      "exp_avg": tensors[_key("exp_avg", name)].to(param.device),
                                      "exp_avg_sq": tensors[_key("exp_avg_sq", name)].to(param.device)}
    with torch.no_grad():
        for name, tensor in kept.items():
            buffers[name].copy_(tensor)


def load_state(path, params, optimizer, buffers: dict | None = None) -> tuple:
    """read_state, then restore_state in place; returns (step, grad scaler state, settings)."""
    step, scaler, settings, tensors = read_state(path)
    restore_state(path, tensors, params, optimizer, buffers)
    return step, scaler, settings


def _same(name: str, saved: torch.Tensor) -> str:
    """The flag that gave the saved shape, where one flag does (TI's --vectors)."""
    return f"{spoken('vectors', *[str(saved.shape[0])] * 2)}, " if name == "vectors" else ""


def read_log(path) -> list[dict]:
    """The records of log.jsonl, one JSON object per line. A line that does not parse is dropped with a warning:
    an append cut short by a crash or a full disk leaves a torn last line, and refusing to resume over it would
    make the run unresumable for good. A missing log gives no records (the run goes on without its history)."""
    path = Path(path)
    if not path.exists():
        print(f"warning: {path} is missing; the log starts again from here", file=sys.stderr)
        return []
    records, torn = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        elif line.strip():
            torn += 1
    if torn:
        print(f"warning: {path}: dropped {torn} unreadable line(s) (a write cut short by a crash or a full disk)",
              file=sys.stderr)
    return records


def log_line(record: dict) -> str:
    """One log.jsonl line. Non-finite numbers (the loss of a skipped step) are written as null: strict JSON,
    which json.dumps would otherwise break with a bare NaN."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    return json.dumps(clean, allow_nan=False) + "\n"


def write_log(path, records: list[dict]):
    """Rewrite the whole log atomically (on resume: the records up to the last save)."""
    write_atomic(path, "".join(log_line(r) for r in records).encode())
