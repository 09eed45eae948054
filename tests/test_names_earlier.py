"""Files written before shared files lost their paths still work where medti reads them back: a training run whose
saved settings hold paths resumes, and so do its DreamBooth class images; a generation run whose manifest holds
paths resumes (and its merged manifest then holds none); and a step file that names its base model without a folder
is refused in one line asking for --model. The earlier files are made here by writing the old fields into files
made now."""
import json

import torch
from PIL import Image, PngImagePlugin
from safetensors import safe_open

from conftest import private_key
from medti import evaluate, generate, train
from medti.files.atomic import safetensors_bytes
from medti.files.embedding_file import Embedding, write
from medti.training.demo import phantoms, tiny_model


def rewrite_settings(state, change):
    """state.safetensors with its settings replaced by change(settings), tensors and other metadata as they were."""
    with safe_open(str(state), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta["settings"] = json.dumps(change(json.loads(meta["settings"])), sort_keys=True)
    state.write_bytes(safetensors_bytes(tensors, meta))


def test_a_run_that_saved_paths_resumes_and_another_model_file_is_refused(tmp_path, capsys):
    """Before, the settings held --model and --config as typed and the held-out images by path, with no model
    sha256. Such a run resumes; the same run with a model file of the same name but other bytes does not."""
    model, config = tiny_model(tmp_path / "model")
    data = phantoms(tmp_path / "data", 6, seed=0)
    args = ["--model", str(model), "--config", str(config), "--data", str(data), "--token", "<t>", "--vectors", "2",
            "--preview-every", "0", "--save-every", "2", "--val-fraction", "0.5", "--val-draws", "2",
            "--out", str(tmp_path / "run")]
    assert train.main([*args, "--max-steps", "2"]) == 0
    names = private_key(tmp_path / "run")

    def earlier(settings):
        held = settings["validation"]
        del settings["model_sha256"]
        return {**settings, "model": str(model), "config": str(config),
                "validation": {**held, "files": [names[f] for f in held["files"]]}}
    rewrite_settings(tmp_path / "run" / "state.safetensors", earlier)
    assert train.main([*args, "--max-steps", "4", "--resume"]) == 0
    with safe_open(str(tmp_path / "run" / "state.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["settings"])["model"] == "tiny-random.safetensors"   # saved as now
    other, _ = tiny_model(tmp_path / "other", seed=1)   # the same file name, other weights
    capsys.readouterr()
    assert train.main([*args[:1], str(other), *args[2:], "--max-steps", "6", "--resume"]) == 2
    assert "other settings: the file of --model" in capsys.readouterr().err


def test_a_generation_run_whose_manifest_holds_paths_resumes_without_them(tmp_path):
    model, config = tiny_model(tmp_path / "model")
    init = phantoms(tmp_path / "images", 1, seed=0) / "phantom000.png"
    argv = ["--model", str(model), "--config", str(config), "--prompt", "x", "--steps", "1", "--size", "32",
            "--init-image", str(init), "--strength", "0.5", "--out", str(tmp_path / "gen")]
    assert generate.main([*argv, "--n", "1"]) == 0
    manifest = tmp_path / "gen" / "manifest.jsonl"
    record = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**record, "model": str(model), "init_image": str(init)}) + "\n")   # as before
    assert generate.main([*argv, "--n", "2", "--resume"]) == 0
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(records) == 2 and str(tmp_path) not in manifest.read_text()
    assert {(r["model"], r["init_image"]) for r in records} == {("tiny-random.safetensors", record["init_image"])}


def test_a_base_model_named_without_its_folder_asks_for_model(tmp_path, capsys, inception_file):
    """An embedding names its base model by the file's name alone; scoring its run's steps without --model, from a
    folder where no such file is, is one line asking for --model (not a loading error about a missing file)."""
    emb = Embedding("<t>", torch.zeros(2, 64), {"base_model": "tiny-random.safetensors"})   # the tiny model's width
    (tmp_path / "run").mkdir()
    write(tmp_path / "run" / "t-10.safetensors", emb)
    real = phantoms(tmp_path / "real", 4, seed=0)
    assert evaluate.main(["--run", str(tmp_path / "run"), "--real", str(real), "--n", "2", "--k", "1",
                          "--inception", str(inception_file), "--out", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "t-10.safetensors: its base model is 'tiny-random.safetensors'" in err
    assert "give --model with its path" in err



def test_class_images_name_their_model_without_its_path_and_earlier_ones_are_kept(tmp_path):
    """DreamBooth's class images are generated images: their parameters name the model by its file's name. Class
    images made before, whose parameters hold the model's path, are the same recipe: a resumed run keeps them."""
    model, config = tiny_model(tmp_path / "model")
    argv = ["--model", str(model), "--config", str(config), "--data", str(phantoms(tmp_path / "data", 2, seed=0)),
            "--method", "lora", "--instance-prompt", "a scan of sks", "--class-prompt", "a scan", "--class-images",
            "2", "--save-every", "1", "--preview-every", "0", "--out", str(tmp_path / "run")]
    assert train.main([*argv, "--max-steps", "1"]) == 0
    first = tmp_path / "run" / "class-images" / "00000.png"
    with Image.open(first) as image:
        parameters, pixels = image.info["parameters"], image.copy()
    assert parameters.endswith("Model: tiny-random.safetensors") and str(tmp_path) not in parameters
    earlier = PngImagePlugin.PngInfo()   # as an earlier release wrote it: --model as given
    earlier.add_text("parameters", parameters.replace("tiny-random.safetensors", str(model)))
    pixels.save(first, pnginfo=earlier)
    kept = first.read_bytes()
    assert train.main([*argv, "--max-steps", "2", "--resume"]) == 0
    assert first.read_bytes() == kept
