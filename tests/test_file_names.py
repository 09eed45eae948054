"""File and folder names that are not valid UTF-8 (an old export's Latin-1 `café.png`, bytes 63 61 66 e9): Python
holds them as lone surrogates, which crashed training (the data fingerprint) and the audit (half a report) when
they were encoded as UTF-8. Each command must finish, and every text file it writes must be valid UTF-8; the private
key that maps pseudonyms to files (names.private.tsv) names such a file exactly, its odd byte written as a
backslash, `x` and two hex digits."""
import os
import shutil
from pathlib import Path

import pytest
import torch

from medti.audit import main as audit
from medti.evaluate import main as evaluate
from medti.train import main as train
from medti.training.demo import phantoms, tiny_model

LATIN1 = b"caf\xe9-patient"   # not UTF-8: 0xe9 alone


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Six phantoms, the first renamed with Latin-1 bytes, under a folder whose own name is Latin-1 too."""
    root = tmp_path_factory.mktemp("names")
    folder = phantoms(root / "plain", 6, seed=0)
    odd = os.path.join(os.fsencode(root), b"dossier-\xe9t\xe9")
    shutil.copytree(os.fsencode(folder), odd)
    first = sorted(os.listdir(odd))[0]
    os.rename(os.path.join(odd, first), os.path.join(odd, LATIN1 + b".png"))
    return root, os.fsdecode(odd)


def utf8_texts(folder) -> list:
    """Every .md/.txt/.json/.jsonl/.tsv file under folder, decoded strictly (raises on invalid UTF-8)."""
    texts = []
    for dirpath, _, files in os.walk(folder):
        for name in files:
            if name.endswith((".md", ".txt", ".json", ".jsonl", ".tsv")):
                with open(os.path.join(dirpath, name), "rb") as f:
                    texts.append(f.read().decode("utf-8"))
    return texts


def test_training_on_a_folder_with_such_names(data, tmp_path):
    root, folder = data
    model, config = tiny_model(root / "model")
    out = tmp_path / "run"
    assert train(["--model", str(model), "--config", str(config), "--data", folder, "--token", "<t>", "--vectors", "2",
                  "--max-steps", "2", "--preview-every", "0", "--val-fraction", "0.5", "--out", str(out)]) == 0
    texts = utf8_texts(out)
    assert texts and any("\tcaf\\xe9-patient.png\n" in text for text in texts)   # in the key, exactly


def test_audit_and_evaluate_of_such_names(data, tmp_path, inception_file):
    root, folder = data
    synthetic = phantoms(tmp_path / "synthetic", 3, seed=5)
    assert audit(["--train", folder, "--synthetic", str(synthetic), "--out", str(tmp_path / "audit")]) == 0
    assert evaluate(["--real", folder, "--fake", str(synthetic), "--k", "1", "--inception", str(inception_file),
                     "--out", str(tmp_path / "eval")]) == 0
    for out in ("audit", "eval"):
        assert utf8_texts(tmp_path / out)   # whole reports, valid UTF-8


def test_weights_files_by_such_names(data, tmp_path, capsys):
    """A model, an embedding and a state file under a Latin-1 name read as under any other. safetensors' reader
    and torch's memory-mapped load take a path as UTF-8 text only: before, `medti.embeddings info` said "not a
    readable .safetensors file (SafetensorError)" of a valid file, and a model by such a name did not load."""
    from test_embeddings import CORE

    import minisd
    from medti.embeddings import main as embeddings
    from medti.files.embedding_file import export, read
    root, _ = data
    model, config = tiny_model(root / "model")
    odd = os.fsdecode(os.path.join(os.fsencode(tmp_path), LATIN1))
    shutil.copy(model, odd + ".safetensors")
    assert minisd.load(odd + ".safetensors", config=str(config)).unet is not None
    export(read(CORE), odd + "-emb.safetensors", "diffusers")
    capsys.readouterr()
    assert embeddings(["info", odd + "-emb.safetensors"]) == 0
    assert "token 'chexpert_cardiomegaly', 64 vectors x 1024" in capsys.readouterr().out
    torch.save({"model.diffusion_model.x": torch.ones(2)}, odd + ".ckpt")   # the pickle path: a memory-mapped load
    from minisd.tensorfile import TensorFile
    assert TensorFile(Path(odd + ".ckpt")).keys == {"model.diffusion_model.x"}
