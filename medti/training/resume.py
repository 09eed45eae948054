"""--resume for medti/training/trainer.py: which settings a resumed run must share with the saved one, and the restore
of what trains, AdamW and the grad scaler from state.safetensors. `s` is the trainer's Session."""
import dataclasses
import shlex
import sys

from minisd.errors import arg, spoken

from . import TrainError
from .config import TrainConfig
from .state import read_state, restore_state

# Settings a resumed run may change: how long and how often (max_steps, save_every, preview_*: never stored, so a
# run saved under older preview defaults resumes, with the new ones), where (device, out, data, val: the images'
# identity is their fingerprint, not where they lie) and checkpointing (memory and time only). The validation
# settings are stored as one "validation" entry, and only when there is validation: a run saved before validation
# existed still resumes, and adding, dropping or changing it is refused.
MAY_CHANGE = ("max_steps", "save_every", "preview_every", "preview_steps", "preview_sampler", "resume", "device",
              "out", "data", "checkpointing", "val", "val_fraction", "val_draws")
# the stored settings that are no flag of their own, in the words of the flags behind them
NOT_FLAGS = {"data_fingerprint": lambda: f"the images in {arg('data')}",
             "validation": lambda: f"the held-out images ({arg('val')}, {arg('val_fraction')} or {arg('val_draws')})"}


def differences(before: dict, now: dict) -> str:
    """`--lr 0.005 (now 0.01), the images in --data`: what differs, flag by flag, with the saved value first."""
    def shown(value) -> str:   # as it would be typed in a shell
        text = shlex.quote(value) if isinstance(value, str) else str(value)
        return text if len(text) <= 40 else text[:37] + "..."
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    return ", ".join(NOT_FLAGS[k]() if k in NOT_FLAGS else f"{arg(k)} {shown(before.get(k))} (now {shown(now.get(k))})"
                     for k in changed)


def resume(s) -> int:
    """Restore the last save (what trains, AdamW, grad scaler) after checking it was made with these settings."""
    path = s.out / "state.safetensors"
    step, scaler_state, before, tensors = read_state(path)   # the settings first: another run's tensors differ
    # runs saved before --demo left the training settings stored "demo": false; it never changed training
    before = {k: v for k, v in before.items() if not (k == "demo" and v is False)}
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
