"""What every `python -m medti.*` command shares: the main() wrapper and the argument parser.

The wrapper is the one place where a user error becomes `error: <one line>` and exit status 2: no module prints
its own errors or catches another module's classes. It also turns an OSError from the file system (disk full,
permission denied) into one line, because that is the user's to fix too, and Ctrl-C into exit 130 without a
traceback. It also owns the status line a long task rewrites in place on a terminal (`status`), so that every
other message starts on a line of its own.
"""
import argparse
import difflib
import os
import shutil
import sys
from collections.abc import Callable

import torch

from minisd.errors import INTERFACE, UserError

# The longest error line printed: about eight lines of a 120-column terminal. A message longer than that holds a
# dump (a whole prompt, every key of a file) in which its advice, at the end, is lost; the sources quote values
# shortened (minisd.errors.quoted, some), and this is the backstop for any that does not.
MAX_MESSAGE = 1000


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """A message as one line of at most about `limit` characters: its start (what and where) and its end (the fix)
    are kept, whole words, and the middle is left out, saying how much."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    head = text[:limit * 2 // 3].rsplit(" ", 1)[0]
    tail = text[-(limit // 4):].split(" ", 1)[-1]
    return f"{head} … [{len(text) - len(head) - len(tail):,} characters left out] … {tail}"


# The status line left open on a terminal: its stream and the length written, so that a shorter line blanks what
# a longer one left ("ETA 1m30ss"), and any other message first ends it ("ETA 1m30sinterrupted").
_OPEN = {"stream": None, "width": 0}


def status(text: str, stream=None, final: bool = False):
    """`text` as the one status line of a long task (a step count, an ETA). On a terminal it is rewritten in place
    ("\r"), padded with spaces over the rest of a longer line before it and cut to the terminal's width (a wrapped
    line could not be rewritten), and ended with a newline when `final`. Into a file each call is a line."""
    stream = stream or sys.stderr
    if not stream.isatty():
        end_status()
        print(text, file=stream, flush=True)
        return
    if _OPEN["stream"] is not stream:
        end_status()
    text = text[:shutil.get_terminal_size().columns - 1]
    print("\r" + text + " " * max(0, _OPEN["width"] - len(text)), end="\n" if final else "", file=stream,
          flush=True)
    _OPEN.update(stream=None if final else stream, width=0 if final else len(text))


def end_status():
    """End an open status line, so that the next message starts on a line of its own."""
    if _OPEN["stream"] is not None:
        print(file=_OPEN["stream"], flush=True)
    _OPEN.update(stream=None, width=0)


class ArgumentParser(argparse.ArgumentParser):
    """Every medti command's parser: argparse's own errors (an unknown flag, a missing required one, a bad choice
    or number) as one line too. argparse prints its whole usage block first, 13 lines in which the one that
    matters is the last. No abbreviations: argparse would take a mistyped `--max-step` as `--max-steps` without a
    word, and a flag added later would silently change what an old abbreviation means."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {one_line(message)}{self._suggestion(message)} (see {self.prog} --help)\n")

    def _suggestion(self, message: str) -> str:
        """For an unknown flag, the nearest flags of this parser and its subcommands by difflib's ratio (0.6 and
        up, its default: `--max-step` -> `--max-steps`, `--val-fration` -> `--val-fraction`), as ", did you mean
        --x?". argparse itself suggests only for a mistyped choice (3.12 and later), never for a flag."""
        prefix = "unrecognized arguments: "
        if not message.startswith(prefix):
            return ""
        flags = self._all_flags()
        words = [w.split("=")[0] for w in message[len(prefix):].split() if w.startswith("--") and len(w) > 2]
        # compared without the leading "--", which every flag shares (it made `--bogus` look like `--out`)
        names = {flag[2:]: flag for flag in flags}
        near = [names[m] for w in words if w not in flags for m in difflib.get_close_matches(w[2:], names, n=1)]
        return f"; did you mean {' or '.join(dict.fromkeys(near))}?" if near else ""

    def _all_flags(self) -> list:
        """Every long flag of this parser and of its subcommands' parsers (an unknown flag of `medti.data preview`
        is reported by the top parser, which does not hold the subcommand's flags)."""
        flags, parsers = [], [self]
        while parsers:
            parser = parsers.pop()
            for action in parser._actions:
                flags += [s for s in action.option_strings if s.startswith("--")]
                if isinstance(action, argparse._SubParsersAction):
                    parsers += list(action.choices.values())
        return list(dict.fromkeys(flags))

    def typed(self, args) -> set:
        """The destinations of the options typed in args: args parsed again with every default suppressed, so that
        only what the user gave comes back (an option typed with its default value is typed all the same)."""
        defaults = [(action, action.default) for action in self._actions]
        try:
            for action, _ in defaults:
                action.default = argparse.SUPPRESS
            return set(vars(self.parse_args(args)))
        finally:
            for action, default in defaults:
                action.default = default

    def parse_known_args(self, args=None, namespace=None):
        return super().parse_known_args(self._values_with_dashes(args), namespace)

    def _values_with_dashes(self, args):
        """`--slices -1:`, `--negative "-blurry"`: argparse reads a value that starts with "-" as a flag and stops
        with "expected one argument". Where a flag takes one value and the next word is no flag of this parser,
        the two are joined as `--slices=-1:`, which argparse reads as meant; nothing that parsed before changes."""
        args = list(sys.argv[1:] if args is None else args)
        takes_one = {s for a in self._actions if a.nargs is None and a.option_strings for s in a.option_strings}
        known = {s for a in self._actions for s in a.option_strings}
        joined, i = [], 0
        while i < len(args):
            word = args[i]
            if word in takes_one and i + 1 < len(args) and args[i + 1].startswith("-") and args[i + 1] not in known \
                    and args[i + 1] != "--":
                joined.append(f"{word}={args[i + 1]}")
                i += 2
                continue
            joined.append(word)
            i += 1
        return joined


