"""`python -m medti.embeddings`: info on files and folders, export that says what it wrote and never overwrites
without --force, and one-line errors (the formats themselves: tests/test_embeddings.py)."""
import os
import subprocess
import sys

from test_embeddings import CORE, PAPER, PAPER_NAMES, ROOT

import minisd
from medti import embeddings as E
from medti.files.embedding_file import EmbeddingError, read


def test_cli_info_and_export(tmp_path, capsys):
    assert E.main(["info", str(CORE)]) == 0
    out = capsys.readouterr().out
    assert "token 'chexpert_cardiomegaly', 64 vectors x 1024, mean vector norm 37." in out
    assert "  step: 49999" in out and "  sd_checkpoint: 09dd2ae4" in out
    assert E.main(["export", str(CORE), str(tmp_path / "c.safetensors"), "--format", "diffusers"]) == 0
    assert read(tmp_path / "c.safetensors").token == "chexpert_cardiomegaly"


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert E.main(["info", str(tmp_path / "missing.pt")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing.pt'}: no such file\n"
    assert E.main(["export", str(CORE), str(tmp_path / "no" / "dir" / "c.pt"), "--format", "a1111"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'no' / 'dir' / 'c.pt'}: the folder {tmp_path / 'no' / 'dir'} does not exist; " \
                  "create it first\n"
    assert issubclass(EmbeddingError, minisd.errors.UserError)   # so medti.cli's wrapper reports it


def test_cli_info_lists_a_folder(capsys, tmp_path):
    """Before: a folder was refused with "unknown extension ''"."""
    assert E.main(["info", str(PAPER)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("  ")]
    assert [line.split(":")[0] for line in lines] == [str(PAPER / f"{name}.pt") for name in PAPER_NAMES]
    assert E.main(["info", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path}: a folder without embedding files (.pt, .bin, .safetensors)\n"


def test_cli_export_says_what_it_wrote_and_does_not_overwrite(tmp_path, capsys):
    out = tmp_path / "c.safetensors"
    assert E.main(["export", str(CORE), str(out), "--format", "diffusers"]) == 0
    assert capsys.readouterr().out == (f"wrote {out} (diffusers): token 'chexpert_cardiomegaly', 64 vectors x 1024, "
                                       "mean vector norm 37.12\n")
    out.write_bytes(b"keep me")
    assert E.main(["export", str(CORE), str(out), "--format", "a1111"]) == 2
    assert capsys.readouterr().err == f"error: {out}: exists; choose another output file, or pass --force to " \
                                      "overwrite it\n"
    assert out.read_bytes() == b"keep me"
    assert E.main(["export", str(CORE), str(out), "--format", "diffusers", "--force"]) == 0
    assert read(out).token == "chexpert_cardiomegaly" and os.listdir(tmp_path) == ["c.safetensors"]
    assert E.main(["export", str(CORE), str(tmp_path / "c.pt"), "--format", "diffusers"]) == 2
    assert capsys.readouterr().err.endswith("c.pt: a diffusers file must end in .safetensors\n")


def test_cli_as_module(tmp_path):
    run = subprocess.run([sys.executable, "-m", "medti.embeddings", "info", str(CORE), str(tmp_path / "x.bin")],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr == f"error: {tmp_path / 'x.bin'}: no such file\n"
