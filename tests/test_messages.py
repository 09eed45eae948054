"""The wording of medti's one-line errors under hostile input: an unknown flag gets the nearest real one, a message
that would quote a 10,000-character value is shortened with its start and its advice kept, and another library's
text relayed inside a message is cut at a sentence, not inside a word."""
import argparse
import importlib
import pickle

import pytest
import torch
from safetensors.torch import save_file
from test_evaluate import _write_set

from medti import embeddings as embeddings_command
from medti import evaluate
from medti import train as train_command
from medti.cli import ArgumentParser, run_main
from medti.files import embedding_file
from medti.generation.prompts import PromptError, check_length
from minisd import dinov2_load
from minisd.config import LoadError
from minisd.errors import UserError


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


@pytest.mark.parametrize("argv, words", [
    (["--max-step", "2"], "unrecognized arguments: --max-step 2; did you mean --max-steps?"),
    (["--val-fration=0.2"], "did you mean --val-fraction?"),
    (["--bogus"], "unrecognized arguments: --bogus (see"),   # nothing near: no guess
])
def test_an_unknown_flag_gets_the_nearest_one(capsys, argv, words):
    """argparse said only "unrecognized arguments"; difflib's nearest flag of the command is now added."""
    with pytest.raises(SystemExit) as stop:
        train_command.main(argv)
    assert stop.value.code == 2 and words in error_line(capsys)


def test_an_unknown_flag_of_a_subcommand_gets_that_subcommand_s_flag(capsys, tmp_path):
    """The top parser reports a subcommand's unknown flag; the suggestion comes from the subcommand's flags."""
    with pytest.raises(SystemExit):
        embeddings_command.main(["export", "a.pt", str(tmp_path / "b.pt"), "--format", "a1111", "--forse"])
    assert "did you mean --force?" in error_line(capsys)


def test_a_huge_message_keeps_its_start_and_its_advice(capsys):
    """A value quoted whole (10,114 characters in the report) buried the fix at the end of the line: the one place
    that prints errors keeps the start and the end, whole words, and says how much it left out."""
    from medti.cli import MAX_MESSAGE
    dump = " ".join(f"word{i}" for i in range(1500))
    message = f"--prompt {dump}: too long; shorten it"

    def run(args):
        raise UserError(message)
    assert len(message) > 10 * MAX_MESSAGE and run_main(argparse.ArgumentParser(), run, []) == 2
    line = error_line(capsys)
    assert len(line) <= MAX_MESSAGE + 50, len(line)   # 50: "error: " and the "[N characters left out]" note
    assert line.startswith("error: --prompt word0 word1 ") and line.endswith(" word1499: too long; shorten it")
    head, left_out = line.split(" … [")
    count = int(left_out.split(" characters left out]")[0].replace(",", ""))
    tail = left_out.split("] … ")[1]
    assert len(head) - len("error: ") + count + len(tail) == len(message)   # the three parts are the whole


def test_a_long_prompt_is_quoted_shortened_at_the_source():
    """generate's token-length error quoted the whole term: a 2,000-word prompt gave a 10,000-character line."""
    term = " ".join(["lung"] * 2000)
    with pytest.raises(PromptError) as e:
        check_length([(term, 1.0)], lambda text: len(text.split()))
    message = str(e.value)
    assert len(message) < 300 and "holds 2,000 tokens, 1,925 more than the 75 that fit" in message, message
    assert f"({len(term):,} characters)" in message


def test_an_argparse_error_is_capped_too(capsys):
    """A prompt pasted without its flag comes back whole in argparse's "unrecognized arguments" line."""
    from medti.cli import MAX_MESSAGE
    p = ArgumentParser(prog="x")
    with pytest.raises(SystemExit):
        p.parse_args(["word " * 3000])
    assert len(error_line(capsys)) <= MAX_MESSAGE + 50


