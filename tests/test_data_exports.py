"""Data folders as hospital exports write them: DICOM named by SOP Instance UID, *.IMA or *.dicom, copies of one
instance in two folders, several series under one Series Number, placeholder PatientIDs. Real files from pydicom's
own test set where one shows the problem, else files made here with pydicom (synthetic values, invented IDs)."""
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom.data
from PIL import Image
from test_dicom import image, save

from medti.dataset.folder import load_dataset
from medti.dataset.report import summary

PYDICOM_FILES = Path(os.path.dirname(pydicom.data.__file__)) / "test_files"
UID_NAME = "1.3.6.1.4.1.5962.1.1.0.0.0.1168612284.20369.0.3"   # how many PACS exports name a file: its SOP UID


def test_dicom_is_found_by_content_whatever_its_name(tmp_path):
    """A file named by SOP Instance UID (suffix `.3`), a Siemens `.IMA` and a `.dicom` are read as DICOM; a text
    file is left out and said to be, while a caption and a .mhd's data file belong to their image."""
    shutil.copy(PYDICOM_FILES / "CT_small.dcm", tmp_path / UID_NAME)
    shutil.copy(PYDICOM_FILES / "MR_small.dcm", tmp_path / "MR000001.IMA")
    save(image(np.arange(64, dtype=np.uint16).reshape(8, 8), Modality="MR"), tmp_path / "scan.dicom")
    Image.new("L", (8, 8), 100).save(tmp_path / "photo.png")
    (tmp_path / "photo.txt").write_text("a caption")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "export.csv").write_text("a,b")
    data = load_dataset(tmp_path, 16)
    assert sorted(data.names) == sorted([UID_NAME, "MR000001.IMA", "scan.dicom", "photo.png"]), data.skipped
    assert data.files == {"DICOM": 3, ".png": 1}
    line = summary(data)
    assert "read 4 file(s): 3 DICOM, 1 .png" in line, line
    assert "skipped 2 file(s) that are not images (export.csv, notes.txt)" in line, line
    assert "photo.txt" not in line


def test_the_summary_says_what_was_unusable(tmp_path):
    Image.new("L", (8, 8), 100).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"junk")
    line = summary(load_dataset(tmp_path, 8))
    assert line.endswith("read 1 file(s): 1 .png; skipped 1 unusable file(s) or case(s), each with its reason "
                         "above"), line
