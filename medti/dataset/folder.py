"""A folder of training images as tensors: any bit depth and mode, crop/resize presets (preprocess.py), stacked MRI
channels, DICOM and volumes (sources.py says what each file is and reads it), each image's patient, and a list of
the files left out with the reason. The fingerprint hashes the bytes of exactly the files used."""
import hashlib
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minisd.errors import UserError

from ..medical.dicom import is_dicom
from ..medical.slices import SliceOptions, check_options, is_volume
from .preprocess import PREPROCESS, Unusable
from .preprocess import fit as _fit
from .sources import item_images, items

EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")   # compared lower-case
# Colour modes PIL cannot convert correctly (LAB, CMYK) are skipped with the reason: one table for init images and
# training data, medti.files.images.REFUSED_MODES. (PIL's convert("RGB") reinterprets CIELAB's L, a, b bytes as if they
# were R, G, B: a mid-grey L=50 a=10 b=10 pixel becomes (0, 82, 235).)


class DataError(UserError):
    """A data problem, in one line that names the file or folder."""


@dataclass
class Dataset:
    images: torch.Tensor   # [N, 3, R, R] float32 in [-1, 1]
    names: list[str]       # relative paths (POSIX), or case names with `channels`
    # per image: its patient -- the DICOM PatientID, else its case (with `channels`) or file name. In memory only:
    # validation splits by it, and no output file ever holds it.
    patients: list[str]
    windows: list[str]     # per image: which window scaled it (`--window 40,400`, `the file's ...`, min-max, ...)
    captions: list[str]    # per image: its caption file's text (with captions=True), else ""
    skipped: list[tuple[str, str]]   # (relative path or case name, reason), in the order met
    fingerprint: str       # sha256 over the used files' paths and bytes: see _fingerprint


def _walk(folder: Path) -> list[Path]:
    """Every file under `folder` whose relative path has no hidden part (".DS_Store", "._x.png" from macOS,
    ".git/"), sorted by relative POSIX path string (the order of `names`); links to folders are not followed."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]   # prune: never descend into hidden folders
        found += [Path(root, f) for f in files if not f.startswith(".")]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def find_images(folder) -> list[Path]:
    """Image and volume files under `folder`, recursive and sorted (see _walk); extensions matched in any case."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    # volumes: medti.medical.slices.is_volume (a .mhd header is listed, its .raw data file not); DICOM: *.dcm,
    # or a file without an extension that has DICOM's preamble (PS3.10; PACS exports often have none)
    return [p for p in _walk(folder) if p.suffix.lower() in EXTENSIONS or is_volume(p) or
            (p.suffix.lower() in ("", ".dcm") and is_dicom(p))]


def warn_skipped(skipped: list, where: str):
    """The one warning for files left out of a set (training data, validation, evaluation, audit): a file the user
    thinks is in the set but is not changes every figure, so it is said, in one line, naming at most 5."""
    if skipped:
        names = "; ".join(f"{name} ({why})" for name, why in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        print(f"warning: skipped {len(skipped)} file(s) in {where}: {names}", file=sys.stderr)


def check_captions(data: Dataset, folder, where: str):
    """With --captions: none of the images having a caption file is a DataError (the files are missing or named
    otherwise: training on the bare template is not what was asked); some missing is a warning naming them."""
    missing = [name for name, caption in zip(data.names, data.captions, strict=True) if not caption]
    hint = "a caption is IMAGE.txt beside IMAGE.png (2-D files only), not empty"
    if len(missing) == len(data.names):
        raise DataError(f"{folder}: none of its {len(missing)} image(s) has a caption; {hint}")
    if missing:
        names = "; ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        print(f"warning: {len(missing)} of {len(data.names)} image(s) in {where} have no caption, their prompt "
              f"is the template with an empty caption ({hint}): {names}", file=sys.stderr)


