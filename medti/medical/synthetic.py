"""Generated images as DICOM: a Secondary Capture object that PACS viewers open, marked as synthetic, with no
patient in it. Section numbers are DICOM PS3.3 (information objects) and PS3.5 (encoding); `dciodvfy` (dicom3tools)
reports no error on these files (tests/test_synthetic_dicom_valid.py).

What it holds (PS3.3 A.8.1, the Secondary Capture Image IOD, and its modules):
  * Patient and General Study: the type 2 attributes (PatientName, PatientID, PatientBirthDate, PatientSex,
    StudyDate, StudyTime, ReferringPhysicianName, StudyID, AccessionNumber) present and EMPTY, as the standard
    allows for unknown values. No value of any source image is copied: the generator saw no patient's file, and
    nothing of a training set reaches the output. PatientIdentityRemoved YES says so to de-identification tools, and
    DeidentificationMethod (type 1C once it is YES, C.7.1.1) says how: there never was a patient.
  * New UIDs for study, series and instance (pydicom's generate_uid: a random UUID-derived UID under pydicom's root),
    so a synthetic set can never be mistaken for, or merged into, a real study.
  * SC Equipment: ConversionType "SYN" (synthetic image, C.8.6.1); ImageType DERIVED\\SECONDARY; BurnedInAnnotation
    NO; Modality "OT" (other); the generation parameters in ImageComments, starting with SYNTHETIC. Laterality
    (type 2C, C.7.3.1) and PatientOrientation (type 2C, C.7.6.1: an image without Image Orientation (Patient)) are
    present and empty: nothing here knows the body part or which way the image faces.
  * Text in UTF-8, SpecificCharacterSet "ISO_IR 192" (C.12.1.1.2), so a prompt in any script survives.
  * Pixels exactly the PNG's: 8 bits, uncompressed (Explicit VR Little Endian); MONOCHROME2 with one sample per
    pixel for a gray image (see `stored_pixels` for the rule), RGB (interleaved, PlanarConfiguration 0) otherwise.
"""
import io
import re

import numpy as np

from . import MedicalError, require

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"   # Secondary Capture Image Storage SOP Class (PS3.4 B.5)
EMPTY_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
               "ReferringPhysicianName", "StudyID", "AccessionNumber", "Laterality", "PatientOrientation")
MARK = "SYNTHETIC IMAGE (medti): not an acquisition of any patient."
METHOD = "synthetic image: no patient, nothing copied"   # LO: at most 64 characters, no backslash (PS3.5 6.2)
UTF8 = "ISO_IR 192"   # PS3.3 C.12.1.1.2: Unicode in UTF-8, the only value when used
# LT may hold graphic characters and the controls CR, LF, FF, ESC (PS3.5 6.2); ESC only starts ISO 2022 code
# extensions, which UTF-8 forbids. Any other control character (a tab in a prompt; C1 controls) becomes a space.
NOT_IN_LT = re.compile(r"[\x00-\x09\x0b\x0e-\x1f\x7f-\x9f]")


def stored_pixels(pixels: np.ndarray) -> np.ndarray:
    """[H, W] for a gray image, [H, W, 3] for colour. The rule: an image is gray when its three channels are equal
    at every pixel, and then its one channel is stored (MONOCHROME2). No tolerance, on purpose: generate decodes
    three channels (medti.files.images.to_pil always gives RGB), and the file must hold exactly the PNG's pixels,
    so an image tinted by even one level stays RGB. SD's decoder seldom gives three exactly equal channels; a
    gray --init-image with --paste-back and a mask that repaints nothing does, and so does any gray array."""
    if pixels.ndim == 3 and (pixels == pixels[..., :1]).all():
        return pixels[..., 0]
    return pixels


def _long_text(text: str) -> str:
    """`text` as an LT value: controls LT does not allow become spaces, and it is cut to 10240 bytes of UTF-8 at a
    character boundary. PS3.5 6.2 says "10240 chars maximum"; dciodvfy counts bytes, and a character of UTF-8 takes
    up to 4, so bytes are what we count: within both readings."""
    return NOT_IN_LT.sub(" ", text).encode(errors="replace")[:10240].decode(errors="ignore")


