"""DICOM series and multi-frame files as volumes: slices grouped by Series Instance UID, ordered along the slice
normal (never by file name or Instance Number), checked for even spacing, and placed in patient space as a
medti.medical.volume.Volume, so a CT or MR series is sliced, reoriented and windowed exactly like a NIfTI or .mha
volume of the same anatomy. Section numbers are DICOM PS3.3.

Geometry (C.7.6.2.1.1): Image Orientation (Patient) gives the direction of a row (the column index increases along
it) and of a column; their cross product is the slice normal. Image Position (Patient) is the centre of the first
voxel. Pixel Spacing is (between rows, between columns). As a SimpleITK image, whose physical frame is DICOM's own
(LPS), that is: x = row direction, spacing Pixel Spacing[1]; y = column direction, Pixel Spacing[0]; z = the normal,
spacing the distance between consecutive positions; origin = the first slice's position."""
import re
from dataclasses import dataclass, replace

import numpy as np

from . import MedicalError, require
from .dicom import read_dicom
from .dicom_header import whole_number
from .volume import Volume, from_image
from .window import PerFrame, Window, display_scale, series_window

# Slices count as evenly spaced when every gap is within 1 % of the median gap (+ 1 µm): positions are written as
# decimal strings of at most 16 characters, good to far better than that, so a larger spread is a missing slice.
EVEN = 0.01


@dataclass
class Series:
    uid: str | None
    images: list                  # the DicomImage files, in the order of their first slice along the normal
    pixels: np.ndarray            # [S, H, W] float32: every frame, ordered along the normal when positions are known
    positions: list | None        # each slice's Image Position (Patient), in that order; None: the file gives none
    files: list                   # each slice's file (a multi-frame file's path repeats), for messages
    windows: list                 # each slice's own window (Window or None), in that order


def _along_normal(orientation, position) -> float:
    """Distance along the slice normal: the dot product of Image Position with row x column orders slices in
    space whatever the tilt of the plane."""
    return float(np.dot(position, np.cross(orientation[:3], orientation[3:])))


def _check_alike(uid, images: list):
    first = images[0]
    for image in images:
        if image.positions is None or image.orientation is None:
            raise MedicalError(f"{image.path}: its series has {sum(len(i.pixels) for i in images)} slices but "
                               "this file has no Image Position/Orientation (Patient), so they cannot be ordered in "
                               "space")
        if not np.allclose(image.orientation, first.orientation, atol=1e-4):
            raise MedicalError(f"{image.path}: its series mixes slice orientations ({first.path.name} differs); "
                               "a volume needs one orientation: localizers and reformats belong apart")
        if image.pixels.shape[1:] != first.pixels.shape[1:]:
            raise MedicalError(f"{image.path}: its series mixes image sizes ({first.path.name} differs)")


def _order(uid, images: list) -> Series:
    if len(images) == 1 and images[0].positions is None:   # one file and no geometry: its frames as stored
        image = images[0]
        return Series(uid, images, image.pixels, None, [image.path] * len(image.pixels), list(image.windows))
    _check_alike(uid, images)
    orientation = images[0].orientation
    planes = sorted(((_along_normal(orientation, p), f, image) for image in images
                     for f, p in enumerate(image.positions)), key=lambda plane: plane[0])
    for (before, _, _), (depth, _, image) in zip(planes, planes[1:], strict=False):
        if abs(depth - before) < 1e-3:   # several echoes or time points share positions: which is "the" slice?
            raise MedicalError(f"{image.path}: its series has two slices at the same position ({depth:.3f} mm "
                               "along the normal): several echoes or time points; split them first")
    ordered = list({id(image): image for _, _, image in planes}.values())
    return Series(uid, ordered, np.stack([image.pixels[f] for _, f, image in planes]),
                  [image.positions[f] for _, f, image in planes], [image.path for _, _, image in planes],
                  [image.windows[f] for _, f, image in planes])


