"""DICOM series and multi-frame files as volumes in training: grouped by Series Instance UID, ordered along the
normal whatever the file names, placed in patient space like SimpleITK's own DICOM series reader (GDCM, an
independent implementation) places them, and sliced exactly like a .mha of the same anatomy. Also --slice-mask as
a folder of masks named after each volume (the Medical Segmentation Decathlon and PI-CAI label layouts). Every file
is made here with pydicom or SimpleITK: synthetic values, invented IDs."""
import gzip
import random
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.uid import EnhancedCTImageStorage, EnhancedMRImageStorage, generate_uid
from test_dicom import image, loop, save
from test_volume import _write_sitk

from medti.dataset.folder import DataError, load_dataset
from medti.medical.dicom import read_dicom
from medti.medical.dicom_series import DicomVolume
from medti.medical.window import Window

ROW, COLUMN = np.array([0.0, 1.0, 0.0]), np.array([1.0, 0.0, 0.0])   # rows run posterior, columns left: swapped axes
NORMAL = np.cross(ROW, COLUMN)                                          # (0, 0, -1): slices stored head to feet
ORIGIN, SPACING, STEP = np.array([10.0, -20.0, 30.0]), (0.7, 0.9), 2.5   # Pixel Spacing (rows, columns), mm


def _hu(slices=6, rows=5, columns=7, seed=0):
    return np.random.default_rng(seed).integers(-1000, 1500, (slices, rows, columns)).astype(np.int16)


def _ct(hu: np.ndarray, k: int, uid: str, **fields) -> Dataset:
    """Slice k of a CT series: stored = HU + 1024, at ORIGIN + k * STEP along NORMAL."""
    position = [float(v) for v in ORIGIN + k * STEP * NORMAL]
    fields = {"ImagePositionPatient": position, "ImageOrientationPatient": [*ROW, *COLUMN], "PixelSpacing":
              list(SPACING), "SliceThickness": STEP, "InstanceNumber": k + 1, "SeriesNumber": 3, **fields}
    return image((hu[k] + 1024).astype(np.uint16), Modality="CT", RescaleSlope=1, RescaleIntercept=-1024,
                 SeriesInstanceUID=uid, StudyInstanceUID="1.2.3.4", FrameOfReferenceUID="1.2.3.5", **fields)


def _series(folder, hu, seed=1, skip=(), prefix="IM", **fields) -> list:
    """The series as files whose names say nothing of position (shuffled); slices in `skip` left out."""
    folder.mkdir(parents=True, exist_ok=True)
    uid, names = generate_uid(), [f"{prefix}{n:04d}" for n in range(len(hu))]
    random.Random(seed).shuffle(names)
    return [save(_ct(hu, k, uid, **fields), folder / names[k]) for k in range(len(hu)) if k not in skip]


def test_a_series_is_placed_in_space_as_simpleitk_s_dicom_reader_places_it(tmp_path):
    hu = _hu()
    files = _series(tmp_path, hu)
    reader = sitk.ImageSeriesReader()   # GDCM: its own header parsing and IPP sorting
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path)))
    reference = sitk.DICOMOrient(reader.Execute(), "LPS")
    volume, first, _ = DicomVolume(tuple(sorted(files))).read("ct")
    assert first.patient.id == "PHANTOM-1"
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(reference))   # integer HU: exact
    for ours, theirs in ((volume.image.GetSpacing(), reference.GetSpacing()),
                         (volume.image.GetOrigin(), reference.GetOrigin()),
                         (volume.image.GetDirection(), reference.GetDirection())):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-9)   # decimal strings both ways: ~1e-15


def _as_mha(path, hu):
    """The same anatomy as one .mha: SimpleITK x = the row direction, y = the column direction, z = the normal."""
    direction = np.column_stack([ROW, COLUMN, NORMAL])
    return _write_sitk(path, hu.astype(np.float32), direction, (SPACING[1], SPACING[0], STEP), ORIGIN)


@pytest.mark.parametrize("plane,slices,window", [("axial", "all", None), ("coronal", "middle:3", "lung"),
                                                 ("sagittal", "1:4", None)])
