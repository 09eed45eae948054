"""3-D volumes (NIfTI .nii/.nii.gz, MetaImage .mha/.mhd, NRRD .nrrd) read into one anatomical orientation, and their
2-D slices in the radiological display orientation; other sequences of a case resampled onto its first one, slices
to square pixels, and channel stacking.

One reader, one physical frame: every format's geometry goes through SimpleITK, whose physical space is DICOM's
patient frame LPS+ (x toward the patient's Left, y Posterior, z Superior). Its NIfTI header reader converts the file's
RAS+ affine (nibabel's "scanner RAS+" world space) to LPS by negating x and y, so a NIfTI and an .mha of the same
anatomy meet in one space, and the resampling of other sequences (SimpleITK Resample) works in that same space.
NIfTI voxels alone are read by nibabel, which keeps NaN where SimpleITK's reader writes 0 (medti.medical.nifti).
(ITK PR #4791: ITK's physical frame is DICOM's, "LPS" = identity direction cosines; nibabel "Coordinate systems and
affines" and "Radiological vs neurological conventions" for RAS+.)
"""
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import MedicalError, require
from .nifti import read_nifti
from .window import finite_values

SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd")
PLANES = {"axial": 0, "coronal": 1, "sagittal": 2}   # plane -> the array axis it is a slice across
SLICE_FORMS = "all, mask, middle:N or START:STOP[:STEP] (integers, N and STEP at least 1)"


@dataclass
class Volume:
    """A 3-D scalar volume in LPS array order: `array[k, j, i]` with k from Inferior to Superior, j from Anterior to
    Posterior, i from the patient's Right to Left (numpy's [z, y, x] of an image whose direction is the identity in
    LPS). Oblique acquisitions get the closest such axis order, without resampling (as `sitk.DICOMOrient` and
    nibabel's `as_closest_canonical` do), so slices stay in the acquired plane."""
    array: np.ndarray                    # [S, P, L] float32 (see above)
    spacing: tuple[float, float, float]  # mm along the array's axes (k, j, i)
    path: str
    case: str | None = None              # the case's folder name, as given by the caller
    image: object = field(default=None, repr=False, compare=False)   # the reoriented SimpleITK image (the grid)


def _check_suffix(path: Path):
    if not path.name.lower().endswith(SUFFIXES):
        raise MedicalError(f"{path}: not a volume file medti reads ({', '.join(SUFFIXES)})")
    if not path.is_file():
        raise MedicalError(f"{path}: no such file")


def _as_3d(image, path: Path):
    """A 3-D scalar image, a 2-D one as a single slice; 4-D and vector (time series, DWI b-values, RGB) refused."""
    sitk = require("SimpleITK", str(path))
    components = image.GetNumberOfComponentsPerPixel()
    if image.GetDimension() > 3 or components > 1:
        # the size in the file's own axis order (x, y, z, t), as nibabel's `shape` and SimpleITK's GetSize say it
        shape = tuple(image.GetSize()) + ((components,) if components > 1 else ())
        raise MedicalError(f"{path}: a {len(shape)}-D volume (size {shape}); medti reads 3-D volumes: "
                           "save one time point or b-value per file")
    if image.GetDimension() == 2:
        # JoinSeries adds a third axis of one slice (direction z = identity), so DICOMOrient accepts it; a 2-D
        # file has no through-plane direction, and its slice is taken as axial.
        image = sitk.JoinSeries([image])
    return image


def _check_geometry(image, path):
    """One line for a grid that cannot be placed in space: voxel sizes that are not positive numbers, an origin or a
    direction matrix that is not numbers, or a direction matrix whose axes are not independent (a damaged header)."""
    spacing, origin = np.array(image.GetSpacing()), np.array(image.GetOrigin())
    direction = np.array(image.GetDirection()).reshape(image.GetDimension(), -1)
    if not (np.isfinite(spacing).all() and (spacing > 0).all()):
        raise MedicalError(f"{path}: voxel sizes {tuple(spacing.tolist())}: must be positive numbers")
    if not (np.isfinite(origin).all() and np.isfinite(direction).all()) or abs(np.linalg.det(direction)) < 1e-6:
        raise MedicalError(f"{path}: its origin {tuple(origin.tolist())} or direction {direction.ravel().tolist()} "
                           "cannot place the voxels in space: a damaged header")


