"""One display convention for every DICOM image that carries Image Orientation (Patient): a lone slice comes out with
exactly the pixels of the same slice read within its series (sliced in the slice's own plane), for sagittal, coronal,
flipped and oblique orientations; the convention itself is checked against the geometry of DICOM PS3.3 C.7.6.2.1.1
(each pixel's place in the patient), independently of the reader. Also the one window of a series whose files carry
different ones (their median), and damaged orientations refused in one line. Synthetic files are made here with
pydicom; the real ones are pydicom's own test files (a CT series and an oblique MR slice)."""
import shutil
import statistics
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.uid import MRImageStorage, generate_uid
from test_dicom import image, save

from medti.dataset.folder import load_dataset
from medti.medical import MedicalError
from medti.medical.dicom import training_image
from medti.medical.dicom_series import DicomVolume
from medti.medical.slices import check_options, dicom_images
from medti.medical.window import Window, parse_window, to_uint8

C, S = np.cos(np.radians(25)), np.sin(np.radians(25))
# (row cosines, column cosines) as a file states them, and the plane a radiologist calls it (the normal's main axis)
ORIENTATIONS = {
    "sagittal, anterior to the right": ([0.0, -1.0, 0.0, 0.0, 0.0, -1.0], "sagittal"),
    "coronal, stored on its side": ([0.0, 0.0, 1.0, 1.0, 0.0, 0.0], "coronal"),
    "axial, rows flipped": ([-1.0, 0.0, 0.0, 0.0, 1.0, 0.0], "axial"),
    "axial, stored from the head": ([1.0, 0.0, 0.0, 0.0, -1.0, 0.0], "axial"),
    "axial, rotated 25 degrees in its plane": ([C, S, 0.0, -S, C, 0.0], "axial"),
    "oblique sagittal, normal 25 degrees off, flipped": ([S, -C, 0.0, 0.0, 0.0, -1.0], "sagittal"),
    "oblique coronal, normal 25 degrees off, flipped": ([-1.0, 0.0, 0.0, 0.0, S, -C], "coronal"),
}
ORIGIN, SPACING, STEP, SHAPE = np.array([12.0, -30.0, 45.0]), (0.8, 1.1), 3.0, (5, 7)   # Pixel Spacing: rows, cols
AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}   # the LPS coordinate (x, y, z) a plane's slices are indexed by


def _series(folder: Path, orientation: list, count: int = 4, windows=None, spacing=SPACING, **fields) -> list:
    """A CT series of `count` slices of random HU (oblong in-plane, oblong pixels), at ORIGIN + k * STEP along its
    normal; each file its own window from `windows` (default: one window for all)."""
    folder.mkdir(parents=True, exist_ok=True)
    normal = np.cross(orientation[:3], orientation[3:])
    rng, uid, paths = np.random.default_rng(7), generate_uid(), []
    for k in range(count):
        center, width = windows[k] if windows else (40, 400)
        ds = image(rng.integers(0, 2500, SHAPE).astype(np.uint16), Modality="CT", SeriesInstanceUID=uid,
                   RescaleSlope=1, RescaleIntercept=-1024, ImageOrientationPatient=[float(v) for v in orientation],
                   ImagePositionPatient=[float(v) for v in ORIGIN + k * STEP * normal], PixelSpacing=list(spacing),
                   WindowCenter=center, WindowWidth=width, **fields)
        paths.append(save(ds, folder / f"IM{k:04d}"))
    return paths


def _within_series(paths: list, plane: str, path: Path, window=None) -> np.ndarray:
    """The pixels of `path`'s slice as its series shows it in `plane`: the slice whose index along the plane's LPS
    axis is the rank of its Image Position there (computed here from the headers, not by the reader)."""
    images, _ = dicom_images(DicomVolume(tuple(paths)), "s", check_options(plane=plane, window=window))
    along = [float(pydicom.dcmread(p).ImagePositionPatient[AXIS[plane]]) for p in paths]
    index = sorted(along).index(along[paths.index(path)])
    assert len(images) == len(paths)   # one displayed slice per file: the plane is the slices' own
    return np.asarray(images[index][1])