def test_a_series_trains_exactly_like_the_same_volume_as_mha(tmp_path, plane, slices, window):
    from medti.medical.window import parse_window
    hu = _hu()
    _series(tmp_path / "dicom" / "case1", hu)
    (tmp_path / "mha" / "case1").mkdir(parents=True)
    _as_mha(tmp_path / "mha" / "case1" / "ct.mha", hu)
    w = parse_window(window) if window else None
    dicom = load_dataset(tmp_path / "dicom", 16, window=w, plane=plane, slices=slices)
    mha = load_dataset(tmp_path / "mha", 16, window=w, plane=plane, slices=slices)
    assert dicom.skipped == [] and len(dicom.names) == len(mha.names) > 0
    assert [n.split("#")[1] for n in dicom.names] == [n.split("#")[1] for n in mha.names]
    assert dicom.names[0].startswith("case1#") and dicom.patients == ["PHANTOM-1"] * len(dicom.names)
    assert (dicom.images == mha.images).all()   # same pixels, bit for bit


def _enhanced(hu: np.ndarray, order: list) -> Dataset:
    """An Enhanced CT multi-frame file (PS3.3 C.7.6.16): frames stored in `order`, each with its own Plane Position;
    orientation, pixel spacing and rescale shared by all frames."""
    ds = image((hu[order] + 1024).astype(np.uint16), sop=EnhancedCTImageStorage, Modality="CT",
               SeriesInstanceUID=generate_uid())
    orientation, measures, transform, shared = Dataset(), Dataset(), Dataset(), Dataset()
    orientation.ImageOrientationPatient = [*ROW, *COLUMN]
    measures.PixelSpacing, measures.SliceThickness = list(SPACING), STEP
    transform.RescaleSlope, transform.RescaleIntercept = 1, -1024
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = [orientation], [measures]
    shared.PixelValueTransformationSequence = [transform]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for k in order:
        position, frame = Dataset(), Dataset()
        position.ImagePositionPatient = [float(v) for v in ORIGIN + k * STEP * NORMAL]
        frame.PlanePositionSequence = [position]
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = frames
    return ds


def test_an_enhanced_multi_frame_file_is_the_same_volume_as_the_series(tmp_path):
    hu = _hu()
    _series(tmp_path / "series" / "case1", hu)
    (tmp_path / "enhanced" / "case1").mkdir(parents=True)
    order = [3, 0, 5, 1, 4, 2]   # frames out of spatial order: their Plane Position puts them in place
    save(_enhanced(hu, order), tmp_path / "enhanced" / "case1" / "ct.dcm")
    series = load_dataset(tmp_path / "series", 16, plane="coronal")
    enhanced = load_dataset(tmp_path / "enhanced", 16, plane="coronal")
    assert enhanced.names == [n.replace("case1#", "case1/ct.dcm#") for n in series.names] and enhanced.skipped == []
    assert (series.images == enhanced.images).all()


def test_series_by_uid_and_radiographs_stay_images(tmp_path):
    """Two series in one folder are two volumes named by Series Number; DX radiographs (no Image Position) that
    share a series (a PA and a lateral view) stay two 2-D images; a series of one slice is an image too."""
    a, b = _hu(4, seed=1), _hu(3, seed=2)
    _series(tmp_path / "study", a, SeriesNumber=2)
    _series(tmp_path / "study", b, seed=5, prefix="CT", SeriesNumber=7, PatientID="PHANTOM-2")
    uid = generate_uid()
    for view in ("pa", "lateral"):
        save(image(np.arange(64, dtype=np.uint16).reshape(8, 8), Modality="DX", SeriesInstanceUID=uid),
             tmp_path / f"cxr-{view}")
    save(_ct(_hu(1), 0, generate_uid()), tmp_path / "single.dcm")
    data = load_dataset(tmp_path, 8, preprocess="center")
    sources = sorted({n.split("#")[0] for n in data.names})
    assert sources == ["cxr-lateral", "cxr-pa", "single.dcm", "study/series-2", "study/series-7"], sources
    per_source = {s: sum(n.split("#")[0] == s for n in data.names) for s in sources}
    assert per_source["study/series-2"] == 4 and per_source["study/series-7"] == 3
    assert {p for n, p in zip(data.names, data.patients, strict=True) if n.startswith("study/series-7")} == \
        {"PHANTOM-2"}


