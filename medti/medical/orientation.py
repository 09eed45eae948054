"""One display convention for every DICOM image that carries Image Orientation (Patient): a lone 2-D slice (a
single-frame CT/MR file that is not part of a series of two or more) is shown exactly as the same slice is shown
when its whole series is read as a volume and sliced in the slice's own plane (medti.medical.volume: reoriented to
LPS array order by sitk.DICOMOrient, then the radiological view of `display`). Without this, a lone sagittal slice
kept its stored row and column order while its neighbours in a series came out turned or mirrored.

The same code path as a series, on purpose: the slice is placed in patient space as a volume one slice thick (its
normal = row x column, as dicom_series.to_volume places a series), so the permutation and flips chosen for an
oblique plane are SimpleITK's in both cases, and nothing here can drift from the series' convention. Section
numbers are DICOM PS3.3."""
import numpy as np

from . import MedicalError, require
from .volume import display, from_image, plane_spacing

# The plane of a slice, by the direction its normal points (the third letter of SimpleITK's orientation code, which
# names the patient direction an image axis runs toward: Left/Right, Anterior/Posterior, Superior/Inferior)
PLANE_OF_NORMAL = {"L": "sagittal", "R": "sagittal", "A": "coronal", "P": "coronal", "S": "axial", "I": "axial"}


def check_orientation(orientation, path) -> tuple:
    """Image Orientation (Patient) (C.7.6.2.1.1) as (row cosines, column cosines), each a float64 vector of 3, or
    one line saying why it cannot orient an image: not 6 numbers, not finite, or two directions that do not span a
    plane (a zero or repeated vector: a damaged header). DICOM requires unit, orthogonal vectors; rounded ones (as
    real files write them, to 6 decimals or fewer) are accepted, as a series' are."""
    values = np.asarray(orientation, np.float64).ravel()
    if values.size != 6 or not np.isfinite(values).all():
        raise MedicalError(f"{path}: Image Orientation (Patient) {list(values.tolist())}: expected 6 finite direction "
                           "cosines (row, then column); the file's geometry is damaged")
    row, column = values[:3], values[3:]
    # |row x column|^2 is the determinant of [row, column, normal]: the volume test (volume._check_geometry) uses 1e-6
    if np.dot(np.cross(row, column), np.cross(row, column)) < 1e-6:
        raise MedicalError(f"{path}: Image Orientation (Patient) {list(values.tolist())}: its row and column "
                           "directions do not span a plane; the file's geometry is damaged")
    return row, column


def slice_plane(orientation, path) -> str:
    """axial, coronal or sagittal: the plane whose LPS axis SimpleITK's DICOMOrient puts the slice normal on (for an
    oblique slice, the closest one)."""
    sitk = require("SimpleITK", str(path))
    row, column = check_orientation(orientation, path)
    direction = np.column_stack([row, column, np.cross(row, column)]).ravel()   # row-major 3x3, as SetDirection
    code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(tuple(float(v) for v in direction))
    return PLANE_OF_NORMAL[code[2]]


def as_displayed(pixels: np.ndarray, orientation, spacing: tuple, path) -> tuple[np.ndarray, tuple]:
    """One slice [H, W] (rows along the column direction, columns along the row direction, as stored) in the
    radiological display orientation of its own plane: (the displayed [H', W'] float32 array, its (row, column)
    spacing). `spacing` is the stored (row, column) pixel size (Pixel Spacing; any positive pair where the file has
    none: it only travels along with the axes)."""
    sitk = require("SimpleITK", str(path))
    row, column = check_orientation(orientation, path)
    image = sitk.GetImageFromArray(np.ascontiguousarray(pixels, np.float32)[None])   # [z, y, x] = [1, rows, columns]
    image.SetSpacing((float(spacing[1]), float(spacing[0]), 1.0))   # one slice: its thickness is never displayed
    image.SetDirection(tuple(float(v) for v in np.column_stack([row, column, np.cross(row, column)]).ravel()))
    volume = from_image(image, path)
    plane = slice_plane(orientation, path)
    return np.ascontiguousarray(display(volume.array, plane, 0)), plane_spacing(volume, plane)
