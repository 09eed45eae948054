"""Patients, not files, in medti.audit and medti.evaluate: --train / --real folders are read by training's own reader
(volumes, DICOM series, the data flags), the real-vs-real baselines compare different patients only, and the report
says which training patient a flagged image copies -- by pseudonym, never by its PatientID. Every file is made here
(SimpleITK, pydicom): simulated chests (test_privacy.chest), invented IDs."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_dicom_series import _series
from test_privacy import chest
from test_volume import _write_sitk

from conftest import private_key
from medti import audit as A
from medti import evaluate
from medti.dataset.folder import load_dataset
from medti.quality import folders
from medti.quality import privacy as P
from medti.quality.folders import Reading, load_set, reading
from medti.quality.report import BASELINE, real_baseline
from medti.quality.stats import from_features

SIDE = 96
SECRET = "QX7-SECRET-4711"   # a PatientID no output may hold


def slices(seed: int, n: int, noise: float = 1.0) -> np.ndarray:
    """n nearly identical slices of one patient ([n, SIDE, SIDE] float32): adjacent slices of a scan differ by
    little more than noise (here noise std `noise` on 0..255)."""
    rng = np.random.default_rng(seed)
    base = chest(seed, SIDE).astype(np.float32)
    return np.stack([base + rng.normal(0, noise, base.shape) for _ in range(n)]).astype(np.float32)


def volume(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write_sitk(path, array, np.eye(3), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))


@pytest.fixture
def train(tmp_path):
    """p1..p8.png, one patient each (patient-001..008), then zcase/ct.mha: a 12-slice volume of one patient
    (patient-009, met last: sorted paths)."""
    for i in range(1, 9):
        folder = tmp_path / "train"
        folder.mkdir(exist_ok=True)
        Image.fromarray(chest(i, SIDE)).save(folder / f"p{i}.png")
    volume(tmp_path / "train" / "zcase" / "ct.mha", slices(0, 12))
    return tmp_path / "train"


def groups(patients: list) -> torch.Tensor:
    number = {p: i for i, p in enumerate(dict.fromkeys(patients))}
    return torch.tensor([number[p] for p in patients])


def test_calibration_leaves_out_the_same_patient_not_only_the_image(train):
    """(a) The old rule (exclude the image itself) finds each slice's neighbour slice and scores it above the flag
    threshold -- the baseline would look like copying. Leaving out the whole patient scores the slices against other
    patients, below the highest non-copy measured on this modality (0.871, privacy.MEASURED). Observed: about 0.94
    vs 0.44, so both bounds hold with a wide margin."""
    held = load_set(train, "train", minimum=2, max_side=A.READ_SIDE)
    assert held.patients[-12:] == ["zcase"] * 12 and held.names[-1] == "zcase/ct.mha#axial011"
    desc = P.descriptors(held.images)
    ref, g = P.fit(desc), groups(held.patients)
    old, new = P.nearest(ref, desc, exclude_self=True), P.nearest(ref, desc, groups=g)
    assert old.similarity[-12:].min() >= P.THRESHOLD
    assert new.similarity[-12:].max() < P.MEASURED["highest_other"]
    assert (g[new.index] != g).all()   # never an image of its own patient
    same = P.nearest(ref, desc, groups=torch.arange(len(desc)))   # exclude_self is groups = every image alone
    assert torch.equal(same.index, old.index) and torch.equal(same.similarity, old.similarity)


def test_a_copied_slice_is_flagged_with_that_slice_and_its_patient_pseudonym(train, tmp_path):
    """(b) A synthetic image equal to slice 5 of the volume, and the mirror of slice 7: both flagged, each naming
    its own slice (an exact copy scores 1.0, a neighbour slice about 0.94) and patient-009; the report counts
    flagged images per patient. The training set's own baseline has no near-duplicate: one patient's slices are
    not compared with each other."""
    held = load_set(train, "train")
    (tmp_path / "syn").mkdir()
    for name, image in (("copy.png", held.images[13]), ("mirror.png", held.images[15].flip(-1))):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / "syn" / name)
    for j in range(3):
        Image.fromarray(chest(500 + j, SIDE)).save(tmp_path / "syn" / f"other{j}.png")
    assert held.names[13] == "zcase/ct.mha#axial005" and held.names[15] == "zcase/ct.mha#axial007"
    assert A.main(["--train", str(train), "--synthetic", str(tmp_path / "syn"), "--out", str(tmp_path / "out")]) == 0
    found = json.loads((tmp_path / "out" / "audit.json").read_text())
    images = {e["file"]: e for e in found["images"]}
    # by pseudonym, with the slice (the volume's file name may be the patient's)
    assert held.pseudonyms[13].endswith("#axial005") and held.pseudonyms[15].endswith("#axial007")
    assert (images["copy.png"]["nearest"], images["copy.png"]["nearest_patient"]) == (held.pseudonyms[13],
                                                                                       "patient-009")
    assert (images["mirror.png"]["nearest"], images["mirror.png"]["mirrored"]) == (held.pseudonyms[15], True)
    assert [e["flagged"] for e in found["images"]] == [True, True, False, False, False]   # copy, mirror, others
    summary = found["summary"]
    assert summary["flagged_by_patient"] == [{"patient": "patient-009", "flagged": 2, "training_images": 12}]
    assert summary["train_set"] == {"images": 20, "patients": 9, "slices": 12, "volumes_or_series": 1,
                                    "single_images": 8, "fingerprint": held.fingerprint}
    assert summary["train_vs_train"]["near_duplicates"] == []
    assert summary["train_vs_train"]["highest"] < P.MEASURED["highest_other"]
    report = (tmp_path / "out" / "audit.md").read_text()
    assert "20 training images of 9 patients (12 slices of 1 volume(s) or series, 8 single images)" in report
    assert "| patient-009 | 2 | 12 |" in report and f"| {held.pseudonyms[13]} | patient-009 |" in report
    assert "zcase" not in report and private_key(tmp_path / "out")[held.pseudonyms[13]] == "zcase/ct.mha#axial005"


def test_a_single_patient_gets_one_line_instead_of_a_baseline(tmp_path, capsys):
    volume(tmp_path / "train" / "case" / "ct.mha", slices(0, 6))
    (tmp_path / "syn").mkdir()
    Image.fromarray(chest(500, SIDE)).save(tmp_path / "syn" / "a.png")
    assert A.main(["--train", str(tmp_path / "train"), "--synthetic", str(tmp_path / "syn"),
                   "--out", str(tmp_path / "out")]) == 0
    assert "all 6 training images are of one patient" in capsys.readouterr().err
    found = json.loads((tmp_path / "out" / "audit.json").read_text())["summary"]["train_vs_train"]
    assert found["highest"] is None and found["near_duplicates"] == []
    assert "not computed, as all 6 training images are of one patient" in (tmp_path / "out" / "audit.md").read_text()


def test_audit_reads_the_slices_training_reads(tmp_path):
    """(c) --slices middle:2 on a folder of volumes: the audit holds exactly load_dataset's images, by name."""
    for c in range(3):
        volume(tmp_path / "train" / f"case{c}" / "t2w.mha", slices(10 + c, 7, noise=20))
    (tmp_path / "syn").mkdir()
    Image.fromarray(chest(500, SIDE)).save(tmp_path / "syn" / "a.png")
    argv = ["--train", str(tmp_path / "train"), "--synthetic", str(tmp_path / "syn"), "--out", str(tmp_path / "out"),
            "--slices", "middle:2"]
    how = A.check_args(A.build_parser().parse_args(argv))
    want = load_dataset(tmp_path / "train", 32, slices="middle:2").names
    assert len(want) == 6 and load_set(tmp_path / "train", "train", how=how).names == want
    assert A.main(argv) == 0
    summary = json.loads((tmp_path / "out" / "audit.json").read_text())["summary"]
    assert (summary["n_train"], summary["train_set"]["patients"], summary["train_set"]["volumes_or_series"]) == \
        (6, 3, 3)