def _fingerprint(data: dict[str, bytes]) -> str:
    """sha256 of the `sha256sum` listing ("<hex>  <relative path>\\n") of the files used (skipped files are not),
    sorted by path, so an auditor can recompute it: `cd DATA; sha256sum FILES... | sha256sum`, FILES in
    code-point (LC_ALL=C sort) order."""
    lines = "".join(f"{hashlib.sha256(data[rel]).hexdigest()}  {rel}\n" for rel in sorted(data))
    return hashlib.sha256(lines.encode("utf-8", "surrogateescape")).hexdigest()   # a name's own bytes, any encoding


NAMING = ("unknown channel", "missing channel", "no case", "duplicate channel")   # --channels naming problems
PREPROCESSING = ("wrong size", "all black")                                       # --preprocess refusals


def _suffix(path: Path) -> str:
    """A file's kind for the summary: `.nii.gz` as one (not `.gz`), no suffix as "(none)"."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower() or "(no extension)"


def _fix(files: list, kind: str, channels: list | None) -> str:
    """The advice of the "no usable image" line, by what was found and the most common reason."""
    if not files:
        return "is this the right folder?"
    if not any(p.suffix.lower() in EXTENSIONS or is_volume(p) or is_dicom(p) for p in files):
        return f"images must be {' '.join(EXTENSIONS)}, DICOM, or volumes (.nii, .nii.gz, .mha, .mhd, .nrrd)"
    if channels and kind.startswith(NAMING):
        return f"with --channels {','.join(channels)}, name files CASE/{channels[0]}.png or CASE_{channels[0]}.png"
    if kind.startswith(PREPROCESSING):
        return "choose another --preprocess or re-export those files"
    return "fix or re-export those files"


def _nothing_usable(folder: Path, skipped: list, channels: list | None) -> str:
    """The one-line "no usable image" message: what was found, the most common skip reason, and a fix."""
    files = _walk(folder)
    found = ", ".join(f"{n} {ext}" for ext, n in Counter(map(_suffix, files)).most_common(5)) or "nothing"
    # "wrong size: 64x48, ..." -> "wrong size"; a series' "IM0004: 5.000 mm from ..." -> the reason, not the file
    kinds = [(part[1] if len(part) > 1 and " " not in part[0] else part[0]).split(" (")[0]
             for part in (reason.split(": ") for _, reason in skipped)]
    kind = Counter(kinds).most_common(1)[0][0] if kinds else ""
    common = f", most often '{kind}', e.g. {': '.join(skipped[kinds.index(kind)])}" if kinds else ""
    return (f"{folder}: no usable image ({len(files)} file(s): {found}; {len(skipped)} skipped{common}); "
            f"{_fix(files, kind, channels)}")


def check_not_empty(folder) -> None:
    """Refuse a folder with no image, DICOM or volume file in it before the model loads (a first run would
    download gigabytes first), in the words of the later "no usable image" line."""
    if not find_images(folder):
        raise DataError(_nothing_usable(Path(folder), [], None))


def check_channels(channels: list[str] | None) -> list[str] | None:
    """The channel names lower-cased (they match files in any case), 3 distinct ones or 1, else a DataError."""
    channels = None if channels is None else [c.strip().lower() for c in channels]
    if channels is not None and (len(channels) not in (1, 3) or len(set(channels)) != len(channels)):
        raise DataError(f"channels must be 3 distinct names (stacked as R, G, B) or 1, got {channels}")
    return channels


def parse_channels(text: str) -> list[str] | None:
    """The --channels flag's text ("t2w,adc,hbv"; empty: no channels) as check_channels' list."""
    return check_channels(text.split(",")) if text else None


def pseudonyms(patients: list) -> dict:
    """patient -> "patient-001", ... numbered in the order met: the only way a patient is named in an output file
    (data preview's data.jsonl, the audit's report), since a PatientID is an identifier."""
    return {p: f"patient-{i + 1:03d}" for i, p in enumerate(dict.fromkeys(patients))}


def _checked(preprocess: str, resolution: int, channels: list[str] | None) -> list[str] | None:
    """load_dataset's own arguments checked; the channel names as check_channels gives them."""
    if preprocess not in PREPROCESS:
        raise DataError(f"preprocess '{preprocess}' is not one of {', '.join(PREPROCESS)}")
    if resolution < 1:
        raise DataError(f"resolution must be positive, got {resolution}")
    return check_channels(channels)


