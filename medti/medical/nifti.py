"""NIfTI files (.nii, .nii.gz) as SimpleITK images: the voxels read by nibabel, the geometry by SimpleITK's own header
reader, so a NIfTI lands in the same LPS space as every other volume (medti.medical.volume).

Why not sitk.ReadImage alone: its NIfTI reader turns NaN and infinite voxels into 0 without a word (measured with
SimpleITK 2.5: a float32 NIfTI with NaN slices reads back with none), so a NaN background or a NaN slice would be
scaled as real zeros and an all-NaN file would train as a black image. nibabel keeps them, and medti's one rule for
them applies (medti.medical.window.finite_values). The header is checked first: a NaN or an infinity in the sform,
the qform or the voxel sizes is refused in one line (SimpleITK would carry it into the direction matrix). NIfTI-2
files, which SimpleITK cannot open, are placed by nibabel's affine instead."""
from pathlib import Path

import numpy as np

from . import MedicalError, require


def _line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _check_header(header, path: Path):
    """One line for a header whose geometry is not numbers: the sform (when its code says it is used), the qform's
    quaternion and offset, the voxel sizes (NIfTI-1 header fields srow_*, quatern_*, qoffset_*, pixdim)."""
    fields = {"pixdim": header["pixdim"][1:4]}
    if int(header["sform_code"]) > 0:
        fields["sform"] = np.concatenate([header["srow_x"], header["srow_y"], header["srow_z"]])
    if int(header["qform_code"]) > 0:
        fields["qform"] = np.array([header[k] for k in ("quatern_b", "quatern_c", "quatern_d", "qoffset_x",
                                                          "qoffset_y", "qoffset_z")], np.float64).ravel()
    for name, values in fields.items():
        if not np.isfinite(np.asarray(values, np.float64)).all():
            raise MedicalError(f"{path}: its {name} holds a value that is not a number ({np.asarray(values).tolist()}"
                               "): the voxels cannot be placed in space")


def _voxels(image, path: Path) -> np.ndarray:
    """The voxels as float32 in nibabel's (i, j, k[, t]) order, scaled by scl_slope/scl_inter, NaN kept; trailing
    axes of length 1 dropped (a 3-D volume saved with a time axis of one)."""
    try:
        data = np.asanyarray(image.dataobj)
    except Exception as e:   # a truncated file, a gzip stream cut short
        raise MedicalError(f"{path}: not readable as a volume ({_line(e)})") from None
    if data.dtype.names:   # RGB24/RGBA32: a structured dtype, one field per colour
        raise MedicalError(f"{path}: a colour volume ({', '.join(data.dtype.names)}); medti reads scalar volumes")
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return data.astype(np.float32, copy=False)


def read_nifti(path: Path):
    """A NIfTI file as a SimpleITK image (2-D, 3-D or 4-D as stored; medti.medical.volume decides what it reads)."""
    nib, sitk = require("nibabel", str(path)), require("SimpleITK", str(path))
    try:
        image = nib.load(path)
    except Exception as e:   # not NIfTI after all, a damaged header
        raise MedicalError(f"{path}: not readable as a volume ({_line(e)})") from None
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):   # (Nifti2Image derives from Nifti1Image)
        # CIFTI-2 (.dconn.nii, .dtseries.nii, ...) is a NIfTI-2 file whose data is a matrix over brain surface
        # vertices and voxels (a connectome, time series): no grid in space to slice
        kind = "a CIFTI-2 file" if isinstance(image, nib.Cifti2Image) else f"nibabel's {type(image).__name__}"
        raise MedicalError(f"{path}: {kind} (a {' x '.join(map(str, image.shape))} matrix), not an image volume; "
                           "medti reads 3-D NIfTI volumes")
    _check_header(image.header, path)
    data = _voxels(image, path)
    # nibabel's array is indexed (i, j, k); SimpleITK's GetImageFromArray takes numpy's [k, j, i]: reverse the axes
    result = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(tuple(reversed(range(data.ndim))))),
                                    isVector=False)   # a 4-D file stays 4-D (and is refused as such), not vectors
    if data.ndim <= 3:   # a 4-D file is refused by its caller, in its words, with no geometry needed
        origin, spacing, direction = _nifti2(image, data.ndim) if _is_nifti2(image) else _itk_header(path, data)
        if not (np.isfinite(spacing).all() and min(spacing) > 0):   # SimpleITK's SetSpacing would throw
            raise MedicalError(f"{path}: voxel sizes {tuple(float(v) for v in spacing)}: must be positive numbers")
        result.SetOrigin(origin)
        result.SetSpacing(spacing)
        result.SetDirection(direction)
    return result


def _is_nifti2(image) -> bool:
    """NIfTI-2 (a 540-byte header, 64-bit sizes): SimpleITK 2.5 cannot read it ("Unable to determine ImageIO
    reader"); nibabel can."""
    return int(image.header["sizeof_hdr"]) == 540


def _itk_header(path: Path, data: np.ndarray) -> tuple:
    """(origin, spacing, direction) as SimpleITK's NIfTI reader gives them (its choice between qform and sform, in
    LPS), from the header alone."""
    sitk = require("SimpleITK", str(path))
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise MedicalError(f"{path}: not readable as a volume ({_line(e)})") from None
    if tuple(reader.GetSize()) != data.shape:
        raise MedicalError(f"{path}: SimpleITK and nibabel disagree on its size ({reader.GetSize()} and {data.shape})")
    return reader.GetOrigin(), reader.GetSpacing(), reader.GetDirection()


def _nifti2(image, ndim: int) -> tuple:
    """(origin, spacing, direction) of a NIfTI-2 file from nibabel's affine (its sform when sform_code > 0, else its
    qform: nibabel's rule, which SimpleITK's NIfTI-1 reader shares when the two agree), RAS+ -> LPS by negating the x
    and y rows, as SimpleITK converts a NIfTI-1 affine; for a 2-D file, its first two axes."""
    lps = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(image.affine, np.float64)[:3]   # [3, 4]: columns i, j, k, offset
    axes = lps[:ndim, :ndim]
    spacing = np.linalg.norm(axes, axis=0)
    direction = axes / np.where(spacing > 0, spacing, 1)
    return tuple(lps[:ndim, 3]), tuple(spacing), tuple(direction.ravel())