def test_audit_reads_channel_cases_as_training_does(tmp_path):
    """--channels t2w,adc,hbv: each case folder is one RGB image named by its case and of that patient, as in
    load_dataset; a case missing a channel is skipped there and here alike."""
    for c in range(3):
        for k, channel in enumerate(("T2W", "adc", "hbv")):   # channel names match files in any case
            (tmp_path / "train" / f"case{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(chest(60 + 3 * c + k, SIDE)).save(tmp_path / "train" / f"case{c}" / f"{channel}.png")
    (tmp_path / "train" / "case2" / "adc.png").unlink()
    args = A.build_parser().parse_args(["--train", str(tmp_path / "train"), "--synthetic", str(tmp_path / "train"),
                                        "--out", str(tmp_path / "out"), "--channels", "t2w,adc,hbv"])
    held = load_set(tmp_path / "train", "train", how=A.check_args(args))
    want = load_dataset(tmp_path / "train", 32, channels=["t2w", "adc", "hbv"])
    assert held.names == want.names == ["case0", "case1"] and held.patients == want.patients
    assert [name for name, _ in held.skipped] == [name for name, _ in want.skipped] == ["case2"]
    assert held.images[0].shape == (3, SIDE, SIDE)   # the native size: no --preprocess


def dicom_train(folder, n_png: int = 4) -> None:
    """Two CT series (folders ser_a, ser_b) of patients whose PatientID and name hold SECRET, and n_png PNGs."""
    for k, sub in enumerate(("ser_a", "ser_b")):
        hu = (slices(20 + k, 5, noise=2) * 4 - 500).astype(np.int16)
        _series(folder / sub, hu, seed=k, PatientID=f"{SECRET}-{k}", PatientName=f"{SECRET}^DOE")
    for i in range(n_png):
        Image.fromarray(chest(40 + i, SIDE)).save(folder / f"x{i}.png")


def test_no_patient_id_reaches_an_audit_output(tmp_path):
    """(d) DICOM series whose PatientID is SECRET: read as two patients, and the copy of one slice is flagged and
    named by its series folder and pseudonym; SECRET's bytes are in no output file (text or PNG). The slices are
    96 x 123 as read: the copy is the square training made of one (--preprocess center at the synthetic size)."""
    dicom_train(tmp_path / "train")
    held = load_set(tmp_path / "train", "train", how=Reading(preprocess="center", resolution=SIDE))
    assert sorted(set(held.patients))[:2] == [f"{SECRET}-0", f"{SECRET}-1"]   # the patients, in memory
    (tmp_path / "syn").mkdir()
    Image.fromarray(held.images[2].permute(1, 2, 0).numpy()).save(tmp_path / "syn" / "copy.png")
    Image.fromarray(chest(500, SIDE)).save(tmp_path / "syn" / "other.png")
    assert A.main(["--train", str(tmp_path / "train"), "--synthetic", str(tmp_path / "syn"),
                   "--out", str(tmp_path / "out")]) == 0
    copy = json.loads((tmp_path / "out" / "audit.json").read_text())["images"][0]
    assert (copy["nearest"], copy["nearest_patient"], copy["flagged"]) == (held.pseudonyms[2], "patient-001", True)
    written = sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith("."))
    assert written == ["audit.json", "audit.md", "closest.png", "flagged.png", "names.private.tsv"]
    for name in written:
        assert SECRET.encode() not in (tmp_path / "out" / name).read_bytes(), name


