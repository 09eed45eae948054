"""A plain (non-editable) `pip install .` works offline and carries the vocabulary and the preset table."""
import shutil
import subprocess
import sys

from conftest import ROOT


def run(*args, **kwargs):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kwargs)


def test_wheel_install_works_offline(tmp_path):
    # A copy of this project installed into its own folder, found first on PYTHONPATH (before any editable
    # install); the machine's torch etc. stay visible. No index is contacted (--no-index, --no-build-isolation).
    # The source is copied first, without build/ and *.egg-info: setuptools builds in the source tree, and a build/
    # left by an earlier install would put a package that setup.cfg no longer lists into the wheel.
    python = sys.executable
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", ".venv"))
    run(python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--no-build-isolation",
        "--target", str(tmp_path / "site"), str(source))
    probe = ("import minisd, minisd.paths, sys; "
             "assert minisd.__file__.startswith(sys.argv[1]), minisd.__file__; "
             "print(minisd.paths.weights_dir()); "
             "print(minisd.load_config('sd2').prediction); "
             "print(minisd.build(minisd.load_config('sd2-base')).text.tokenizer(['a chest x-ray'])[0, :5].tolist()); "
             # every command imports from the installed copy alone: a package left out of setup.cfg would be found
             # in the source tree through the editable install's finder, so each module's file is checked
             "import medti, medti.train, medti.generate, medti.evaluate, medti.audit, medti.data, medti.embeddings, "
             "medti.lora; wrong = [m.__file__ for n, m in sys.modules.items() "
             "if n.split('.')[0] in ('medti', 'minisd') and not (m.__file__ or sys.argv[1]).startswith(sys.argv[1])]; "
             "assert not wrong, wrong")
    out = run(python, "-c", probe, str(tmp_path / "site"), cwd=tmp_path,
              env={"PYTHONPATH": str(tmp_path / "site"), "HF_HUB_OFFLINE": "1"}).stdout.splitlines()
    assert out[0].startswith(str(tmp_path / "site")) and out[0].endswith("minisd/weights")
    assert out[1] == "v"
    # the installed copy tokenizes exactly as the source tree does (itself checked against OpenCLIP)
    from minisd.tokenizer import Tokenizer
    assert out[2] == str(Tokenizer()(["a chest x-ray"])[0, :5].tolist())