def from_image(image, path, case=None) -> Volume:
    """A Volume of a 3-D SimpleITK image: reoriented to LPS array order (DICOMOrient permutes and flips axes only,
    no interpolation), as float32; NaN and infinite voxels become the volume's minimum (finite_values, the rule of
    every reader; a volume without one finite voxel is refused)."""
    sitk = require("SimpleITK", str(path))
    _check_geometry(image, path)
    image = sitk.Cast(image, sitk.sitkFloat32)
    values = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(values).all():
        fixed = sitk.GetImageFromArray(finite_values(values, path).astype(np.float32))
        fixed.CopyInformation(image)
        image = fixed
    # DICOMOrient's code names the direction each index axis increases toward, fastest first: "LPS" gives the
    # identity direction matrix (ITK PR #4791), i.e. numpy [z, y, x] = [I→S, A→P, R→L].
    image = sitk.DICOMOrient(image, "LPS")
    array = sitk.GetArrayFromImage(image)              # [z, y, x]: SimpleITK's size (x, y, z) reversed
    spacing = tuple(float(s) for s in reversed(image.GetSpacing()))
    return Volume(array=array, spacing=spacing, path=str(path), case=case, image=image)


def element_data_file(path: Path) -> Path | None:
    """The data file a MetaImage header (.mhd) names in ElementDataFile, as a path from the header's folder; None
    for any other file, for LOCAL (the data follow the header in the same file) and for a LIST or %-pattern of slice
    files."""
    if not path.name.lower().endswith(".mhd"):
        return None
    for line in path.read_text(errors="replace").splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "ElementDataFile" and value.strip() not in ("LOCAL", "LIST") and "%" not in value:
            return path.parent / value.strip()
    return None


def read_volume(path, case: str | None = None) -> Volume:
    """Read a NIfTI, MetaImage or NRRD file (any axis order and direction) as a Volume in LPS array order.
    `case` is the case's name (its folder), carried along for messages and data sets."""
    path = Path(path)
    _check_suffix(path)     # before the import: a wrong file is named as such even without the extra
    sitk = require("SimpleITK", str(path))
    if path.name.lower().endswith((".nii", ".nii.gz")):
        return from_image(_as_3d(read_nifti(path), path), path, case)   # NaN voxels kept: see medti.medical.nifti
    data = element_data_file(path)
    if data is not None and not data.is_file():   # checked here: ITK would print its own lines to stderr first
        raise MedicalError(f"{path}: its data file (ElementDataFile) {os.path.relpath(data, path.parent)} is missing; "
                           "put it where the header says, or convert the pair to one .mha")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:   # ITK's message is many lines; its last non-empty line says what went wrong
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise MedicalError(f"{path}: not readable as a volume ({lines[-1] if lines else 'unknown error'})") from None
    return from_image(_as_3d(image, path), path, case)


