"""What a new user of `--method lora | unet`, DreamBooth and `--lora` met (a trial run of the README, December):
a flag that would have been silently ignored is refused in one line, an --out inside an input folder is refused,
class images left by a killed run with other settings are made again (and refused on --resume), and the LoRA
errors name flags of ours, not torch's arguments."""
import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file

from medti.files.lora_file import LoRAFileError, info, read
from medti.generation.loras import LoRAError, find, parse_flag
from medti.train import build_parser, main
from medti.training.demo import phantoms, tiny_model

PROMPT, CLASS = "a phantom of sks", "a phantom"


def refused(capsys, args: list, words: str):
    """main(args) exits 2 with one line holding `words` (before any model is loaded: none exists here, so a check
    that let the mistake through would fail on the model, never download one)."""
    assert main(["--model", "no-such-model.safetensors", "--config", "sd2-base", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and words in err, err


def test_prior_weight_without_class_images_is_refused(tmp_path, capsys):
    """Alone it weighs nothing; it used to be accepted and ignored."""
    refused(capsys, ["--data", str(tmp_path), "--out", str(tmp_path.parent / "run"), "--method", "lora",
                     "--instance-prompt", PROMPT, "--prior-weight", "2"], "--prior-weight weighs the class images")
    assert not (tmp_path.parent / "run").exists()


def test_out_inside_the_class_images_folder_is_refused(tmp_path, capsys):
    """As --out inside --data: the run's previews would become class images of the next run."""
    (tmp_path / "data").mkdir(), (tmp_path / "class").mkdir()
    refused(capsys, ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "class" / "run"), "--method",
                     "lora", "--instance-prompt", PROMPT, "--class-prompt", CLASS, "--class-images",
                     str(tmp_path / "class")], "is inside --class-images")
    assert not (tmp_path / "class" / "run").exists()


def test_captions_with_a_template_that_has_no_caption_slot_is_refused(tmp_path, capsys):
    (tmp_path / "template.txt").write_text("{} only\n")
    refused(capsys, ["--data", str(tmp_path), "--out", str(tmp_path.parent / "run"), "--method", "lora",
                     "--instance-prompt", PROMPT, "--captions", "--template", str(tmp_path / "template.txt")],
            "no line has a {caption} slot")


@pytest.fixture
def tiny(tmp_path):
    model, config = tiny_model(tmp_path / "model")
    data = phantoms(tmp_path / "data", 2, seed=0)
    return ["--model", str(model), "--config", str(config), "--data", str(data), "--method", "lora",
            "--instance-prompt", PROMPT, "--max-steps", "1", "--save-every", "1", "--preview-every", "0"]


def test_class_images_of_a_killed_run_with_another_prompt_are_made_again(tiny, tmp_path, capsys):
    """A run killed while making its class images leaves them and no state; started again (no --resume needed)
    with another --class-prompt, it must not train on the old prompt's images. On --resume such an image is an
    error and stays as it is: the run's own images are never replaced."""
    out = tmp_path / "run"
    (out / "class-images").mkdir(parents=True)
    old = out / "class-images" / "00000.png"
    Image.new("RGB", (64, 64)).save(old, pnginfo=_text("class image 0: an old prompt"))
    assert main([*tiny, "--class-prompt", CLASS, "--class-images", "2", "--out", str(out)]) == 0
    assert "image 2/2: step 50/50" in capsys.readouterr().err   # the making is shown, as generate shows it
    with Image.open(old) as image:
        assert image.info["parameters"].startswith(f"class image 0: {CLASS}\n"), image.info
    Image.new("RGB", (64, 64)).save(old, pnginfo=_text("class image 0: an old prompt"))
    capsys.readouterr()
    refused(capsys, [*tiny, "--class-prompt", CLASS, "--class-images", "2", "--out", str(out), "--resume"],
            f"--resume: {old} was made with another --class-prompt")
    with Image.open(old) as image:
        assert image.info["parameters"] == "class image 0: an old prompt"


def _text(parameters: str) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    return info


def test_a_tag_without_lora_dir_says_how_to_give_one():
    with pytest.raises(LoRAError) as e:
        find("missing", {}, [], "<lora:missing:1>")
    assert "no --lora-dir to look in: pass --lora-dir FOLDER (holding missing.safetensors)" in str(e.value)
    assert "(no --lora-dir given)" not in str(e.value)


def test_a_file_that_is_no_torch_file_gets_no_torch_advice(tmp_path):
    """torch.load's weights-only refusal advises `weights_only=False`, an argument no medti command has."""
    (tmp_path / "notes.pt").write_text('{"step": 1}\n')
    with pytest.raises(LoRAFileError) as e:
        read(tmp_path / "notes.pt", None)
    assert "not a readable LoRA file" in str(e.value) and "weights_only" not in str(e.value), str(e.value)


def test_help_says_what_trains():
    """`--help` used to open with "Textual inversion: learn a token's vectors" only."""
    help_text = build_parser().format_help()
    assert "--method lora" in help_text.split("options:")[0] and "--method unet" in help_text.split("options:")[0]


def test_a_folder_given_as_lora_points_to_lora_dir(tmp_path):
    """It used to say "no such file" of a folder that is there."""
    with pytest.raises(LoRAError) as e:
        parse_flag(f"{tmp_path}:0.8")
    assert f"{tmp_path} is a folder" in str(e.value) and f"--lora-dir {tmp_path}" in str(e.value), str(e.value)


@pytest.mark.parametrize("tensors, words", [
    ({"<phantom>": torch.zeros(8, 64)}, "textual-inversion embedding: give it to generate's --embeddings"),
    ({"model.diffusion_model.out.2.bias": torch.zeros(4)}, "model checkpoint: load it with --model"),
])
def test_an_embedding_or_a_model_given_as_lora_is_named(tmp_path, tensors, words):
    save_file(tensors, tmp_path / "x.safetensors")
    with pytest.raises(LoRAFileError) as e:
        info(tmp_path / "x.safetensors")   # what `python -m medti.lora info` and --lora read first
    assert words in str(e.value), str(e.value)


def test_captions_without_any_caption_file_is_refused_and_some_missing_are_named(tiny, tmp_path, capsys):
    """--captions over a folder with no caption file trained on the bare template without a word (the files were
    named otherwise, or not copied): now one line naming --data; with some missing, a warning names them."""
    out = ["--captions", "--out", str(tmp_path / "run")]
    assert main([*tiny, *out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--data" in err and "none of its 2 image(s) has a caption" in err, err
    assert not (tmp_path / "run").exists()
    (tmp_path / "data" / "phantom000.txt").write_text("a disc\n")
    assert main([*tiny, *out]) == 0
    assert "warning: 1 of 2 image(s) in --data have no caption" in capsys.readouterr().err