def series(paths) -> list[Series]:
    """Read DICOM files and group them into volumes: single-frame files by Series Instance UID, each series
    ordered along the slice normal (not by file name); a multi-frame file is a volume on its own, its frames
    ordered by their Plane Position when it gives them. Series come in the order their first file was given."""
    groups: dict = {}   # series UID (or a multi-frame file's path) -> images, in the order first met
    for path in paths:
        image = read_dicom(path)
        key = ("file", image.path) if image.pixels.shape[0] > 1 else image.series_uid
        groups.setdefault(key, []).append(image)
    return [_order(images[0].series_uid, images) for images in groups.values()]


def _step(s: Series, normal: np.ndarray) -> float:
    """The even distance between consecutive slices along the normal, or one line saying where it is not even
    (a missing slice) or where the slices shift sideways (a gantry tilt: the volume would be sheared)."""
    if len(s.positions) == 1:
        return 1.0   # one slice: no distance to measure; it only scales a one-pixel-thick coronal/sagittal view
    deltas = np.diff(np.asarray(s.positions, np.float64), axis=0)
    along = deltas @ normal
    step = float(np.median(along))
    sideways = np.linalg.norm(deltas - along[:, None] * normal, axis=1)
    for k in range(len(along)):
        if abs(along[k] - step) > EVEN * step + 1e-3:
            raise MedicalError(f"{s.files[k + 1]}: {along[k]:.3f} mm from the previous slice, where the others are "
                               f"{step:.3f} mm apart (a missing or extra slice?); a volume needs even spacing")
        if sideways[k] > EVEN * step + 1e-3:
            raise MedicalError(f"{s.files[k + 1]}: shifted {sideways[k]:.3f} mm sideways from the previous slice (a "
                               "gantry tilt?); resample the series to an upright grid first")
    return step


def to_volume(s: Series, name: str, case: str | None = None) -> Volume:
    """A Series as a Volume in LPS array order (medti.medical.volume), or one line saying why it is no volume."""
    first = s.images[0]
    if s.positions is None:
        raise MedicalError(f"{first.path}: {len(s.pixels)} frames without Image Position (Patient): a cine or time "
                           "series, not a volume; export the frames you want as single images")
    if first.spacing is None or any(not np.allclose(i.spacing or (), first.spacing, atol=1e-4) for i in s.images):
        raise MedicalError(f"{first.path}: its series has no single Pixel Spacing, so its slices cannot be placed "
                           "in space")
    sitk = require("SimpleITK", str(first.path))
    row, column = np.array(first.orientation[:3]), np.array(first.orientation[3:])
    normal = np.cross(row, column)
    step = _step(s, normal)
    image = sitk.GetImageFromArray(np.ascontiguousarray(s.pixels, np.float32))   # [z, y, x] = [slice, row, column]
    image.SetSpacing((first.spacing[1], first.spacing[0], step))
    image.SetOrigin(tuple(float(v) for v in s.positions[0]))
    image.SetDirection(tuple(float(v) for v in np.column_stack([row, column, normal]).ravel()))   # row-major 3x3
    return from_image(image, name, case)


@dataclass(frozen=True)
class DicomVolume:
    """The files of one DICOM volume, as medti.dataset finds them: a series of single-frame files or one multi-frame
    file. `number` (Series Number) and `description` (Series Description, made safe by safe_description) name one
    of several series in a folder."""
    paths: tuple
    number: int | None = None
    description: str | None = None

    def read(self, name: str, case: str | None = None, window: Window | None = None) -> tuple:
        """(the Volume, its first file: photometric interpretation and Patient, its own window). The own window of a
        series of files is one for all its slices (medti.medical.window.series_window: theirs where they agree, else
        their median); a multi-frame file's is its first frame's, or PerFrame when its frames carry different windows
        and no `window` (the user's --window) overrides them: each frame is then scaled by its own (by_frame)."""
        if len(self.paths) > 1:
            s = _order(None, [read_dicom(p) for p in self.paths])
            return to_volume(s, name, case), s.images[0], series_window(s.windows)
        s = series(self.paths)[0]
        s, own = by_frame(s) if window is None else (s, s.images[0].window)
        return to_volume(s, name, case), s.images[0], own


