"""Training previews: a run killed and resumed makes every preview an uninterrupted run makes; previews are cheap by
default (20 steps of DPM++ 2M), announced, labelled, and counted in the ETA; the rate leaves the first step's
warm-up and the previews out."""
import json
import re
import time

import numpy as np
import pytest
from PIL import Image

import medti.training.trainer as T
from medti.train import main
from medti.training import previews as V
from medti.training import progress as P
from medti.training.demo import phantoms, tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("previews")
    model, config = tiny_model(folder / "model")
    data = phantoms(folder / "data", 6, seed=0)
    return ["--model", str(model), "--config", str(config), "--data", str(data), "--token", "<t>", "--vectors", "2",
            "--resolution", "64"]


class Killed(BaseException):
    """Where SIGKILL lands: nothing after it runs. A BaseException leaves the folder as a kill does (the files
    written so far, no state newer than the last save; the folder's flock goes with the process either way)."""


def previews(out) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.glob("preview-*.png"))}


@pytest.mark.parametrize("dies_at", [2, 3, 4])
def test_a_run_killed_during_a_preview_and_resumed_makes_every_preview(tiny, tmp_path, monkeypatch, dies_at):
    """Saves every 2 steps, a preview every step. Killed during the preview of step 2 (just saved) or of step 4
    (the last step, saved): the resumed run starts after that step and never made its preview. Killed during
    the preview of step 3 (saved at 2): steps 3 and 4 are trained again, with their previews."""
    run = [*tiny, "--max-steps", "4", "--save-every", "2", "--preview-every", "1", "--preview-steps", "2"]
    assert main([*run, "--out", str(tmp_path / "whole")]) == 0
    real = T.preview

    def dying(s, step):
        if step == dies_at:
            raise Killed
        real(s, step)
    monkeypatch.setattr(T, "preview", dying)
    with pytest.raises(Killed):
        main([*run, "--out", str(tmp_path / "killed")])
    monkeypatch.setattr(T, "preview", real)
    assert f"preview-{dies_at:06d}.png" not in previews(tmp_path / "killed")
    assert main([*run, "--out", str(tmp_path / "killed"), "--resume"]) == 0
    assert previews(tmp_path / "killed") == previews(tmp_path / "whole")   # the same files, byte for byte
    assert len(previews(tmp_path / "whole")) == 4


def test_previews_are_cheap_by_default_announced_and_labelled(tiny, tmp_path, capsys):
    assert main([*tiny, "--max-steps", "2", "--preview-every", "2", "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "preview at step 2: 4 images, 20 steps of DPM++ 2M\n" in err
    assert re.search(r"preview at step 2: wrote preview-000002\.png in \d+ s\n", err), err
    strip = Image.open(tmp_path / "run" / "preview-000002.png")
    assert "20 steps of DPM++ 2M, CFG 2" in strip.text["parameters"] and strip.size == (4 * 64, 64)
    pixels = np.asarray(strip.convert("L"))
    boxes = [pixels[:9, 64 * i:64 * (i + 1)] for i in range(4)]   # each image's label: light text on a black box
    assert all(box[1, :40].max() == 0 and box.max() > 150 for box in boxes)
    assert len({box.tobytes() for box in boxes}) == 4              # "step 2, seed 0" ... "step 2, seed 3"


def test_the_eta_counts_the_previews_to_come_and_the_rate_leaves_them_out(tiny, tmp_path, capsys, monkeypatch):
    """A preview that takes 3 s (the tiny model's take milliseconds; a real one takes minutes). At step 3 of 4
    one preview is still to come (step 4): the ETA is at least its 3 s. The rate at step 3 is that of step 3
    alone (a tiny-model step: tens of milliseconds); counted from the start, through the preview of step 2, it
    was at most 3 steps / 3 s."""
    monkeypatch.setattr(V, "write_preview", lambda s, step: time.sleep(3.0))
    assert main([*tiny, "--max-steps", "4", "--preview-every", "2", "--out", str(tmp_path / "run")]) == 0
    lines = {int(line.split()[1].split("/")[0]): line for line in capsys.readouterr().err.splitlines()
             if line.startswith("step ")}
    assert lines[1].endswith("ETA: measuring")
    assert re.search(r"ETA \d+ s \+ 2 preview\(s\), not timed yet$", lines[2])   # step 2's own, and step 4's
    eta = re.search(r"ETA (\d+) s \(1 preview\(s\) included\)$", lines[3])
    assert eta and int(eta[1]) >= 3, lines[3]
    it_s = [json.loads(line)["it_s"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert it_s[2] > 2.0, it_s   # 2 it/s: step 3 under 0.5 s, twice the old formula's most


def test_clock_arithmetic(monkeypatch):
    """The rate and the ETA on a clock moved by hand: first step 60 s (warm-up), then 1 s a step, a preview every
    5 steps of 30 s, 20 steps in all."""
    now = [0.0]
    monkeypatch.setattr(P.time, "perf_counter", lambda: now[0])
    clock = P.Clock(first=0)
    for step in range(1, 7):
        now[0] += 60.0 if step == 1 else 1.0
        rate = clock.tick(step)
        if step == 5:
            now[0] += 30.0
            clock.previewed(30.0)
    assert rate == 1.0   # steps 2..6: 5 steps in 35 s, 30 of them the preview
    # step 6: 14 steps (14 s) and the previews of steps 10, 15, 20 (3 x 30 s) to come
    assert clock.eta(6, 20, 5) == "ETA 1m44s (3 preview(s) included)"
    assert P.previews_left(5, 20, 5) == 4 and P.previews_left(6, 20, 5) == 3 and P.previews_left(6, 20, 0) == 0
    # a resumed run's missing preview (30 s) before its first step (60 s), then 1 s a step: the preview is no
    # part of either rate
    now[0] = 0.0
    clock = P.Clock(first=10)
    now[0] += 30.0
    clock.previewed(30.0)
    now[0] += 60.0
    assert clock.tick(11) == 1 / 60.0
    now[0] += 2.0
    assert clock.tick(13) == 1.0


def test_a_resumed_run_may_change_its_preview_settings(tiny, tmp_path, capsys):
    """Preview settings are not stored with the run, so a run saved under the old defaults (100 steps of Euler a)
    resumes, with the new ones or any others."""
    assert main([*tiny, "--max-steps", "2", "--save-every", "2", "--preview-every", "0", "--out",
                 str(tmp_path / "run")]) == 0
    assert main([*tiny, "--max-steps", "3", "--save-every", "2", "--preview-every", "3", "--preview-steps", "3",
                 "--preview-sampler", "euler_a", "--out", str(tmp_path / "run"), "--resume"]) == 0
    assert "preview at step 3: 4 images, 3 steps of Euler a" in capsys.readouterr().err


@pytest.mark.parametrize("extra, words", [
    (("--preview-sampler", "fast"), "--preview-sampler 'fast': one of euler_a, euler, dpmpp_2m, ddim"),
    (("--preview-steps", "2000"), "--preview-steps 2000: the linspace spacing has 1,000 training timesteps"),
    (("--preview-steps", "0"), "--preview-steps 0: give 1 to"),
])
def test_bad_preview_flags_are_one_line_before_anything_is_written(tiny, tmp_path, capsys, extra, words):
    """DPM++ 2M cannot take more than 1,000 steps of the linspace spacing: found hours into a run before."""
    assert main([*tiny, "--max-steps", "1", *extra, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err and not (tmp_path / "out").exists()
