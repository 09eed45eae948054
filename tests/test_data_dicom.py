"""DICOM files as training data (the chest X-ray workflow from DICOM): medti.dataset reads them through
medti.medical.dicom with the window the user names (or the file's own, else min-max), inverts MONOCHROME1, keeps each
image's patient in memory, and --val-fraction holds out whole patients. Files are made here with pydicom: synthetic
values, invented IDs."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.uid import DigitalXRayImageStorageForPresentation
from test_dicom import image, loop, save

from conftest import private_key
from medti.dataset.folder import DataError, load_dataset
from medti.training.validation import split_patients

PATIENTS = {"CXR-A": 3, "CXR-B": 2, "CXR-C": 4}   # invented IDs, images per patient


def cxr_folder(folder: Path) -> dict:
    """MONOCHROME1 X-rays (low = white, as many CR/DX files are) with their own window, one subfolder per study,
    file names that do not give the patient away; returns {relative name: stored pixels}."""
    rng, stored = np.random.default_rng(0), {}
    for p, (patient, count) in enumerate(PATIENTS.items()):
        for i in range(count):
            pixels = rng.integers(0, 4096, (32, 32)).astype(np.uint16)
            ds = image(pixels, sop=DigitalXRayImageStorageForPresentation, Modality="DX", PatientID=patient,
                       PhotometricInterpretation="MONOCHROME1", WindowCenter=2048, WindowWidth=3000)
            name = f"study{p}/IM{i:04d}"            # extension-less, as PACS exports often are
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            save(ds, folder / name)
            stored[name] = pixels
    return stored


def test_dicom_images_are_windowed_inverted_and_know_their_patient(tmp_path):
    stored = cxr_folder(tmp_path)
    data = load_dataset(tmp_path, 32, preprocess="none")
    assert data.names == sorted(stored) and data.skipped == []
    for row, name in enumerate(data.names):
        # the standard's formula by hand, then MONOCHROME1 -> dense is bright (255 - y), to +-1 gray level
        expected = 255 - loop(stored[name], 2048, 3000)
        got = (data.images[row, 0].numpy() + 1) * 127.5
        assert np.abs(got - expected).max() <= 1.0, name
    assert data.patients == [p for p, n in PATIENTS.items() for _ in range(n)]


def test_an_explicit_window_wins_over_the_file_s(tmp_path):
    from medti.medical.window import parse_window
    stored = cxr_folder(tmp_path)
    data = load_dataset(tmp_path, 32, preprocess="none", window=parse_window("1000,500"))
    got = (data.images[0, 0].numpy() + 1) * 127.5
    assert np.abs(got - (255 - loop(stored[data.names[0]], 1000, 500))).max() <= 1.0


def test_held_out_patients_are_never_trained_on():
    patients = [p for p, n in PATIENTS.items() for _ in range(n)] + [f"own-{i}" for i in range(5)]
    for seed in range(25):
        train, val = split_patients(patients, 0.34, seed)
        assert sorted(train + val) == list(range(len(patients)))
        assert not {patients[i] for i in train} & {patients[i] for i in val}, seed
    # one image per patient: exactly the old per-image split
    from medti.training.validation import split
    assert split_patients([f"f{i}" for i in range(7)], 0.3, 4) == split(7, 0.3, 4)


def test_unusable_dicom_files_are_skipped_with_the_reason(tmp_path):
    from pydicom.uid import BasicTextSRStorage
    from test_dicom import dataset
    Image.fromarray(np.arange(1024, dtype=np.uint8).reshape(32, 32)).save(tmp_path / "ok.png")
    save(dataset(sop=BasicTextSRStorage, Modality="SR"), tmp_path / "report.dcm")
    data = load_dataset(tmp_path, 32, preprocess="none")
    assert data.names == ["ok.png"] and data.skipped[0][0] == "report.dcm"
    assert "holds no image" in data.skipped[0][1] and "SR" in data.skipped[0][1]
    with pytest.raises(DataError, match="report.dcm: .*holds no image"):
        load_dataset(tmp_path, 32, preprocess="none", strict=True)


def test_damaged_files_are_skipped_in_medti_s_words_and_no_library_warning_escapes(tmp_path):
    """Before: a Number of Frames of "1A" was a traceback (int() in the series grouping); a JPEG 2000 file cut short
    in its pixel data was "holds no image", after pydicom's two-line "End of file reached" warning; a TIFF with a
    damaged EXIF block came with PIL's "Corrupt EXIF data" warning. Warnings are held back where files are read."""
    import warnings

    from pydicom.dataelem import RawDataElement
    from pydicom.encaps import encapsulate
    from pydicom.tag import Tag
    from pydicom.uid import JPEG2000
    stored = np.arange(16, dtype=np.uint16).reshape(4, 4)
    ds = image(stored)
    ds[Tag(0x0028, 0x0008)] = RawDataElement(Tag(0x0028, 0x0008), "IS", 2, b"1A", 0, False, True)   # Number of Frames
    with warnings.catch_warnings():   # pydicom warns of the invalid value it writes here on purpose
        warnings.simplefilter("ignore")
        save(ds, tmp_path / "frames.dcm")
    ds = image(stored, syntax=JPEG2000)
    ds.PixelData = encapsulate([b"x" * 400])
    whole = save(ds, tmp_path / "cut.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(whole[:-200])   # ends inside the encapsulated pixel data
    # a little-endian TIFF header, then bytes that are no valid IFD (tools/hostile_files.py's random.tif)
    (tmp_path / "random.tif").write_bytes(b"II*\x00" + np.random.default_rng(2).integers(0, 256, 500, np.uint8)
                                          .tobytes())
    Image.fromarray(np.arange(1024, dtype=np.uint8).reshape(32, 32)).save(tmp_path / "ok.png")
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        data = load_dataset(tmp_path, 32, preprocess="none")
    assert [str(w.message) for w in escaped] == []
    reasons = dict(data.skipped)
    assert data.names == ["ok.png"] and sorted(reasons) == ["cut.dcm", "frames.dcm", "random.tif"]
    assert reasons["frames.dcm"] == "damaged header: NumberOfFrames '1A' is not a whole number; export the file again"
    assert reasons["cut.dcm"].startswith("truncated file: it ends inside a data element")
    assert reasons["random.tif"] == "not an image PIL can read (.tif extension)"


def test_without_the_extra_a_dicom_folder_is_one_line_naming_it(tmp_path):
    cxr_folder(tmp_path)
    code = ("import sys; sys.modules['pydicom'] = None\nfrom medti.dataset.folder import load_dataset\n"
            f"try:\n    load_dataset({str(tmp_path)!r}, 32)\nexcept Exception as e:\n    print(type(e).__name__, e)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert done.stdout.startswith("MissingExtra ") and done.stdout.strip().endswith('pip install "medti[medical]"')


def test_train_on_a_dicom_folder_holds_out_whole_patients(tmp_path, capsys):
    """medti.train --data <DICOM folder> --val-fraction: the summary counts patients, val.txt names one side only,
    and no PatientID reaches any output file."""
    from medti.train import main
    from medti.training.demo import tiny_model
    cxr_folder(tmp_path / "data")
    model, config = tiny_model(tmp_path / "model", seed=0)
    args = ["--model", str(model), "--config", str(config), "--data", str(tmp_path / "data"), "--token", "<cxr>",
            "--vectors", "2", "--max-steps", "2", "--resolution", "64", "--preview-every", "0", "--save-every", "2",
            "--val-fraction", "0.34", "--val-draws", "2", "--preprocess", "cxr", "--out", str(tmp_path / "run")]
    assert main(args) == 0
    assert "--data: 9 image(s): 9 image file(s); 3 patient(s)" in capsys.readouterr().out
    held = [private_key(tmp_path / "run")[name] for name in (tmp_path / "run" / "val.txt").read_text().split()]
    assert held and len({name.split("/")[0] for name in held}) == 1   # one study folder = one patient here
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert not any(p.encode() in path.read_bytes() for p in PATIENTS), path


def test_a_bad_window_is_one_line_before_anything_loads(tmp_path, capsys):
    from medti.train import main
    (tmp_path / "data").mkdir()
    assert main(["--data", str(tmp_path / "data"), "--token", "<x>", "--window", "lungs", "--out",
                 str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --window") and "lung" in err and "\n" not in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("spacing", [{"PixelSpacing": [1.0, 0.5]}, {"ImagerPixelSpacing": [0.3, 0.15]},
                                     {"PixelAspectRatio": [2, 1]}])
def test_a_radiograph_with_oblong_pixels_is_resampled_to_square_ones(tmp_path, spacing):
    """A circle of radius 20 stored on pixels twice as tall as wide (40 rows x 80 columns, an ellipse as stored)
    comes out a circle on 80 x 80 square pixels, as a volume's slice would, whichever attribute gives the shape."""
    rows, cols = np.mgrid[0:40, 0:80]
    disc = ((rows + 0.5 - 20) * 2) ** 2 + (cols + 0.5 - 40) ** 2 <= 20 ** 2 * 4   # in units of the finer pixel
    save(image(np.where(disc, 1000, 0).astype(np.uint16), Modality="DX", **spacing), tmp_path / "IM0001")
    data = load_dataset(tmp_path, 80, preprocess="none")
    assert data.names == ["IM0001"], data.skipped
    got = (data.images[0, 0].numpy() + 1) * 127.5 > 127.5
    y, x = np.mgrid[0:80, 0:80]
    expected = (y + 0.5 - 40) ** 2 + (x + 0.5 - 40) ** 2 <= 40 ** 2
    assert (got & expected).sum() / (got | expected).sum() > 0.97       # the same disc, to its edge pixels
    height, width = np.ptp(np.nonzero(got)[0]) + 1, np.ptp(np.nonzero(got)[1]) + 1
    assert abs(height - width) <= 1 and abs(width - 80) <= 1
