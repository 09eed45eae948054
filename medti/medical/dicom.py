"""DICOM files -> float32 pixels in modality units (CT in HU) and the few header fields training needs (series and
multi-frame volumes: medti.medical.dicom_series; the header's window, rescale and geometry: dicom_header). pydicom
reads the files (`pip install "medti[medical]"`); it is imported inside functions only, so medti works without it.
Section numbers are DICOM PS3.3 (information objects) and PS3.10 (file format).

Scope, stated: grayscale only (MONOCHROME1/2). Windowing, the VOI LUT, is defined for grayscale images
(PS3.3 C.11.2), and color DICOM (ultrasound, secondary capture, slide microscopy) would need its own path; it is
refused in one line. The file's own window keeps its VOI LUT Function (0028,1056): LINEAR, LINEAR_EXACT or SIGMOID
(medti.medical.window); a VOI LUT Sequence (a table instead of a window) is not applied."""
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import MedicalError, require
from .dicom_header import frame_rescale, frame_window, geometry, pixel_aspect, whole_number
from .orientation import as_displayed, check_orientation
from .volume import square_pixels
from .window import Window, described, display_scale, finite_values, to_uint8

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")   # PS3.3 C.7.6.3 and C.7.6.24


@dataclass(frozen=True)
class Patient:
    """Whose image it is, as its header says (PS3.3 C.7.1.1 Patient, C.7.2.1 General Study). In memory only: never
    written anywhere. medti.dataset.patients decides which of these fields keys the patient (a placeholder
    PatientID is no key). `fallback`: the key when the header gives none (a file or folder name), set by the caller."""
    id: str                # Patient ID (0010,0020), stripped
    study: str             # Study Instance UID (0020,000D)
    birth: str             # Patient's Birth Date (0010,0030)
    sex: str               # Patient's Sex (0010,0040)
    fallback: str = ""


def patient_of(ds) -> Patient:
    """The Patient of a dataset: each field as text, "" where absent or empty."""
    return Patient(*(str(ds.get(k) or "").strip() for k in ("PatientID", "StudyInstanceUID", "PatientBirthDate",
                                                            "PatientSex")))


@dataclass
class DicomImage:
    pixels: np.ndarray            # [F, H, W] float32 in modality units (after the Modality LUT); F = 1 for one frame
    photometric: str              # "MONOCHROME1" (low = white) or "MONOCHROME2" (low = black)
    windows: tuple                # each frame's own first window (Window or None): C.11.2, or Frame VOI LUT per frame
    patient: Patient              # in memory only (see Patient)
    series_uid: str | None
    positions: tuple | None       # Image Position (Patient) of each frame, mm: its first voxel's centre (C.7.6.2.1.1)
    orientation: tuple | None     # Image Orientation (Patient): row then column direction cosines
    spacing: tuple | None         # Pixel Spacing: (between rows, between columns) in mm
    aspect: tuple | None          # (row, column) pixel size of a 2-D image, for its shape only (pixel_aspect)
    path: Path

    @property
    def position(self) -> tuple | None:
        return self.positions[0] if self.positions else None

    @property
    def window(self) -> Window | None:
        """The file's own first window (its first frame's)."""
        return self.windows[0]


