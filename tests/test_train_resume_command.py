"""`python -m medti.train --resume --out DIR` with no other flag: the run records its command and settings in
DIR/command.private.json when it starts, and a resume takes every flag not typed from there. It ends with the bytes
of an uninterrupted run; a typed flag a resume may not change is refused with the saved and the typed value; one it
may change (--max-steps, a moved --data) is taken; a folder from before the record resumes the old way; a damaged
record is one line."""
import dataclasses
import json
import shlex
import shutil

import pytest

from medti.train import main
from medti.training import trainer
from medti.training.config import TrainConfig
from medti.training.demo import phantoms, tiny_model

RECORD = "command.private.json"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(folder, flags, whole, cut): a 4-step run with validation and every random mode on, and the same run
    stopped by Ctrl-C right after its save at step 2 (what a killed run leaves: the save, no later one)."""
    folder = tmp_path_factory.mktemp("command")
    model, config = tiny_model(folder / "model")
    data = phantoms(folder / "data", 6, seed=0)
    flags = ["--model", str(model), "--config", str(config), "--data", str(data), "--token", "<t>", "--vectors",
             "2", "--preview-every", "0", "--save-every", "2", "--max-steps", "4", "--seed", "5", "--latents",
             "random", "--flip", "--val-fraction", "0.34"]
    assert main([*flags, "--out", str(folder / "whole")]) == 0

    def save_then_stop(s, step, val_loss):
        save(s, step, val_loss)
        if step == 2:
            raise KeyboardInterrupt
    save = trainer.save
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "save", save_then_stop)
        assert main([*flags, "--out", str(folder / "cut")]) == 130
    return folder, flags, folder / "whole", folder / "cut"


def copy(runs, tmp_path):
    shutil.copytree(runs[3], tmp_path / "run")
    return tmp_path / "run"


def record(out) -> dict:
    return json.loads((out / RECORD).read_text())


def steps(out) -> list:
    return [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_the_run_records_its_flags_and_every_setting(runs):
    folder, flags, _, cut = runs
    saved = record(cut)
    assert shlex.split(saved["flags"]) == [*flags, "--out", str(cut)] and saved["resumes"] == []
    # the settings as TrainConfig holds them when built from the same values by hand: every field, defaults too
    expected = TrainConfig(model=flags[1], config=flags[3], data=flags[5], token="<t>", vectors=2, preview_every=0,
                           save_every=2, max_steps=4, seed=5, latents="random", flip=True, val_fraction="0.34",
                           out=str(cut))
    assert saved["settings"] == dataclasses.asdict(expected)


def test_resume_with_only_out_ends_as_an_uninterrupted_run(runs, tmp_path):
    _, _, whole, _ = runs
    out = copy(runs, tmp_path)
    assert steps(out) == [1, 2]
    assert main(["--resume", "--out", str(out)]) == 0
    for name in ("t.safetensors", "t-best.safetensors", "state.safetensors", "val.txt"):
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name
    logs = [[json.loads(line) for line in (o / "log.jsonl").read_text().splitlines()] for o in (out, whole)]
    assert [(r["loss"], r.get("val_loss")) for r in logs[0]] == [(r["loss"], r.get("val_loss")) for r in logs[1]]
    assert record(out)["resumes"] == [shlex.join(["--resume", "--out", str(out)])]


# --lr 0.005 is the default rate of textual inversion (A1111's), the rate the run trained at without --lr
@pytest.mark.parametrize("typed, words", [
    (["--lr", "0.01"], "was trained with --lr 0.005; you gave --lr 0.01; drop the flag or use another --out"),
    (["--seed", "0"], "was trained with --seed 5; you gave --seed 0; drop the flag"),   # typed, though the default
    (["--strict"], "was trained with no --strict; you gave --strict; drop the flag"),
    (["--vectors", "3", "--val-fraction", "0.5"],
     "was trained with --val-fraction 0.34, --vectors 2; you gave --val-fraction 0.5, --vectors 3; drop those flags"),
])
def test_a_changed_setting_is_refused_with_both_values(runs, tmp_path, capsys, typed, words):
    out = copy(runs, tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(["--resume", "--out", str(out), *typed]) == 2
    assert f"--resume: {out} {words}" in one_line_error(capsys)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before   # nothing written


def test_flags_a_resume_may_change_are_taken_and_kept(runs, tmp_path, capsys):
    """--max-steps raised, --data moved to another folder (the same images): the run goes on there, and the record
    keeps both for the next resume."""
    folder, _, _, _ = runs
    out, moved = copy(runs, tmp_path), tmp_path / "moved-data"
    shutil.copytree(folder / "data", moved)
    assert main(["--resume", "--out", str(out), "--max-steps", "5", "--data", str(moved)]) == 0
    assert steps(out) == [1, 2, 3, 4, 5]
    assert record(out)["settings"]["max_steps"] == 5 and record(out)["settings"]["data"] == str(moved)
    capsys.readouterr()
    assert main(["--resume", "--out", str(out)]) == 0
    assert "the run is at step 5 already, --max-steps 5: nothing to train" in capsys.readouterr().err


def test_a_run_from_before_the_record_resumes_as_before(runs, tmp_path, capsys):
    """No command.private.json: `--resume --out` alone says to give the flags again; given, the run resumes and
    from then on has a record (its first command unknown)."""
    _, flags, whole, _ = runs
    out = copy(runs, tmp_path)
    (out / RECORD).unlink()
    assert main(["--resume", "--out", str(out)]) == 2
    err = one_line_error(capsys)
    assert f"--resume: {out} has no {RECORD}" in err and "give the run's flags again, --data and the rest" in err
    argv = [*flags, "--out", str(out), "--resume"]
    assert main(argv) == 0
    assert (out / "t.safetensors").read_bytes() == (whole / "t.safetensors").read_bytes()
    assert record(out)["flags"] is None and record(out)["resumes"] == [shlex.join(argv)]


@pytest.mark.parametrize("damage, words", [
    (b"{\"settings\": {\"max_steps\": 4", "JSONDecodeError"),
    (b"[1, 2]", "TypeError"),
    (b"\xff\xfe", "UnicodeDecodeError"),
    (b"{\"flags\": null}", "KeyError"),
    (b"{\"settings\": {\"max_steps\": \"4\"}}", "setting max_steps is \"4\", not a whole number"),
    (b"{\"settings\": {\"flip\": 1}}", "setting flip is 1, not true or false"),
])
def test_a_damaged_record_is_one_line(runs, tmp_path, capsys, damage, words):
    out = copy(runs, tmp_path)
    (out / RECORD).write_bytes(damage)
    state = (out / "state.safetensors").read_bytes()
    assert main(["--resume", "--out", str(out)]) == 2
    err = one_line_error(capsys)
    assert f"--resume: {out / RECORD} is damaged ({words}" in err and "delete it and give the run's flags" in err
    assert (out / RECORD).read_bytes() == damage and (out / "state.safetensors").read_bytes() == state


def test_resume_without_out_names_the_flag(capsys):
    assert main(["--resume"]) == 2
    assert one_line_error(capsys) == "error: --resume: name the run's folder with --out"
