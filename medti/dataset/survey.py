"""What a data folder holds, before anything is decoded: the image, volume and DICOM files (find_images), and the
files that are none of these, so that the summary can say what was left out and why. DICOM is recognised by its
content, never by its name: hospital exports name files by SOP Instance UID (`1.3.6...20369.0.3`: suffix `.3`),
Siemens writes `*.IMA`, others `*.dicom` or nothing at all.

Cost of that rule: every file that is not an image or a volume by its extension is opened and its first 132 bytes
read (PS3.10 7.1: a 128-byte preamble, then "DICM"). Measured on 2,000 files (1,000 DICOM named by UID, 1,000 text
files) in the page cache: see docs/medical-files.md for the figure."""
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..medical.dicom import is_dicom
from ..medical.slices import data_files, is_volume

EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")   # compared lower-case


@dataclass
class Survey:
    """What reading a folder found besides its images, filled as it is read (medti.dataset.folder.read_items) and
    said in the run's summary and warnings. Names are relative POSIX paths under the folder."""
    found: list = field(default_factory=list)        # image, volume and DICOM files (Paths), as find_images lists
    others: list = field(default_factory=list)       # files that are none of those: not images
    duplicates: list = field(default_factory=list)   # (copy left out, the file kept): one SOP Instance UID
    placeholders: object = None   # medti.dataset.patients.Replaced: images whose PatientID was a placeholder


def walk(folder: Path) -> list[Path]:
    """Every file under `folder` whose relative path has no hidden part (".DS_Store", "._x.png" from macOS,
    ".git/"), sorted by relative POSIX path string (the order of `names`); links to folders are not followed."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]   # prune: never descend into hidden folders
        found += [Path(root, f) for f in files if not f.startswith(".")]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def is_image_name(path: Path) -> bool:
    """An image or volume by its extension (any case): read by its kind's reader without looking inside."""
    return path.suffix.lower() in EXTENSIONS or is_volume(path)


def listed(files: list[Path]) -> list[Path]:
    """The image, volume and DICOM files among `files`: by extension, else by DICOM's preamble (medti.medical.dicom
    .is_dicom: one read of 132 bytes per file, and any *.dcm, so a damaged one is reported rather than passed over)."""
    return [p for p in files if is_image_name(p) or is_dicom(p)]


def not_images(folder: Path, files: list[Path], found: list[Path]) -> list[str]:
    """The files of `files` that are not in `found` and belong to no image: a caption (IMAGE.txt beside IMAGE.png)
    and a .mhd header's data file (.raw, .zraw) are part of their image, not files left out."""
    kept = set(found)
    parts = {p.with_suffix(".txt") for p in found if p.suffix.lower() in EXTENSIONS}
    parts |= {d for p in found if p.name.lower().endswith(".mhd") for d in data_files(p)[1:]}
    return [p.relative_to(folder).as_posix() for p in files if p not in kept and p not in parts]


def kind(path: Path) -> str:
    """A listed file's kind for the summary: its extension for images and volumes (`.nii.gz` as one), else DICOM."""
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower() if is_image_name(path) else "DICOM"


def kinds(folder: Path, found: list[Path], used) -> dict[str, int]:
    """{kind: count}, most first (`{"DICOM": 142, ".png": 8}`): how many of the listed files of each kind were read
    (their bytes are in `used`, the relative paths the fingerprint hashes)."""
    counts = Counter(kind(p) for p in found if p.relative_to(folder).as_posix() in used)
    return dict(counts.most_common())