def test_unusable_series_are_skipped_with_one_line_each(tmp_path):
    hu = _hu()
    _series(tmp_path / "gap", hu, skip=(3,))                                   # a slice missing
    tilted = _series(tmp_path / "tilt", hu)
    for path in tilted:                                                         # each slice shifted sideways: a tilt
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient[1] = float(ds.ImagePositionPatient[1]) + 0.8 * ds.InstanceNumber
        ds.save_as(path)
    files = _series(tmp_path / "mixed", hu)
    ds = pydicom.dcmread(files[0])
    ds.ImageOrientationPatient = [1.0, 0, 0, 0, 0, -1.0]                      # a localizer in the same series
    ds.save_as(files[0])
    (tmp_path / "cine").mkdir()
    save(image(np.zeros((3, 4, 4), np.uint16), Modality="XA"), tmp_path / "cine" / "run.dcm")   # no positions
    _series(tmp_path / "good", hu)
    reasons = {}
    for folder in ("gap", "tilt", "mixed", "cine"):
        with pytest.raises(Exception) as e:
            load_dataset(tmp_path / folder, 8, strict=True)
        reasons[folder] = str(e.value)
        assert "\n" not in reasons[folder]
    assert "5.000 mm from the previous slice, where the others are 2.500 mm apart" in reasons["gap"]
    assert "sideways" in reasons["tilt"] and "gantry tilt" in reasons["tilt"]
    assert "mixes slice orientations" in reasons["mixed"]
    assert "cine or time series" in reasons["cine"]
    loose = load_dataset(tmp_path, 8, slices="all")   # not strict: every bad one listed, nothing else lost
    assert {name for name, _ in loose.skipped} == {"gap", "tilt", "mixed", "cine/run.dcm"}, loose.skipped
    assert loose.names == [f"good#axial{k:03d}" for k in range(6)]
    assert dict(loose.skipped)["cine/run.dcm"].startswith("3 frames without")   # the path is the skip's name
    assert dict(loose.skipped)["gap"].startswith("IM")                          # which file of the series


def test_slice_mask_folder_named_after_each_volume(tmp_path):
    """--slice-mask FOLDER: the Medical Segmentation Decathlon layout, imagesTr/prostate_00.nii.gz with its mask
    labelsTr/prostate_00.nii.gz; the mask folder inside --data is never read as training images."""
    hu = _hu().astype(np.float32)
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    direction, spacing = np.column_stack([ROW, COLUMN, NORMAL]), (SPACING[1], SPACING[0], STEP)
    for n, keep in ((0, [1, 2]), (1, [4])):
        _write_sitk(tmp_path / "imagesTr" / f"prostate_0{n}.mha", hu + n, direction, spacing, ORIGIN)
        mask = np.zeros_like(hu)
        mask[keep, 2, 3] = 1
        _write_sitk(tmp_path / "labelsTr" / f"prostate_0{n}.mha", mask, direction, spacing, ORIGIN)
    data = load_dataset(tmp_path, 8, slices="mask", slice_mask=str(tmp_path / "labelsTr"))
    # stored head to feet: stored slice k is LPS axial index 5 - k
    assert data.names == ["imagesTr/prostate_00.mha#axial003", "imagesTr/prostate_00.mha#axial004",
                          "imagesTr/prostate_01.mha#axial001"] and data.skipped == []
    (tmp_path / "labelsTr" / "prostate_01.mha").unlink()
    data = load_dataset(tmp_path, 8, slices="mask", slice_mask=str(tmp_path / "labelsTr"))
    assert data.skipped == [("imagesTr/prostate_01.mha", f"no mask prostate_01{{.nii,.nii.gz,.mha,.mhd,.nrrd}} in "
                                                         f"--slice-mask {tmp_path / 'labelsTr'}")]


def test_slice_mask_folder_for_pi_cai_cases_and_dicom_series(tmp_path):
    """PI-CAI's whole-gland masks live in another repository, one per study: <patient>_<study>.nii.gz for the case
    images/<patient>/<patient>_<study>_{t2w,adc,hbv}.mha; a DICOM series' mask is named after its folder."""
    hu = _hu().astype(np.float32)
    direction, spacing = np.column_stack([ROW, COLUMN, NORMAL]), (SPACING[1], SPACING[0], STEP)
    (tmp_path / "images" / "10000").mkdir(parents=True)
    (tmp_path / "labels").mkdir()
    for channel in ("t2w", "adc", "hbv"):
        _write_sitk(tmp_path / "images" / "10000" / f"10000_1000000_{channel}.mha", hu, direction, spacing, ORIGIN)
    mask = np.zeros_like(hu)
    mask[2, 1, 1] = 1
    _write_sitk(tmp_path / "labels" / "10000_1000000.mha", mask, direction, spacing, ORIGIN)
    data = load_dataset(tmp_path / "images", 8, channels=["t2w", "adc", "hbv"], slices="mask",
                        slice_mask=str(tmp_path / "labels"))
    assert data.names == ["10000/10000_1000000#axial003"] and data.patients == ["10000"]
    _series(tmp_path / "ct" / "case7", _hu())
    _write_sitk(tmp_path / "labels" / "case7.mha", mask, direction, spacing, ORIGIN)
    data = load_dataset(tmp_path / "ct", 8, slices="mask", slice_mask=str(tmp_path / "labels"))
    assert data.names == ["case7#axial003"]


