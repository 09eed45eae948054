"""Generated images written as DICOM Secondary Capture: read back with pydicom, pixels equal to the image, marked
synthetic, and no attribute that could identify anyone (all patient and study identifiers present but empty)."""
import io

import numpy as np
import pydicom
import pytest
from PIL import Image
from test_generate import model_files  # noqa: F401, F811 (the fixture)

from medti.medical import MedicalError
from medti.medical.synthetic import EMPTY_TYPE2, SECONDARY_CAPTURE, new_uid, synthetic_dicom

# Attributes that identify a person or an institution (a selection of PS3.15 Table E.1-1, the de-identification
# profile); none may hold a value in a synthetic object.
IDENTIFYING = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "OtherPatientIDs",
               "PatientAddress", "InstitutionName", "InstitutionAddress", "ReferringPhysicianName",
               "PerformingPhysicianName", "OperatorsName", "AccessionNumber", "StationName", "DeviceSerialNumber")


def png_pixels(mode: str) -> np.ndarray:
    """An image as medti.generate writes it, decoded back from PNG bytes."""
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (48, 64, 3) if mode == "RGB" else (48, 64), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())))


@pytest.mark.parametrize("mode, photometric", [("L", "MONOCHROME2"), ("RGB", "RGB")])
def test_reads_back_with_the_png_pixels_and_no_identity(mode, photometric):
    pixels = png_pixels(mode)
    study, series = new_uid(), new_uid()
    data = synthetic_dicom(pixels, "prompt '<cardiomegaly>', seed 3, euler_a 100 steps, cfg 2", study, series)
    assert data[128:132] == b"DICM"                      # a real DICOM file: preamble and prefix (PS3.10 7.1)
    ds = pydicom.dcmread(io.BytesIO(data))
    assert np.array_equal(ds.pixel_array, pixels)
    assert ds.PhotometricInterpretation == photometric and ds.SOPClassUID == SECONDARY_CAPTURE
    assert ds.ConversionType == "SYN" and list(ds.ImageType) == ["DERIVED", "SECONDARY"]
    assert ds.ImageComments.startswith("SYNTHETIC IMAGE") and "seed 3" in ds.ImageComments
    assert (ds.StudyInstanceUID, ds.SeriesInstanceUID) == (study, series)
    assert ds.SOPInstanceUID not in (study, series) and ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    for name in IDENTIFYING:
        assert str(ds.get(name, "")) == "", name
    assert all(name in ds for name in EMPTY_TYPE2)   # type 2: present, empty (PS3.5 7.4)


def test_every_file_gets_its_own_instance_uid():
    pixels = png_pixels("L")
    uids = {pydicom.dcmread(io.BytesIO(synthetic_dicom(pixels, "", "1.2.3", "1.2.3.4"))).SOPInstanceUID
            for _ in range(3)}
    assert len(uids) == 3


def test_wrong_pixels_are_one_line():
    with pytest.raises(MedicalError, match=r"uint8 \[H, W\] or \[H, W, 3\] pixels, not float32 \[4, 4\]"):
        synthetic_dicom(np.zeros((4, 4), np.float32), "", "1.2", "1.2.3")


def test_generate_format_dicom_writes_each_image_as_synthetic_dicom(model_files, tmp_path):  # noqa: F811
    """`medti.generate --format dicom`: NNNNN.dcm beside each PNG with the PNG's pixels and parameters; one study and
    series per run; a --resume that remakes an image gives it the same UIDs; another run never shares one."""
    from test_generate import generate
    assert generate(model_files, tmp_path / "a", "--prompt", "chest x-ray", "--n", "2", "--format", "dicom") == 0
    files = [pydicom.dcmread(tmp_path / "a" / f"0000{i}.dcm") for i in range(2)]
    for i, ds in enumerate(files):
        png = Image.open(tmp_path / "a" / f"0000{i}.png")
        assert np.array_equal(ds.pixel_array, np.asarray(png)) and ds.ConversionType == "SYN"
        assert png.text["parameters"] in ds.ImageComments
    assert files[0].SeriesInstanceUID == files[1].SeriesInstanceUID != files[0].StudyInstanceUID
    assert files[0].SOPInstanceUID != files[1].SOPInstanceUID
    (tmp_path / "a" / "00001.png").unlink()   # lost: --resume remakes it
    before = files[1].SOPInstanceUID
    assert generate(model_files, tmp_path / "a", "--prompt", "chest x-ray", "--n", "2", "--format", "dicom",
                    "--resume") == 0
    assert pydicom.dcmread(tmp_path / "a" / "00001.dcm").SOPInstanceUID == before
    assert generate(model_files, tmp_path / "b", "--prompt", "chest x-ray", "--n", "1", "--format", "dicom") == 0
    assert pydicom.dcmread(tmp_path / "b" / "00000.dcm").SeriesInstanceUID != files[0].SeriesInstanceUID