def test_torch_s_text_is_cut_at_a_sentence(tmp_path):
    """A damaged .pt: torch's message was cut at 160 characters, inside "a high likelihood"; now it is whole
    sentences of torch's own text that fit in 160 characters (torch's next character is the space after a full
    stop)."""
    torch.save({"x": torch.zeros(3)}, tmp_path / "ok.pt")
    (tmp_path / "bad.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:200])
    with pytest.raises(RuntimeError) as theirs:
        torch.load(tmp_path / "bad.pt", weights_only=True)
    torch_text = " ".join(str(theirs.value).split())
    assert len(torch_text) > 160   # else there is nothing to cut
    with pytest.raises(embedding_file.EmbeddingError) as e:
        embedding_file.read(tmp_path / "bad.pt")
    relayed = str(e.value).split("RuntimeError, ", 1)[1]
    assert torch_text.startswith(relayed) and relayed.endswith(".") and torch_text[len(relayed)] == " ", relayed
    assert 0 < len(relayed) <= 160


@pytest.mark.parametrize("text, limit, expected", [
    ("One. Two three. Four", 15, "One. Two three."),     # the sentence ending exactly at the limit is whole
    ("One. Two three. Four", 14, "One."),
    ("a, b, c d e f g", 8, "a, b …"),                    # no sentence fits: the last clause
    ("abc def ghi", 9, "abc def …"),                     # nor a clause: the last word
    ("abcdefghij", 4, "abcd …"),
    ("short  text", 40, "short text"),
])
def test_excerpt_cuts_at_boundaries(text, limit, expected):
    from minisd.errors import excerpt
    assert excerpt(text, limit) == expected


def test_torch_s_weights_only_refusal_says_what_it_refused(tmp_path):
    """torch opens every weights-only refusal with the same advice (load with weights_only=False, which would run the
    file's code); the first 160 characters were that advice. What is relayed is what differs: the unpickler's
    reason, here the opcode torch names in its own message."""
    (tmp_path / "odd.pt").write_bytes(pickle.dumps({"a": complex(1, 2)}, protocol=4))
    with pytest.raises(Exception) as theirs:
        torch.load(tmp_path / "odd.pt", weights_only=True)
    reason = str(theirs.value).split("WeightsUnpickler error:")[1].split("Check the documentation")[0]
    with pytest.raises(embedding_file.EmbeddingError) as e:
        embedding_file.read(tmp_path / "odd.pt")
    assert str(e.value).endswith(f"UnpicklingError, {' '.join(reason.split())}") and "weights_only` set" not in \
        str(e.value), str(e.value)


def test_an_a1111_export_is_named_with_its_article(tmp_path, capsys):
    """It read "a a1111 file must end in .pt or .bin"."""
    source = tmp_path / "e.safetensors"
    embedding_file.write(source, embedding_file.Embedding("<e>", torch.ones(1, 4)))
    assert embeddings_command.main(["export", str(source), str(tmp_path / "e.safetensors2"), "--format",
                                    "a1111"]) == 2
    assert error_line(capsys).endswith("e.safetensors2: an A1111 file must end in .pt or .bin")


@pytest.fixture
def folders(tmp_path):
    return _write_set(tmp_path / "real", 6), tmp_path


@pytest.mark.parametrize("command, argv, words", [
    # a missing --embeddings folder was an embedding file "with unknown extension ''", found after loading
    ("generate", ["--model", "{tmp}/m.safetensors", "--config", "sd2-base", "--prompt", "x", "--out", "{tmp}/o",
                  "--embeddings", "{tmp}/nowhere"], "--embeddings {tmp}/nowhere: no such file or folder"),
    ("generate", ["--model", "{tmp}/m.safetensors", "--config", "sd2-base", "--prompt", "x", "--out", "{tmp}/o",
                  "--init-image", "{tmp}/nowhere.png"], "--init-image {tmp}/nowhere.png: no such file"),
    ("generate", ["--model", "{tmp}/nowhere.safetensors", "--config", "sd2-base", "--prompt", "x", "--out",
                  "{tmp}/o"], "--model {tmp}/nowhere.safetensors: no such file, and not a preset"),
    ("embeddings", ["info", "{tmp}/nowhere"], "{tmp}/nowhere: no such file"),
    ("lora", ["info", "{tmp}/nowhere.safetensors"], "{tmp}/nowhere.safetensors: no such file"),
    ("evaluate", ["--real", "{tmp}/nowhere.npz", "--fake", "{real}", "--out", "{tmp}/o", "--inception",
                  "{tmp}/absent.pth"], "--real {tmp}/nowhere.npz: no such file"),
    ("evaluate", ["--real", "{real}", "--run", "{tmp}/nowhere", "--out", "{tmp}/o"],
     "--run {tmp}/nowhere: no such folder"),
    ("data", ["preview", "--data", "{tmp}/nowhere", "--out", "{tmp}/o"], "--data {tmp}/nowhere: no such folder"),
])
def test_a_path_that_does_not_exist_says_so_with_its_flag(folders, capsys, command, argv, words):
    real, tmp = folders
    fill = {"{tmp}": str(tmp), "{real}": str(real)}
    for key, value in fill.items():
        argv = [a.replace(key, value) for a in argv]
        words = words.replace(key, value)
    assert importlib.import_module(f"medti.{command}").main(argv) == 2
    assert error_line(capsys).startswith(f"error: {words}")
    assert not (tmp / "o").exists()


def test_a_dinov2_path_that_does_not_exist_is_one_line(tmp_path, monkeypatch):
    """"./weights" has one slash, so it was taken for a hub name, and huggingface_hub's HFValidationError was a
    traceback; no network is touched now (the probe would fail the test)."""
    monkeypatch.setattr(dinov2_load, "hub_reachable", lambda *a: pytest.fail("the hub was probed"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LoadError) as e:
        dinov2_load.load_dinov2("./weights")
    assert "./weights: no such folder, and not a hub name such as facebook/dinov2-large" in str(e.value)


@pytest.fixture
def run_folder(tmp_path):
    """A training run's folder with two saved steps whose base model is a file outside the presets."""
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")   # its header is read, never its tensors
    run = tmp_path / "run"
    run.mkdir()
    for step in (10, 20):
        embedding_file.write(run / f"t-{step}.safetensors", embedding_file.Embedding(
            "<t>", torch.ones(2, 32), {"base_model": str(tmp_path / "model.safetensors")}))
    return run


@pytest.mark.parametrize("extra, words", [
    ([], "model.safetensors: which model is this?"),
    (["--config", "sd2-base", "--k", "5", "--n", "3"], "--k 5: each set needs more than k images"),
    (["--config", "sd2-base", "--kid-subset-size", "6", "--n", "3", "--k", "2"], "--kid-subset-size 6: larger"),
])
def test_evaluate_run_checks_before_anything_is_encoded(run_folder, folders, capsys, monkeypatch, extra, words):
    """--run found a model file without --config only when the first step was generated, after the real set was
    encoded; and --k (or --kid-subset-size) against --n only after generating and encoding a step."""
    real, tmp = folders
    for name in ("load_network", "real_side"):
        monkeypatch.setattr(evaluate, name, lambda *a, **k: pytest.fail("the network loaded or the set was encoded"))
    argv = ["--real", str(real), "--run", str(run_folder), "--out", str(tmp / "o"), "--device", "cpu", *extra]
    assert evaluate.main(argv) == 2
    assert words in error_line(capsys)