def test_channels_from_dicom_series_folders_equal_the_same_case_as_mha(tmp_path):
    """A hospital's prostate MRI: one DICOM series per sequence, `CASE/t2w/`, `CASE/adc/`, `CASE/hbv/`, of
    different grids; stacked exactly as the same sequences saved as `CASE/t2w.mha` ... are (resampled onto the
    first one's grid in patient space)."""
    grids = {"t2w": (_hu(6, 8, 8, seed=3), (0.5, 0.5), 1.5), "adc": (_hu(3, 4, 4, seed=4), (1.0, 1.0), 3.0),
             "hbv": (_hu(3, 4, 4, seed=5), (1.0, 1.0), 3.0)}
    (tmp_path / "mha" / "case1").mkdir(parents=True)
    for channel, (hu, spacing, step) in grids.items():
        uid, folder = generate_uid(), tmp_path / "dicom" / "case1" / channel
        folder.mkdir(parents=True)
        for k in range(len(hu)):
            position = [float(v) for v in ORIGIN + k * step * NORMAL]
            save(_ct(hu, k, uid, ImagePositionPatient=position, PixelSpacing=list(spacing), PatientID="PHANTOM-9"),
                 folder / f"{channel.upper()}{k:03d}")
        _write_sitk(tmp_path / "mha" / "case1" / f"{channel}.mha", hu.astype(np.float32),
                    np.column_stack([ROW, COLUMN, NORMAL]), (spacing[1], spacing[0], step), ORIGIN)
    channels = ["t2w", "adc", "hbv"]
    dicom = load_dataset(tmp_path / "dicom", 16, channels=channels, window=None)
    mha = load_dataset(tmp_path / "mha", 16, channels=channels)
    assert dicom.skipped == [] and dicom.names == mha.names == [f"case1#axial{k:03d}" for k in range(6)]
    assert dicom.patients == ["PHANTOM-9"] * 6 and mha.patients == ["case1"] * 6
    assert (dicom.images == mha.images).all()
    assert not (dicom.images[:, 0] == dicom.images[:, 1]).all()   # the channels differ: really three sequences


def test_messages_say_what_was_there(tmp_path):
    """From the new-user trial: a mask on another grid names both grids the right way round; a --slices range
    past the end says how many slices there are; the "no usable image" advice fits the reason (not --preprocess
    for a volume problem); the window each image was scaled by is recorded."""
    from medti.dataset.folder import DataError
    hu = _hu().astype(np.float32)
    direction, spacing = np.column_stack([ROW, COLUMN, NORMAL]), (SPACING[1], SPACING[0], STEP)
    (tmp_path / "data" / "c").mkdir(parents=True)
    _write_sitk(tmp_path / "data" / "c" / "ct.mha", hu, direction, spacing, ORIGIN)
    (tmp_path / "masks").mkdir()
    _write_sitk(tmp_path / "masks" / "ct.mha", np.ones((6, 5, 3), np.float32), direction, spacing, ORIGIN)
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path / "data", 8, slices="mask", slice_mask=str(tmp_path / "masks"), strict=True)
    assert "shape (6, 3, 5) where the image's is (6, 7, 5)" in str(e.value), e.value   # LPS order
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path / "data", 8, slices="40:50")
    assert "no slice chosen by --slices 40:50 of the 6 axial slices" in str(e.value)
    assert "--preprocess" not in str(e.value) and "fix or re-export those files" in str(e.value)
    assert "1 .mha" in str(e.value)
    from medti.medical.window import parse_window
    data = load_dataset(tmp_path / "data", 8, window=parse_window("lung"))
    assert set(data.windows) == {"--window -600,1500"}
    assert set(load_dataset(tmp_path / "data", 8).windows) == {"min-max over the volume"}
    _series(tmp_path / "dicom" / "case1", _hu(), WindowCenter=40, WindowWidth=400)
    assert set(load_dataset(tmp_path / "dicom", 8).windows) == {"the file's 40,400"}