def default_threads() -> int:
    """torch's CPU threads when --threads is 0: OMP_NUM_THREADS where the user (or torchrun, which sets 1 per
    process) chose it, else half the cores this process may use, at least 1. Why not torch's default (every core):
    with anything else running, each parallel operation waits for a busy core, 5-30 times slower (figures in
    docs/performance.md). Why not the load average: the thread count changes float summation order, so a rule
    that followed the load would make a resumed run differ in its last bits."""
    chosen = os.environ.get("OMP_NUM_THREADS", "").strip()
    if chosen.isdecimal() and int(chosen) > 0:
        return int(chosen)
    return max(1, len(os.sched_getaffinity(0)) // 2)


def add_threads(parser: argparse.ArgumentParser):
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch; 0 (default): OMP_NUM_THREADS if set, else half the cores "
                             "(results differ in the last bits between thread counts)")


def set_threads(count: int):
    """--threads as torch's intra-op thread count (0: default_threads), at most the machine's logical CPUs: more
    threads than CPUs only wait for each other, and torch takes no count past 2**31 at all."""
    cpus = os.cpu_count() or 1
    if not 0 <= count <= cpus:
        raise UserError(f"--threads {count}: give 0 (automatic) or a number of threads up to {cpus}, the CPUs of "
                        "this machine")
    torch.set_num_threads(count or default_threads())


def shows_any_name():
    """A file name that is not valid UTF-8 (held surrogate-escaped) printed on stdout as stderr prints it, with
    backslash escapes. Python's stdout under a UTF-8 locale other than C.UTF-8 is strict, and `embeddings info`
    on such a file would end in a UnicodeEncodeError after the file had been read correctly."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")


def run_main(parser: argparse.ArgumentParser, run: Callable, argv=None) -> int:
    """Parse argv with parser, call run(args); user errors and OS errors become one line and exit 2."""
    shows_any_name()
    args = parser.parse_args(argv)
    token = INTERFACE.set("cli")
    try:
        if hasattr(args, "threads"):
            set_threads(args.threads)
        try:
            run(args)
        finally:
            end_status()   # what follows (an error, "interrupted") starts on its own line, not glued to progress
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


def torchrun_world() -> tuple[int, int]:
    """(rank, world size) from RANK and WORLD_SIZE, as torchrun sets them; (0, 1) without a launcher. The one reader
    of them for every command that runs under torchrun (train, generate): a wrong value is one line here, never a
    traceback later or a rank that waits forever for peers that do not exist."""
    values = {}
    for name, default, low in (("WORLD_SIZE", "1", 1), ("RANK", "0", 0)):
        text = os.environ.get(name, default)
        if not text.strip().isdecimal() or int(text) < low:   # isdigit takes "²", which int() refuses
            raise UserError(f"environment variable {name}={text!r}: must be a whole number >= {low} (torchrun "
                            f"sets it; unset RANK and WORLD_SIZE to run one process)")
        values[name] = int(text)
    if values["RANK"] >= values["WORLD_SIZE"]:
        raise UserError(f"environment variables RANK={values['RANK']} and WORLD_SIZE={values['WORLD_SIZE']}: "
                        f"RANK must be below WORLD_SIZE (0 to {values['WORLD_SIZE'] - 1})")
    return values["RANK"], values["WORLD_SIZE"]
