"""One rule for an image that is one gray level (or one colour) as read, after its window, whatever reads it (PNG,
DICOM, volumes): skipped with the level, the window and what to try (medti.dataset.preprocess.check_not_flat).
Files made here (synthetic values)."""
import nibabel as nib
import numpy as np
import pytest
from test_data import save
from test_dicom import image as dicom_image
from test_dicom import save as dicom_save
from test_dicom import standard

from medti.dataset.folder import DataError, load_dataset
from medti.medical.window import parse_window


def test_a_flat_image_is_skipped_alike_whatever_its_reader(tmp_path):
    """One rule for an image that is one gray level (or colour) as read, after its window: nothing in it to learn,
    so it is skipped with the level, the window that made it, and what to try. Before, each was written as a flat
    square (a 1 x 1 PNG upscaled; pydicom's CT files whose values all lie above their own window 30,100; a volume's
    empty edge slices) and trained on."""
    save(tmp_path / "dot.png", np.full((1, 1), 95, np.uint8))
    save(tmp_path / "colour.png", np.tile(np.array([10, 20, 30], np.uint8), (8, 8, 1)))
    save(tmp_path / "good.png", np.arange(64, dtype=np.uint8).reshape(8, 8))
    stored = 2000 + np.arange(64, dtype=np.uint16).reshape(8, 8)   # HU 976..1039 with the intercept below
    dicom_save(dicom_image(stored, Modality="CT", RescaleIntercept=-1024, RescaleSlope=1, WindowCenter=30,
                           WindowWidth=100), tmp_path / "ct.dcm")
    dicom_save(dicom_image(np.zeros((8, 8), np.uint16), Modality="CT", WindowCenter=272, WindowWidth=846),
               tmp_path / "zeros.dcm")   # every stored value 0 (nibabel's decimal_rescale.dcm): no window can help
    volume = np.zeros((8, 8, 3), np.float32)   # (i, j, k): axial slice k; slice 0 empty, as a scan's edge can be
    volume[..., 1:] = np.arange(128, dtype=np.float32).reshape(8, 8, 2) + 1
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(tmp_path / "scan.nii.gz"))
    data = load_dataset(tmp_path, 8, preprocess="none")
    level = int(np.floor(standard(0.0, 272, 846) + 0.5))   # value 0 under the file's window, as PS3.3 states it
    assert data.names == ["good.png", "scan.nii.gz#axial001", "scan.nii.gz#axial002"]
    assert dict(data.skipped) == {
        "colour.png": "flat image: every pixel is (10, 20, 30) (as stored): a blank image, nothing to learn from; "
                      "leave it out",
        "ct.dcm": "flat image: every pixel is 255 (the file's 30,100): every value lies outside the file's own "
                  "window; try a --window CENTER,WIDTH that holds its values",
        "dot.png": "flat image: every pixel is 95 (as stored): a blank image, nothing to learn from; leave it out",
        "scan.nii.gz#axial000": "flat image: every pixel is 0 (min-max over the volume): an empty slice; choose others "
                                "with --slices or --slice-mask, or leave it be",
        "zeros.dcm": f"flat image: every pixel is {level} (the file's 272,846): the file holds one value, nothing "
                     "to learn from; leave it out"}
    windowed = load_dataset(tmp_path, 8, preprocess="none", window=parse_window("1000,200"))   # the values' own
    assert "ct.dcm" in windowed.names
    save(tmp_path / "only" / "dot.png", np.full((1, 1), 95, np.uint8))
    with pytest.raises(DataError, match=r"only: no usable image .* most often 'flat image', .*; each is one gray"):
        load_dataset(tmp_path / "only", 8)
