"""`python -m medti.audit` as a user meets it: its outputs, the manifest's prompts and seeds, --fail-on-flag as a
gate, a second run into the same folder, and every bad input as one line with nothing left behind. The method's
own figures are tests/test_privacy.py's; small simulated sets (128 px) keep this file quick."""
import errno
import json
import subprocess
import sys

import pytest
from PIL import Image, PngImagePlugin
from test_privacy import chest

from conftest import private_key
from medti import audit as A
from medti.audit import main
from medti.files import atomic as files

SIZE = 128


def save(path, array, **text):
    """A PNG; `text` goes into text chunks (how a DICOM export may carry a patient's name into a PNG)."""
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, pnginfo=info)


@pytest.fixture
def sets(tmp_path):
    """train/ (10 patients, each PNG tagged with a fake patient name), run/ (a generation run: 00000.png copies
    training patient 3, 00001.png is its mirror, 00002-00005.png are other patients, with manifest.jsonl) and
    clean/ (the four other patients alone)."""
    for i in range(10):
        save(tmp_path / "train" / "case" / f"p{i}.png", chest(i, SIZE), PatientName=f"DOE^JOHN{i}")
    images = [chest(3, SIZE), chest(3, SIZE)[:, ::-1].copy()] + [chest(500 + j, SIZE) for j in range(4)]
    lines = []
    for i, image in enumerate(images):
        save(tmp_path / "run" / f"{i:05d}.png", image)
        lines.append(json.dumps({"file": f"{i:05d}.png", "prompt": f"x-ray <cxr> {i}", "seed": 100 + i,
                                 "init_image": "/secret/patient.png"}))
        if i >= 2:
            save(tmp_path / "clean" / f"{i:05d}.png", image)
    (tmp_path / "run" / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def audit(tmp, synthetic="run", out="out", *extra):
    return main(["--train", str(tmp / "train"), "--synthetic", str(tmp / synthetic), "--out", str(tmp / out),
                 *map(str, extra)])


def one_line_error(capsys, progress: bool = False) -> str:
    """The refusal's line, alone on stderr: no progress line ("medti.audit: ...") or warning before it, unless
    `progress` (a failure once the audit has begun)."""
    err = [line for line in capsys.readouterr().err.splitlines() if not progress or
           not line.startswith("medti.audit: ")]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_outputs_one_entry_per_image_with_prompt_and_seed_of_the_flagged(sets, capsys):
    assert audit(sets) == 0
    out = sets / "out"
    assert sorted(p.name for p in out.iterdir()) == [".lock", "audit.json", "audit.md", "closest.png", "flagged.png",
                                                     "names.private.tsv"]
    found = json.loads((out / "audit.json").read_text())
    images, summary = found["images"], found["summary"]
    assert [e["file"] for e in images] == [f"{i:05d}.png" for i in range(6)]   # relative to --synthetic
    assert [e["flagged"] for e in images] == [True, True, False, False, False, False]
    assert images[0]["nearest"] == images[1]["nearest"] and images[0]["nearest"].startswith("img-")   # pseudonyms
    assert private_key(out)[images[0]["nearest"]] == "case/p3.png"               # by the key, relative to --train
    assert images[1]["mirrored"] and not images[0]["mirrored"]
    assert (images[0]["prompt"], images[0]["seed"]) == ("x-ray <cxr> 0", 100) and "prompt" not in images[2]
    assert all(0 <= e["similarity"] <= 1 for e in images) and images[0]["similarity"] == 1.0
    assert (summary["flagged"], summary["n_synthetic"], summary["n_train"]) == (2, 6, 10)
    assert summary["threshold"] == 0.9 and "no weights" in summary["method"]
    assert summary["sheets"] == {"flagged.png": "flagged.png", "closest.png": "closest.png"}
    flagged = Image.open(out / "flagged.png")
    assert flagged.size == (4 * 256, 256)   # two pairs side by side: synthetic | training, synthetic | training
    assert "Verdict: 2 of 6 synthetic images are flagged" in (out / "audit.md").read_text()
    assert "2 of 6 synthetic images flagged" in capsys.readouterr().out


def test_no_patient_identifier_reaches_an_output(sets):
    """Only pseudonyms of training images and names relative to the synthetic folder leave the audit, and no folder
    is named by its path (the key file, names.private.tsv, holds the training images' paths under --train): not a
    PNG text chunk of a training image, not the manifest's path of an init image; the sheets carry no text chunk."""
    assert audit(sets) == 0
    for path in (sets / "out").iterdir():
        data = path.read_bytes()
        assert b"DOE^JOHN" not in data and b"/secret/" not in data, path.name
        assert str(sets).encode() not in data and (b"case/p" in data) == (path.name == "names.private.tsv")
        if path.suffix == ".png":
            assert not Image.open(path).text


def test_manifest_flag_for_a_plain_folder(sets):
    (sets / "plain").mkdir()
    for i in (0, 2):
        (sets / "plain" / f"{i:05d}.png").write_bytes((sets / "run" / f"{i:05d}.png").read_bytes())
    assert audit(sets, "plain", "out", "--manifest", sets / "run" / "manifest.jsonl") == 0
    images = json.loads((sets / "out" / "audit.json").read_text())["images"]
    assert (images[0]["file"], images[0]["seed"]) == ("00000.png", 100)


def test_fail_on_flag_exits_3_after_writing_and_0_when_clean(sets, capsys):
    assert audit(sets, "run", "out", "--fail-on-flag") == A.FLAGGED == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("flagged: 2 synthetic image(s) are near-copies") and (sets / "out" / "audit.json").exists()
    assert audit(sets, "clean", "clean-out", "--fail-on-flag") == 0
    out = sets / "clean-out"
    assert not (out / "flagged.png").exists() and (out / "closest.png").exists()
    assert "no synthetic image is a near-copy" in (out / "audit.md").read_text()
    assert json.loads((out / "audit.json").read_text())["summary"]["sheets"]["flagged.png"] is None


def test_a_second_run_replaces_the_audit_and_a_foreign_folder_is_refused(sets, capsys):
    assert audit(sets) == 0 and (sets / "out" / "flagged.png").exists()
    assert audit(sets, "clean") == 0   # same --out, nothing flagged now: the old flagged.png must not survive
    assert not (sets / "out" / "flagged.png").exists()
    assert json.loads((sets / "out" / "audit.json").read_text())["summary"]["n_synthetic"] == 4
    (sets / "mine").mkdir()
    (sets / "mine" / "notes.txt").write_text("keep")
    capsys.readouterr()
    assert audit(sets, "run", "mine") == 2
    assert "holds files that are not an audit's (e.g. notes.txt)" in one_line_error(capsys)
    assert sorted(p.name for p in (sets / "mine").iterdir()) == [".lock", "notes.txt"]


@pytest.mark.parametrize("case, words", [
    ("empty-train", "--train"), ("one-train", "at least 2 needed"), ("empty-synthetic", "--synthetic"),
    ("threshold", "--threshold 1.5: must be in (0, 1]"), ("nan", "--threshold nan"),
    ("out-in-train", "is inside --train"), ("out-in-run", "is inside --synthetic"),
    ("manifest-missing", "--manifest"), ("manifest-foreign", "names none of the 4 images"),
    # before: each came after one to three lines of progress and warnings
    ("missing-train", "--train"), ("damaged-train", "0 usable image(s), 1 skipped, e.g. bad.png"),
    ("manifest-not-json", "line 1 is not a manifest record"),
])
def test_bad_input_is_one_line_and_leaves_nothing(sets, capsys, case, words):
    (sets / "empty").mkdir()
    save(sets / "one" / "p.png", chest(0, SIZE))
    (sets / "other.jsonl").write_text(json.dumps({"file": "elsewhere.png", "prompt": "x", "seed": 0}) + "\n")
    (sets / "bad.jsonl").write_text("{not json\n")
    (sets / "damaged").mkdir()
    (sets / "damaged" / "bad.png").write_text("not an image\n")
    train = {"empty-train": sets / "empty", "one-train": sets / "one", "missing-train": sets / "nowhere",
             "damaged-train": sets / "damaged"}.get(case, sets / "train")
    synthetic = sets / ("empty" if case == "empty-synthetic" else "clean" if case.startswith("manifest") else "run")
    out = {"out-in-train": sets / "train" / "audit", "out-in-run": sets / "run" / "audit"}.get(case, sets / "o")
    extra = {"threshold": ["--threshold", "1.5"], "nan": ["--threshold", "nan"],
             "manifest-missing": ["--manifest", sets / "nope.jsonl"],
             "manifest-foreign": ["--manifest", sets / "other.jsonl"], "manifest-not-json": ["--manifest",
                                                                                         sets / "bad.jsonl"]}
    argv = ["--train", train, "--synthetic", synthetic, "--out", out, *extra.get(case, [])]
    assert main([str(a) for a in argv]) == 2
    assert words in one_line_error(capsys)
    assert not out.exists()   # no empty output folder either


def test_mismatched_sizes_are_resized_not_refused(sets):
    image = Image.fromarray(chest(3, SIZE)).resize((96, 160))   # another size and aspect than the 128² training set
    image.save(sets / "clean" / "odd.png")
    assert audit(sets, "clean") == 0
    images = {e["file"]: e for e in json.loads((sets / "out" / "audit.json").read_text())["images"]}
    odd = images["odd.png"]
    assert private_key(sets / "out")[odd["nearest"]] == "case/p3.png" and odd["flagged"]


def test_unknown_flag_is_argparse_usage_error(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--train", "a", "--synthetic", "b", "--out", "c", "--bogus"])
    assert stop.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_disk_full_leaves_no_half_audit(sets, capsys, monkeypatch):
    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(files.os, "fsync", full)
    assert audit(sets) == 2
    err = one_line_error(capsys, progress=True)
    assert "No space left on device" in err and str(sets / "out") in err   # the file being written is named
    assert not (sets / "out").exists()   # the files written before the failure went, and so did the new folder


def test_the_process_exit_status(sets):
    """The real command line: status 3 from --fail-on-flag reaches the shell, with no traceback."""
    result = subprocess.run([sys.executable, "-m", "medti.audit", "--train", str(sets / "train"), "--synthetic",
                             str(sets / "run"), "--out", str(sets / "p"), "--fail-on-flag"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 3 and "Traceback" not in result.stderr, result.stderr


def test_dinov2_second_opinion_beside_each_image(sets, tmp_path):
    """--features dinov2 (a small random-weight release in the hub layout, tests/test_dinov2.py's): each image gets
    its nearest training image by DINOv2 cosine too; an identical or mirrored copy has cosine 1 with its source
    (1e-5: float32 features of a few hundred dimensions). The flags stay the pixel method's."""
    from test_dinov2 import make_release
    _, folder, _ = make_release(tmp_path / "dinov2", swiglu=False)
    assert audit(sets, "run", "out", "--features", "dinov2", "--dinov2", folder) == 0
    found = json.loads((sets / "out" / "audit.json").read_text())
    for copy in found["images"][:2]:   # the copy and its mirror (the mirror's features are taken too)
        assert private_key(sets / "out")[copy["dinov2_nearest"]] == "case/p3.png"
        assert copy["dinov2_similarity"] > 1 - 1e-5
    assert all(-1 <= e["dinov2_similarity"] <= 1 for e in found["images"])
    assert found["summary"]["flagged"] == 2 and "dinov2" in found["summary"]["second_opinion"]["features"]
    assert "## Second opinion" in (sets / "out" / "audit.md").read_text()
    for name in ("audit.json", "audit.md"):   # the DINOv2 folder by its name: no path in the report
        assert str(tmp_path) not in (sets / "out" / name).read_text()


def test_dinov2_flag_needs_its_features(sets, capsys):
    assert audit(sets, "run", "o", "--dinov2", "facebook/dinov2-small") == 2
    assert "--dinov2 is the network of --features dinov2" in one_line_error(capsys)
    assert not (sets / "o").exists()


def test_large_images_are_reduced_as_read_and_still_matched(sets):
    """A 1,200 x 1,000 export of training patient 3 (PNG exports of X-rays are often 2-3k pixels): read at most
    READ_SIDE on its longer side, so memory stays bounded, and still flagged against the 128² training image."""
    from medti.quality.folders import load_set
    big = Image.fromarray(chest(3, SIZE)).resize((1200, 1000), Image.BICUBIC)
    big.save(sets / "clean" / "big.png")
    held = load_set(sets / "clean", "synthetic", max_side=A.READ_SIDE)
    assert max(max(x.shape[1:]) for x in held.images) == A.READ_SIDE
    assert audit(sets, "clean") == 0
    images = {e["file"]: e for e in json.loads((sets / "out" / "audit.json").read_text())["images"]}
    big = images["big.png"]
    assert private_key(sets / "out")[big["nearest"]] == "case/p3.png" and big["flagged"]
