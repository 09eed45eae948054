"""Values that are not numbers, in every reader: NaN and infinities become the minimum of the finite values (the rule
the PNG/TIFF path had, medti.files.images.finite); a file without one finite value, or whose rescale is not a number
or overflows, is skipped with its reason (an error with --strict), never trained on as a flat black image. Files made
here with pydicom, nibabel and SimpleITK (synthetic values)."""
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from test_dicom import image, save

from medti.dataset.folder import DataError, load_dataset

RAMP = np.arange(100, 164, dtype=np.float32).reshape(8, 8)   # 100 .. 163: min-max maps 100 -> 0 and 163 -> 255


def _gray(data, row: int = 0) -> np.ndarray:
    return ((data.images[row, 0].numpy() + 1) * 127.5).round()


def _expected(values: np.ndarray) -> np.ndarray:
    """min-max over the finite values, NaN as the minimum: the rule, by hand."""
    low, high = np.nanmin(values), np.nanmax(values)
    return np.floor((np.where(np.isnan(values), low, values) - low) * 255 / (high - low) + 0.5)


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
def test_a_rescale_that_is_not_a_number_or_overflows_is_skipped_with_the_reason(tmp_path):
    stored = np.arange(64, dtype=np.uint16).reshape(8, 8)
    save(image(stored, Modality="CT", RescaleSlope="NaN", RescaleIntercept=0), tmp_path / "nan-slope.dcm")
    save(image(stored, Modality="CT", RescaleSlope="1e308", RescaleIntercept=0), tmp_path / "huge-slope.dcm")
    save(image(stored, Modality="CT", RescaleSlope=1, RescaleIntercept=-1024), tmp_path / "good.dcm")
    data = load_dataset(tmp_path, 8, preprocess="none")
    assert data.names == ["good.dcm"]
    reasons = dict(data.skipped)
    assert reasons["nan-slope.dcm"] == "Rescale Slope nan and Intercept 0: not both finite numbers"
    assert reasons["huge-slope.dcm"].startswith("Rescale Slope 1e+308 and Intercept 0 take stored value 1 to 1e+308, "
                                                "past float32's range")
    with pytest.raises(DataError, match="huge-slope.dcm: Rescale Slope 1e"):
        load_dataset(tmp_path, 8, preprocess="none", strict=True)


def _float_dicom(values: np.ndarray, path):
    """A float MR image (Float Pixel Data, PS3.3 C.7.6.24: 32-bit IEEE floats, which may hold NaN)."""
    ds = image(np.zeros(values.shape, np.uint16), Modality="MR")
    del ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation
    ds.BitsAllocated, ds.FloatPixelData = 32, values.astype(np.float32).tobytes()
    return save(ds, path)


def test_float_dicom_with_nan_rows_keeps_its_scale_and_all_nan_is_refused(tmp_path):
    values = RAMP.copy()
    values[2:4] = np.nan
    _float_dicom(values, tmp_path / "a.dcm")
    _float_dicom(np.full((8, 8), np.nan), tmp_path / "b.dcm")
    data = load_dataset(tmp_path, 8, preprocess="none")
    assert data.names == ["a.dcm"] and (_gray(data) == _expected(values)).all()
    assert dict(data.skipped)["b.dcm"] == "no finite pixel values: all 64 are NaN or infinite"


def test_nifti_nan_voxels_are_the_minimum_not_zero_and_all_nan_is_refused(tmp_path):
    """SimpleITK's NIfTI reader turns NaN into 0, which min-max would take as the darkest value (100..163 scaled
    from 0): medti reads the voxels with nibabel and applies the rule. The same for .mha (SimpleITK keeps NaN)."""
    volume = np.stack([RAMP + 64 * k for k in range(4)], axis=-1)   # (i, j, k): 4 axial slices of 8 x 8
    volume[..., 1] = np.nan                                         # a NaN slice
    volume[0, 0, 2] = np.inf
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(tmp_path / "a.nii.gz"))
    nib.save(nib.Nifti1Image(np.full((8, 8, 4), np.nan, np.float32), np.eye(4)), str(tmp_path / "b.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.full((4, 8, 8), np.nan, np.float32)), str(tmp_path / "c.mha"))
    data = load_dataset(tmp_path, 8, preprocess="none")
    # the NaN slice is the minimum, one gray level: skipped as flat (trained on as a black square before that rule)
    assert data.names == [f"a.nii.gz#axial{k:03d}" for k in (0, 2, 3)]
    finite = np.where(np.isfinite(volume), volume, np.nan)
    low, high = np.nanmin(finite), np.nanmax(finite)
    for row, k in ((0, 0), (2, 3)):   # axial slice k: nibabel's [:, :, k] seen from the feet (rows A->P, columns R->L)
        expected = np.floor((volume[::-1, ::-1, k].T - low) * 255 / (high - low) + 0.5)
        assert (_gray(data, row) == expected).all(), k
    reasons = dict(data.skipped)
    assert reasons["a.nii.gz#axial001"].startswith("flat image: every pixel is 0 (min-max over the volume)")
    assert reasons["b.nii.gz"] == reasons["c.mha"] == "no finite pixel values: all 256 are NaN or infinite"
