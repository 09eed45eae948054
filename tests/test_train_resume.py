"""--resume over what crashes and full disks leave: a torn last log line, a deleted log, a truncated state file, a
log that cannot be read; and no non-finite number in any saved file. Issue 11, defects 4, 7 and 12."""
import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from medti.files import embedding_file as E
from medti.train import main
from medti.training.demo import phantoms, tiny_model


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 2-step run saved at step 2, to be copied and damaged by each test."""
    folder = tmp_path_factory.mktemp("resume")
    model, config = tiny_model(folder / "model")
    data = phantoms(folder / "data", 6, seed=0)
    base = ["--model", str(model), "--config", str(config), "--data", str(data), "--token", "<t>", "--vectors", "2",
            "--preview-every", "0", "--save-every", "2"]
    assert main([*base, "--max-steps", "2", "--out", str(folder / "run")]) == 0
    return folder / "run", base


def copy(finished, tmp_path):
    run, base = finished
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run", base


def steps(out) -> list:
    return [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]


def test_torn_last_log_line_is_dropped_and_the_run_goes_on(finished, tmp_path, capsys):
    """A crash or a full disk during the append leaves half a line; it used to make every --resume die in
    JSONDecodeError. Now the line is dropped with a warning, and the resumed log is whole again."""
    out, base = copy(finished, tmp_path)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.9')   # what a crash mid-write leaves
    assert main([*base, "--max-steps", "3", "--resume", "--out", str(out)]) == 0
    assert "dropped 1 unreadable line" in capsys.readouterr().err
    assert steps(out) == [1, 2, 3]


def test_deleted_log_is_a_warning_and_restarts_the_log(finished, tmp_path, capsys):
    out, base = copy(finished, tmp_path)
    (out / "log.jsonl").unlink()
    assert main([*base, "--max-steps", "3", "--resume", "--out", str(out)]) == 0
    assert "log.jsonl is missing" in capsys.readouterr().err
    assert steps(out) == [3]
    assert Image.open(out / "loss.png").text["Description"].endswith("(per step)")


def test_unreadable_log_is_one_line(finished, tmp_path, capsys):
    """A real OSError (here: the log is a folder) is reported in one line with the file's name, not a traceback."""
    out, base = copy(finished, tmp_path)
    (out / "log.jsonl").unlink()
    (out / "log.jsonl").mkdir()
    assert main([*base, "--max-steps", "3", "--resume", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "log.jsonl" in err, err


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage"])
def test_damaged_state_is_one_line(finished, tmp_path, capsys, damage):
    out, base = copy(finished, tmp_path)
    state = out / "state.safetensors"
    data = state.read_bytes()
    damaged = {"truncate": data[:len(data) // 2], "empty": b"", "garbage": b"\x00" * 64}[damage]
    state.write_bytes(damaged)
    assert main([*base, "--max-steps", "3", "--resume", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--resume" in err and "is damaged" in err and "another --out" in err, err
    assert state.read_bytes() == damaged   # nothing was written over it


def test_no_non_finite_number_in_any_saved_file(finished, tmp_path):
    """lr 1e30: after one step the vectors are huge and every later loss is NaN; those steps are skipped. The log
    says null for them (strict JSON: a bare NaN breaks jq and most parsers), and embedding and state stay finite."""
    _, base = finished
    out = tmp_path / "nan"
    assert main([*base, "--max-steps", "3", "--save-every", "1", "--lr", "1e30", "--out", str(out)]) == 0

    def refuse(constant):
        raise ValueError(f"non-finite {constant} in log.jsonl")
    records = [json.loads(line, parse_constant=refuse) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [False, True, True] and records[1]["loss"] is None
    assert torch.isfinite(E.read(out / "t.safetensors").vectors).all()
    with safe_open(str(out / "state.safetensors"), framework="pt") as f:
        assert all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys())


def test_state_saved_before_the_demo_split_still_resumes(finished, tmp_path):
    """State files written before --demo left the training settings hold "demo": false among them; such a run
    must still resume (demo never changed training), while any other changed setting is still refused."""
    from medti.files.atomic import safetensors_bytes, write_atomic
    out, base = copy(finished, tmp_path)
    state = out / "state.safetensors"
    with safe_open(str(state), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    settings = json.loads(meta["settings"])
    write_atomic(state, safetensors_bytes(tensors, {**meta, "settings": json.dumps({**settings, "demo": False})}))
    assert main([*base, "--max-steps", "4", "--out", str(out), "--resume"]) == 0
    assert steps(out)[-1] == 4


def test_state_saved_before_the_methods_still_resumes(finished, tmp_path, capsys):
    """State files written before --method existed hold none of its settings; they ran textual inversion, which
    is the default of each: they resume, and a changed one of those settings is still refused."""
    from medti.files.atomic import safetensors_bytes, write_atomic
    out, base = copy(finished, tmp_path)
    state = out / "state.safetensors"
    with safe_open(str(state), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    settings = json.loads(meta["settings"])
    new = ("method", "instance_prompt", "rank", "alpha", "lora_targets", "trainable", "train_text", "ema",
           "save_dtype", "class_prompt", "class_images", "prior_weight")
    assert set(new) <= set(settings)   # this test would pass vacuously otherwise
    old = {k: v for k, v in settings.items() if k not in new}
    write_atomic(state, safetensors_bytes(tensors, {**meta, "settings": json.dumps(old)}))
    (out / "command.private.json").unlink()   # nor had such a run its command recorded: its flags are retyped
    pairs = list(zip(base[::2], base[1::2], strict=True))
    relaunch = [x for flag, value in pairs if flag not in ("--token", "--vectors") for x in (flag, value)]
    assert main([*relaunch, "--max-steps", "3", "--method", "lora", "--instance-prompt", "x", "--out", str(out),
                 "--resume"]) == 2
    err = capsys.readouterr().err   # flag by flag, in the flags' words, the saved value first
    assert "other settings: --instance-prompt '' (now x), --lr " in err
    assert "--method ti (now lora), --token '<t>' (now ''), --vectors 2 (now 64); give the same" in err
    assert main([*base, "--max-steps", "4", "--out", str(out), "--resume"]) == 0
    assert steps(out)[-1] == 4


def test_resume_with_other_vectors_says_what_to_pass(tmp_path):
    from medti.training import TrainError
    from medti.training.state import load_state, save_state
    saved = torch.nn.Parameter(torch.zeros(2, 8))
    save_state(tmp_path / "state.safetensors", saved, torch.optim.AdamW([saved]), {}, 3, {})
    other = torch.nn.Parameter(torch.zeros(3, 8))
    with pytest.raises(TrainError, match=r"holds vectors of shape \[2, 8\], this run trains \[3, 8\]; resume with the "
                                         r"run's own settings \(vectors=2, the same model\) or start a new run in "
                                         r"another out=$"):
        load_state(tmp_path / "state.safetensors", other, torch.optim.AdamW([other]))


def test_a_run_already_at_max_steps_says_so(finished, tmp_path, capsys):
    """Resumed with a --max-steps the run has reached: a note in the flag's words, no step trained."""
    out, base = copy(finished, tmp_path)
    before = (out / "t.safetensors").read_bytes()
    assert main([*base, "--max-steps", "1", "--resume", "--out", str(out)]) == 0
    assert "note: the run is at step 2 already, --max-steps 1: nothing to train; raise --max-steps to go on" in \
        capsys.readouterr().err
    assert steps(out) == [1, 2] and (out / "t.safetensors").read_bytes() == before


def test_a_resume_says_where_it_goes_on_from(finished, tmp_path, capsys):
    """A run killed after writing a later step's model but before its state showed only "step 3/4" on resume, with
    no word of which save it continued from."""
    out, base = copy(finished, tmp_path)
    capsys.readouterr()
    assert main([*base, "--max-steps", "4", "--resume", "--out", str(out)]) == 0
    assert "--resume: from step 2, the last save in state.safetensors" in capsys.readouterr().out
    assert steps(out) == [1, 2, 3, 4]
