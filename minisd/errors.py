"""The one user-error class, and how a message names an argument in the words of the interface in use.

Every error that is the user's to fix (a bad file, a bad flag or argument) derives from UserError and carries one
line that names the thing and says how to fix it. A Python caller typed `minisd.load(path, config=...)`; a CLI user
typed `--model PATH --config NAME`. `arg("config")` gives whichever of `config=` and `--config` fits: the CLI
wrapper (medti/cli.py) switches the interface for the run, so the same raise reads right to both.
"""
import contextvars

INTERFACE = contextvars.ContextVar("minisd_interface", default="python")


class UserError(ValueError):
    """A user mistake, stated in one line. Subclasses name the area (LoadError, DataError, ...)."""


def arg(name: str) -> str:
    """`name=` for a Python caller, `--name` (underscores as dashes) for a CLI user."""
    return f"--{name.replace('_', '-')}" if INTERFACE.get() == "cli" else f"{name}="


def spoken(name: str, cli_value: str, python_value: str | None = None) -> str:
    """An argument with its value as the user types it: `config='x'` in Python, `--config x` on the command line
    (arg above says which interface is in use)."""
    flag = arg(name)
    return f"{flag}{python_value or repr(cli_value)}" if flag.endswith("=") else f"{flag} {cli_value}"