def _per_frame(stored: np.ndarray, rescales: list, windows: list) -> Dataset:
    """An Enhanced MR file of axial frames (row direction +x, column +y, 2 mm apart along +z, 1 mm pixels) whose
    Pixel Value Transformation and Frame VOI LUT are per frame (PS3.3 C.7.6.16.2.9 and .10)."""
    ds = image(stored, sop=EnhancedMRImageStorage, Modality="MR", SeriesInstanceUID=generate_uid())
    shared, orientation, measures = Dataset(), Dataset(), Dataset()
    orientation.ImageOrientationPatient = [1.0, 0, 0, 0, 1.0, 0]
    measures.PixelSpacing, measures.SliceThickness = [1.0, 1.0], 2.0
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = [orientation], [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for k, ((slope, intercept), (center, width)) in enumerate(zip(rescales, windows, strict=True)):
        frame, position, transform, voi = Dataset(), Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = [0.0, 0.0, 2.0 * k]
        transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = slope, intercept, "US"
        voi.WindowCenter, voi.WindowWidth = center, width
        frame.PlanePositionSequence, frame.PixelValueTransformationSequence = [position], [transform]
        frame.FrameVOILUTSequence = [voi]
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = frames
    return ds


def test_each_frame_of_an_enhanced_file_is_windowed_by_its_own(tmp_path):
    """Per-frame rescale and window (the standard's per-frame functional groups), not frame 0's for all frames;
    data.jsonl's window says so. Axial frames along +z: axial slice k is frame k as stored."""
    stored = np.random.default_rng(3).integers(0, 1200, (3, 8, 8)).astype(np.uint16)
    rescales, windows = [(1, 0), (2, -10), (1, 5)], [(100, 200), (500, 1000), (1000, 400)]
    save(_per_frame(stored, rescales, windows), tmp_path / "mr.dcm")
    data = load_dataset(tmp_path, 8, preprocess="none")
    assert data.names == [f"mr.dcm#axial{k:03d}" for k in range(3)] and data.skipped == []
    for k, ((slope, intercept), (center, width)) in enumerate(zip(rescales, windows, strict=True)):
        expected = loop(stored[k].astype(np.float64) * slope + intercept, center, width)
        got = (data.images[k, 0].numpy() + 1) * 127.5
        assert np.abs(got - expected).max() <= 1.0, k
    assert data.windows == ["each frame's own window (3 windows, 100,200 ... 1000,400)"] * 3
    assert load_dataset(tmp_path, 8, preprocess="none", window=Window(500, 1000)).windows[0] == "--window 500,1000"


def test_the_philips_enhanced_mr_file_gives_each_frame_its_window(tmp_path):
    """nibabel's Philips enhanced MR (an MPRAGE, 176 sagittal frames) sets a window per frame from its content:
    every frame's is read, as pydicom reads it from the per-frame functional groups."""
    source = Path(nibabel.__file__).parent / "nicom" / "tests" / "data" / "philips_mprage.dcm.gz"
    (tmp_path / "mprage.dcm").write_bytes(gzip.decompress(source.read_bytes()))
    ds = pydicom.dcmread(tmp_path / "mprage.dcm")
    theirs = [(float(f.FrameVOILUTSequence[0].WindowCenter), float(f.FrameVOILUTSequence[0].WindowWidth))
              for f in ds.PerFrameFunctionalGroupsSequence]
    assert len(set(theirs)) > 100
    assert [(w.center, w.width) for w in read_dicom(tmp_path / "mprage.dcm").windows] == theirs
    # nibabel ships the file with every stored pixel 0 (ds.pixel_array.max() == 0): each slice is one gray level,
    # skipped as flat, and the reason names the windows that made it
    assert int(ds.pixel_array.max()) == 0
    with pytest.raises(DataError) as error:
        load_dataset(tmp_path, 16, slices="middle:1", strict=True)
    assert f"flat image: every pixel is 0 (each frame's own window ({len(set(theirs))} windows, " in str(error.value)