def _no_one(ds):
    """Patient, study and series attributes that would name a person or a real study: present and empty."""
    for name in EMPTY_TYPE2:
        setattr(ds, name, "")
    ds.PatientIdentityRemoved, ds.DeidentificationMethod = "YES", METHOD
    ds.Modality, ds.ConversionType = "OT", "SYN"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.BurnedInAnnotation = "NO"


def _image(ds, pixels: np.ndarray):
    """Image Pixel module (C.7.6.3) for uint8 [H, W] or [H, W, 3]; a gray image also gets the window that shows
    its stored values as they are (VOI LUT, C.11.2.1.2.1: LINEAR with center 128 and width 256 maps 0..255 onto
    0..255), so a viewer, and medti's own reader, shows the PNG's gray levels and not a stretched version."""
    rgb = pixels.ndim == 3
    ds.SamplesPerPixel, ds.PhotometricInterpretation = (3, "RGB") if rgb else (1, "MONOCHROME2")
    if rgb:
        ds.PlanarConfiguration = 0   # R, G, B of one pixel next to each other, as the array is laid out
    else:
        ds.WindowCenter, ds.WindowWidth = 128, 256
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()


def synthetic_dicom(pixels: np.ndarray, comments: str, study_uid: str, series_uid: str,
                    instance_uid: str | None = None, number: int | None = None) -> bytes:
    """The bytes of one Secondary Capture file for uint8 pixels [H, W] or [H, W, 3] (three equal channels are
    stored as gray, see stored_pixels); `comments` (the generation parameters) go into ImageComments after the
    SYNTHETIC mark. One study and series UID per generated set; the instance UID is new unless given; `number`
    is the InstanceNumber (empty if None)."""
    pydicom = require("pydicom", "--format dicom")
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] != 3):
        raise MedicalError(f"a synthetic DICOM takes uint8 [H, W] or [H, W, 3] pixels, not {pixels.dtype} "
                           f"{list(pixels.shape)}")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    instance = instance_uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SECONDARY_CAPTURE, instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = UTF8   # before any text: pydicom encodes every text value with it
    ds.SOPClassUID, ds.SOPInstanceUID = SECONDARY_CAPTURE, instance
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.SeriesNumber, ds.InstanceNumber = 1, ("" if number is None else number)   # IS, type 2 (C.7.3.1, C.7.6.1)
    _no_one(ds)
    ds.ImageComments = _long_text(f"{MARK} {comments}")
    _image(ds, stored_pixels(pixels))
    buffer = io.BytesIO()
    # enforce_file_format: the 128-byte preamble, "DICM" and the file meta group, as a DICOM file must have (PS3.10)
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def new_uid(*entropy: str) -> str:
    """A fresh random UID; with `entropy`, the UID derived from those strings (pydicom hashes them under its UID
    root), so the same run's shards and resumed processes give its files the same study, series and instance UIDs."""
    return require("pydicom", "--format dicom").uid.generate_uid(entropy_srcs=list(entropy) or None)


def write_dicom(path, image, comments: str, settings: dict, index: int):
    """`path` (NNNNN.dcm beside the PNG) for generated image `index` (a PIL image), atomically. The run's settings
    (the command line, --out included, the same in every shard and on --resume; --n may grow on a resume) name it:
    the study and series UIDs derive from them, the instance UID from them and the file name, so a file rewritten on
    --resume keeps its UID and two runs never share one. InstanceNumber is index + 1 (numbers start at 1)."""
    from ..files.atomic import write_atomic
    run = str(sorted((k, str(v)) for k, v in settings.items() if k not in ("resume", "n")))
    study, series = new_uid(run, "study"), new_uid(run, "series")
    instance = new_uid(run, str(path.name))
    write_atomic(path, synthetic_dicom(np.asarray(image), comments, study, series, instance, index + 1))
