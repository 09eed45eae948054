"""A plain (non-editable) `pip install .` works offline and carries the vocabulary and the preset table."""
import subprocess
import sys

from conftest import ROOT


def run(*args, **kwargs):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kwargs)


def test_wheel_install_works_offline(tmp_path):
    # A copy of this project installed into its own folder, found first on PYTHONPATH (before any editable
    # install); the machine's torch etc. stay visible. No index is contacted (--no-index, --no-build-isolation).
    python = sys.executable
    run(python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--no-build-isolation",
        "--target", str(tmp_path / "site"), str(ROOT))
    probe = ("import minisd, minisd.paths, sys; "
             "assert minisd.__file__.startswith(sys.argv[1]), minisd.__file__; "
             "print(minisd.paths.weights_dir()); "
             "print(minisd.load_config('sd2').prediction); "
             "print(minisd.build(minisd.load_config('sd2-base')).text.tokenizer(['a chest x-ray'])[0, :5].tolist())")
    out = run(python, "-c", probe, str(tmp_path / "site"), cwd=tmp_path,
              env={"PYTHONPATH": str(tmp_path / "site"), "HF_HUB_OFFLINE": "1"}).stdout.splitlines()
    assert out[0].startswith(str(tmp_path / "site")) and out[0].endswith("minisd/weights")
    assert out[1] == "v"
    # the installed copy tokenizes exactly as the source tree does (itself checked against OpenCLIP)
    from minisd.tokenizer import Tokenizer
    assert out[2] == str(Tokenizer()(["a chest x-ray"])[0, :5].tolist())