@pytest.mark.parametrize("name", ORIENTATIONS)
def test_a_lone_slice_has_the_pixels_it_has_within_its_series(tmp_path, name):
    orientation, plane = ORIENTATIONS[name]
    paths = _series(tmp_path / "series", orientation)
    (tmp_path / "alone").mkdir()
    lone = shutil.copy(paths[2], tmp_path / "alone" / "IM0002")
    alone = np.asarray(training_image(lone, None)[0])
    np.testing.assert_array_equal(alone, _within_series(paths, plane, paths[2]))   # 8-bit, exact
    data = load_dataset(tmp_path / "alone", 16)   # and through training's reader
    assert data.names == ["IM0002"] and data.skipped == []


@pytest.mark.parametrize("name", ORIENTATIONS)
def test_the_display_is_radiological_by_each_pixel_s_place_in_the_patient(tmp_path, name):
    """Each pixel's value is one of its LPS coordinates, from PS3.3 C.7.6.2.1.1 (position + column index x column
    spacing x row cosines + row index x row spacing x column cosines). Shown radiologically, the patient's Left
    (x) grows to the right in axial and coronal views, Posterior (y) grows downward in axial views and to the right
    in sagittal ones (anterior on the left), and Superior (z) shrinks downward in coronal and sagittal views."""
    orientation, plane = ORIENTATIONS[name]
    row, column = np.array(orientation[:3]), np.array(orientation[3:])
    i, j = np.mgrid[0:SHAPE[0], 0:SHAPE[1]]
    place = ORIGIN + j[..., None] * row + i[..., None] * column   # [H, W, 3] mm, LPS; 1 mm pixels
    expected = {"axial": ((1, +1), (0, +1)), "coronal": ((2, -1), (0, +1)), "sagittal": ((2, -1), (1, +1))}[plane]
    for image_axis, (coordinate, sign) in enumerate(expected):
        values = place[..., coordinate]
        stored = np.round((values - values.min()) * 10).astype(np.uint16)   # 0.1 mm per unit: 0 to at most 85
        path = save(image(stored, ImageOrientationPatient=[float(v) for v in orientation], PixelSpacing=[1.0, 1.0]),
                    tmp_path / f"{coordinate}.dcm")
        # window 40,100 holds 0..89 without clipping; a pixel step of >= 0.9 mm (cos 25) is >= 20 gray levels
        shown = np.asarray(training_image(path, Window(40, 100))[0]).astype(int)
        steps = np.diff(shown, axis=image_axis)
        assert (np.sign(steps) == sign).all(), (name, plane, coordinate, shown)


def test_pydicom_s_ct_series_and_oblique_mr_slice_read_alone_as_within_their_series(tmp_path):
    """Real files: the 5-slice CT series in pydicom's dicomdirtests (axial), and pydicom's MR2_UNCR.dcm, an oblique
    sagittal MR slice, made a series of 3 by copies at 5 mm steps along its normal (new instance UIDs, pixels
    untouched). Each slice read alone equals itself within its series, in the series' own window."""
    ct = sorted(Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent.glob("dicomdirtests/98892001/CT5N/*"))
    assert len(ct) == 5
    mr = Path(pydicom.data.get_testdata_file("MR2_UNCR.dcm"))
    ds = pydicom.dcmread(mr)
    normal = np.cross(ds.ImageOrientationPatient[:3], ds.ImageOrientationPatient[3:])
    position, copies = np.array(ds.ImagePositionPatient, np.float64), []
    for k in range(3):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImagePositionPatient = [float(v) for v in position + (k - 1) * 5 * normal]
        copies.append(save(ds, tmp_path / f"mr{k}.dcm"))
    for paths, plane, k in ((ct, "axial", 2), (copies, "sagittal", 1)):
        np.testing.assert_array_equal(np.asarray(training_image(paths[k], None)[0]),
                                      _within_series(paths, plane, paths[k]))


