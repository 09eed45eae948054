"""`medti.generate --format dicom` writes objects that dciodvfy, the DICOM validator of dicom3tools (David Clunie),
finds no error in: gray and colour images, ASCII and non-ASCII prompts. The test needs the validator and fails
without it (never skips): `sudo apt-get install dicom3tools` on Debian/Ubuntu, as .ci/run does.

dciodvfy also prints warnings, which do not fail the test. Those it gives today, and why they stay:
  * "Missing attribute or value that would be needed to build DICOMDIR" for Patient ID, Study Date, Study Time and
    Study ID: these are empty on purpose (there is no patient, and a date would make the files differ between two
    identical runs); a DICOMDIR builder must fill them in itself.
  * Laterality "is only permitted to be empty when actually unknown": it is unknown, nothing here knows the body part.
"""
import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from PIL import Image
from test_generate import generate, model_files  # noqa: F401 (the fixture is used by name)

INSTALL = ("dciodvfy not found on PATH: this test validates the DICOM files with it; install dicom3tools "
           "(Debian/Ubuntu: `sudo apt-get install dicom3tools`), as .ci/run does")
PROMPTS = {"ascii": "chest x-ray, cardiomegaly", "non-ascii": "肺 radiographie: opacité, épanchement; Ærø"}


def dciodvfy(path) -> list:
    """dciodvfy's lines for one file (it writes its findings to stderr)."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.fail(INSTALL)
    result = subprocess.run([exe, str(path)], capture_output=True, timeout=120)
    # it echoes values as stored (UTF-8 here); decode leniently, the verdict is in the ASCII prefixes
    return (result.stdout + result.stderr).decode(errors="replace").splitlines()


def generated(model_files, folder, prompt: str, gray: bool):  # noqa: F811
    """00000.dcm of one generate run. Gray: a gray --init-image pasted back everywhere (an all-black mask repaints
    nothing), so the image is exactly gray; colour: the tiny random model's own output."""
    extra = []
    if gray:
        ramp = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))   # [64, 64], 0..252
        Image.fromarray(ramp).save(folder / "init.png")
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(folder / "keep.png")
        extra = ["--init-image", str(folder / "init.png"), "--mask", str(folder / "keep.png"), "--paste-back"]
    assert generate(model_files, folder / "out", "--prompt", prompt, "--format", "dicom", *extra) == 0
    return folder / "out" / "00000.dcm"


@pytest.mark.parametrize("text", PROMPTS)
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "RGB"])
def test_dciodvfy_reports_no_error(model_files, tmp_path, photometric, text):  # noqa: F811
    path = generated(model_files, tmp_path, PROMPTS[text], gray=photometric == "MONOCHROME2")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == photometric   # the case is the one named
    assert PROMPTS[text] in ds.ImageComments
    lines = dciodvfy(path)
    assert "SCImage" in lines, lines   # it recognised the Secondary Capture Image IOD and checked its modules
    errors = [line for line in lines if line.startswith("Error")]
    assert not errors, "\n".join(line[:300] for line in errors)
