"""medti.medical.dicom and .window on DICOM files written here with pydicom (synthetic values, no patient data):
windowing against a per-pixel loop of the standard's formula, rescale to HU, MONOCHROME1, series order in space,
multi-frame, and one-line refusals."""
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import (  # noqa: E402
    JPEG2000,
    BasicTextSRStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    MRImageStorage,
    generate_uid,
)

from medti.medical import MedicalError  # noqa: E402
from medti.medical.dicom import is_dicom, read_dicom, render  # noqa: E402
from medti.medical.dicom_series import series  # noqa: E402
from medti.medical.window import PRESETS, Window, described, parse_window, to_uint8  # noqa: E402


def dataset(sop=CTImageStorage, syntax=ExplicitVRLittleEndian, **fields) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = sop
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.SOPClassUID = sop
    ds.PatientID = "PHANTOM-1"
    for keyword, value in fields.items():
        setattr(ds, keyword, value)
    return ds


def image(stored: np.ndarray, **fields) -> Dataset:
    """A grayscale image dataset holding `stored` ([H, W] or [F, H, W], uint16 or int16) as native pixel data."""
    ds = dataset(**fields)
    ds.Rows, ds.Columns = stored.shape[-2:]
    if stored.ndim == 3:
        ds.NumberOfFrames = stored.shape[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = fields.get("PhotometricInterpretation", "MONOCHROME2")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = int(stored.dtype == np.int16)
    ds.PixelData = stored.tobytes()
    return ds


def save(ds: Dataset, path):
    ds.save_as(path, enforce_file_format=True)   # writes the preamble, "DICM" and the file meta group (PS3.10 7.1)
    return path


def standard(x: float, c: float, w: float) -> float:
    """PS3.3 C.11.2.1.2.1, LINEAR, ymin 0 and ymax 255, written out for one value as the standard states it."""
    if x <= c - 0.5 - (w - 1) / 2:
        return 0.0
    if x > c - 0.5 + (w - 1) / 2:
        return 255.0
    return ((x - (c - 0.5)) / (w - 1) + 0.5) * 255


def loop(values: np.ndarray, c: float, w: float) -> np.ndarray:
    return np.array([[standard(float(v), c, w) for v in row] for row in values])


def test_ct_rescale_to_hu_and_lung_window(tmp_path):
    stored = np.random.default_rng(0).integers(0, 3000, (16, 16)).astype(np.uint16)
    ds = image(stored, Modality="CT", RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=[40, 400],
               WindowWidth=[400, 1500])
    read = read_dicom(save(ds, tmp_path / "ct.dcm"))
    hu = stored.astype(np.float64) - 1024
    assert read.pixels.shape == (1, 16, 16) and read.pixels.dtype == np.float32
    np.testing.assert_array_equal(read.pixels[0], hu)
    assert read.window == Window(40, 400)   # first of several windows
    lung = parse_window("lung")
    got = render(read, lung)[0].astype(int)
    assert np.abs(got - loop(hu, lung.center, lung.width)).max() <= 1
    own = render(read)[0].astype(int)   # no window given: the file's own first one
    assert np.abs(own - loop(hu, 40, 400)).max() <= 1


def test_mr_without_rescale_uses_its_window(tmp_path):
    stored = np.random.default_rng(1).integers(0, 1200, (12, 10)).astype(np.uint16)
    ds = image(stored, sop=MRImageStorage, Modality="MR", WindowCenter=300, WindowWidth=501)
    read = read_dicom(save(ds, tmp_path / "mr.dcm"))
    np.testing.assert_array_equal(read.pixels[0], stored)
    assert np.abs(render(read)[0].astype(int) - loop(stored, 300, 501)).max() <= 1


def test_no_window_is_min_max_and_width_one_is_a_threshold():
    values = np.array([[-5.0, 0.0, 5.0]])
    np.testing.assert_array_equal(to_uint8(values, None), [[0, 128, 255]])
    np.testing.assert_array_equal(to_uint8(values, None, "MONOCHROME1"), [[255, 128, 0]])   # 127.5 rounds up
    np.testing.assert_array_equal(to_uint8(values, Window(0.5, 1)), [[0, 0, 255]])   # x <= c - 0.5 -> ymin


def test_monochrome1_inverted_after_windowing(tmp_path):
    stored = np.arange(0, 1000, 10, dtype=np.uint16).reshape(10, 10)
    ds = image(stored, Modality="CR", PhotometricInterpretation="MONOCHROME1", WindowCenter=500, WindowWidth=600)
    read = read_dicom(save(ds, tmp_path / "cr.dcm"))
    assert read.photometric == "MONOCHROME1"
    got = render(read)[0].astype(int)
    assert np.abs(got - (255 - loop(stored, 500, 600))).max() <= 1
    assert got[0, 0] == 255 and got[-1, -1] == 0   # lowest stored value is white (PS3.3 C.7.6.3.1.2)


def tilted_orientation():
    """Row and column unit vectors of a plane tilted 20 degrees about the x axis (an oblique acquisition)."""
    t = np.radians(20)
    return [1.0, 0.0, 0.0, 0.0, float(np.cos(t)), float(np.sin(t))]


def test_series_ordered_along_the_normal_not_by_name(tmp_path):
    orientation = tilted_orientation()
    normal = np.cross(orientation[:3], orientation[3:])
    uid, names = generate_uid(), [f"{n}.dcm" for n in "qkzab"]
    random.Random(0).shuffle(names)   # file names in no relation to position
    depths = [7.5, -2.5, 12.5, 2.5, -7.5]
    for name, depth in zip(names, depths, strict=True):
        slab = np.full((4, 4), int(depth * 10 + 100), dtype=np.uint16)   # the value tells the slice
        position = [float(v) for v in np.array([-100.0, 30.0, 5.0]) + depth * normal]
        save(image(slab, Modality="CT", SeriesInstanceUID=uid, ImagePositionPatient=position,
                   ImageOrientationPatient=orientation, PixelSpacing=[0.7, 0.7], InstanceNumber=1), tmp_path / name)
    other = save(image(np.zeros((4, 4), np.uint16), SeriesInstanceUID=generate_uid()), tmp_path / "other.dcm")
    found = series(sorted(tmp_path.glob("[!o]*.dcm")) + [other])
    assert [len(s.images) for s in found] == [5, 1] and found[0].uid == uid
    np.testing.assert_array_equal(found[0].pixels[:, 0, 0], [25, 75, 125, 175, 225])
    assert found[0].images[0].spacing == (0.7, 0.7)


def test_series_refuses_mixed_orientation(tmp_path):
    uid = generate_uid()
    for i, orientation in enumerate([[1.0, 0, 0, 0, 1, 0], tilted_orientation()]):
        save(image(np.zeros((4, 4), np.uint16), SeriesInstanceUID=uid, ImagePositionPatient=[0, 0, float(i)],
                   ImageOrientationPatient=orientation), tmp_path / f"{i}.dcm")
    with pytest.raises(MedicalError, match="mixes slice orientations") as e:
        series(sorted(tmp_path.glob("*.dcm")))
    assert "\n" not in str(e.value)


def test_multi_frame_is_one_volume(tmp_path):
    stored = np.arange(3 * 5 * 6, dtype=np.int16).reshape(3, 5, 6) - 40
    path = save(image(stored, Modality="CT", RescaleSlope=2, RescaleIntercept=-10), tmp_path / "mf.dcm")
    read = read_dicom(path)
    assert read.pixels.shape == (3, 5, 6)
    np.testing.assert_array_equal(read.pixels, stored * 2.0 - 10)
    assert [s.pixels.shape for s in series([path])] == [(3, 5, 6)]
    shown = render(read)   # no window in the file: min-max over the whole volume, one scale for all frames
    assert shown.min() == 0 and shown.max() == 255 and shown[0].max() < 128 < shown[2].min()


def test_is_dicom_by_content(tmp_path):
    path = save(image(np.zeros((2, 2), np.uint16)), tmp_path / "IM000017")   # no extension, as PACS exports
    (tmp_path / "notes.txt").write_text("not DICOM " * 20)
    assert is_dicom(path) and not is_dicom(tmp_path / "notes.txt") and not is_dicom(tmp_path / "missing")
    assert read_dicom(path).patient.id == "PHANTOM-1"


def one_line(call, *match):
    with pytest.raises(MedicalError) as e:
        call()
    message = str(e.value)
    assert "\n" not in message, message
    for word in match:
        assert word in message, message
    return message


def test_refusals_in_one_line(tmp_path):
    sr = save(dataset(sop=BasicTextSRStorage, Modality="SR"), tmp_path / "report.dcm")
    one_line(lambda: read_dicom(sr), "holds no image", "Modality SR", "Basic Text SR")
    garbage = encapsulate([b"not a JPEG 2000 codestream" * 4])
    for syntax, name in ((JPEG2000, "JPEG 2000"), (JPEGLSLossless, "JPEG-LS")):
        ds = image(np.zeros((4, 4), np.uint16), syntax=syntax)
        ds.PixelData = garbage
        path = save(ds, tmp_path / f"{name}.dcm")
        one_line(lambda p=path: read_dicom(p), name, str(syntax))
    ds = image(np.zeros((2, 2), np.uint16))
    ds.PhotometricInterpretation = "RGB"
    rgb = save(ds, tmp_path / "rgb.dcm")
    one_line(lambda: read_dicom(rgb), "RGB", "grayscale")
    (tmp_path / "broken.dcm").write_bytes(b"\0" * 10)
    one_line(lambda: read_dicom(tmp_path / "broken.dcm"), "not a readable DICOM file")


def test_parse_window():
    assert parse_window("-600,1500") == PRESETS["lung"] == parse_window("Lung")
    assert parse_window(" 40 , 80 ") == Window(40, 80)
    message = one_line(lambda: parse_window("spleen"), "--window 'spleen'", "lung", "soft_tissue")
    assert "CENTER,WIDTH" in message
    one_line(lambda: parse_window("40,0", flag="window="), "window= '40,0'", "at least 1")
    one_line(lambda: parse_window("40,nan"), "CENTER,WIDTH")


def test_enhanced_multi_frame_reads_shared_functional_groups(tmp_path):
    """Enhanced CT/MR keep rescale and window in the Shared Functional Groups Sequence (PS3.3 C.7.6.16)."""
    ds = image(np.full((2, 3, 3), 1100, np.uint16), Modality="CT")
    transform, voi, shared = Dataset(), Dataset(), Dataset()
    transform.RescaleSlope, transform.RescaleIntercept = 1, -1024
    voi.WindowCenter, voi.WindowWidth = 50, 350
    shared.PixelValueTransformationSequence, shared.FrameVOILUTSequence = [transform], [voi]
    ds.SharedFunctionalGroupsSequence = [shared]
    read = read_dicom(save(ds, tmp_path / "enhanced.dcm"))
    assert read.pixels.shape == (2, 3, 3) and (read.pixels == 76).all() and read.window == Window(50, 350)


def test_series_refuses_unorderable_slices(tmp_path):
    uid = generate_uid()
    flat = {"SeriesInstanceUID": uid, "ImageOrientationPatient": [1.0, 0, 0, 0, 1, 0]}
    a = save(image(np.zeros((4, 4), np.uint16), ImagePositionPatient=[0, 0, 1.0], **flat), tmp_path / "a.dcm")
    b = save(image(np.zeros((4, 4), np.uint16), ImagePositionPatient=[5, 5, 1.0], **flat), tmp_path / "b.dcm")
    one_line(lambda: series([a, b]), "same position", "split them")   # in-plane shift only: same depth
    c = save(image(np.zeros((4, 4), np.uint16), SeriesInstanceUID=uid), tmp_path / "c.dcm")
    one_line(lambda: series([a, c]), "no Image Position/Orientation")


def test_not_a_regular_file_is_not_dicom(tmp_path):
    fifo = tmp_path / "pipe.dcm"
    os.mkfifo(fifo)
    assert not is_dicom(fifo) and not is_dicom(tmp_path)   # returns at once: a FIFO is never read


def test_without_pydicom_one_line_names_the_extra(tmp_path):
    """medti imports without the extra; reading a DICOM file then says which extra to install."""
    code = ("import sys; sys.modules['pydicom'] = None\n"
            "from medti.medical.dicom import read_dicom\n"
            "try:\n    read_dicom('x.dcm')\nexcept Exception as e:\n    print(type(e).__name__, e)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert done.stdout.strip().endswith('pip install "medti[medical]"'), done.stdout + done.stderr
    assert done.stdout.startswith("MissingExtra x.dcm:")   # MedicalError's subclass for the extra


def test_compressed_syntaxes_pydicom_decodes_itself(tmp_path):
    """RLE Lossless (pydicom's own encoder and decoder, PS3.5 Annex G) and Deflated Explicit VR (zlib, PS3.5 A.5)
    need no extra codec: read back to the same modality values as the uncompressed file."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless
    stored = np.random.default_rng(7).integers(0, 4000, (2, 9, 11)).astype(np.uint16)   # two frames
    plain = read_dicom(save(image(stored, Modality="CT", RescaleSlope=1, RescaleIntercept=-1024), tmp_path / "a.dcm"))
    ds = image(stored, Modality="CT", RescaleSlope=1, RescaleIntercept=-1024)
    ds.compress(RLELossless)
    rle = read_dicom(save(ds, tmp_path / "rle.dcm"))
    deflated = image(stored, syntax=DeflatedExplicitVRLittleEndian, Modality="CT", RescaleSlope=1,
                     RescaleIntercept=-1024)
    flat = read_dicom(save(deflated, tmp_path / "deflated.dcm"))
    assert str(pydicom_syntax(tmp_path / "rle.dcm")) == RLELossless   # really compressed on disk
    for other in (rle, flat):
        np.testing.assert_array_equal(other.pixels, plain.pixels)
    np.testing.assert_array_equal(plain.pixels, stored.astype(np.float32) - 1024)


def pydicom_syntax(path):
    import pydicom
    return pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID


@pytest.mark.parametrize("function, center, width", [("SIGMOID", 1800, 1200), ("LINEAR_EXACT", 1800.5, 9),
                                                     ("SIGMOID", 1800, 0.5), ("LINEAR_EXACT", 1800, 0.5)])
def test_voi_lut_functions_equal_pydicom(tmp_path, function, center, width):
    """The file's VOI LUT Function (PS3.3 C.11.2.1.3) is applied, equal to pydicom's apply_voi_lut to +-1 gray
    level on the 0..255 scale (its output spans the stored range through the rescale, here -1024..64511 HU)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
    stored = np.random.default_rng(1).integers(0, 4096, (32, 32)).astype(np.uint16)
    ds = image(stored, Modality="CT", RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=center - 1024,
               WindowWidth=width, VOILUTFunction=function)
    ours = render(read_dicom(save(ds, tmp_path / "ct.dcm")))[0].astype(np.float64)
    low, high = -1024, 65535 - 1024   # pydicom's y range: the 16-bit stored range through the rescale
    with np.errstate(over="ignore"):   # pydicom's SIGMOID: exp overflows to inf far below the window (y = ymin)
        theirs = (apply_voi_lut(apply_modality_lut(stored, ds), ds) - low) / (high - low) * 255
    assert np.abs(ours - theirs).max() <= 1.0
    own = read_dicom(tmp_path / "ct.dcm").window
    assert described(None, own) == f"the file's {center - 1024:g},{width:g} {function}"


def test_pacs_compressions_decode_through_medti_with_the_extra_s_decoders(tmp_path):
    """The medical extra's decoders, through medti's reader: JPEG Lossless (Process 14, SV1: pylibjpeg-libjpeg) on
    pydicom-data's JPEG-LL.dcm against pydicom's own reference values for it; JPEG 2000 lossless
    (pylibjpeg-openjpeg) and JPEG-LS lossless on pydicom's test files against their uncompressed original."""
    from pydicom.data import get_testdata_file
    from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1
    lossless = get_testdata_file("JPEG-LL.dcm")   # pydicom-data (the test extra pins it)
    assert str(pydicom_syntax(lossless)) == JPEGLosslessSV1
    pixels = read_dicom(lossless).pixels[0]   # no rescale: modality values are the stored ones
    # pydicom's pixel reference for this file (its tests' JPGS_16_16_1_1_1F_M2), rows 400 and 600, columns 124-131
    assert tuple(pixels[400, 124:132]) == (60, 58, 61, 68, 59, 65, 64, 67)
    assert tuple(pixels[600, 124:132]) == (3, 1, 2, 0, 2, 1, 2, 0)
    original = read_dicom(get_testdata_file("MR_small.dcm")).pixels
    for name, syntax in (("MR_small_jp2klossless.dcm", JPEG2000Lossless), ("MR_small_jpeg_ls_lossless.dcm",
                                                                             JPEGLSLossless)):
        path = get_testdata_file(name)
        assert str(pydicom_syntax(path)) == syntax
        np.testing.assert_array_equal(read_dicom(path).pixels, original)