BAD = [(["--plane", "oblique"], "--plane 'oblique'"), (["--slices", "middle:x"], "--slices"),
       (["--window", "nope"], "--window 'nope'"), (["--channels", "a,b"], "--channels a,b"),
       (["--slice-mask", "no/such/mask.nii"], "--slice-mask no/such")]


@pytest.mark.parametrize("flags, words", BAD)
@pytest.mark.parametrize("tool", ["audit", "evaluate"])
def test_a_bad_data_flag_is_one_line_before_any_image_is_read(tool, flags, words, train, tmp_path, capsys,
                                                               monkeypatch):
    """(e) One line naming the flag, exit 2, no output folder, and the reader never called."""
    def never(*args):
        raise AssertionError("an image was read before the flags were checked")
    monkeypatch.setattr(folders, "read_items", never)
    out = tmp_path / "out"
    argv = ["--train", train, "--synthetic", train.parent / "syn", "--out", out] if tool == "audit" else \
        ["--real", train, "--fake", train.parent / "syn", "--out", out]
    (train.parent / "syn").mkdir()
    main = A.main if tool == "audit" else evaluate.main
    assert main([str(a) for a in argv + flags]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and words in errors[0], errors
    assert not out.exists()


def test_data_flags_with_a_statistics_file_are_refused(tmp_path, capsys):
    (tmp_path / "fake").mkdir()
    assert evaluate.main(["--real", str(tmp_path / "real.npz"), "--fake", str(tmp_path / "fake"), "--out",
                          str(tmp_path / "o"), "--plane", "coronal"]) == 2
    assert "--plane says how a --real folder is read" in capsys.readouterr().err


def test_default_reading_is_training_s_default():
    """No data flag: the folder is read as medti.train reads --data with its defaults."""
    assert reading(A.build_parser().parse_args(["--train", "t", "--synthetic", "s", "--out", "o"])) == \
        Reading(as_training=True)


def test_evaluate_baseline_leaves_out_the_same_patient():
    """(f) Real images 0-2 are one patient with identical features (three slices alike), 3-5 other patients: each
    image's baseline distance is to another patient's image, never 0 (the old rule's answer for 0-2)."""
    features = torch.tensor([[0.0, 0], [0, 0], [0, 0], [3, 0], [0, 4], [0, 10]])
    real = from_features(features, [f"r{i}" for i in range(6)], None)
    held = folders.ImageSet([], real.names, None, patients=["a", "a", "a", "b", "c", "d"])
    series, what = real_baseline(real, held)
    # distances 3, 4, 6 by hand; 1e-9: float64 rounding of |x|² + |y|² - 2 x·y only
    assert series[BASELINE].tolist() == pytest.approx([3, 3, 3, 3, 4, 6], rel=1e-9)
    assert "another patient (4 patients)" in what
    old, _ = real_baseline(real, None)   # a statistics file names no patients: each image left out alone
    assert old[BASELINE].tolist()[:3] == [0, 0, 0]
    alone = folders.ImageSet([], real.names, None, patients=["a"] * 6)
    assert real_baseline(real, alone) == ({}, "no real-to-real baseline: all 6 real images are of one patient")


def test_evaluate_reads_a_dicom_folder_by_patient_and_writes_no_patient_id(tmp_path, inception_file):
    """--real a folder of two DICOM series and 4 PNGs (6 patients): report.json counts the patients, report.md
    says the baseline is by patient, and SECRET is in no output file."""
    dicom_train(tmp_path / "real")
    fake = tmp_path / "fake"
    fake.mkdir()
    for i in range(6):
        Image.fromarray(chest(600 + i, SIDE)).save(fake / f"{i}.png")
    out = tmp_path / "out"
    assert evaluate.main(["--real", str(tmp_path / "real"), "--fake", str(fake), "--out", str(out), "--inception",
                          str(inception_file), "--kid-subsets", "2", "--k", "2"]) == 0
    found = json.loads((out / "report.json").read_text())
    assert (found["n_real"], found["n_real_patients"]) == (14, 6)
    assert "nearest real image of another patient (6 patients)" in (out / "report.md").read_text()
    for path in out.iterdir():
        assert SECRET.encode() not in path.read_bytes(), path.name
