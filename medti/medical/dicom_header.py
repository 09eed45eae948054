"""The attributes of a DICOM header that medti reads besides the pixels: each frame's window and rescale, the
geometry (positions, orientation, pixel spacing and aspect) and integer counts, at the top level or in an enhanced
multi-frame file's functional groups. Values that cannot be used are one line naming the file and the attribute.
Section numbers are DICOM PS3.3."""
import numpy as np

from . import MedicalError
from .window import FUNCTIONS, Window


def _first(value):
    """Window Center/Width may hold several values (one per window, PS3.3 C.11.2.1.2); the first is the default."""
    return float(np.atleast_1d(np.asarray(value, dtype=np.float64))[0])


def _shared(ds, sequence: str, frame: int = 0):
    """The item of a functional-group sequence of an enhanced multi-frame image (PS3.3 C.7.6.16): in the Shared
    Functional Groups Sequence (one item for every frame), else in frame `frame`'s item of the Per-Frame one.
    Enhanced CT/MR keep rescale, window and geometry there instead of at the top level."""
    for groups, index in (("SharedFunctionalGroupsSequence", 0), ("PerFrameFunctionalGroupsSequence", frame)):
        group = ds.get(groups)
        item = group[index].get(sequence) if group and len(group) > index else None
        if item:
            return item[0]
    return None


def frame_window(ds, frame: int = 0) -> Window | None:
    """Frame `frame`'s first window (PS3.3 C.11.2.1.2; an enhanced multi-frame file's Frame VOI LUT, C.7.6.16.2.10,
    shared or per frame) with its VOI LUT Function (C.11.2.1.3; absent: LINEAR, and a term outside the defined ones
    read as LINEAR too); None without one, or with a width its function forbids."""
    source = ds if "WindowWidth" in ds else _shared(ds, "FrameVOILUTSequence", frame)
    if source is None or "WindowWidth" not in source or "WindowCenter" not in source:
        return None
    function = str(source.get("VOILUTFunction") or "LINEAR").strip().upper()
    window = Window(_first(source.WindowCenter), _first(source.WindowWidth),
                    function if function in FUNCTIONS else "LINEAR")
    return window if window.valid else None


def frame_rescale(ds, frame: int) -> tuple[float, float]:
    """(slope, intercept) of frame `frame`: at the top level (single-frame images, C.11.1), else the frame's Pixel
    Value Transformation (C.7.6.16.2.9, shared or per frame); (1, 0) when absent."""
    source = ds if "RescaleSlope" in ds else _shared(ds, "PixelValueTransformationSequence", frame)
    slope = float(source.RescaleSlope) if source is not None and "RescaleSlope" in source else 1.0
    intercept = float(source.RescaleIntercept) if source is not None and "RescaleIntercept" in source else 0.0
    return slope, intercept


def whole_number(ds, keyword: str, path, default: int = 1) -> int:
    """An integer string attribute (IS: Number of Frames, Series Number) as an int, `default` where absent or empty;
    text that is no whole number (a damaged header's "1A") is one line naming the file and the attribute."""
    value = ds.get(keyword) if ds is not None else None
    if value is None or str(value).strip() == "":
        return default
    try:
        return int(str(value).strip())
    except ValueError:
        raise MedicalError(f"{path}: damaged header: {keyword} {str(value)!r} is not a whole number; export the "
                           "file again") from None


def _floats(ds, keyword: str, path) -> tuple | None:
    """A numeric attribute's values as floats; None where absent or empty. One value (a single-valued element, VM 1)
    is a tuple of one, for the caller to refuse by its count; text that is no number is one line naming it."""
    value = ds[keyword].value if ds is not None and keyword in ds else None
    if value is None or value == "":
        return None
    try:
        return tuple(float(v) for v in np.atleast_1d(np.asarray(value, dtype=object)))
    except (TypeError, ValueError):
        raise MedicalError(f"{path}: {keyword} {value!r}: not numbers; the file's geometry is damaged") from None


def geometry(ds, frames: int, path) -> tuple:
    """(per-frame positions, orientation, pixel spacing), each None where the file lacks it: at the top level
    (single-frame CT/MR, PS3.3 C.7.6.2), else in the functional groups (enhanced multi-frame: Plane Position
    per frame, Plane Orientation and Pixel Measures usually shared, C.7.6.16.2.3-4 and .1)."""
    if "ImagePositionPatient" in ds and frames == 1:
        return (_floats(ds, "ImagePositionPatient", path),), _floats(ds, "ImageOrientationPatient", path), \
            _floats(ds, "PixelSpacing", path)
    positions = tuple(_floats(_shared(ds, "PlanePositionSequence", f), "ImagePositionPatient", path)
                      for f in range(frames))
    orientation = _floats(ds, "ImageOrientationPatient", path) or \
        _floats(_shared(ds, "PlaneOrientationSequence"), "ImageOrientationPatient", path)
    spacing = _floats(ds, "PixelSpacing", path) or _floats(_shared(ds, "PixelMeasuresSequence"), "PixelSpacing", path)
    return (positions if all(positions) else None), orientation, spacing


def pixel_aspect(ds, spacing: tuple | None, path) -> tuple | None:
    """(height, width) of a pixel in any one unit, for a 2-D image's shape: Pixel Spacing (in the patient), else
    Imager Pixel Spacing (at the detector, as CR/DX files give it: for a projection the same ratio), both (row
    spacing, column spacing) (PS3.3 10.7.1), else Pixel Aspect Ratio (0028,0034), "vertical size\\horizontal size"
    (C.7.6.3.1.7); None when the file says nothing (square, as stored). All zeros says nothing either: real CR
    exports write `0.000\\0.000` when they had no size to give (pydicom-data's RG1_*.dcm), and refusing them
    would drop real radiographs. Other sizes that are not positive numbers (one zero, a negative, NaN) are refused
    in one line: no image can be shaped by them."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing", "PixelAspectRatio"):
        found = spacing if keyword == "PixelSpacing" else _floats(ds, keyword, path)
        if found and len(found) >= 2 and not any(found[:2]):   # 0\0: no size given, as if the attribute were absent
            continue
        if found and len(found) >= 2:
            if not (np.isfinite(found[:2]).all() and min(found[:2]) > 0):
                raise MedicalError(f"{path}: {keyword} {list(found)}: pixel sizes must be positive numbers; the file's "
                                   "geometry is damaged")
            return tuple(found[:2])
    return None