def by_frame(s: Series) -> tuple[Series, Window | PerFrame | None]:
    """An enhanced multi-frame file's frames each windowed by its own Frame VOI LUT, as PS3.3 C.7.6.16.2.10 defines
    it (one per frame: a Philips enhanced MR sets each frame's from its own content), when every frame has one and
    they differ: (the Series with pixels on the 0..255 display scale, PerFrame). Otherwise (the Series, its one
    window or None): the volume then keeps one scale over all its slices."""
    distinct = list(dict.fromkeys(s.windows))
    if len(distinct) < 2 or None in distinct:
        return s, s.windows[0]
    photometric = s.images[0].photometric
    pixels = np.stack([display_scale(p, w, photometric) for p, w in zip(s.pixels, s.windows, strict=True)])
    return replace(s, pixels=pixels.astype(np.float32)), PerFrame(tuple(distinct))


def _header(path, pydicom):
    """The header (pydicom's Dataset without the pixels), None when it cannot be read or its Number of Frames is no
    number: the file is then read as an image, and its reader (medti.medical.dicom) says why in its own line."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        whole_number(ds, "NumberOfFrames", path)
        return ds
    except Exception:   # damaged or not DICOM
        return None


def safe_description(ds) -> str | None:
    """The Series Description as a name part (`T2 TSE AX` -> `T2_TSE_AX`): letters, digits, `_` and `-`, at most
    32 characters; None when it is empty, or holds something that may identify: a UID-like run of numbers and dots
    or 8 digits or more (a date, an accession number), the Patient ID, or a part of the Patient's Name of 3 letters
    or more (free text can hold anything, and a name reaches the terminal and the private key files)."""
    raw = str(ds.get("SeriesDescription") or "")
    text = "_".join(re.findall(r"[A-Za-z0-9-]+", raw))[:32].strip("_-")
    words = {w.lower() for w in re.split(r"[\^ ,]+", str(ds.get("PatientName") or "")) if len(w) >= 3}
    words |= {str(ds.get("PatientID") or "").strip().lower()} - {""}
    if not text or re.search(r"\d+(\.\d+){3,}|\d{8,}", raw) or any(w in raw.lower() for w in words):
        return None
    return text


def _key(ds, path):
    """(grouping key, Series Number, safe Series Description) of a file's header (None: unreadable)."""
    frames = whole_number(ds, "NumberOfFrames", path)   # checked by _header: never a damaged one here
    positioned = ds is not None and "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds
    uid = ds.get("SeriesInstanceUID") if positioned and frames == 1 else None
    key = ("series", str(uid)) if uid else (("volume" if frames > 1 else "image"), path)
    try:   # a name part only: a damaged Series Number is left out, not a refusal
        number = whole_number(ds, "SeriesNumber", path, None)
    except MedicalError:
        number = None
    return key, number, (safe_description(ds) if ds is not None else None)


def find_volumes(paths) -> tuple[list, list]:
    """DICOM files -> ([Path (a 2-D image) or DicomVolume], [(copy, the file kept)]), in the order of each one's
    first file. A file whose SOP Instance UID an earlier file has is a copy of that instance (the same image exported
    twice, to two folders: PS3.3 C.12.1.1.1 makes the UID unique to one instance) and is left out, the first in the
    order given kept. Single-frame files with a position, an orientation and a Series Instance UID are grouped by
    that UID, and a group of two or more is a volume; a multi-frame file is a volume; everything else (radiographs:
    CR/DX files carry no Image Position; a series of one slice; an unreadable file) is a 2-D image. Only headers are
    read here."""
    paths = list(paths)
    if not paths:
        return [], []
    pydicom = require("pydicom", str(paths[0]))
    found: dict = {}   # key -> (paths, series number, description), in the order first met
    seen, copies = {}, []   # SOP Instance UID -> its first file; (copy, kept)
    for path in paths:
        ds = _header(path, pydicom)
        instance = str(ds.get("SOPInstanceUID") or "") if ds is not None else ""
        if instance and instance in seen:
            copies.append((path, seen[instance]))
            continue
        if instance:
            seen[instance] = path
        key, number, description = _key(ds, path)
        found.setdefault(key, ([], number, description))[0].append(path)
    return [DicomVolume(tuple(files), number, description) if kind == "volume" or len(files) > 1 else files[0]
            for (kind, _), (files, number, description) in found.items()], copies
