"""command.private.json: the command a training run was started with and the settings it runs under, kept in its
--out folder, so that `python -m medti.train --resume --out DIR` continues the run with no flag typed again.

Why `.private.` in the name: the settings hold paths (--data, --val, --model, --template ...), and the files and
folders of medical exports are often named after patients. A file whose name contains `.private.` holds paths and
names: it stays with whoever ran the command and is never shared.

This file only fills in what was not typed. What a resumed run must share with the saved one is still checked
against state.safetensors once the model has loaded (medti.training.resume), so a hand-edited or stale file can
never resume a different run; it can only fail earlier than that check, in the flags' own words.
"""
import dataclasses
import json
import shlex
from pathlib import Path

from minisd.errors import arg, spoken

from ..files.atomic import write_atomic
from . import TrainError
from .config import TrainConfig, check_out
from .methods import learning_rate
from .resume import MAY_CHANGE, shown

COMMAND = "command.private.json"
# The flags a resume may give with another value than the run was trained with: MAY_CHANGE less the validation
# flags. Those two are settings all the same: MAY_CHANGE lists them only because state.safetensors holds them in
# its one "validation" entry and compares them there. --model may name the same file where it lies now: the state
# compares the file by its sha256 (model_sha256), so a moved copy resumes and other weights are refused there.
FREE = frozenset(MAY_CHANGE) - {"val_fraction", "val_draws"} | {"model"}
DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}


def _fits(value, default) -> bool:
    """A saved value has its setting's type: bools are no ints here, and a float setting may be saved as 1."""
    if isinstance(default, bool) or isinstance(value, bool):
        return type(value) is type(default)
    return isinstance(value, (int, float) if isinstance(default, float) else type(default))


def read_command(out) -> dict | None:
    """The run's settings from DIR/command.private.json (every TrainConfig field it names), or None where the run
    has no such file: it was made before medti recorded the command. A file that is no JSON, or holds a setting of
    the wrong type, is one line naming it: this run cannot guess what it should have said."""
    path = Path(out) / COMMAND
    if not path.exists():
        return None
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))["settings"]
        wrong = [k for k, v in settings.items() if k in DEFAULTS and not _fits(v, DEFAULTS[k])]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise _damaged(path, f"{type(e).__name__}: {str(e)[:80]}") from None
    if wrong:
        kind = KINDS[type(DEFAULTS[wrong[0]])]
        raise _damaged(path, f"setting {wrong[0]} is {json.dumps(settings[wrong[0]])[:40]}, not {kind}")
    return {k: v for k, v in settings.items() if k in DEFAULTS}


def _damaged(path: Path, what: str) -> TrainError:
    return TrainError(f"{arg('resume')}: {path} is damaged ({what}); delete it and give the run's flags again with "
                      f"{arg('resume')}")


def write_command(out, cfg: TrainConfig, argv: list | None):
    """Record this start of the run in DIR/command.private.json (atomic): `flags`, the flags of its first start as
    typed after `python -m medti.train` (one shell line; null for a Python caller), `resumes`, those of each
    --resume since, and `settings`, every TrainConfig field as this start runs with it, for the next --resume."""
    path = Path(out) / COMMAND
    typed = None if argv is None else shlex.join(argv)
    record = {"flags": typed, "resumes": []}
    if cfg.resume:   # after the earlier starts; a run made before this file existed has no first command on record
        try:
            earlier = json.loads(path.read_text(encoding="utf-8"))
            record = {"flags": earlier["flags"], "resumes": list(earlier["resumes"])}
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):   # none, or damaged: start again
            record = {"flags": None, "resumes": []}
        record["resumes"].append(typed)
    record["settings"] = dataclasses.asdict(cfg)
    write_atomic(path, (json.dumps(record, indent=1) + "\n").encode())


def _typed(values: dict, names: list) -> str:
    """`--lr 0.005, --flip`: settings as flags; a switch that is off is `no --flip`."""
    return ", ".join((arg(k) if values[k] else f"no {arg(k)}") if isinstance(values[k], bool) else
                     spoken(k, shown(values[k]), repr(values[k])) for k in names)


def resumed_config(cfg: TrainConfig, given) -> TrainConfig:
    """--resume from the command line: the run's recorded settings, with the flags typed (`given`: the names of the
    TrainConfig fields on the command line) taking their typed values. A typed flag that differs from the run's
    where a resume may not change it is refused, with both values. A run without command.private.json (made
    before medti recorded it) resumes as it always did: from the flags typed, all of them."""
    if not cfg.resume:
        return cfg
    if not cfg.out:
        raise TrainError(f"{arg('resume')}: name the run's folder with {arg('out')}")
    check_out(cfg)   # a folder with no state to resume: said before any word about flags
    saved = read_command(cfg.out)
    if saved is None:
        if "data" not in given:
            raise TrainError(f"{arg('resume')}: {cfg.out} has no {COMMAND} (the run was made before medti recorded "
                             f"its command there); give the run's flags again, {arg('data')} and the rest, with "
                             f"{arg('resume')} {arg('out')} {cfg.out}")
        return cfg
    saved = {**DEFAULTS, **saved}   # a setting added since the run was recorded: its default is how it ran
    merged = {**saved, **{name: getattr(cfg, name) for name in given}}
    # --lr left out is the method's rate: compared and said as that rate (state.safetensors holds it so too)
    before, now = ({**values, "lr": learning_rate(TrainConfig(**values))} for values in (saved, merged))
    changed = sorted(k for k in given if k not in FREE and before[k] != now[k])
    if changed:
        which = "the flag" if len(changed) == 1 else "those flags"
        raise TrainError(f"{arg('resume')}: {cfg.out} was trained with {_typed(before, changed)}; you gave "
                         f"{_typed(now, changed)}; drop {which} or use another {arg('out')}")
    return TrainConfig(**merged)
