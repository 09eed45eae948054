"""What a generation run leaves on disk when things go wrong: no PNG or latent for a non-finite result, no
temporary file or half manifest line after a full disk, a torn last line (a crash) recovered by --resume, and
--resume with a smaller --n keeping the records of the images still there. Small runs (32², one step) keep it
quick; the sampling itself is tested elsewhere."""
import errno
import json

import torch
from test_generate import generate, model_files  # noqa: F401 (the fixture is used by name)

import medti.generation.manifest as M
import medti.generation.run as G
from medti.files import atomic as files


def quick(model_files, out, *extra):  # noqa: F811
    return generate(model_files, out, "--prompt", "x", "--size", "32", "--steps", "1", *extra)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()[-1]   # the progress lines come before it
    assert err.startswith("error: "), err
    return err


def left_behind(out) -> list:
    return sorted(p.name for p in out.iterdir() if p.name != ".lock") if out.exists() else []


def test_non_finite_latents_write_nothing(model_files, tmp_path, capsys, monkeypatch):  # noqa: F811
    """Whatever made them (a damaged model the loader missed, fp16 overflow), NaN latents stop the run: no PNG, no
    latent file, no manifest line. sample() is replaced because the loader now refuses NaN weights itself."""
    monkeypatch.setattr(G, "sample", lambda *a, **k: torch.full((1, 4, 4, 4), float("nan")))
    assert quick(model_files, tmp_path / "o", "--save-latents") == 2
    assert "the latents for 00000.png hold NaN or inf, so nothing was written" in one_line_error(capsys)
    assert left_behind(tmp_path / "o") == []


def test_non_finite_decode_writes_no_latent_either(model_files, tmp_path, capsys, monkeypatch):  # noqa: F811
    """Finite latents that decode to NaN (e.g. a scale_factor of 0 in a config): the latent is not written
    either, since it is written with its PNG, after both checks."""
    monkeypatch.setattr(G, "decode", lambda sd, latents: torch.full((1, 3, 32, 32), float("nan")))
    assert quick(model_files, tmp_path / "o", "--save-latents") == 2
    assert "decoded images for 00000.png hold NaN" in one_line_error(capsys)
    assert left_behind(tmp_path / "o") == []


def test_disk_full_leaves_nothing_half_written_and_resumes(model_files, tmp_path, capsys, monkeypatch):  # noqa: F811
    out = tmp_path / "o"
    assert quick(model_files, tmp_path / "whole", "--n", "2") == 0

    def no_space(*args):
        raise OSError(errno.ENOSPC, "No space left on device")
    with monkeypatch.context() as m:   # 1. the disk fills while the first PNG is flushed
        m.setattr(files.os, "fsync", no_space)
        assert quick(model_files, out, "--n", "2") == 2
    err = one_line_error(capsys)
    assert "No space left on device" in err and "rerun with --resume" in err
    assert left_behind(out) == []   # no .00000.png.<pid>.tmp, and not even the folder it created
    appended = []

    def half_then_full(fd, data):   # 2. the disk fills halfway through the second manifest line
        if appended:
            M.os.write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        appended.append(M.os.write(fd, data))
    with monkeypatch.context() as m:
        m.setattr(M, "_write_all", half_then_full)
        assert quick(model_files, out, "--n", "2", "--resume") == 2
    assert "manifest.part0.jsonl: No space left on device" in one_line_error(capsys)
    part = (out / "manifest.part0.jsonl").read_text()
    assert part.endswith("\n") and len(part.splitlines()) == 1   # cut back: no half line
    assert quick(model_files, out, "--n", "2", "--resume") == 0   # 3. space freed: the run completes
    assert (out / "manifest.jsonl").read_text() == (tmp_path / "whole" / "manifest.jsonl").read_text()
    for name in ("00000.png", "00001.png"):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_torn_last_line_is_recovered_by_resume(model_files, tmp_path):  # noqa: F811
    """A crash mid-append leaves a last line without its newline: --resume drops it, remakes that image, and the
    next record does not glue onto the fragment."""
    out = tmp_path / "o"
    assert quick(model_files, out, "--n", "2") == 0
    whole = (out / "manifest.jsonl").read_text()
    first, second = whole.splitlines(keepends=True)
    (out / "manifest.jsonl").unlink()
    (out / "manifest.part0.jsonl").write_text(first + second[: len(second) // 2])   # a real torn line
    assert quick(model_files, out, "--n", "2", "--resume") == 0
    assert (out / "manifest.jsonl").read_text() == whole
    assert not list(out.glob("manifest.part*"))


def test_resume_with_smaller_n_keeps_records_of_images_on_disk(model_files, tmp_path):  # noqa: F811
    out = tmp_path / "o"
    assert quick(model_files, out, "--n", "3") == 0
    before = (out / "manifest.jsonl").read_text()
    assert quick(model_files, out, "--n", "2", "--resume") == 0
    assert (out / "manifest.jsonl").read_text() == before   # 00002.png is still there, and so is its record
    assert [json.loads(line)["file"] for line in before.splitlines()] == ["00000.png", "00001.png", "00002.png"]