def is_dicom(path) -> bool:
    """A regular file that is a DICOM file: "DICM" after the 128-byte preamble (PS3.10 7.1), whatever its name
    (DICOMDIR exports and PACS dumps often have no extension), or any file named *.dcm, so a damaged .dcm is read
    and reported by read_dicom instead of being passed over in silence. Opened with O_NONBLOCK and checked on the
    open file, as medti.dataset does: a FIFO named like an image must not hang the search."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return False
            head = f.read(132)
    except OSError:
        return False
    return path.suffix.lower() == ".dcm" or head[128:132] == b"DICM"


def _modality(ds, stored: np.ndarray, pydicom, path) -> np.ndarray:
    """Stored values -> modality units [F, H, W], the Modality LUT (PS3.3 C.11.1): value * RescaleSlope +
    RescaleIntercept (CT: HU, e.g. slope 1 and intercept -1024), each frame by its own (an enhanced file may rescale
    each frame differently), or a Modality LUT Sequence, which pydicom applies. A rescale that is not a finite number
    or that takes values past float32's range is refused; NaN and infinities in float pixel data become the minimum
    (medti.medical.window.finite_values, the rule of every reader)."""
    shape = (-1, int(ds.Rows), int(ds.Columns))
    if "ModalityLUTSequence" in ds:
        values = pydicom.pixels.apply_modality_lut(stored, ds).reshape(shape)
        return finite_values(values, path).astype(np.float32)
    stored = stored.reshape(shape)
    rescale = np.array([frame_rescale(ds, f) for f in range(len(stored))], np.float64)[:, :, None, None]   # [F,2,1,1]
    if not np.isfinite(rescale).all():
        slope, intercept = rescale[~np.isfinite(rescale).all(axis=1)[:, 0, 0]][0, :, 0, 0]
        raise MedicalError(f"{path}: Rescale Slope {slope:g} and Intercept {intercept:g}: not both finite numbers")
    # float64 for the product: slopes like 0.000123 on 16-bit values lose digits in float32 before the cast
    with np.errstate(over="ignore", invalid="ignore"):
        values = stored.astype(np.float64) * rescale[:, 0] + rescale[:, 1]
    past = np.isfinite(stored) & ~(np.abs(values) <= np.finfo(np.float32).max)
    if past.any():
        frame = int(np.nonzero(past)[0][0])
        raise MedicalError(f"{path}: Rescale Slope {rescale[frame, 0, 0, 0]:g} and Intercept "
                           f"{rescale[frame, 1, 0, 0]:g} take stored value {stored[past][0]:g} to "
                           f"{values[past][0]:g}, past float32's range; a damaged header?")
    return finite_values(values, path).astype(np.float32)


def _decode(ds, path: Path, pydicom) -> np.ndarray:
    """ds.pixel_array, or one line naming the transfer syntax and the decoders pydicom lists for it. Compressed
    syntaxes need plugins (pydicom's "Plugins for Pixel Data compression and decompression" table: JPEG 2000 ->
    pylibjpeg + pylibjpeg-openjpeg, python-gdcm or pillow; JPEG-LS -> pylibjpeg-libjpeg, gdcm or pyjpegls)."""
    syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    try:
        return ds.pixel_array
    except Exception as e:   # pydicom raises RuntimeError, ValueError, NotImplementedError... by plugin
        if syntax is None or not syntax.is_compressed:
            raise MedicalError(f"{path}: its pixel data cannot be read ({_line(e)})") from None
        try:
            decoder = pydicom.pixels.get_decoder(syntax)
        except NotImplementedError:   # no decoder at all in pydicom for this syntax (e.g. MPEG video)
            raise MedicalError(f"{path}: pixel data is {syntax.name} ({syntax}), which pydicom cannot decode") from None
        missing = _requirements(decoder)
        if not decoder.is_available:
            raise MedicalError(f"{path}: pixel data is {syntax.name} ({syntax}), and no decoder for it is "
                               f"installed; pydicom needs one of: {missing}") from None
        hint = f"; other decoders: {missing}" if missing else ""
        raise MedicalError(f"{path}: pixel data is {syntax.name} ({syntax}) and could not be decoded by "
                           f"{', '.join(decoder.available_plugins)} ({_line(e)}): a damaged file or a variant that "
                           f"decoder lacks{hint}") from None


def _requirements(decoder) -> str:
    """pydicom's "gdcm - requires gdcm>=3.0.10" lines as pip requirements: gdcm's distribution is python-gdcm."""
    needs = [line.split(" - requires ", 1)[-1].replace("gdcm>=", "python-gdcm>=").replace("numpy and ", "")
             for line in decoder.missing_dependencies]
    return " | ".join(needs)


def _line(error: Exception) -> str:
    """An exception's text on one line, without pydicom's preamble and object addresses (noise to a user)."""
    text = " ".join(str(error).split()).split("raised by all available plugins: ")[-1]
    return re.sub(r" ?<[^<>]* object at 0x[0-9a-f]+>", "", text)


def read_dicom(path) -> DicomImage:
    """One DICOM file -> DicomImage, or a MedicalError of one line saying why it cannot be used."""
    pydicom = require("pydicom", str(path))
    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except Exception as e:   # InvalidDicomError, OSError, and struct/value errors from a truncated or damaged file
        raise MedicalError(f"{path}: not a readable DICOM file ({_line(e)})") from None
    if not len(ds):   # pydicom keeps no element at all when the file ends inside one (it warns "End of file ...")
        raise MedicalError(f"{path}: truncated file: it ends inside a data element, and none of its attributes can "
                           "be read; copy it again from its source")
    if not any(keyword in ds for keyword in PIXEL_KEYWORDS):
        sop = ds.get("SOPClassUID")
        kind = f"SOP Class {sop.name}" if sop is not None else "no SOP Class"
        raise MedicalError(f"{path}: holds no image (Modality {ds.get('Modality', 'unknown')}, {kind}): structured "
                           "reports, RT structures and the like have no pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise MedicalError(f"{path}: photometric interpretation {photometric or 'missing'}; only grayscale "
                           "(MONOCHROME1/MONOCHROME2) DICOM is read")
    whole_number(ds, "NumberOfFrames", path)   # pydicom's decoder reads it: a damaged one is named first
    stored = _decode(ds, path, pydicom)
    pixels = _modality(ds, stored, pydicom, path)   # [F, H, W]
    positions, orientation, spacing = geometry(ds, len(pixels), path)
    if orientation is not None:   # damaged cosines refused here, for a series as for one slice
        check_orientation(orientation, path)
    if positions and any(len(p) != 3 or not np.isfinite(p).all() for p in positions):
        bad = next(p for p in positions if len(p) != 3 or not np.isfinite(p).all())
        raise MedicalError(f"{path}: Image Position (Patient) {list(bad)}: expected 3 finite coordinates in mm")
    windows = tuple(frame_window(ds, f) for f in range(len(pixels)))
    return DicomImage(pixels=pixels, photometric=photometric, windows=windows, patient=patient_of(ds),
                      aspect=pixel_aspect(ds, spacing, path),
                      series_uid=ds.get("SeriesInstanceUID"), positions=positions, orientation=orientation,
                      spacing=spacing, path=path)


def render(image: DicomImage, window: Window | None = None) -> np.ndarray:
    """[F, H, W] uint8 for display or training. The window is the one given, else the file's own, else the
    image's own min-max (the project's rule for images without a known scale); MONOCHROME1 comes out inverted so
    that dense is bright, as in MONOCHROME2 (see medti.medical.window.to_uint8)."""
    return to_uint8(image.pixels, window or image.window, image.photometric)


def training_image(path, window: Window | None):
    """One single-frame DICOM file as medti.dataset reads images: (8-bit L PIL image, its Patient). pydicom
    missing is the user's to fix (MedicalError, one line for the run); a file that cannot be used is the `MedicalError`
    that medti.dataset turns into a skip with its reason. Multi-frame files and series are volumes, read by
    medti.medical.dicom_series; one reaching this function has frames but no geometry, and is refused. Pixels that
    are not square (Pixel Spacing rows != columns, see dicom_header.pixel_aspect) are resampled to square ones of
    the finer size, as volumes' slices are, so a later resize to the model's size does not stretch the anatomy. A
    slice that carries Image Orientation (Patient) is turned to the radiological view of its own plane, exactly as its
    series would show it (medti.medical.orientation); one without (CR/DX, secondary captures) is shown as stored."""
    from PIL import Image
    image = read_dicom(path)
    if len(image.pixels) > 1:
        raise MedicalError(f"{path}: {len(image.pixels)} frames without per-frame positions: not a volume and not one "
                           "image; export the frames you want as single images")
    pixels, aspect = image.pixels[0], image.aspect
    if image.orientation is not None:   # shown as its series shows it (medti.medical.orientation)
        pixels, aspect = as_displayed(pixels, image.orientation, aspect or (1.0, 1.0), path)
    scaled = display_scale(pixels, window or image.window, image.photometric)
    if image.orientation is not None:   # float32 between scaling and rounding, as a series' slices are
        scaled = scaled.astype(np.float32)
    if aspect is not None:   # non-square pixels: resampled to square, as volumes' slices are (the finer size)
        scaled = square_pixels(scaled, *aspect)
    shown = Image.fromarray(np.floor(np.clip(scaled, 0, 255) + 0.5).astype(np.uint8))   # round half up, as to_uint8
    shown.info["window"] = described(window, image.window)
    shown.info["one value"] = bool(pixels.min() == pixels.max())   # no window can show what is not there
    return shown, image.patient
