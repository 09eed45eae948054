"""No names in what is shared. Medical exports are named after their patients (`DOE_JOHN_MRN4242.dcm`); every file a
command writes to be passed on -- data.jsonl, val.txt, state.safetensors, embeddings, manifests, generated PNGs and
DICOM, statistics and features files, reports, audits and their sheets -- names an image by a pseudonym of its bytes
only, and the private key beside it (`names.private.tsv`) maps each pseudonym back to its file.

The commands run once (module fixture) on a folder whose file and folder names carry the markers, with tiny models;
each test then reads what they wrote."""
import hashlib
import json
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from pydicom.uid import DigitalXRayImageStorageForPresentation
from safetensors import safe_open
from test_dicom import image, save
from test_volume import _asymmetric, _write_nifti

from conftest import private_key
from medti import audit, data, embeddings, evaluate, generate, train
from medti.training.demo import phantoms, tiny_model

MARKERS = ("DOE_JOHN", "MRN4242")
PATIENT = "DOE_JOHN_MRN4242"


def write_exports(folder: Path) -> Path:
    """Four PNGs, a byte-identical copy of the first (a second pseudonym must tell them apart), a DICOM radiograph
    whose PatientID is the record number, a NIfTI volume (5 slices) and a file that is no image, all named after
    the patient, in a folder named after the patient."""
    exports = folder / "exports" / PATIENT
    for i, png in enumerate(sorted(phantoms(folder / "plain", 4, seed=0).iterdir())):
        exports.mkdir(parents=True, exist_ok=True)
        shutil.copy(png, exports / f"{PATIENT}_chest_{i}.png")
    shutil.copy(exports / f"{PATIENT}_chest_0.png", exports / f"SMITH_{PATIENT}_copy.png")
    pixels = np.random.default_rng(1).integers(0, 4096, (64, 64)).astype(np.uint16)
    save(image(pixels, sop=DigitalXRayImageStorageForPresentation, Modality="DX", PatientID="MRN4242",
               PatientName="DOE^JOHN"), exports / f"{PATIENT}.dcm")
    canonical, spacing, origin = _asymmetric()
    _write_nifti(exports / f"{PATIENT}_t2w.nii.gz", canonical, np.eye(3), spacing, origin)
    (exports / f"{PATIENT}_broken.png").write_bytes(b"not a png at all")
    return exports.parent


@pytest.fixture(scope="module")
def runs(tmp_path_factory, inception_file):
    """Every command, as a user would run them one after the other, into OUT/<command>; with every text drawn into
    an image (sheet labels, plot titles) recorded, since pixels cannot be searched for a name."""
    with pytest.MonkeyPatch.context() as patch:
        drawn, text = [], ImageDraw.ImageDraw.text
        patch.setattr(ImageDraw.ImageDraw, "text", lambda self, xy, words, *a, **k: (
            drawn.append(str(words)), text(self, xy, words, *a, **k))[1])
        return (*commands(tmp_path_factory.mktemp("hospital"), inception_file), drawn)


def commands(root: Path, inception_file) -> tuple:
    """Preview, train (with validation), export the embedding, generate from an init image and mask (PNG and
    DICOM), evaluate (saving statistics and features, then reading them back; scoring the run's saved steps) and
    audit copies of two training squares; returns (root, exports, out, init image, mask)."""
    exports, out = write_exports(root), root / "out"
    model, config = tiny_model(root / "models")
    tiny = ["--model", str(model), "--config", str(config)]
    init = exports / PATIENT / f"{PATIENT}_chest_1.png"
    mask = root / f"{PATIENT}_mask.png"
    square = Image.new("L", (64, 64), 0)
    square.paste(255, (16, 16, 48, 48))
    square.save(mask)
    assert data.main(["preview", "--data", str(exports), "--resolution", "32", "--out", str(out / "preview")]) == 0
    assert train.main([*tiny, "--data", str(exports), "--token", "<t>", "--vectors", "2", "--max-steps", "2",
                       "--resolution", "32", "--save-every", "1", "--preview-every", "2", "--preview-steps", "2",
                       "--val-fraction", "0.3", "--val-draws", "2", "--out", str(out / "run")]) == 0
    (out / "exported").mkdir()
    for fmt, name in (("a1111", "t.pt"), ("diffusers", "t.safetensors")):
        assert embeddings.main(["export", str(out / "run" / "t.safetensors"), str(out / "exported" / name),
                                "--format", fmt]) == 0
    assert generate.main([*tiny, "--embeddings", str(out / "run" / "t.safetensors"), "--prompt", "<t>", "--n", "3",
                          "--steps", "2", "--size", "32", "--init-image", str(init), "--mask", str(mask),
                          "--strength", "0.6", "--format", "dicom", "--grid", "--out", str(out / "gen")]) == 0
    (out / "stats").mkdir()
    assert evaluate.main(["--real", str(exports), "--fake", str(out / "gen"), "--k", "1", "--inception",
                          str(inception_file), "--save-stats", str(out / "stats" / "real.npz"), "--save-features",
                          str(out / "stats" / "features.safetensors"), "--out", str(out / "eval")]) == 0
    assert evaluate.main(["--real", str(out / "stats" / "real.npz"), "--fake", str(out / "gen"), "--k", "1",
                          "--inception", str(inception_file), "--out", str(out / "eval-stats")]) == 0
    assert evaluate.main(["--run", str(out / "run"), "--real", str(exports), *tiny, "--n", "2", "--steps", "2",
                          "--k", "1", "--inception", str(inception_file), "--out", str(out / "eval-run")]) == 0
    (out / "copies").mkdir()   # two of the training squares, as a memorising model would give them back
    for row in ("00000", "00001"):
        shutil.copy(out / "preview" / f"{row}.png", out / "copies" / f"{row}.png")
    assert audit.main(["--train", str(exports), "--synthetic", str(out / "copies"), "--out", str(out / "audit")]) == 0
    return root, exports, out, init, mask


