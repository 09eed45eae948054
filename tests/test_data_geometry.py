"""Geometry that cannot place pixels is a skip with its reason (a one-line error with --strict, naming the file), never
a traceback: zero or negative Pixel Spacing, a .mhd whose data file lies outside the data folder, a NaN in a NIfTI
sform. NIfTI-2 files, which SimpleITK cannot open, are read (nibabel). Files made here (synthetic values) and
nibabel's own NIfTI-2 example."""
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.data import get_testdata_file
from test_data_dicom_series import _hu, _series
from test_dicom import image, save

from medti.dataset.folder import DataError, load_dataset


def _strict_line(folder, *words):
    with pytest.raises(DataError) as error:
        load_dataset(folder, 8, strict=True)
    message = str(error.value)
    assert "\n" not in message and all(w in message for w in words), message


@pytest.mark.parametrize("spacing", [[0, 1], [-0.5, 0.5], [1, float("inf")]])
def test_pixel_spacing_that_is_not_positive_is_a_skip(tmp_path, spacing):
    save(image(np.arange(64, dtype=np.uint16).reshape(8, 8), Modality="DX", PixelSpacing=spacing), tmp_path / "IM1")
    _series(tmp_path / "ct", _hu(3), PixelSpacing=spacing[::-1])
    save(image(np.arange(64, dtype=np.uint16).reshape(8, 8), Modality="DX"), tmp_path / "ok.dcm")
    data = load_dataset(tmp_path, 8)
    assert data.names == ["ok.dcm"]
    reasons = dict(data.skipped)
    assert reasons["IM1"].startswith(f"PixelSpacing {[float(v) for v in spacing]}: pixel sizes must be positive")
    assert reasons["ct"].startswith("IM") and "PixelSpacing" in reasons["ct"]   # which file of the series
    _strict_line(tmp_path, "IM1: PixelSpacing")


def test_a_pixel_spacing_of_zeros_says_nothing_and_the_image_is_read_as_stored(tmp_path):
    """`0\\0` is what CR exports write when they had no size (pydicom-data's RG1_UNCI.dcm, a real radiograph): read
    as if the attribute were absent (square pixels, as stored), not refused as damaged geometry."""
    pixels = np.arange(64, dtype=np.uint16).reshape(8, 8)
    for folder in ("zeros", "none", "real"):
        (tmp_path / folder).mkdir()
    save(image(pixels, Modality="CR", PixelSpacing=[0, 0]), tmp_path / "zeros" / "IM1")
    save(image(pixels, Modality="CR"), tmp_path / "none" / "IM1")
    zeros, none = load_dataset(tmp_path / "zeros", 8), load_dataset(tmp_path / "none", 8)
    assert zeros.names == ["IM1"] and not zeros.skipped and np.array_equal(zeros.images, none.images)
    real = Path(get_testdata_file("RG1_UNCI.dcm"))   # PixelSpacing 0.000\\0.000 in the file
    (tmp_path / "real" / "RG1_UNCI").write_bytes(real.read_bytes())
    assert load_dataset(tmp_path / "real", 8).names == ["RG1_UNCI"]


def test_a_mhd_whose_data_lies_outside_the_folder_is_a_skip(tmp_path):
    data_dir = tmp_path / "data"
    (data_dir / "case1").mkdir(parents=True)
    (tmp_path / "elsewhere.raw").write_bytes(np.zeros(4 * 5 * 6, np.float32).tobytes())
    header = "ObjectType = Image\nNDims = 3\nDimSize = 4 5 6\nElementType = MET_FLOAT\nElementDataFile = {}\n"
    (data_dir / "case1" / "up.mhd").write_text(header.format("../../elsewhere.raw"))
    (data_dir / "case1" / "absolute.mhd").write_text(header.format(tmp_path / "elsewhere.raw"))
    (data_dir / "case1" / "inside.raw").write_bytes(np.arange(120, dtype=np.float32).tobytes())
    (data_dir / "case1" / "inside.mhd").write_text(header.format("inside.raw"))
    data = load_dataset(data_dir, 8)
    assert {n.split("#")[0] for n in data.names} == {"case1/inside.mhd"}
    reasons = dict(data.skipped)
    assert reasons["case1/up.mhd"] == ("its data file (ElementDataFile) ../../elsewhere.raw lies outside the data "
                                       "folder; keep it beside the .mhd, or convert to .mha")
    assert "lies outside the data folder" in reasons["case1/absolute.mhd"]
    _strict_line(data_dir, "absolute.mhd: its data file")


