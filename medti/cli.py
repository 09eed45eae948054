"""What every `python -m medti.*` command shares: the main() wrapper and the device/dtype rule.

The wrapper is the one place where a user error becomes `error: <one line>` and exit status 2: no module prints
its own errors or catches another module's classes. It also turns an OSError from the file system (disk full,
permission denied) into one line, because that is the user's to fix too, and Ctrl-C into exit 130 without a
traceback.
"""
import argparse
import os
import sys
from collections.abc import Callable

import torch

from minisd.config import default_dtype
from minisd.errors import INTERFACE, UserError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def one_line(text: str) -> str:
    return " ".join(str(text).split())


class ArgumentParser(argparse.ArgumentParser):
    """Every medti command's parser: argparse's own errors (an unknown flag, a missing required one, a bad choice
    or number) as one line too. argparse prints its whole usage block first, 13 lines in which the one that
    matters is the last. No abbreviations: argparse would take a mistyped `--max-step` as `--max-steps` without a
    word, and a flag added later would silently change what an old abbreviation means."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {one_line(message)} (see {self.prog} --help)\n")


def run_main(parser: argparse.ArgumentParser, run: Callable, argv=None) -> int:
    """Parse argv with parser, call run(args); user errors and OS errors become one line and exit 2."""
    args = parser.parse_args(argv)
    token = INTERFACE.set("cli")
    try:
        run(args)
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:   # `... | head` closed our stdout: not an error, and nothing more can be printed there
        sys.stdout = open(os.devnull, "w")
        return 0
    except OSError as e:   # ENOSPC, EACCES, EROFS ... raised while writing outputs
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        INTERFACE.reset(token)
    return 0


def resolve_device(name: str) -> torch.device:
    """--device as a torch.device that exists here, or a UserError that says which ones do."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name!r}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA GPU is visible to torch here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """--dtype fp32|fp16|bf16, or the project's default for the device (minisd.config.default_dtype)."""
    if not name:
        return default_dtype(device)
    if name not in DTYPES:
        raise UserError(f"--dtype {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]
