"""Generated images written as DICOM Secondary Capture: read back with pydicom, pixels equal to the image, marked
synthetic, and no attribute that could identify anyone (all patient and study identifiers present but empty); gray
images as MONOCHROME2 that medti's own reader takes back; text in UTF-8. dciodvfy's verdict:
test_synthetic_dicom_valid.py."""
import io
import json

import numpy as np
import pydicom
import pytest
from PIL import Image
from test_generate import model_files  # noqa: F401, F811 (the fixture)

from medti.medical import MedicalError
from medti.medical.dicom import read_dicom, training_image
from medti.medical.synthetic import EMPTY_TYPE2, MARK, SECONDARY_CAPTURE, new_uid, synthetic_dicom

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


def test_three_equal_channels_are_stored_gray_and_medti_reads_them_back(tmp_path):
    """generate's images are always RGB; one whose channels are equal everywhere is stored as one 8-bit channel,
    MONOCHROME2, and medti's training reader gives back exactly its pixels (tolerance: none). One level of tint in
    one pixel keeps it RGB: the file holds the PNG's pixels, never an approximation."""
    gray = png_pixels("L")
    path = tmp_path / "gray.dcm"
    path.write_bytes(synthetic_dicom(np.stack([gray] * 3, axis=-1), "", "1.2.3", "1.2.3.4"))
    ds = pydicom.dcmread(path)
    layout = (ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored)
    assert layout == ("MONOCHROME2", 1, 8, 8)
    assert "PlanarConfiguration" not in ds and np.array_equal(ds.pixel_array, gray)
    assert np.array_equal(read_dicom(path).pixels[0], gray.astype(np.float32))
    image, patient = training_image(path, None)   # the file's own window: its values as they are, not min-max
    assert image.mode == "L" and np.array_equal(np.asarray(image), gray) and patient.id == ""
    tinted = np.stack([gray] * 3, axis=-1)
    tinted[5, 7, 2] ^= 1
    ds = pydicom.dcmread(io.BytesIO(synthetic_dicom(tinted, "", "1.2.3", "1.2.3.4")))
    assert ds.PhotometricInterpretation == "RGB" and np.array_equal(ds.pixel_array, tinted)


def test_text_is_utf8_and_round_trips_exactly():
    """A prompt in any script comes back from pydicom character for character, with Specific Character Set
    ISO_IR 192 (UTF-8); a tab, which LT does not allow (PS3.5 6.2), becomes a space; CR and LF stay."""
    prompt = "肺 opacité, épanchement pleural; Ærø, señal\r\nNegative prompt: \u0639\u0638\u0645"
    data = synthetic_dicom(png_pixels("RGB"), prompt + "\tSeed: 3", "1.2.3", "1.2.3.4")
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert ds.ImageComments == f"{MARK} {prompt} Seed: 3"
    assert "肺".encode() in data   # stored as UTF-8 bytes, not replaced


def test_long_text_is_cut_to_10240_bytes_at_a_character_boundary():
    """LT holds at most 10240 (PS3.5 6.2); dciodvfy counts bytes, and 肺 is 3 bytes of UTF-8."""
    ds = pydicom.dcmread(io.BytesIO(synthetic_dicom(png_pixels("L"), "é" + "肺" * 5000, "1.2.3", "1.2.3.4")))
    stored = ds.ImageComments
    assert 10240 - 3 < len(stored.encode()) <= 10240 and f"{MARK} é{'肺' * 5000}".startswith(stored)


def test_the_conditional_and_type_2_attributes_of_secondary_capture_are_there():
    """PS3.3 A.8.1: Deidentification Method is type 1C once Patient Identity Removed is YES (C.7.1.1); Laterality
    (C.7.3.1) and Patient Orientation (C.7.6.1) are type 2C, present and empty; Series and Instance Number type 2."""
    ds = pydicom.dcmread(io.BytesIO(synthetic_dicom(png_pixels("L"), "", "1.2.3", "1.2.3.4", number=7)))
    assert ds.PatientIdentityRemoved == "YES" and ds.DeidentificationMethod.startswith("synthetic")
    assert ds.Laterality == "" and ds.PatientOrientation == "" and "Laterality" in ds and "PatientOrientation" in ds
    assert (ds.SeriesNumber, ds.InstanceNumber) == (1, 7)


def test_generate_writes_a_gray_image_as_monochrome2_without_the_source_file_name(model_files, tmp_path):  # noqa: F811
    """A gray --init-image pasted back everywhere (an all-black mask repaints nothing) gives an exactly gray image:
    its .dcm is MONOCHROME2 with the PNG's pixels, medti reads it back, and the init image's file name (which
    names a patient) appears nowhere in the file."""
    from test_generate import generate
    gray = png_pixels("L")[:, :48][:48]
    Image.fromarray(np.pad(gray, 8)).save(tmp_path / "patient-4711.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "keep.png")
    assert generate(model_files, tmp_path / "out", "--prompt", "chest x-ray", "--format", "dicom", "--init-image",
                    str(tmp_path / "patient-4711.png"), "--mask", str(tmp_path / "keep.png"), "--paste-back") == 0
    png = np.asarray(Image.open(tmp_path / "out" / "00000.png"))
    dcm = tmp_path / "out" / "00000.dcm"
    ds = pydicom.dcmread(dcm)
    assert ds.PhotometricInterpretation == "MONOCHROME2" and np.array_equal(ds.pixel_array, png[..., 0])
    assert np.array_equal(np.asarray(training_image(dcm, None)[0]), png[..., 0])
    assert b"4711" not in dcm.read_bytes() and b"patient-" not in dcm.read_bytes()


def test_resume_with_another_format_is_refused_and_old_png_manifests_still_resume(model_files, tmp_path,  # noqa: F811
                                                                                   capsys):
    """A folder made with --format png and resumed with dicom (or the reverse) would mix images with and without
    their .dcm: refused in one line naming the field. A manifest from before the format was recorded is a PNG run."""
    from test_generate import generate
    args = ("--prompt", "x", "--n", "2")
    assert generate(model_files, tmp_path / "png", *args) == 0
    (tmp_path / "png" / "00001.png").unlink()
    capsys.readouterr()
    assert generate(model_files, tmp_path / "png", *args, "--format", "dicom", "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "00000.png was made with other parameters: --format png (now dicom);" in err, err
    assert generate(model_files, tmp_path / "dcm", *args, "--format", "dicom") == 0
    assert generate(model_files, tmp_path / "dcm", *args, "--resume") == 2
    manifest = tmp_path / "png" / "manifest.jsonl"   # as a medti from before the format was recorded wrote it
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    manifest.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "format"}) + "\n" for r in records))
    assert generate(model_files, tmp_path / "png", *args, "--format", "dicom", "--resume") == 2
    assert generate(model_files, tmp_path / "png", *args, "--resume") == 0
    assert (tmp_path / "png" / "00001.png").is_file()
