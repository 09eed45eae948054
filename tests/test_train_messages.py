"""`python -m medti.train` under hostile input, in one line before the model trains: caption files that are not
text or make the prompt longer than the text tower reads, a LoRA --alpha or --prior-weight that makes every step
overflow, and the wording of a missing --token or --data; and the line that says what --val-fraction held out."""
import pytest
from safetensors import safe_open

import minisd
from medti.dataset.folder import load_dataset
from medti.files import lora_file
from medti.train import main
from medti.training.demo import phantoms, tiny_model
from minisd.tokenizer import MAX_PROMPT_TOKENS, Tokenizer

PROMPT = "a phantom of sks"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def data(tmp_path):
    return phantoms(tmp_path / "data", 4, seed=0)


def lora(model, data, out, *extra) -> list:
    return ["--model", str(model[0]), "--config", str(model[1]), "--data", str(data), "--method", "lora",
            "--instance-prompt", PROMPT, "--max-steps", "1", "--save-every", "1", "--preview-every", "0",
            "--out", str(out), *extra]


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("content, words", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not a UTF-8 text file (byte 0x89 at offset 0)"),
    (b"a disc\x00\x00\x00", "holds the control character '\\x00' at character 6"),
    ("a disc \x1b[31m".encode(), "holds the control character '\\x1b'"),
])
def test_a_caption_that_is_no_text_is_refused_naming_it(model, data, tmp_path, capsys, content, words):
    """Random bytes used to be decoded with U+FFFD replacements and trained on as the caption."""
    (data / "phantom001.txt").write_bytes(content)
    assert main([*lora(model, data, tmp_path / "run"), "--captions"]) == 2
    err = one_line(capsys)
    assert f"--data {data / 'phantom001.txt'}: {words}" in err, err
    assert not (tmp_path / "run").exists()


def test_a_caption_with_a_byte_order_mark_is_text(data):
    """Windows Notepad starts a UTF-8 file with EF BB BF: that is text, read without the mark."""
    (data / "phantom000.txt").write_bytes("\ufeffa bright disc\r\n".encode())
    assert load_dataset(data, 64, captions=True).captions[0] == "a bright disc"


def test_a_caption_past_the_token_limit_is_refused_before_training(model, data, tmp_path, capsys):
    """The text tower reads 75 tokens; a longer prompt was cut silently in training, while generate refuses it.
    The count is the tokenizer's own, made here on the prompt the template gives (default "{}, {caption}")."""
    caption = " ".join(["nodule"] * 80)
    (data / "phantom002.txt").write_text(caption + "\n")
    (data / "phantom003.txt").write_text("a small disc\n")
    count = len(Tokenizer().encode(f"{PROMPT}, {caption}"))
    assert count > MAX_PROMPT_TOKENS
    assert main([*lora(model, data, tmp_path / "run"), "--captions"]) == 2
    err = one_line(capsys)
    assert f"--data {data / 'phantom002.txt'}: with this caption the training prompt holds {count} tokens, " \
           f"{count - MAX_PROMPT_TOKENS} more than the {MAX_PROMPT_TOKENS} that fit" in err, err
    assert not (tmp_path / "run").exists()   # nothing trained, nothing left behind
    (data / "phantom002.txt").write_text(" ".join(["nodule"] * 5) + "\n")   # shortened: the run goes ahead
    assert main([*lora(model, data, tmp_path / "run"), "--captions"]) == 0


def test_alpha_and_prior_weight_that_overflow_are_refused_up_front(model, data, tmp_path, capsys):
    """--alpha 1e30 scaled the adapters' output by 2.5e29: every step was non-finite and the run stopped after ten,
    advising a lower --lr. The bound is the largest scale medti's LoRA reader takes (lora_file.MAX_ALPHA_SCALE)."""
    most = lora_file.MAX_ALPHA_SCALE * 4   # --rank 4, the default
    for extra, words in ((["--alpha", "1e30"], f"--alpha 1e+30: from 0 (= the rank) to {most:g}"),
                         (["--alpha", f"{most * 1.001}"], f"to {most:g}"),
                         (["--prior-weight", "inf", "--class-prompt", "a phantom", "--class-images", str(data)],
                          "--prior-weight inf: must be a finite number")):
        assert main(lora(model, data, tmp_path / "run", *extra)) == 2
        assert words in one_line(capsys)
        assert not (tmp_path / "run").exists()


def test_alpha_at_the_bound_trains_and_reads_back(model, data, tmp_path):
    """The bound is where the reader stops: a run at it writes a file that medti's own reader takes."""
    most = lora_file.MAX_ALPHA_SCALE * 4
    assert main(lora(model, data, tmp_path / "run", "--alpha", f"{most:g}")) == 0
    path = tmp_path / "run" / "lora.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["alpha"] == f"{most:g}"
    sd = minisd.load(model[0], config=model[1])
    lora_file.read(path, sd.unet, sd.text.tower)


@pytest.mark.parametrize("change, words", [
    ({"--token": ""}, "error: --token: give the placeholder to learn"),
    ({"--data": ""}, "error: --data: give the folder of training images"),
    ({"--data": "{tmp}/nowhere"}, "error: --data {tmp}/nowhere: no such folder"),
    ({"--data": "{data}/phantom000.png"}, "error: --data {data}/phantom000.png: a file, not a folder of training"),
    ({"--template": "{tmp}/nowhere.txt"}, "error: --template {tmp}/nowhere.txt: no such file"),
])
def test_missing_and_wrong_inputs_are_said_as_they_are(model, data, tmp_path, capsys, change, words):
    """A missing --token read `--token ''`; a --data left out, absent or a file all read "not a folder of training
    images"; a missing --template quoted Python's "[Errno 2] No such file or directory"."""
    args = ["--model", str(model[0]), "--config", str(model[1]), "--data", str(data), "--token", "<p>",
            "--out", str(tmp_path / "run")]
    for flag, value in change.items():
        value = value.replace("{tmp}", str(tmp_path)).replace("{data}", str(data))
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert main(args) == 2
    err = one_line(capsys)
    assert err.startswith(words.replace("{tmp}", str(tmp_path)).replace("{data}", str(data))), err
    assert "''" not in err


def test_val_fraction_says_how_many_it_held_out(model, tmp_path, capsys):
    """It never said how many images (of how many patients) the fraction came to: one line, beside the set's
    summary, that agrees with val.txt."""
    data = phantoms(tmp_path / "data", 7, seed=1)   # 7 PNG files: each its own patient
    assert main(["--model", str(model[0]), "--config", str(model[1]), "--data", str(data), "--token", "<p>",
                 "--vectors", "2", "--max-steps", "1", "--preview-every", "0", "--val-fraction", "0.5",
                 "--out", str(tmp_path / "run")]) == 0
    held = (tmp_path / "run" / "val.txt").read_text().splitlines()
    assert len(held) == 4   # 3.5 rounds half up
    assert "--val-fraction 0.5: held out 4 of 7 image(s) (4 patient(s)) for validation, listed in val.txt\n" in \
        capsys.readouterr().out
