"""A folder of training images as tensors: any bit depth and mode, crop/resize presets (preprocess.py), stacked MRI
channels, DICOM and volumes (sources.py says what each file is and reads it), each image's patient, and a list of
the files left out with the reason. The fingerprint hashes the bytes of exactly the files used."""
import hashlib
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from minisd.config import MAX_SIDE
from minisd.errors import UserError
from minisd.tokenizer import MAX_PROMPT_TOKENS

from ..files.images import library_warnings
from ..files.pseudonyms import Numbering, image_name, key_rows
from ..medical.slices import SliceOptions, check_options
from .patients import keys
from .preprocess import PREPROCESS, Unusable, check_not_flat
from .preprocess import fit as _fit
from .report import nothing_usable
from .sources import item_images, items
from .survey import Survey, kinds, listed, not_images, walk

# Colour modes PIL cannot convert correctly (LAB, CMYK) are skipped with the reason: one table for init images and
# training data, medti.files.images.REFUSED_MODES. (PIL's convert("RGB") reinterprets CIELAB's L, a, b bytes as if they
# were R, G, B: a mid-grey L=50 a=10 b=10 pixel becomes (0, 82, 235).)


class DataError(UserError):
    """A data problem, in one line that names the file or folder."""


@dataclass
class Dataset:
    images: torch.Tensor   # [N, 3, R, R] float32 in [-1, 1]
    names: list[str]       # relative paths (POSIX), or case names with `channels`
    # per image: its patient -- the DICOM PatientID (a placeholder one: the Study Instance UID; medti.dataset.patients),
    # else its case (with `channels`) or file name. In memory only: validation splits by it, no output file holds it.
    patients: list[str]
    windows: list[str]     # per image: which window scaled it (`--window 40,400`, `the file's ...`, min-max, ...)
    captions: list[str]    # per image: its caption file's text (with captions=True), else ""
    skipped: list[tuple[str, str]]   # (relative path or case name, reason), in the order met
    fingerprint: str       # sha256 over the used files' paths and bytes: see fingerprint_of()
    files: dict = field(default_factory=dict)   # {kind: files read}: "DICOM" (by content), ".png", ".nii.gz", ...
    survey: Survey | None = None                # what else the folder held: files that are not images, ...
    # per image: how files meant to be shared name it (medti.files.pseudonyms): `img-<content hash>[#axial042]`
    pseudonyms: list[str] = field(default_factory=list)

    @property
    def key(self) -> list:
        """(pseudonym, name) of each image, then of each file left out: the rows of names.private.tsv."""
        return key_rows(self.pseudonyms, self.names, self.skipped)


def find_images(folder) -> list[Path]:
    """Image, volume and DICOM files under `folder`, recursive and sorted (medti.dataset.survey.walk): images and
    volumes by extension in any case (a .mhd header is listed, its .raw data file not), DICOM by its content
    whatever its name (survey.listed)."""
    return survey_folder(folder).found


def survey_folder(folder) -> Survey:
    """A Survey of `folder` with `found` (find_images) and `others` (files that are not images) filled in."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    files = walk(folder)
    found = listed(files)
    return Survey(found, not_images(folder, files, found))


def caption_text(path: Path, raw: bytes) -> str:
    """A caption file's text on one line (a newline in a prompt would split nothing here), or a DataError naming
    the file: it must be UTF-8 (a leading byte-order mark, as Windows Notepad writes, is allowed) without control
    characters other than tabs and line ends. Anything else is the bytes of some other file, and was trained on as
    U+FFFD replacement characters."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a UTF-8 text file (byte {raw[e.start]:#04x} at offset {e.start}); a caption "
                        "is plain text: save it as UTF-8") from None
    bad = next((i for i, c in enumerate(text) if unicodedata.category(c) == "Cc" and c not in "\t\n\r"), None)
    if bad is not None:
        raise DataError(f"{path}: holds the control character {text[bad]!r} at character {bad}, so it is no text "
                        "file; a caption is plain text")
    return " ".join(text.split())


