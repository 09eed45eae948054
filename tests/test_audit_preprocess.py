"""medti.audit --preprocess: the training images are compared as the model saw them, the squares medti.train's
--preprocess made of them, because those are what a memorising model reproduces. Non-square training images (PNGs
and DICOM DX MONOCHROME1 files made here with pydicom, invented IDs) and, as the synthetic set, their squares as
`python -m medti.data preview` writes them: every one is flagged; other patients' squares are not. Before this flag
existed the audit compared the images as read (a 192 x 160 file against a 128 x 128 copy of its square) and
missed every copy (highest similarity 0.39 here, measured once with the preprocess disabled)."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from pydicom.uid import DigitalXRayImageStorageForPresentation
from test_dicom import image, save
from test_privacy import chest

from conftest import private_key
from medti import audit as A
from medti import data as preview
from medti.quality.folders import ImageSet

SIDE = 128     # the model's resolution: preview writes, and the audit then compares, 128 x 128 squares
BORDER = 8     # black margin around each X-ray, as exports often have: cxr crops it, center does not


def xray(seed: int, width: int, height: int) -> np.ndarray:
    """A simulated chest (test_privacy.chest) cut to width x height inside a black border: uint8 [H, W]."""
    body = chest(seed, max(width, height))[:height, :width]
    return np.pad(body, BORDER)


@pytest.fixture
def train(tmp_path):
    """6 landscape PNGs (192 x 160 before the border), 4 portrait DICOM DX MONOCHROME1 files (160 x 192: low values
    are white, so the stored pixels are the chest inverted), and one all-black PNG, which cxr cannot use."""
    folder = tmp_path / "train"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(xray(i, 192, 160)).save(folder / f"p{i}.png")
    for i in range(4):
        stored = (255 - xray(10 + i, 160, 192).astype(np.uint16)) * 16
        ds = image(stored, sop=DigitalXRayImageStorageForPresentation, Modality="DX", PatientID=f"DX-{i}",
                   PhotometricInterpretation="MONOCHROME1", WindowCenter=2048, WindowWidth=4096)
        (folder / f"study{i}").mkdir()
        save(ds, folder / f"study{i}" / "IM0001")   # extension-less, as PACS exports are
    Image.new("L", (192, 160)).save(folder / "black.png")
    return folder


def squares(data, tmp_path, preprocess: str, name: str = "syn") -> tuple:
    """medti.data preview's squares of `data` copied alone into a folder (its contact sheet and data.jsonl are
    not synthetic images); returns (folder, {png: (the pseudonym of the training file it was made from, that file
    by preview's key, names.private.tsv)})."""
    shown = tmp_path / f"preview-{name}"
    assert preview.main(["preview", "--data", str(data), "--preprocess", preprocess, "--resolution", str(SIDE),
                         "--out", str(shown)]) == 0
    synthetic = tmp_path / name
    synthetic.mkdir()
    lines = [json.loads(line) for line in (shown / "data.jsonl").read_text().splitlines()]
    for line in lines:
        shutil.copy(shown / line["file"], synthetic / line["file"])
    return synthetic, {line["file"]: (line["source"], private_key(shown)[line["source"]]) for line in lines}



def audit(train, synthetic, out, *flags) -> dict:
    assert A.main(["--train", str(train), "--synthetic", str(synthetic), "--out", str(out), *flags]) == 0
    return json.loads((out / "audit.json").read_text())


@pytest.mark.parametrize("preprocess", ["cxr", "center"])
def test_copies_of_the_training_squares_are_flagged(train, tmp_path, preprocess):
    """Each square preview wrote is flagged, nearest its own file, at similarity >= 0.99 (observed: 1.000 each; the
    same copies audited without the preprocess scored 0.26-0.39, none flagged)."""
    synthetic, source = squares(train, tmp_path, preprocess)
    found = audit(train, synthetic, tmp_path / "out", "--preprocess", preprocess)
    assert len(found["images"]) == 10   # the black image is flat: left out by preview, as training leaves it out
    for entry in found["images"]:
        assert entry["flagged"] and entry["similarity"] >= 0.99, entry
        # one pseudonym for one image in preview and audit alike (of its bytes), and each key gives its file
        assert entry["nearest"] == source[entry["file"]][0], entry
        assert private_key(tmp_path / "out")[entry["nearest"]] == source[entry["file"]][1]
    summary = found["summary"]
    assert summary["train_preprocess"] == {"preprocess": preprocess, "resolution": SIDE}
    skipped = {private_key(tmp_path / "out")[name]: why for name, why in summary["skipped"]["train"]}
    assert skipped["black.png"].startswith("flat image")   # by the audit's reading of --train, whatever the preprocess


def test_other_patients_squares_are_not_flagged(train, tmp_path):
    """Squares made the same way of patients not in the training folder: none flagged (observed highest: 0.56)."""
    others = tmp_path / "others"
    others.mkdir()
    for i in range(6):
        Image.fromarray(xray(100 + i, 192, 160)).save(others / f"q{i}.png")
    synthetic, _ = squares(others, tmp_path, "cxr")
    found = audit(train, synthetic, tmp_path / "out", "--preprocess", "cxr")
    assert len(found["images"]) == 6 and not any(entry["flagged"] for entry in found["images"])
    assert found["summary"]["highest_similarity"] < A.privacy.MEASURED["highest_other"]


def test_a_bad_preprocess_is_one_line_before_any_image_is_read(train, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(A, "load_set", lambda *a, **k: pytest.fail("an image was read"))
    code = A.main(["--train", str(train), "--synthetic", str(train), "--out", str(tmp_path / "out"),
                   "--preprocess", "crop"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--preprocess 'crop'" in err
    assert not (tmp_path / "out").exists()


def test_the_resolution_is_the_synthetic_square_else_the_read_side():
    def sizes(*shapes):
        return ImageSet([], [], None, sizes=list(shapes))
    assert A.resolution(sizes((768, 768), (768, 768))) == 768            # a 768-v model's output
    assert A.resolution(sizes((512, 430))) == A.READ_SIDE                # not square: no one training square
    assert A.resolution(sizes((256, 256), (512, 512))) == A.READ_SIDE    # two sizes: not one model's output
