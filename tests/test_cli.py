"""medti.cli: the one main() wrapper; minisd.config: the device/dtype rule."""
import argparse
import errno
import os
import subprocess
import sys

import pytest
import torch

from medti.cli import run_main
from minisd.config import resolve_device, resolve_dtype
from minisd.errors import UserError, arg


def parser():
    p = argparse.ArgumentParser()
    p.add_argument("--what", default="user")
    return p


def test_user_and_os_errors_become_one_line_and_exit_2(capsys):
    def run(args):
        if args.what == "user":
            raise UserError(f"bad {arg('what')}\nvalue")   # a newline in a message is folded, never printed
        raise OSError(errno.ENOSPC, "No space left on device", "/out/x.png")
    assert run_main(parser(), run, []) == 2
    assert capsys.readouterr().err == "error: bad --what value\n"
    assert run_main(parser(), run, ["--what", "disk"]) == 2
    assert capsys.readouterr().err == "error: /out/x.png: No space left on device\n"
    assert arg("what") == "what="   # outside run_main the words are Python's again


def test_other_exceptions_are_not_swallowed():
    def run(args):
        raise RuntimeError("a bug")
    with pytest.raises(RuntimeError):
        run_main(parser(), run, [])


def test_closed_pipe_exits_quietly():
    code = ("import sys; from medti.cli import run_main; import argparse\n"
            "def run(a):\n    [print('x' * 100) for _ in range(100000)]\n"
            "sys.exit(run_main(argparse.ArgumentParser(), run, []))")
    p = subprocess.run(f"{sys.executable} -c \"{code}\" | head -1", shell=True, capture_output=True, text=True)
    assert p.stdout.strip() == "x" * 100 and "Traceback" not in p.stderr and "error" not in p.stderr


def test_device_and_dtype_rules():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="not a device"):
        resolve_device("banana")
    if not torch.cuda.is_available():   # this machine and CI: no GPU, so cuda must be refused in one line
        with pytest.raises(UserError, match="no CUDA GPU"):
            resolve_device("cuda")
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.float16
    with pytest.raises(UserError, match="fp8"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_flags_are_never_abbreviated(capsys):
    """`--max-step 2` must not train as `--max-steps 2`: medti's parser takes whole flag names only."""
    from medti.cli import ArgumentParser
    p = ArgumentParser(prog="x")
    p.add_argument("--max-steps", type=int)
    assert p.parse_args(["--max-steps", "2"]).max_steps == 2
    with pytest.raises(SystemExit) as info:
        p.parse_args(["--max-step", "2"])
    assert info.value.code == 2 and "unrecognized arguments: --max-step 2" in capsys.readouterr().err


def test_thread_default_and_flag(monkeypatch, capsys):
    """--threads 0: OMP_NUM_THREADS where set (torchrun sets 1 per process), else half the usable cores, at least
    one; a given count is applied before the command runs; a negative one, or one past the machine's CPUs, is a
    one-line error."""
    from medti.cli import add_threads, default_threads
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert default_threads() == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert default_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    parser = argparse.ArgumentParser()
    add_threads(parser)
    before, seen = torch.get_num_threads(), []
    try:
        assert run_main(parser, lambda args: seen.append(torch.get_num_threads()), ["--threads", "2"]) == 0
        assert seen == [2]
        assert run_main(parser, lambda args: None, ["--threads", "-1"]) == 2
        assert "--threads -1: give 0 (automatic) or a number of threads" in capsys.readouterr().err
        # more than torch can take (before: ValueError "Overflow when unpacking long", a traceback)
        assert run_main(parser, lambda args: None, ["--threads", "99999999999"]) == 2
        assert f"--threads 99999999999: give 0 (automatic) or a number of threads up to {os.cpu_count()}" in \
            capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


def test_a_value_that_starts_with_a_dash_is_read_as_the_value(capsys):
    """`--slices -1:` and `--negative "-blurry"` stopped with "expected one argument" (argparse reads a word that
    starts with "-" as a flag); a word that is a flag of the parser still counts as one."""
    from medti.cli import ArgumentParser
    parser = ArgumentParser(prog="p")
    parser.add_argument("--slices", default="")
    parser.add_argument("--negative", default="")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flip", action="store_true")
    args = parser.parse_args(["--slices", "-1:", "--negative", "-blurry", "--seed", "-3", "--flip"])
    assert (args.slices, args.negative, args.seed, args.flip) == ("-1:", "-blurry", -3, True)
    with pytest.raises(SystemExit):
        parser.parse_args(["--slices", "--flip"])   # a flag of this parser is not taken as a value
    assert "--slices: expected one argument" in capsys.readouterr().err
    sub = ArgumentParser(prog="q").add_subparsers(dest="command")
    preview = sub.add_parser("preview")
    preview.add_argument("--slices", default="")
    assert sub._name_parser_map["preview"].parse_args(["--slices", "-5:"]).slices == "-5:"