def readable(path: Path) -> bytes:
    """A file's bytes, with what a reader decodes from it added: PNG text chunks (which may be compressed) and the
    arrays of an .npz archive (which may be deflated)."""
    raw = path.read_bytes()
    if path.suffix == ".png":
        with Image.open(path) as im:
            raw += json.dumps(getattr(im, "text", {})).encode()
    if path.suffix == ".npz":
        with zipfile.ZipFile(path) as archive:
            raw += b"".join(archive.read(name) for name in archive.namelist())
    return raw


def test_no_shared_file_names_a_patient_or_a_path(runs):
    """Every file the commands wrote, hidden ones and binary ones included, holds neither marker nor the absolute
    path of the temporary folder -- except the `.private.` key files, which must hold them (else this proves
    nothing)."""
    root, _, out, _, _, drawn = runs
    markers = [m.encode() for m in MARKERS] + [str(root).encode()]
    # the audit's sheets: pseudonyms (a label may be drawn word by word: medti.files.lettering)
    assert "training: img-" in " ".join(drawn)
    assert not [words for words in drawn if any(m.decode() in words for m in markers)]
    files = [p for p in out.rglob("*") if p.is_file()]
    private = [p for p in files if ".private." in p.name]
    leaks = {p.relative_to(out).as_posix(): found for p in sorted(set(files) - set(private))
             if (found := [m.decode() for m in markers if m in readable(p)])}
    assert len(files) > 40 and not leaks, leaks
    assert {p.relative_to(out).as_posix() for p in private} == {
        "preview/names.private.tsv", "run/names.private.tsv", "gen/names.private.tsv", "eval/names.private.tsv",
        "stats/real.names.private.tsv", "stats/features.names.private.tsv", "audit/names.private.tsv",
        "run/command.private.json"}   # the command and settings of the run, paths as typed, for --resume
    for path in private:   # each key names the files; the command names the folders, as typed
        assert (b"DOE_JOHN" if path.suffix == ".tsv" else str(root).encode()) in path.read_bytes(), path

def sha(path: Path) -> str:
    """The pseudonym of one file by the documented rule: `img-` and the first 12 hex digits of `sha256sum FILE`."""
    return "img-" + hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def test_the_preview_key_maps_each_pseudonym_to_its_file(runs):
    _, exports, out, _, _, _ = runs
    names = private_key(out / "preview" / "names.private.tsv")
    lines = [json.loads(line) for line in (out / "preview" / "data.jsonl").read_text().splitlines()]
    assert len(lines) == 4 + 1 + 1 + 5   # the PNGs, the copy, the DICOM file, the volume's slices; broken skipped
    for line in lines:
        pseudonym = line["source"] + (f"#{line['slice']}" if line["slice"] else "")
        path = names[pseudonym]
        file = exports / path.partition("#")[0]
        if file.name == f"SMITH_{PATIENT}_copy.png":   # after its twin in path order: the second of those bytes
            assert line["source"] == sha(file) + "-2"
        else:
            assert line["source"] == sha(file), path
        assert line["slice"] == (path.partition("#")[2] or None)
    assert names["skipped-001"] == f"{PATIENT}/{PATIENT}_broken.png"


def test_training_names_held_out_images_and_its_model_without_paths(runs):
    _, exports, out, _, _, _ = runs
    held = (out / "run" / "val.txt").read_text().splitlines()
    names = private_key(out / "run" / "names.private.tsv")
    assert held and sorted(names) == sorted(held)
    for pseudonym in held:
        assert pseudonym.partition("#")[0] == sha(exports / names[pseudonym].partition("#")[0])
    with safe_open(str(out / "run" / "state.safetensors"), "pt") as f:
        settings = json.loads(f.metadata()["settings"])
    with safe_open(str(out / "run" / "t.safetensors"), "pt") as f:
        meta = f.metadata()
    assert settings["validation"]["files"] == held and settings["model"] == "tiny-random.safetensors"
    assert settings["config"] == "tiny-random.json" and settings["model_sha256"] == meta["base_sha256"]
    assert meta["base_model"] == "tiny-random.safetensors"


