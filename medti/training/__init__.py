"""Training: one loop (trainer.py) generic over what trains (methods.py: textual inversion, LoRA, the UNet), with
its settings and checks (config.py), objective, optimiser, saved state, resume, outputs, validation, DreamBooth's
class images, several processes (distributed.py) and the offline demo. `python -m medti.train` is its command.
"""
from pathlib import Path

from minisd.errors import UserError, arg


class TrainError(UserError):
    """A training setting we refuse or a run that cannot go on, in one line."""


def check_folder(name: str, path: str, what: str):
    """A folder flag in the words of its problem: not given, given but absent, or a file (all three used to read
    "not a folder of training images", which sent a user who had forgotten --data looking at their folder)."""
    if not path:
        raise TrainError(f"{arg(name)}: give the folder of {what}")
    if not Path(path).is_dir():
        problem = f"a file, not a folder of {what}" if Path(path).exists() else "no such folder"
        raise TrainError(f"{arg(name)} {path}: {problem}")