@dataclass(frozen=True)
class SliceSpec:
    """Which slices: "all", "mask" (those where the mask is non-empty), "middle" (`count` central ones) or "range"
    (Python slice semantics over the slice indices; `span` is (start, stop, step), each possibly None)."""
    kind: str
    span: tuple = (None, None, None)   # not a `slice`: slices are unhashable before Python 3.12, unfit for frozen
    count: int = 0

    def indices(self, n: int) -> list[int]:
        if self.kind == "middle":
            start = max(0, (n - self.count) // 2)   # centred; an odd surplus goes to the end, like n // 2
            return list(range(start, min(n, start + self.count)))
        return list(range(n))[slice(*self.span)]

    @property
    def text(self) -> str:
        """As the user writes it (--slices)."""
        if self.kind == "middle":
            return f"middle:{self.count}"
        if self.kind == "range":
            start, stop, step = ("" if v is None else str(v) for v in self.span)
            return f"{start}:{stop}" + (f":{step}" if step else "")
        return self.kind


def parse_slices(text: str, flag: str = "--slices") -> SliceSpec:
    """The `--slices` forms: all | mask | middle:N | START:STOP[:STEP] (START or STOP may be empty)."""
    text = text.strip().lower()
    if text in ("all", "mask"):
        return SliceSpec(text)
    middle = re.fullmatch(r"middle:(\d+)", text)
    if middle and int(middle[1]) >= 1:
        return SliceSpec("middle", count=int(middle[1]))
    span = re.fullmatch(r"(-?\d*):(-?\d*)(?::(\d+))?", text)
    if span and (span[3] is None or int(span[3]) >= 1):
        start, stop, step = (int(g) if g else None for g in span.groups())
        return SliceSpec("range", span=(start, stop, step))
    raise MedicalError(f"{flag} {text!r}: expected {SLICE_FORMS}")


def display(array: np.ndarray, plane: str, index: int) -> np.ndarray:
    """One slice of an LPS-ordered array in the radiological display orientation (MR-TIP "Orientation": "transverse:
    A to top of image and L to right; coronal: H to top of image and L to right; sagittal: H to top of image and A to
    left"; nibabel "Radiological vs neurological conventions": as if seen from the patient's feet): axial seen from the
    feet, anterior at the top and the patient's right on the image's left; coronal seen from the front, superior at
    the top and the patient's right on the left; sagittal seen from the patient's left, superior at the top and
    anterior on the left."""
    if plane == "axial":
        return array[index]                # rows A→P, columns R→L: already as displayed
    if plane == "coronal":
        return array[::-1, index, :]       # rows flipped to S→I (superior on top), columns R→L
    return array[::-1, :, index]           # sagittal: rows S→I, columns A→P (anterior on the left)


def plane_spacing(volume: Volume, plane: str) -> tuple[float, float]:
    """(row, column) spacing in mm of the displayed slices of `plane` (flips do not change spacing)."""
    k, j, i = volume.spacing
    return {"axial": (j, i), "coronal": (k, i), "sagittal": (k, j)}[_plane(plane)]


def _plane(plane: str) -> str:
    if plane not in PLANES:
        raise MedicalError(f"--plane {plane!r}: expected one of {', '.join(PLANES)}")
    return plane


def same_grid(image: Volume, other: Volume) -> str | None:
    """None when `other` lies on `image`'s voxel grid, else every difference, the other's value first:
    "shape (20, 48, 48) where the image's is (20, 96, 96); spacing ..."."""
    checks = {"shape": (other.array.shape, image.array.shape), "spacing": (other.spacing, image.spacing),
              "origin": (other.image.GetOrigin(), image.image.GetOrigin()),
              "direction": (other.image.GetDirection(), image.image.GetDirection())}
    found = []
    for what, (x, y) in checks.items():
        # 1e-4 (mm, or cosine): headers round-trip through text (.mhd/.nrrd) and float32 (NIfTI) with small errors
        if np.shape(x) != np.shape(y) or not np.allclose(x, y, rtol=0, atol=1e-4):
            found.append(f"{what} {tuple(np.round(x, 4).tolist())} where the image's is "
                         f"{tuple(np.round(y, 4).tolist())}")
    return "; ".join(found) or None


def _mask_keep(volume: Volume, mask: Volume, axis: int) -> np.ndarray:
    """Per slice along `axis`: True where the mask has a non-zero voxel. A mask on another grid is refused: it
    would select slices of other anatomy (resample it first: resample_onto(label=True))."""
    differs = same_grid(volume, mask)
    if differs:
        raise MedicalError(f"{mask.path}: the mask is not on the grid of {volume.path}: its {differs}; resample "
                           "it onto the image first (SimpleITK Resample, nearest neighbour)")
    other = tuple(a for a in range(3) if a != axis)
    return np.any(mask.array != 0, axis=other)


def slices(volume: Volume, plane: str = "axial", spec="all", mask: Volume | None = None):
    """[(index, 2-D float32 array in display orientation)] for `plane`, chosen by `spec` (a SliceSpec or its
    `--slices` text). `index` is along the LPS array axis (axial 0 = most inferior, coronal 0 = most anterior,
    sagittal 0 = the patient's rightmost). A `mask` keeps only the chosen slices where it is non-empty; spec
    "mask" is all of those, and needs one."""
    axis = PLANES[_plane(plane)]
    spec = parse_slices(spec) if isinstance(spec, str) else spec
    if spec.kind == "mask" and mask is None:
        raise MedicalError("--slices mask: needs a mask volume (--slice-mask)")
    chosen = spec.indices(volume.array.shape[axis])
    if mask is not None:
        keep = _mask_keep(volume, mask, axis)
        chosen = [k for k in chosen if keep[k]]
    return [(k, np.ascontiguousarray(display(volume.array, plane, k))) for k in chosen]


def resample_onto(moving, reference: Volume, label: bool = False) -> Volume:
    """`moving` (a path or a Volume) resampled onto `reference`'s voxel grid in physical (LPS) space: each output
    voxel takes the moving image's value at the same point in the patient, so a lesion lands on the same voxel in
    every sequence. Linear interpolation (nearest neighbour for a label/mask volume, so labels stay labels);
    0 outside the moving image's extent. No registration: the scanner's coordinates are trusted, as for sequences
    of one session (SimpleITK `Resample(image, referenceImage, transform, interpolator, defaultPixelValue)`)."""
    moving = moving if isinstance(moving, Volume) else read_volume(moving, reference.case)
    sitk = require("SimpleITK", moving.path)
    interpolator = sitk.sitkNearestNeighbor if label else sitk.sitkLinear
    # identity Transform: both images are already in one physical space, the grid alone changes
    image = sitk.Resample(moving.image, reference.image, sitk.Transform(), interpolator, 0.0, sitk.sitkFloat32)
    return from_image(image, moving.path, moving.case or reference.case)


def read_case(paths, case: str | None = None) -> list[Volume]:
    """The sequences of one case (e.g. T2w, ADC, high-b DWI), all on the grid of the first one (the reference,
    usually T2w: the finest in-plane)."""
    reference = read_volume(Path(paths[0]), case)
    return [reference] + [resample_onto(Path(p), reference) for p in paths[1:]]


def stack_channels(channels) -> np.ndarray:
    """2-D slices of one position, one per sequence ([H, W] each, on one grid) -> [H, W, C] float32."""
    shapes = {np.shape(c) for c in channels}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise MedicalError(f"channels to stack must be 2-D slices of one shape, got {[np.shape(c) for c in channels]}; "
                           "resample the sequences onto one grid first (resample_onto)")
    return np.stack([np.asarray(c, np.float32) for c in channels], axis=-1)


def case_slices(volumes: list[Volume], plane="axial", spec="all", mask: Volume | None = None):
    """[(index, [H, W, C])]: the chosen slices of `volumes` (on one grid, as read_case gives) stacked."""
    per_volume = [slices(v, plane, spec, mask) for v in volumes]
    return [(index, stack_channels([s[n][1] for s in per_volume])) for n, (index, _) in enumerate(per_volume[0])]


def _resize_axis(array: np.ndarray, n: int, axis: int) -> np.ndarray:
    """Linear interpolation of `array` to `n` samples along `axis`, pixel edges aligned (the first and last pixel's
    outer edges stay where they were, like align_corners=False); samples beyond the outer pixel centres take the
    edge value."""
    old = array.shape[axis]
    centres = np.clip((np.arange(n) + 0.5) * old / n - 0.5, 0, old - 1)   # new pixel centres in old index units
    low = np.floor(centres).astype(int)
    high = np.minimum(low + 1, old - 1)
    weight = (centres - low).reshape([-1 if a == axis else 1 for a in range(array.ndim)])
    return np.take(array, low, axis) * (1 - weight) + np.take(array, high, axis) * weight


def square_pixels(slice2d: np.ndarray, spacing_row: float, spacing_col: float) -> np.ndarray:
    """A slice with rows `spacing_row` mm apart and columns `spacing_col` mm apart, resampled (linear) to square
    pixels of the finer spacing, keeping its physical extent: so a later resize to the model's size does not
    stretch the anatomy (a coronal slice of a 0.5 × 0.5 × 3 mm T2w is 6 times too flat as stored). The extent is
    kept exactly, so the new spacing is extent / round(extent / finer): the finer spacing to within half a pixel
    over the whole slice."""
    finer = min(spacing_row, spacing_col)
    rows, cols = slice2d.shape
    out = np.asarray(slice2d, np.float32)
    new_rows, new_cols = max(1, round(rows * spacing_row / finer)), max(1, round(cols * spacing_col / finer))
    if new_rows != rows:
        out = _resize_axis(out, new_rows, 0)
    if new_cols != cols:
        out = _resize_axis(out, new_cols, 1)
    return out.astype(np.float32)