def test_generation_names_its_init_image_and_mask_by_their_bytes(runs):
    _, _, out, init, mask, _ = runs
    records = [json.loads(line) for line in (out / "gen" / "manifest.jsonl").read_text().splitlines()]
    assert {(r["init_image"], r["mask"], r["model"]) for r in records} == {
        (sha(init), sha(mask), "tiny-random.safetensors")}
    assert private_key(out / "gen" / "names.private.tsv") == {sha(init): str(init), sha(mask): str(mask)}


def test_the_audit_names_the_copied_training_image_by_its_pseudonym(runs):
    """The two copies are flagged, each nearest the training image preview wrote it from, by the pseudonym
    data.jsonl gave it; the key gives its file; the training folder is named by its fingerprint only."""
    _, exports, out, _, _, _ = runs
    found = json.loads((out / "audit" / "audit.json").read_text())
    rows = [json.loads(line) for line in (out / "preview" / "data.jsonl").read_text().splitlines()]
    names = private_key(out / "audit" / "names.private.tsv")
    for entry in found["images"]:
        source = rows[int(entry["file"][:5])]["source"]
        assert entry["flagged"] and entry["nearest"].removesuffix("-2") == source.removesuffix("-2"), entry
        assert (exports / names[entry["nearest"]]).is_file()
    assert found["summary"]["skipped"]["train"] == [["skipped-001", "not an image PIL can read"]]
    assert names["skipped-001"] == f"{PATIENT}/{PATIENT}_broken.png"
    assert found["summary"]["train_set"]["fingerprint"][:16] in (out / "audit" / "audit.md").read_text()


def test_evaluation_files_name_real_images_by_pseudonym(runs):
    _, exports, out, _, _, _ = runs
    with np.load(out / "stats" / "real.npz") as stats:
        files = json.loads(str(stats["files"]))
    names = private_key(out / "stats" / "real.names.private.tsv")
    assert len(files) == 11 and all(names[f].startswith(f"{PATIENT}/") for f in files)
    with safe_open(str(out / "stats" / "features.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["real_files"]) == files
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["skipped"]["real"] == [["skipped-001", "not an image PIL can read"]] and report["fake"] == "gen"
    assert report["real"].startswith("11 real images (fingerprint ")


def test_an_image_of_several_files_is_named_by_their_digests_sorted(tmp_path):
    """A --channels case (three files): `img-` and 12 hex of the sha256 of its files' sha256 digests, sorted, one
    per line, as documented; the files' names take no part (renamed, the pseudonym stays)."""
    from medti.dataset.folder import load_dataset
    case = tmp_path / "case"
    case.mkdir()
    for name, seed in (("DOE_t2w", 0), ("DOE_adc", 1), ("DOE_hbv", 2)):
        shutil.copy(next(phantoms(tmp_path / f"p{seed}", 1, seed=seed).iterdir()), case / f"{name}.png")
    digests = sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in case.iterdir())
    expected = "img-" + hashlib.sha256("".join(f"{d}\n" for d in digests).encode()).hexdigest()[:12]
    read = load_dataset(case, 32, channels=["t2w", "adc", "hbv"])
    assert read.names == ["DOE"] and read.pseudonyms == [expected]
    for channel in ("t2w", "adc", "hbv"):
        (case / f"DOE_{channel}.png").rename(case / f"X_{channel}.png")
    assert load_dataset(case, 32, channels=["t2w", "adc", "hbv"]).pseudonyms == [expected]

def test_the_key_writes_tabs_line_breaks_and_backslashes_escaped(tmp_path):
    """File names may hold a tab, a line break or a backslash: the key keeps one row of two fields per image, with
    them written \\t, \\n and \\\\ as documented, so undoing those gives the file back."""
    names = ["tab\there.png", "line\nbreak.png", "back\\slash.png"]
    for name, png in zip(names, sorted(phantoms(tmp_path / "p", 3, seed=0).iterdir()), strict=True):
        (tmp_path / "data").mkdir(exist_ok=True)
        shutil.copy(png, tmp_path / "data" / name)
    assert data.main(["preview", "--data", str(tmp_path / "data"), "--resolution", "32", "--out",
                      str(tmp_path / "out")]) == 0
    rows = (tmp_path / "out" / "names.private.tsv").read_text().split("\n")[1:-1]
    assert len(rows) == 3 and all(row.count("\t") == 1 for row in rows)
    escapes = {"\\t": "\t", "\\n": "\n", "\\\\": "\\"}
    paths = {pseudonym: re.sub(r"\\[tn\\]", lambda m: escapes[m.group()], path)
             for pseudonym, path in (row.split("\t") for row in rows)}
    for pseudonym, path in paths.items():
        assert sha(tmp_path / "data" / path) == pseudonym
    assert sorted(paths.values()) == sorted(names)
