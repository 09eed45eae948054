"""`python -m medti.data preview`: the PNGs are exactly the training tensors, data.jsonl describes each with a
pseudonym for the patient (never the PatientID) and for the image (never its path: names.private.tsv maps it to
the file), and bad input is one line that leaves nothing behind."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_data_dicom import PATIENTS, cxr_folder

from medti.data import main
from medti.dataset.folder import load_dataset

ROOT = Path(__file__).resolve().parent.parent


def test_preview_writes_the_training_images_and_no_patient_id(tmp_path, capsys):
    cxr_folder(tmp_path / "data")
    Image.fromarray(np.arange(1200, dtype=np.uint8).reshape(30, 40)).save(tmp_path / "data" / "extra.png")
    assert main(["preview", "--data", str(tmp_path / "data"), "--resolution", "32", "--preprocess", "cxr",
                 "--out", str(tmp_path / "out")]) == 0
    data = load_dataset(tmp_path / "data", 32, preprocess="cxr")
    lines = [json.loads(line) for line in (tmp_path / "out" / "data.jsonl").read_text().splitlines()]
    rows = (tmp_path / "out" / "names.private.tsv").read_text().splitlines()   # pseudonym -> path, for the user
    names = dict(row.split("\t") for row in rows[1:])
    assert rows[0] == "pseudonym\tpath" and sorted(names.values()) == sorted(data.names)
    assert len(lines) == len(data.names) == 10
    for row, line in enumerate(lines):
        png = np.asarray(Image.open(tmp_path / "out" / line["file"]))
        tensor = ((data.images[row] + 1) * 127.5).round().permute(1, 2, 0).numpy()
        assert np.array_equal(png, tensor), line                      # exactly what training sees
        assert line["source"] == data.pseudonyms[row] and line["slice"] is None   # a pseudonym, not the file
        assert line["source"] == "img-" + hashlib.sha256((tmp_path / "data" / names[line["source"]]).read_bytes()
                                                         ).hexdigest()[:12]    # `sha256sum FILE`'s, as documented
        # the DX files carry their own window (test_data_dicom); the PNG is 8-bit as stored
        assert line["window"] == ("as stored" if names[line["source"]] == "extra.png" else "the file's 2048,3000")
    # in the order met: extra.png (its own patient), then the three DICOM patients
    assert [line["patient"] for line in lines] == ["patient-001"] + ["patient-002"] * 3 + ["patient-003"] * 2 + \
        ["patient-004"] * 4
    assert (tmp_path / "out" / "contact-sheet.png").is_file()
    for path in (tmp_path / "out").iterdir():
        assert not any(p.encode() in path.read_bytes() for p in PATIENTS), path
        assert (b"study0/IM0000" in path.read_bytes()) == (path.name == "names.private.tsv"), path
    assert "wrote 10 image(s) of 4 patient(s)" in capsys.readouterr().out


@pytest.mark.parametrize("extra, words", [
    (["--window", "lungs"], "error: --window 'lungs'"),
    (["--plane", "up"], "error: --plane 'up'"),
    (["--out-dir", "x"], "unrecognized arguments: --out-dir x"),
    # before: an OverflowError in PIL, a MemoryError, and "--data resolution must be positive" (the wrong flag)
    (["--resolution", "99999999999"], "error: --resolution 99999999999: must be from 1 to 4096 pixels"),
    (["--resolution", "100000"], "error: --resolution 100000: must be from 1 to 4096 pixels"),
    (["--resolution", "0"], "error: --resolution 0: must be from 1 to 4096 pixels"),
])
def test_bad_flags_are_one_line_and_write_nothing(tmp_path, capsys, extra, words):
    cxr_folder(tmp_path / "data")
    try:
        code = main(["preview", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), *extra])
    except SystemExit as e:   # argparse's own errors exit from the parser
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err and not (tmp_path / "out").exists()


def test_out_must_be_new_and_outside_data(tmp_path, capsys):
    cxr_folder(tmp_path / "data")
    assert main(["preview", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "data" / "p")]) == 2
    assert "is inside --data" in capsys.readouterr().err
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x.txt").write_text("mine")
    assert main(["preview", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "used")]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err


def test_runs_as_python_m_medti_data(tmp_path):
    cxr_folder(tmp_path / "data")
    done = subprocess.run([sys.executable, "-m", "medti.data", "preview", "--data", str(tmp_path / "data"),
                           "--resolution", "32", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "00008.png").is_file() and not (tmp_path / "out" / "00009.png").exists()
