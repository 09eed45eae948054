"""--resume for medti/training/trainer.py: which settings a resumed run must share with the saved one, and the restore
of what trains, AdamW and the grad scaler from state.safetensors. `s` is the trainer's Session."""
import dataclasses
import shlex
import sys

from minisd.errors import arg, spoken

from . import TrainError
from .config import TrainConfig
from .state import as_stored_now, read_state, restore_state

# Settings a resumed run may change: how long and how often (max_steps, save_every, preview_*: never stored, so a
# run saved under older preview defaults resumes, with the new ones), where (device, out, data, val: the images'
# identity is their fingerprint, not where they lie), checkpointing (memory and time only) and keep_saves (which
# files a save leaves, not what trains: a run may start keeping its steps' models when resumed). The validation
# settings are stored as one "validation" entry, and only when there is validation: a run saved before validation
# existed still resumes, and adding, dropping or changing it is refused.
MAY_CHANGE = ("max_steps", "save_every", "preview_every", "preview_steps", "preview_sampler", "resume", "device",
              "out", "data", "cache", "checkpointing", "val", "val_fraction", "val_draws", "keep_saves")


def shown(value) -> str:
    """A setting's value as it would be typed in a shell, cut to 40 characters (a path can be long)."""
    text = shlex.quote(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def held_out(before: dict | None, now: dict | None) -> str:
    """How the held-out images differ, in the words of the flags that chose them, the saved value first:
    `--val-fraction 0.2 (now 0.1)`, `--val-draws 4 (now 8)`, `the images in --val`, `held out 12 images (now 10)`.
    `before` and `now` are the "validation" settings (medti.training.validation.HeldOut.about, the draws and the
    files), or None for a run without validation."""
    def chosen(v: dict) -> str:   # how the images were chosen, as typed
        if not v:
            return "no held-out images"
        return spoken("val_fraction", f"{v['fraction']:g}") if "fraction" in v else f"a {arg('val')} folder"
    before, now = before or {}, now or {}
    if "fraction" in before and "fraction" in now and before["fraction"] != now["fraction"]:
        return f"{chosen(before)} (now {now['fraction']:g})"
    if chosen(before) != chosen(now):
        return f"{chosen(before)} (now {chosen(now)})"
    parts = []
    if before.get("folder_sha256") != now.get("folder_sha256"):
        parts.append(f"the images in {arg('val')}")
    if before.get("draws") != now.get("draws"):
        parts.append(f"{spoken('val_draws', str(before.get('draws')))} (now {now.get('draws')})")
    counts = len(before.get("files", [])), len(now.get("files", []))
    if not parts and counts[0] != counts[1]:   # same fraction of another number of images (or of patients)
        parts.append(f"held out {counts[0]} images (now {counts[1]})")
    return ", ".join(parts) or "the held-out images (as many, but other ones)"


# the stored settings that are no flag of their own, in the words of the flags behind them: (saved, now) -> text
NOT_FLAGS = {"data_fingerprint": lambda before, now: f"the images in {arg('data')}",
             "model_sha256": lambda before, now: f"the file of {arg('model')}",
             "encoder_sha256": lambda before, now: f"the weights of {arg('encoder')}",
             "validation": held_out}


def differences(before: dict, now: dict) -> str:
    """`--lr 0.005 (now 0.01), the images in --data`: what differs, flag by flag, with the saved value first."""
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    return ", ".join(NOT_FLAGS[k](before.get(k), now.get(k)) if k in NOT_FLAGS else
                     f"{arg(k)} {shown(before.get(k))} (now {shown(now.get(k))})" for k in changed)


def resume(s) -> int:
    """Restore the last save (what trains, AdamW, grad scaler) after checking it was made with these settings."""
    path = s.out / "state.safetensors"
    step, scaler_state, before, tensors = read_state(path)   # the settings first: another run's tensors differ
    # runs saved before --demo left the training settings stored "demo": false; it never changed training
    before = {k: v for k, v in before.items() if not (k == "demo" and v is False)}
    before = as_stored_now(before, s.settings, s.val)   # an earlier release kept paths
    # a setting added since the run was saved (--method and its flags) has its default there: that is how it ran
    defaults = dataclasses.asdict(TrainConfig())
    before = {**{k: defaults[k] for k in s.settings.keys() - before.keys() if k in defaults}, **before}
    if before != s.settings:
        raise TrainError(f"{arg('resume')}: {s.cfg.out} was trained with other settings: "
                         f"{differences(before, s.settings)}; give the same ones, or another {arg('out')}")
    restore_state(path, tensors, s.method.params, s.optimizer, s.method.buffers)
    if scaler_state:   # empty unless training in fp16
        s.scaler.load_state_dict(scaler_state)
    if step >= s.cfg.max_steps:   # --max-steps is no setting: a resume may raise it, or name one already reached
        print(f"note: the run is at step {step} already, {spoken('max_steps', *[str(s.cfg.max_steps)] * 2)}: "
              f"nothing to train; raise {arg('max_steps')} to go on", file=sys.stderr)
    return step