def check_captions(data: Dataset, folder, where: str, tokens=None):
    """With --captions: none of the images having a caption file is a DataError (the files are missing or named
    otherwise: training on the bare template is not what was asked); some missing is a warning naming them.
    `tokens(caption)`: the tokens of the longest training prompt with that caption in it. One past what the text
    tower reads (MAX_PROMPT_TOKENS) is a DataError naming the caption file: the tower would cut it silently, and
    generate refuses such a prompt (medti.generation.prompts.check_length)."""
    missing = [name for name, caption in zip(data.names, data.captions, strict=True) if not caption]
    hint = "a caption is IMAGE.txt beside IMAGE.png (2-D files only), not empty"
    if len(missing) == len(data.names):
        raise DataError(f"{folder}: none of its {len(missing)} image(s) has a caption; {hint}")
    for name, caption in zip(data.names, data.captions, strict=True):
        count = tokens(caption) if tokens and caption else 0
        if count > MAX_PROMPT_TOKENS:
            raise DataError(f"{Path(folder) / Path(name).with_suffix('.txt')}: with this caption the training prompt "
                            f"holds {count} tokens, {count - MAX_PROMPT_TOKENS} more than the {MAX_PROMPT_TOKENS} "
                            "that fit (generate refuses such a prompt); shorten the caption")
    if missing:
        names = "; ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        print(f"warning: {len(missing)} of {len(data.names)} image(s) in {where} have no caption, their prompt "
              f"is the template with an empty caption ({hint}): {names}", file=sys.stderr)


def fingerprint_of(data: dict[str, bytes | str]) -> str:
    """sha256 of the `sha256sum` listing ("<hex>  <relative path>\\n") of the files used (skipped files are not),
    sorted by path, so an auditor can recompute it: `cd DATA; sha256sum FILES... | sha256sum`, FILES in
    code-point (LC_ALL=C sort) order."""
    digest = {rel: raw if isinstance(raw, str) else hashlib.sha256(raw).hexdigest() for rel, raw in data.items()}
    lines = "".join(f"{digest[rel]}  {rel}\n" for rel in sorted(data))
    return hashlib.sha256(lines.encode("utf-8", "surrogateescape")).hexdigest()   # a name's own bytes, any encoding


def check_not_empty(folder) -> None:
    """Refuse a folder with no image, DICOM or volume file in it before the model loads (a first run would
    download gigabytes first), in the words of the later "no usable image" line."""
    if not find_images(folder):
        raise DataError(nothing_usable(Path(folder), [], None))


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
    if not 1 <= resolution <= MAX_SIDE:
        raise DataError(f"resolution {resolution}: must be from 1 to {MAX_SIDE} pixels")
    return check_channels(channels)


def item_pseudonym(numbering: Numbering, images: list, data: dict) -> str:
    """The pseudonym of one item of read_items (its images, {relative path: bytes}), from the bytes of its image
    files: a caption file takes no part, so training with --captions names an image as the audit names it."""
    captions = {image.info["caption_file"] for _, image, _ in images if "caption_file" in image.info}
    return numbering.item({path: data[path] for path in data if path not in captions})


def read_items(folder: Path, channels: list[str] | None, options: SliceOptions, skip, captions: bool = False,
               survey: Survey | None = None):
    """Each item under `folder` (a file, a case, a volume) as read, before --preprocess: yields
    ([(name, 8-bit image, patient)], {relative path: bytes of the files it came from}); an unusable item goes to
    `skip(name, reason)` instead. Training (load_dataset) and evaluation and the audit (medti.quality.folders)
    read folders through this. `survey`: survey_folder's, to be completed as the folder is read."""
    survey = survey or survey_folder(folder)
    files = [p for p in survey.found if not options.is_mask(p)]   # a case's mask is not a training image
    with library_warnings():   # the DICOM headers: a file they warn about is read, and judged, below
        listed = items(folder, files, channels, skip, survey)   # (name, file, DICOM volume or {channel: file})
    for name, source in listed:
        try:
            with library_warnings():   # not around the yield: the caller's own warnings are not ours to hold
                found = item_images(folder, name, source, channels, options, captions)
        except Unusable as e:
            skip(name, str(e))
            continue
        yield found


