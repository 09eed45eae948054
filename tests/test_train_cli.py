"""`python -m medti.train` as a user meets it: every bad flag is one line before anything is written, a failed run
leaves no folder, one run at a time per --out, the demo re-runs cleanly and ends with a generate command that works,
and the modules form no import cycle. Issue 11, defects 1, 2, 3, 4, 5, 8, 9 and 11."""
import ast
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_layout import graph

from medti.train import main
from medti.training.demo import phantoms, tiny_model

ROOT = Path(__file__).resolve().parent.parent
TRAINING_MODULES = {"medti.train", "medti.training.trainer", "medti.training.config", "medti.training.outputs",
                    "medti.training.methods", "medti.training.dreambooth", "medti.training.demo",
                    "medti.training.objective", "medti.training.optim", "medti.training.state", "medti.dataset.folder",
                    "medti.files.plots"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The demo's tiny random model and six phantoms: enough to get a run past its checks in seconds."""
    folder = tmp_path_factory.mktemp("cli")
    model, config = tiny_model(folder / "model")
    return model, config, phantoms(folder / "data", 6, seed=0)


def args(tiny, out, *extra):
    model, config, data = tiny
    return ["--model", str(model), "--config", str(config), "--data", str(data), "--token", "<t>", "--vectors", "2",
            "--max-steps", "1", "--preview-every", "0", "--out", str(out), *extra]


DEVICE = [("--device", "banana"), "not a device"]
# No skip: on a machine with a GPU, "cuda" exists, so the refused case is a GPU index it does not have.
CUDA = [("--device", "cuda"), "no CUDA GPU"] if not torch.cuda.is_available() else [("--device", "cuda:99"), "only"]


@pytest.mark.parametrize("extra,words", [
    (("--init", ""), "--init ''"),
    (("--init", "   "), "give word(s)"),   # (the CLI wrapper folds the spaces of the message)
    DEVICE,
    CUDA,
    (("--dtype", "fp8"), "--dtype 'fp8': use one of fp32, fp16, bf16"),
    (("--token", "<a\nb>"), "contains '\\n'"),
    (("--token", "<a b>"), "contains ' '"),
    (("--token", "<a\u200bb>"), "contains '\\u200b'"),   # zero-width space: invisible, category Cf
    (("--token", "<a/b>"), "contains '/'"),
    (("--preview-every", "-1"), "--preview-every -1: must be 0 (no previews) or more"),
    (("--save-every", "-5"), "--save-every -5: must be at least 1"),
    (("--max-steps", "0"), "--max-steps 0: must be at least 1"),
    (("--resolution", "-64"), "--resolution -64: must be 0"),
    # past what a machine holds: a MemoryError after the model loaded, and a batch that never started
    (("--resolution", "100000"), "--resolution 100000: must be from 1 to 4096 pixels"),
    (("--batch", "99999999999"), "--batch 99999999999: at most 1,024 images per micro-batch"),
    (("--seed", "-1"), "--seed -1: must be 0 <= seed < 2**32"),
    (("--seed", str(2 ** 70)), "must be 0 <= seed < 2**32"),
    (("--lr", "1e999"), "positive and finite"),
    (("--latents", "sometimes"), "--latents 'sometimes'"),
])
def test_bad_flags_are_one_line_and_write_nothing(tiny, tmp_path, capsys, extra, words):
    """Each was a traceback (--init '', --device, the seeds), or silently accepted (fp8 fell back to fp32, a newline
    in the token, negative counts). Checked before --out is created: nothing is left behind."""
    out = tmp_path / "out"
    assert main(args(tiny, out, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and err.count("\n") == 0 and words in err, err
    assert not out.exists()


def test_out_inside_data_is_refused(tiny, tmp_path, capsys):
    """Previews written into the data folder would be trained on by the next run and change its fingerprint."""
    data = tmp_path / "data"
    data.mkdir()
    for png in sorted(tiny[2].iterdir()):
        (data / png.name).write_bytes(png.read_bytes())
    for out in (data / "run", data, data / "a" / "b"):
        assert main([*args(tiny, out), "--data", str(data)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "is inside --data" in err, err
    assert sorted(p.name for p in data.iterdir()) == sorted(p.name for p in tiny[2].iterdir())


HOLD = """import sys, time
from medti.files.atomic import claim_folder
with claim_folder(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("flag", ["--data", "--val"])
def test_a_folder_without_images_is_refused_before_the_model_loads(tiny, tmp_path, capsys, monkeypatch, flag):
    """A first run of a preset downloads gigabytes: an empty --data (or --val) must not wait for that."""
    import minisd
    monkeypatch.setattr(minisd, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    assert main([*args(tiny, tmp_path / "out"), flag, str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {flag} {empty}: no usable image (1 file(s): 1 .txt; 0 skipped); images must be " \
                  f".png .jpg .jpeg .tif .tiff .bmp, DICOM, or volumes (.nii, .nii.gz, .mha, .mhd, .nrrd)", err
    assert not (tmp_path / "out").exists()


def test_failed_run_leaves_no_folder_and_two_runs_do_not_share_one(tiny, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "new" / "out"
    assert main([*args(tiny, out), "--data", str(empty)]) == 2   # no usable image
    assert "no usable image" in capsys.readouterr().err and not out.exists()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(args(tiny, out)) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "another run is writing there" in err, err
        assert not (out / "log.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()


def test_no_import_cycle_through_the_training_modules():
    """The demo is a user of the trainer: demo -> trainer, train -> demo, never back (was train <-> demo). The import
    graph is tests/test_layout.py's (imports inside functions count too)."""
    edges = graph()

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for m in edges[todo.pop()] - seen:
                seen.add(m)
                todo.append(m)
        return seen
    for module in TRAINING_MODULES:
        assert module not in reach(module), f"{module} imports itself through {sorted(reach(module))}"
    assert "medti.training.demo" not in reach("medti.training.trainer")
    assert "medti.train" not in reach("medti.training.demo")


def test_trainer_reads_as_setup_resume_loop():
    """Issue 11: train.run was 106 lines. Every training function is short (the style's ~40 lines), and the loop
    draws its data through the one get_batch."""
    for module in TRAINING_MODULES:
        for node in ast.walk(ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())):
            if isinstance(node, ast.FunctionDef):
                assert node.end_lineno - node.lineno < 45, f"{module}.{node.name}"
    source = (ROOT / "medti" / "training" / "trainer.py").read_text()
    loop = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and n.name == "loop")
    calls = [n.func.id for n in ast.walk(loop) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    assert calls.count("get_batch") == 1


def test_demo_prints_a_generate_command_that_works_and_reruns_cleanly(tmp_path):
    """Run as users type it (`python -m medti.train --demo`: the module is __main__, where the old TrainError
    identity bug lived). The printed command really generates; `demo` is no saved setting; a second run into the
    same folder is one line naming the folder typed, and --resume continues it with its own settings."""
    out = tmp_path / "demo-run"
    demo = [sys.executable, "-m", "medti.train", "--demo", "--max-steps", "2", "--out", str(out)]
    first = subprocess.run(demo, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert first.returncode == 0, first.stderr[-2000:]
    command = first.stdout.strip().splitlines()[-1].strip()
    assert command.startswith("python -m medti.generate ")
    generated = subprocess.run([sys.executable, *shlex.split(command)[1:]], capture_output=True, text=True,
                               timeout=600, cwd=ROOT)
    assert generated.returncode == 0, generated.stderr[-2000:]
    assert len(list((out / "generated").glob("*.png"))) >= 4
    with safe_open(str(out / "state.safetensors"), framework="pt") as f:
        assert "demo" not in json.loads(f.metadata()["settings"])
    again = subprocess.run(demo, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 2 and again.stderr.strip().count("\n") == 0, again.stderr
    assert f"--out {out} holds a run already; pass --resume" in again.stderr and "Traceback" not in again.stderr
    # --resume alone takes the run's own settings (--max-steps 2: nothing left to train), not the demo's 300 steps
    resumed = subprocess.run([sys.executable, "-m", "medti.train", "--demo", "--resume", "--out", str(out)],
                             capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "the run is at step 2 already, --max-steps 2: nothing to train" in resumed.stderr


@pytest.mark.parametrize("env, words", [
    ({"RANK": "abc", "WORLD_SIZE": "2"}, "environment variable RANK='abc': must be a whole number >= 0"),
    ({"WORLD_SIZE": "0"}, "environment variable WORLD_SIZE='0': must be a whole number >= 1"),
    ({"RANK": "3", "WORLD_SIZE": "2"}, "RANK must be below WORLD_SIZE (0 to 1)"),   # this one waited forever
    ({"RANK": "0", "WORLD_SIZE": "2"}, "environment variable MASTER_ADDR is not set, but WORLD_SIZE=2"),
])
def test_a_wrong_launcher_environment_is_one_line(tiny, tmp_path, env, words):
    """torchrun's variables set by hand (or left over in a shell) are checked with the settings, as generate checks
    them: one line and exit 2 before the model loads, never a traceback from int() or init_process_group, never a
    rank that waits for peers that do not exist. A subprocess with a timeout, so a hang fails the test."""
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "medti.train", *args(tiny, out)], env=base | env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0, run.stderr
    assert words in run.stderr and "Traceback" not in run.stderr and not out.exists()