def summary(data: Dataset) -> str:
    """What a set is made of, for the run's log: `120 image(s): 112 slice(s) of 3 volume(s) or series, 8 image
    file(s); 4 patient(s)` -- patients by DICOM PatientID, else by case folder or file (see Dataset.patients)."""
    volumes = {name.split("#")[0] for name in data.names if "#" in name}
    files = sum("#" not in name for name in data.names)
    parts = ([f"{len(data.names) - files} slice(s) of {len(volumes)} volume(s) or series"] if volumes else []) + \
        ([f"{files} image file(s)"] if files else [])
    return f"{len(data.names)} image(s): {', '.join(parts)}; {len(set(data.patients))} patient(s)"


def read_items(folder: Path, channels: list[str] | None, options: SliceOptions, skip, captions: bool = False):
    """Each item under `folder` (a file, a case, a volume) as read, before --preprocess: yields
    ([(name, 8-bit image, patient)], {relative path: bytes of the files it came from}); an unusable item goes to
    `skip(name, reason)` instead. Training (load_dataset) and evaluation and the audit (medti.quality.folders)
    read folders through this."""
    files = [p for p in find_images(folder) if not options.is_mask(p)]   # a case's mask is not a training image
    for name, source in items(folder, files, channels, skip):   # (name, file, DICOM volume or {channel: file})
        try:
            yield item_images(folder, name, source, channels, options, captions)
        except Unusable as e:
            skip(name, str(e))


def load_dataset(folder, resolution: int, preprocess: str = "center", channels: list[str] | None = None,
                 strict: bool = False, window=None, *, plane: str = "axial", slices: str = "all",
                 slice_mask: str = "", captions: bool = False) -> Dataset:
    """All usable images under `folder`, unflipped (flips are the trainer's). Unusable files/cases go to `skipped`;
    with strict=True the first one is a DataError instead. No usable image at all is always a DataError.
    Volumes become one image per slice chosen by `plane`, `slices`, `slice_mask` (medti.medical.slices). With
    `captions`, each 2-D file's caption file (image.txt beside image.png, A1111's convention) is read too, and is
    part of the fingerprint."""
    folder, channels = Path(folder), _checked(preprocess, resolution, channels)
    options = check_options(plane, slices, slice_mask, window)   # a bad flag: a MedicalError naming it
    skipped: list[tuple[str, str]] = []

    def skip(name: str, reason: str):
        if strict:
            raise DataError(f"{folder / name}: {reason}")
        skipped.append((name, reason))

    arrays, names, patients, windows, texts, used = [], [], [], [], [], {}
    for images, data in read_items(folder, channels, options, skip, captions):
        for name, image, patient in images:   # one image, or a volume's slices: an all-black slice skips alone
            window = image.info.get("window", "as stored")   # medical readers say; other files are 8-bit as read
            try:
                image = _fit(image, resolution, preprocess)
            except Unusable as e:
                skip(name, str(e))
                continue
            arrays.append(np.asarray(image.convert("RGB")))   # [R, R, 3] uint8; grayscale replicated to 3 channels
            names.append(name)
            patients.append(patient)
            windows.append(window)
            texts.append(image.info.get("caption", ""))
        used.update(data)
    if not arrays:
        raise DataError(_nothing_usable(folder, skipped, channels))
    # [N, R, R, 3] uint8 -> [N, 3, R, R] float32 in [-1, 1]; 0 -> -1 and 255 -> 1 exactly
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous().float().div_(127.5).sub_(1)
    return Dataset(images, names, patients, windows, texts, skipped, _fingerprint(used))