class Reading:
    """The usable images under a folder, one at a time (iterate), read as load_dataset reads them: the same skip and
    refusal rules, the same pseudonyms. What the reading leaves besides the images -- the files left out, the
    sha256 of each file used, the survey -- stays here, so a caller can stream a set larger than memory
    (`python -m medti.data encode`) and get the same fingerprint as load_dataset."""

    def __init__(self, folder, resolution: int, preprocess: str = "center", channels: list[str] | None = None,
                 strict: bool = False, window=None, *, plane: str = "axial", slices: str = "all",
                 slice_mask: str = "", captions: bool = False):
        self.folder, self.channels = Path(folder), _checked(preprocess, resolution, channels)
        self.options = check_options(plane, slices, slice_mask, window)   # a bad flag: a MedicalError naming it
        self.resolution, self.preprocess, self.strict, self.captions = resolution, preprocess, strict, captions
        self.skipped: list[tuple[str, str]] = []
        self.used: dict[str, str] = {}   # relative path -> sha256 of its bytes (not the bytes: memory stays flat)
        self.survey = survey_folder(folder)

    def skip(self, name: str, reason: str):
        if self.strict:
            raise DataError(f"{self.folder / name}: {reason}")
        self.skipped.append((name, reason))

    def __iter__(self):
        """(uint8 [R, R, 3] array, name, pseudonym, patient, window, caption) per usable image, in load_dataset's
        order."""
        numbering = Numbering()
        for images, data in read_items(self.folder, self.channels, self.options, self.skip, self.captions,
                                       self.survey):
            item = item_pseudonym(numbering, images, data)
            for name, image, patient in images:   # one image, or a volume's slices: a flat slice skips alone
                window = image.info.get("window", "as stored")   # medical readers say; other files are 8-bit as read
                try:
                    check_not_flat(image)
                    image = _fit(image, self.resolution, self.preprocess)
                except Unusable as e:
                    self.skip(name, str(e))
                    continue
                raw = image.info.get("caption")
                caption = caption_text(self.folder / Path(name).with_suffix(".txt"), raw) if raw is not None else ""
                # [R, R, 3] uint8; grayscale replicated to 3 channels
                yield np.asarray(image.convert("RGB")), name, image_name(item, name), patient, window, caption
            self.used.update({path: hashlib.sha256(raw).hexdigest() for path, raw in data.items()})

    def finish(self, patients: list, count: int) -> tuple[list, str, dict]:
        """After the last image: (patients keyed as medti.dataset.patients keys them, the fingerprint, {kind: files
        read}); no usable image at all is a DataError."""
        if not count:
            raise DataError(nothing_usable(self.folder, self.skipped, self.channels))
        patients, self.survey.placeholders = keys(patients)   # a placeholder PatientID keys by study
        return patients, fingerprint_of(self.used), kinds(self.folder, self.survey.found, self.used)


def as_tensor(arrays: list) -> torch.Tensor:
    """[N, R, R, 3] uint8 arrays -> [N, 3, R, R] float32 in [-1, 1]; 0 -> -1 and 255 -> 1 exactly. Elementwise,
    so a chunk of a set converts to exactly the rows of the whole set converted at once."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous().float().div_(127.5).sub_(1)


def load_dataset(folder, resolution: int, preprocess: str = "center", channels: list[str] | None = None,
                 strict: bool = False, window=None, *, plane: str = "axial", slices: str = "all",
                 slice_mask: str = "", captions: bool = False) -> Dataset:
    """All usable images under `folder`, unflipped (flips are the trainer's). Unusable files/cases go to `skipped`;
    with strict=True the first one is a DataError instead. No usable image at all is always a DataError.
    Volumes become one image per slice chosen by `plane`, `slices`, `slice_mask` (medti.medical.slices). With
    `captions`, each 2-D file's caption file (image.txt beside image.png, A1111's convention) is read too, and is
    part of the fingerprint."""
    reading = Reading(folder, resolution, preprocess, channels, strict, window, plane=plane, slices=slices,
                      slice_mask=slice_mask, captions=captions)
    rows = list(reading)   # [(array, name, pseudonym, patient, window, caption)] -> one list per column
    arrays, names, shared, patients, windows, texts = ([row[i] for row in rows] for i in range(6))
    patients, fingerprint, files = reading.finish(patients, len(rows))
    return Dataset(as_tensor(arrays), names, patients, windows, texts, reading.skipped, fingerprint, files,
                   reading.survey, shared)
