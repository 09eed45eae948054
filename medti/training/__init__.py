"""Training: one loop (trainer.py) generic over what trains (methods.py: textual inversion, LoRA, the UNet), with
its settings and checks (config.py), objective, optimiser, saved state, resume, outputs, validation, DreamBooth's
class images, several processes (distributed.py) and the offline demo. `python -m medti.train` is its command.
"""
from minisd.errors import UserError


class TrainError(UserError):
    """A training setting we refuse or a run that cannot go on, in one line."""