def test_a_nan_in_a_nifti_sform_is_a_skip(tmp_path, capfd):
    image_ = nib.Nifti1Image(np.ones((6, 5, 4), np.float32), np.diag([2.0, 3.0, 4.0, 1.0]))
    image_.header.set_qform(None, code=0)
    nib.save(image_, str(tmp_path / "bad.nii"))
    raw = bytearray((tmp_path / "bad.nii").read_bytes())
    raw[280:284] = struct.pack("<f", float("nan"))   # srow_x[0] (NIfTI-1 header, byte 280): the sform's x scale
    (tmp_path / "bad.nii").write_bytes(bytes(raw))
    nib.save(nib.Nifti1Image(np.arange(120, dtype=np.float32).reshape(6, 5, 4), np.eye(4)), str(tmp_path / "good.nii"))
    data = load_dataset(tmp_path, 8)
    assert {n.split("#")[0] for n in data.names} == {"good.nii"}
    assert dict(data.skipped)["bad.nii"].startswith("its sform holds a value that is not a number ([nan, 0.0")
    assert "vnl_svd" not in capfd.readouterr().err   # refused before SimpleITK decomposes it (pages of noise)
    _strict_line(tmp_path, "bad.nii: its sform")


def test_nifti2_reads_as_the_same_nifti1_would(tmp_path):
    """NIfTI-2 (SimpleITK: "Unable to determine ImageIO reader") placed by nibabel's affine: the same data and an
    oblique affine as NIfTI-1 (read through SimpleITK's header) give identical slices in every plane."""
    rng = np.random.default_rng(5)
    volume = rng.integers(0, 1000, (9, 7, 5)).astype(np.float32)
    angle = np.deg2rad(20)
    affine = np.array([[0.8 * np.cos(angle), -0.9 * np.sin(angle), 0, 10], [0.8 * np.sin(angle), 0.9 * np.cos(angle),
                       0, -5], [0, 0, -2.5, 30], [0, 0, 0, 1]])
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    nib.save(nib.Nifti1Image(volume, affine), str(tmp_path / "one" / "t2w.nii.gz"))
    nib.save(nib.Nifti2Image(volume, affine), str(tmp_path / "two" / "t2w.nii.gz"))
    for plane in ("axial", "coronal", "sagittal"):
        one, two = (load_dataset(tmp_path / d, 16, plane=plane) for d in ("one", "two"))
        assert two.skipped == [] and len(two.names) == len(one.names) > 0
        assert (one.images == two.images).all(), plane


def test_nibabel_s_nifti2_example_is_named_as_4d_not_unreadable(tmp_path):
    source = Path(nib.__file__).parent / "tests" / "data" / "example_nifti2.nii.gz"
    (tmp_path / "example_nifti2.nii.gz").write_bytes(source.read_bytes())
    _strict_line(tmp_path, "example_nifti2.nii.gz: a 4-D volume (size (32, 20, 12, 2))")


def test_a_cifti_file_is_named_as_such_not_a_traceback(tmp_path):
    """nibabel's CIFTI-2 example (a dense connectome, .dconn.nii): before, "TypeError: 'Cifti2Header' object is not
    subscriptable" from the header check. Its data is a matrix over brain vertices and voxels, not a volume."""
    source = Path(nib.__file__).parent / "tests" / "data" / "row_major.dconn.nii"
    (tmp_path / "row_major.dconn.nii").write_bytes(source.read_bytes())
    _strict_line(tmp_path, "row_major.dconn.nii: a CIFTI-2 file (a 10 x 10 matrix), not an image volume")
