"""Choosing a step of an image-conditioned run: `medti.train --keep-saves` keeps each save's model (resume included),
and `medti.evaluate --run` makes variations of the run's held-out cases with each step's model, through medti.generate
itself (so its images are those of a direct `medti.generate --condition-image`), scores them against those cases
and marks the step of lowest FID; a re-run reuses the images; what it cannot score is one line.

Figures are compared for equality only where both sides run the same arithmetic (the same images, the same code)."""
import json

import numpy as np
import pytest
from PIL import Image
from test_evaluate import _error
from test_image_conditioning import encoder_release

from medti import evaluate, generate
from medti.files.pseudonyms import KEY, read_key
from medti.train import main as train
from medti.training.demo import phantoms, tiny_model

# 6 phantoms, half held out: 3 cases, 2 variations each per step; --k 2 and KID subsets of 3 fit sets of 3 and 6
SCORING = ["--n", "6", "--steps", "2", "--k", "2", "--kid-subset-size", "3", "--kid-subsets", "3", "--device", "cpu"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("image-eval")
    model, config = tiny_model(tmp / "model")
    encoder_release(tmp / "enc", width=48)
    return {"tmp": tmp, "model": model, "config": config, "data": phantoms(tmp / "data", 6, seed=0),
            "enc": tmp / "enc"}


def image_run(f, out, *extra) -> list:
    return ["--model", str(f["model"]), "--config", str(f["config"]), "--data", str(f["data"]), "--method", "unet",
            "--condition", "dinov2", "--encoder", str(f["enc"]), "--resolution", "64", "--preview-every", "0",
            "--save-dtype", "fp32", "--lr", "1e-3", "--save-every", "1", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def run(files):
    """Two saves (steps 1 and 2), each kept, with half of --data held out."""
    out = files["tmp"] / "run"
    assert train(image_run(files, out, "--max-steps", "2", "--keep-saves", "--val-fraction", "0.5")) == 0
    return out


def test_keep_saves_keeps_each_step_and_survives_resume(files, run, tmp_path):
    """model-<step>.safetensors at each save, the last one the same bytes as model.safetensors; a run stopped after
    step 1 and resumed (--keep-saves may be turned on at the resume) ends with the same files."""
    assert (run / "model-1.safetensors").is_file()
    assert (run / "model-2.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()
    assert (run / "model-1.safetensors").read_bytes() != (run / "model-2.safetensors").read_bytes()
    out = tmp_path / "resumed"
    assert train(image_run(files, out, "--max-steps", "1", "--val-fraction", "0.5")) == 0
    assert not (out / "model-1.safetensors").exists()   # the default keeps only model.safetensors
    assert train(["--resume", "--out", str(out), "--max-steps", "2", "--keep-saves"]) == 0
    assert (out / "model-2.safetensors").read_bytes() == (run / "model-2.safetensors").read_bytes()


def test_keep_saves_is_for_unet_runs(files, tmp_path, capsys):
    args = ["--model", str(files["model"]), "--config", str(files["config"]), "--data", str(files["data"]),
            "--token", "<t>", "--keep-saves", "--out", str(tmp_path / "ti")]
    assert train(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--keep-saves is for --method unet, not ti" in err, err


def held_out_files(run) -> list:
    """The held-out cases by hand: val.txt's pseudonyms, names.private.tsv's paths, under --data."""
    key = read_key(run / KEY)
    return [key[name] for name in (run / "val.txt").read_text().split()]


def test_steps_are_variations_of_held_out_cases(files, run, inception_file, tmp_path, capsys):
    out = tmp_path / "scores"
    argv = ["--run", str(run), "--out", str(out), "--inception", str(inception_file), *SCORING]
    assert evaluate.main(argv) == 0
    rows = json.loads((out / "steps.json").read_text())
    assert [r["step"] for r in rows] == [1, 2] and [r["n_fake"] for r in rows] == [6, 6]
    assert all(r["chosen_by"] == "fid" for r in rows) and rows[0]["fid"] != rows[1]["fid"]
    best = min(rows, key=lambda r: r["fid"])["step"]
    table = (out / "steps.md").read_text()
    assert f"lowest FID at step {best}" in table and f"**{best}** (lowest FID)" in table
    assert (out / "fid.png").is_file()
    # step 1's images of the first held-out case = a direct medti.generate of that case, seeds 0 and 1
    cases = held_out_files(run)
    by_hand = tmp_path / "by-hand"
    assert generate.main(["--model", str(run / "model-1.safetensors"), "--config", str(files["config"]),
                          "--encoder", str(files["enc"]), "--condition-image", str(files["data"] / cases[0]),
                          "--n", "2", "--seed", "0", "--steps", "2", "--sampler", "dpmpp_2m", "--device", "cpu",
                          "--out", str(by_hand)]) == 0
    for name in ("00000.png", "00001.png"):
        assert np.array_equal(np.array(Image.open(by_hand / name)), np.array(Image.open(out / "step-1" / name)))
    records = [json.loads(line) for line in (out / "step-1" / "manifest.jsonl").read_text().splitlines()]
    assert len({r["condition"][0]["pseudonym"] for r in records}) == 3   # every held-out case, none other
    # a re-run into the same folder makes no image again, and scores the same
    before = (out / "step-2" / "00005.png").stat().st_mtime_ns
    assert evaluate.main(argv) == 0
    assert json.loads((out / "steps.json").read_text()) == rows
    assert (out / "step-2" / "00005.png").stat().st_mtime_ns == before


def test_sources_folder_replaces_held_out_cases(files, run, inception_file, tmp_path):
    """--sources DIR: variations of its images, scored against them when --real is left out."""
    sources = phantoms(tmp_path / "cases", 3, seed=5)
    out = tmp_path / "scores"
    assert evaluate.main(["--run", str(run), "--sources", str(sources), "--out", str(out), "--inception",
                          str(inception_file), *SCORING]) == 0
    records = [json.loads(line) for line in (out / "step-2" / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 6 and "the 3 images of --sources" in (out / "steps.md").read_text()


def test_what_cannot_be_scored_is_one_line(files, run, inception_file, tmp_path, capsys):
    nothing_held = tmp_path / "nothing-held"
    assert train(image_run(files, nothing_held, "--max-steps", "1", "--keep-saves")) == 0
    text_run = tmp_path / "text-run"
    assert train(["--model", str(files["model"]), "--config", str(files["config"]), "--data", str(files["data"]),
                  "--method", "unet", "--instance-prompt", "a phantom", "--resolution", "64", "--preview-every", "0",
                  "--max-steps", "1", "--save-every", "1", "--out", str(text_run)]) == 0
    moved = tmp_path / "moved"
    (moved).mkdir()
    for name in ("model-1.safetensors", "val.txt", "command.private.json"):
        (moved / name).write_bytes((run / name).read_bytes())
    (moved / KEY).write_text("pseudonym\tpath\n")   # the key lost its rows
    base = ["--inception", str(inception_file), *SCORING]
    cases = [(["--run", str(nothing_held)], "held no images out (no val.txt"),
             (["--run", str(text_run)], "saved only model.safetensors, so its steps cannot be compared; train with "
                                        "--keep-saves"),
             (["--run", str(moved)], "is not in names.private.tsv; give --sources DIR"),
             (["--run", str(run), "--model", str(files["model"])], "--model: "),
             (["--run", str(run), "--sources", str(tmp_path / "none")], "--sources"),
             (["--real", str(files["data"]), "--fake", str(files["data"]), "--sources", str(files["data"])],
              "--sources is for --run")]
    for argv, words in cases:
        assert evaluate.main([*argv, "--out", str(tmp_path / "o"), *base]) == 2
        assert words in _error(capsys)


def test_cases_are_read_as_the_run_read_its_images(files, inception_file, tmp_path):
    """A run trained with --preprocess cxr makes its variations of cases cropped as cxr crops them: step 1's images
    equal a direct medti.generate of the case with --preprocess cxr, and differ from one with the default center
    crop (what evaluate passed before, so the encoder saw squares it never trained on)."""
    data = tmp_path / "bordered"
    data.mkdir()
    for file in sorted(phantoms(tmp_path / "plain", 4, seed=3).iterdir()):
        # a wide black border on the left and at the top: cxr crops it away, center keeps part of it
        gray = np.array(Image.open(file).convert("L"))
        Image.fromarray(np.pad(gray, ((40, 0), (60, 0)))).save(data / file.name)
    run = tmp_path / "cxr-run"
    argv = image_run({**files, "data": data}, run, "--max-steps", "1", "--keep-saves", "--val-fraction", "0.5",
                     "--preprocess", "cxr")
    assert train(argv) == 0
    out = tmp_path / "scores"
    assert evaluate.main(["--run", str(run), "--out", str(out), "--inception", str(inception_file),
                          "--n", "4", "--steps", "2", "--k", "1", "--kid-subset-size", "2", "--kid-subsets", "2",
                          "--device", "cpu"]) == 0
    case = data / held_out_files(run)[0]
    made = {}
    for preprocess in ("cxr", "center"):
        assert generate.main(["--model", str(run / "model-1.safetensors"), "--config", str(files["config"]),
                              "--encoder", str(files["enc"]), "--condition-image", str(case), "--n", "1",
                              "--steps", "2", "--sampler", "dpmpp_2m", "--device", "cpu", "--preprocess", preprocess,
                              "--out", str(tmp_path / preprocess)]) == 0
        made[preprocess] = np.array(Image.open(tmp_path / preprocess / "00000.png"))
    step = np.array(Image.open(out / "step-1" / "00000.png"))
    assert np.array_equal(step, made["cxr"]) and not np.array_equal(step, made["center"])
