"""Data folders as hospital exports write them: DICOM named by SOP Instance UID, *.IMA or *.dicom, copies of one
instance in two folders, several series under one Series Number, placeholder PatientIDs. Real files from pydicom's
own test set where one shows the problem, else files made here with pydicom (synthetic values, invented IDs)."""
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom.data
from PIL import Image
from test_data_dicom_series import _hu, _series
from test_dicom import image, save

from medti.dataset.folder import load_dataset
from medti.dataset.report import summary
from medti.training.config import TrainConfig
from medti.training.sources import load_data

PYDICOM_FILES = Path(os.path.dirname(pydicom.data.__file__)) / "test_files"
UID_NAME = "1.3.6.1.4.1.5962.1.1.0.0.0.1168612284.20369.0.3"   # how many PACS exports name a file: its SOP UID


def test_dicom_is_found_by_content_whatever_its_name(tmp_path):
    """A file named by SOP Instance UID (suffix `.3`), a Siemens `.IMA` and a `.dicom` are read as DICOM; a text
    file is left out and said to be, while a caption and a .mhd's data file belong to their image."""
    shutil.copy(PYDICOM_FILES / "CT_small.dcm", tmp_path / UID_NAME)
    shutil.copy(PYDICOM_FILES / "MR_small.dcm", tmp_path / "MR000001.IMA")
    save(image(np.arange(64, dtype=np.uint16).reshape(8, 8), Modality="MR"), tmp_path / "scan.dicom")
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(tmp_path / "photo.png")
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
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"junk")
    line = summary(load_dataset(tmp_path, 8))
    assert line.endswith("read 1 file(s): 1 .png; skipped 1 unusable file(s) or case(s), each with its reason "
                         "above"), line


def test_copies_of_one_instance_are_read_once_and_said_in_one_line(tmp_path, capsys):
    """The same series exported to two folders (byte-identical files, one SOP Instance UID each) and a radiograph
    copied: the first in path order is read, the copies are left out in one warning line (they were refused as
    'several echoes' before)."""
    files = _series(tmp_path / "a-export", _hu(4))
    (tmp_path / "b-export").mkdir()
    for path in files:
        shutil.copy(path, tmp_path / "b-export" / path.name)
    (tmp_path / "cxr-1").mkdir()
    save(image(np.arange(64, dtype=np.uint16).reshape(8, 8), Modality="DX"), tmp_path / "cxr-1" / "IM0001")
    shutil.copytree(tmp_path / "cxr-1", tmp_path / "cxr-2")
    data = load_data(TrainConfig(data=str(tmp_path), resolution=8))
    assert data.skipped == []
    assert sorted({n.split("#")[0] for n in data.names}) == ["a-export", "cxr-1/IM0001"]
    assert len(data.names) == 5 and len(data.survey.duplicates) == 5
    assert ("cxr-2/IM0001", "cxr-1/IM0001") in data.survey.duplicates
    out = capsys.readouterr()
    warning = [line for line in out.err.splitlines() if "copies" in line]
    assert len(warning) == 1 and warning[0].startswith("warning: 5 DICOM file(s) in "), out.err
    assert "are copies of files read already (the same SOP Instance UID)" in warning[0]
    assert "b-export/IM0000 (copy of a-export/IM0000)" in warning[0]
    assert "echoes" not in out.err
    assert "left out 5 copies of DICOM files read already" in out.out


def test_series_sharing_a_number_get_distinct_stable_names(tmp_path):
    """Four series numbered 3 in one folder (a scanner restarts its numbering; two exams exported together): named by
    their description where it tells them apart, else by a counter in path order; never by UID, and never by a
    description that holds the patient's name."""
    for n, (prefix, description) in enumerate([("A", "T2 TSE AX"), ("B", "T1 AX"), ("C", ""), ("D", "DOE scout")]):
        _series(tmp_path / "study", _hu(3, seed=n), prefix=prefix, seed=n, SeriesDescription=description,
                PatientName="DOE^JANE")
    data = load_dataset(tmp_path, 8)
    sources = list(dict.fromkeys(n.split("#")[0] for n in data.names))
    assert sources == ["study/series-3-T2_TSE_AX", "study/series-3-T1_AX", "study/series-3-1", "study/series-3-2"]
    assert load_dataset(tmp_path, 8).names == data.names          # stable
    assert not any("DOE" in n or "1.2." in n for n in data.names)


def _dx(folder: Path, n: int, **fields):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = np.arange(64, dtype=np.uint16).reshape(8, 8) + 50 * i   # not one gray level: that is skipped
        save(image(pixels, Modality="DX", **fields), folder / f"IM{i:04d}")


def test_a_placeholder_patient_id_keys_patients_by_study(tmp_path, capsys):
    """'ANONYMOUS', 'anon ', '' and '0' on five studies, and one real-looking ID on two people (different birth
    dates): each study is its own patient, said in one warning line; a plain ID still groups its studies."""
    studies = {"s1": "ANONYMOUS", "s2": "ANONYMOUS", "s3": "anon ", "s4": "", "s5": "0", "s6": "P-7", "s7": "P-7",
               "s8": "P-1", "s9": "P-1"}
    births = {"s6": "19500101", "s7": "19800202", "s8": "19600303", "s9": "19600303"}
    for k, (study, pid) in enumerate(studies.items()):
        _dx(tmp_path / study, 2, PatientID=pid, StudyInstanceUID=f"1.2.826.0.1.3680043.10.{k}",
            PatientBirthDate=births.get(study, ""))
    data = load_data(TrainConfig(data=str(tmp_path), resolution=8))
    by_study = {}
    for name, patient in zip(data.names, data.patients, strict=True):
        by_study.setdefault(name.split("/")[0], set()).add(patient)
    assert all(len(keys) == 1 for keys in by_study.values())        # a study is never split
    assert len(set(data.patients)) == 8                             # s1..s7 apart, s8 and s9 one patient
    assert by_study["s8"] == by_study["s9"] == {"P-1"}
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if "placeholder PatientID" in line]
    assert len(warning) == 1 and warning[0].startswith("warning: 14 image(s) in "), err
    assert "7 in all" in warning[0] and "1.2.826" not in err and "P-7" not in err
