"""The one user-error class, how a message names an argument in the words of the interface in use, and how it
shows what it quotes (a value, a list, another library's text) without burying its own words.

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


# What one message may show of a value it quotes (a prompt, a caption, a list of names): a message is read on one
# terminal line or two, and a 10,000-character prompt quoted whole buried the line's advice at the end of it.
SHOWN = 80


def quoted(text: str, limit: int = SHOWN) -> str:
    """repr(text), its middle left out past `limit` characters (the start says which text, the end often why)."""
    text = str(text)
    if len(text) <= limit:
        return repr(text)
    keep = limit // 2
    return f"{text[:keep]!r} … {text[-keep:]!r} ({len(text):,} characters)"


def some(items, shown: int = 5, sep: str = ", ") -> str:
    """The first `shown` items, then "… and N more" for the rest."""
    items = [str(item) for item in items]
    rest = len(items) - shown
    return sep.join(items[:shown]) + (f" … and {rest:,} more" if rest > 0 else "")


def excerpt(text: str, limit: int = 160) -> str:
    """Another library's message (torch, safetensors) as part of one of ours: whitespace collapsed, and past
    `limit` characters cut after the last whole sentence that fits, else at the last clause (", ", "; ", ": ") or
    word with " …" -- never in the middle of a word or sentence, which reads as another statement ("a high lik")."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    head = text[:limit + 1]   # one more: a sentence or word that ends exactly at the limit is whole
    end = max(head.rfind(mark) for mark in (". ", "! ", "? "))
    if end > 0:
        return head[:end + 1]
    for marks in (("; ", ", ", ": "), (" ",)):
        cut = max(head.rfind(mark) for mark in marks)
        if cut > 0:
            return head[:cut] + " …"
    return text[:limit] + " …"
