"""medti.cli: the one main() wrapper; minisd.config: the device/dtype rule."""
import argparse
import errno
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