def test_an_mr_series_whose_files_carry_different_windows_is_scaled_by_their_median(tmp_path):
    """An MR scanner sets each image's window from its content; one scale for the series: the median centre and the
    median width of the slices' windows, whichever end of the series comes first along its normal (the first file's
    window used to be taken: an edge slice's)."""
    windows = [(100, 150), (420, 900), (380, 700), (400, 800), (90, 120)]
    median = Window(statistics.median(c for c, _ in windows), statistics.median(w for _, w in windows))
    for name, orientation in (("up", [1.0, 0, 0, 0, 1.0, 0]), ("down", [1.0, 0, 0, 0, -1.0, 0])):
        paths = _series(tmp_path / name, orientation, 5, windows, (1.0, 1.0), sop=MRImageStorage)
        images, _ = dicom_images(DicomVolume(tuple(paths)), name, check_options())
        for path in paths:   # every slice in the one median window, by the standard's LINEAR formula
            hu = pydicom.dcmread(path).pixel_array.astype(np.float64) - 1024
            shown = _within_series(paths, "axial", path)
            np.testing.assert_array_equal(shown, to_uint8(hu[None], median)[0] if name == "up" else
                                          to_uint8(hu[None, ::-1], median)[0])
        window = images[0][1].info["window"]
        assert window == "the series' median 380,700 (of 5 windows)", window
    lung = parse_window("lung")   # --window still wins over the files' own
    shown = _within_series(paths, "axial", paths[0], lung)
    hu = pydicom.dcmread(paths[0]).pixel_array.astype(np.float64) - 1024
    np.testing.assert_array_equal(shown, to_uint8(hu[None, ::-1], lung)[0])


@pytest.mark.parametrize("orientation,words", [
    ([1.0, 0, 0, 1.0, 0, 0], "do not span a plane"),
    ([0.0] * 6, "do not span a plane"),
    ([1.0, 0, 0, 0, 1.0], "expected 6 finite"),
    ([1.0], "expected 6 finite"),
    ([float("nan"), 0, 0, 0, 1.0, 0], "expected 6 finite"),
])
def test_a_damaged_orientation_is_one_line_naming_the_file(tmp_path, orientation, words):
    path = save(image(np.zeros((4, 4), np.uint16), ImageOrientationPatient=orientation), tmp_path / "IM0001")
    with pytest.raises(MedicalError, match=words) as e:
        training_image(path, None)
    assert str(e.value).startswith(f"{path}: Image Orientation (Patient)") and "\n" not in str(e.value)
    save(image(np.arange(256, dtype=np.uint16).reshape(16, 16)), tmp_path / "IM0002")   # usable: the run goes on
    # and training lists the damaged one as skipped, with the reason
    data = load_dataset(tmp_path, 16, preprocess="none")
    assert data.names == ["IM0002"] and [(n, words in r) for n, r in data.skipped] == [("IM0001", True)]


def test_a_damaged_position_or_text_for_numbers_is_one_line_naming_the_attribute(tmp_path):
    """Image Position (Patient) needs 3 coordinates; a geometry attribute whose text is no number (pydicom keeps it as
    text when reading) is named, not a ValueError from deep inside."""
    from pydicom.dataelem import RawDataElement
    two = save(image(np.zeros((4, 4), np.uint16), ImagePositionPatient=[0.0, 1.0],
                     ImageOrientationPatient=[1.0, 0, 0, 0, 1.0, 0]), tmp_path / "two.dcm")
    with pytest.raises(MedicalError, match=r"Image Position \(Patient\) \[0.0, 1.0\]: expected 3 finite"):
        training_image(two, None)
    ds = image(np.zeros((4, 4), np.uint16))
    value = b"abc\\1\\0\\0\\1\\0 "   # even length, as DICOM values are (PS3.5 7.1.1)
    ds[0x00200037] = RawDataElement(0x00200037, "DS", len(value), value, 0, False, True)
    text = save(ds, tmp_path / "text.dcm")
    with pytest.raises(MedicalError, match="ImageOrientationPatient .*abc.*: not numbers") as e:
        training_image(text, None)
    assert str(e.value).startswith(f"{text}: ") and "\n" not in str(e.value)
