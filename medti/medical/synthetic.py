"""Generated images as DICOM: a Secondary Capture object that PACS viewers open, marked as synthetic, with no
patient in it.

What it holds (DICOM PS3.3 A.8.1, the Secondary Capture Image IOD, and its modules):
  * Patient and General Study: the type 2 attributes (PatientName, PatientID, PatientBirthDate, PatientSex,
    StudyDate, StudyTime, ReferringPhysicianName, StudyID, AccessionNumber) present and EMPTY, as the standard
    allows for unknown values. No value of any source image is copied: the generator saw no patient's file, and
    nothing of a training set reaches the output. PatientIdentityRemoved YES says so to de-identification tools.
  * New UIDs for study, series and instance (pydicom's generate_uid: a random UUID-derived UID under pydicom's root),
    so a synthetic set can never be mistaken for, or merged into, a real study.
  * SC Equipment: ConversionType "SYN" (synthetic image, C.8.6.1); ImageType DERIVED\\SECONDARY; BurnedInAnnotation
    NO; Modality "OT" (other); the generation parameters in ImageComments, starting with SYNTHETIC.
  * Pixels exactly the PNG's: 8 bits, MONOCHROME2 for gray images, RGB (interleaved, PlanarConfiguration 0)
    otherwise, uncompressed (Explicit VR Little Endian).
"""
import io

import numpy as np

from . import MedicalError, require

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"   # Secondary Capture Image Storage SOP Class (PS3.4 B.5)
EMPTY_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
               "ReferringPhysicianName", "StudyID", "AccessionNumber", "SeriesNumber", "InstanceNumber")
MARK = "SYNTHETIC IMAGE (medti): not an acquisition of any patient."


def synthetic_dicom(pixels: np.ndarray, comments: str, study_uid: str, series_uid: str,
                    instance_uid: str | None = None) -> bytes:
    """The bytes of one Secondary Capture file for uint8 pixels [H, W] or [H, W, 3]; `comments` (the generation
    parameters) go into ImageComments after the SYNTHETIC mark. One study and series UID per generated set; the
    instance UID is new unless given."""
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
    ds.SOPClassUID, ds.SOPInstanceUID = SECONDARY_CAPTURE, instance
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    for name in EMPTY_TYPE2:
        setattr(ds, name, "")
    ds.PatientIdentityRemoved = "YES"
    ds.Modality, ds.ConversionType = "OT", "SYN"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.BurnedInAnnotation = "NO"
    ds.ImageComments = f"{MARK} {comments}"[:10240]   # LT: at most 10240 characters (PS3.5 6.2)
    rgb = pixels.ndim == 3
    ds.SamplesPerPixel, ds.PhotometricInterpretation = (3, "RGB") if rgb else (1, "MONOCHROME2")
    if rgb:
        ds.PlanarConfiguration = 0   # R, G, B of one pixel next to each other, as the array is laid out
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    buffer = io.BytesIO()
    # enforce_file_format: the 128-byte preamble, "DICM" and the file meta group, as a DICOM file must have (PS3.10)
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def new_uid(*entropy: str) -> str:
    """A fresh random UID; with `entropy`, the UID derived from those strings (pydicom hashes them under its UID
    root), so the same run's shards and resumed processes give its files the same study, series and instance UIDs."""
    return require("pydicom", "--format dicom").uid.generate_uid(entropy_srcs=list(entropy) or None)


def write_dicom(path, image, comments: str, settings: dict):
    """`path` (NNNNN.dcm beside the PNG) for one generated PIL image, atomically. The run's settings (the command
    line, --out included, the same in every shard and on --resume; --n may grow on a resume) name it: the study and
    series UIDs derive from them, the instance UID from them and the file name, so a file rewritten on --resume
    keeps its UID and two runs never share one."""
    from ..files.atomic import write_atomic
    run = str(sorted((k, str(v)) for k, v in settings.items() if k not in ("resume", "n")))
    study, series = new_uid(run, "study"), new_uid(run, "series")
    write_atomic(path, synthetic_dicom(np.asarray(image), comments, study, series, new_uid(run, str(path.name))))
