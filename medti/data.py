"""Training images for textual inversion: any bit depth and mode, crop/resize presets, stacked MRI channels, and
a list of the files left out with the reason. Each file is read once; the bytes hashed are the bytes decoded."""
import hashlib
import io
import os
import stat
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from minisd.errors import UserError

from .images import REFUSED_MODES, ImageError, to_8bit
from .medical import MedicalError, MissingExtra
from .medical.dicom import is_dicom, training_image
from .medical.slices import check_options, is_volume, stem
from .medical.slices import item as volume_item
from .preprocess import PREPROCESS, Unusable
from .preprocess import fit as _fit

EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")   # compared lower-case
# Colour modes PIL cannot convert correctly (LAB, CMYK) are skipped with the reason: one table for init images and
# training data, medti.images.REFUSED_MODES. (PIL's convert("RGB") reinterprets CIELAB's L, a, b bytes as if they
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


def _to_8bit(image: Image.Image) -> Image.Image:
    """medti.images.to_8bit (16-bit and float images rescaled from their own range), a failure as a skip."""
    try:
        return to_8bit(image)
    except ImageError as e:
        raise Unusable(str(e)) from None


def _bytes(path: Path) -> bytes:
    """The bytes of a regular file. Anything else named like an image is skipped without reading it: opening a
    FIFO for reading waits for a writer forever, and a device or socket has no end. O_NONBLOCK makes the open itself
    return at once for a FIFO; the type is then checked on the opened file, so a file swapped meanwhile cannot slip
    through (reads from a regular file are unaffected by O_NONBLOCK)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            kind = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(kind):
                what = "a FIFO" if stat.S_ISFIFO(kind) else "a device or socket"
                raise Unusable(f"not a regular file ({what}); only regular files are read")
            return f.read()
    except OSError as e:   # permissions, a broken link, a file removed meanwhile
        raise Unusable(f"cannot read the file ({e.strerror})") from None


@contextmanager
def _medical(path):
    """A MedicalError as Unusable minus its leading path; MissingExtra passes (the run's problem, not the file's)."""
    try:
        yield
    except MissingExtra:
        raise
    except MedicalError as e:
        raise Unusable(str(e).removeprefix(f"{path}: ")) from None


def _read(path: Path, data: bytes, window=None) -> Image.Image:
    """Decode one file's bytes to 8-bit L or RGB, or raise Unusable with the reason. DICOM files go through
    medti.medical.dicom (window: a medti.medical.window.Window, else the file's own, else min-max); the patient
    is kept in the image's `info["patient"]`, in memory only."""
    if not data:
        raise Unusable("empty file (0 bytes)")
    if data[128:132] == b"DICM" or path.suffix.lower() == ".dcm":
        with _medical(path):
            image, patient = training_image(path, window)
        image.info["patient"] = patient
        return image
    try:
        with Image.open(io.BytesIO(data)) as image:
            if getattr(image, "n_frames", 1) > 1:   # a stack/volume: taking slice 0 silently would be a guess
                raise Unusable(f"{image.n_frames} frames in one file; export one slice per file")
            if image.mode in REFUSED_MODES:
                raise Unusable(f"mode {image.mode}: {REFUSED_MODES[image.mode]}")
            image.load()   # decode now: a truncated file fails here, not later
            return _to_8bit(image)
    except Image.UnidentifiedImageError:   # (Unusable is none of the classes caught here, so it passes through)
        raise Unusable(f"not an image PIL can read ({path.suffix} extension)") from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise Unusable(f"unreadable image: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def warn_skipped(skipped: list, where: str):
    """The one warning for files left out of a set (training data, validation, evaluation, audit): a file the user
    thinks is in the set but is not changes every figure, so it is said, in one line, naming at most 5."""
    if skipped:
        names = "; ".join(f"{name} ({why})" for name, why in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        print(f"warning: skipped {len(skipped)} file(s) in {where}: {names}", file=sys.stderr)


def read_image(path: Path, window=None) -> Image.Image:
    """One file as training data reads it: 8-bit L or RGB (16-bit rescaled by medti.images.to_8bit), or Unusable
    with the reason. medti.quality reads evaluation and audit sets through this, so every set obeys one rule."""
    return _read(path, _bytes(path), window)


def _group_cases(folder: Path, files: list[Path], channels: list[str], skip) -> dict[str, dict[str, Path]]:
    """Match files to (case, channel). A file whose stem is a channel name (any case) belongs to the case named
    by its folder: `CASE/t2w.png` -> case "CASE". Otherwise the text after the stem's last underscore is the
    channel: `CASE_t2w.png` -> case "CASE" (or "sub/CASE" in a subfolder). The first rule wins. The layouts
    may be mixed: `p1/T2W.png` and `p1_adc.png` both belong to case "p1". Other files are skipped, listed."""
    cases: dict[str, dict[str, Path]] = {}
    for path in files:
        rel = path.relative_to(folder)
        prefix, _, suffix = stem(path).rpartition("_")   # stem: without `.nii.gz`'s two suffixes too
        if stem(path).lower() in channels:
            case, channel = rel.parent.as_posix(), stem(path).lower()
            if case == ".":
                skip(rel.as_posix(), f"no case: use a folder per case (CASE/{path.name}) or CASE_{path.name}")
                continue
        elif prefix and suffix.lower() in channels:
            case, channel = (rel.parent / prefix).as_posix(), suffix.lower()
        else:
            skip(rel.as_posix(), f"unknown channel: '{suffix}' is not one of {', '.join(channels)}")
            continue
        found = cases.setdefault(case, {})
        if channel in found:
            skip(rel.as_posix(), f"duplicate channel: {case} {channel} is {found[channel].relative_to(folder)}")
            continue
        found[channel] = path
    return dict(sorted(cases.items()))


def _load_case(folder: Path, found: dict[str, Path], channels: list[str]) -> tuple[Image.Image, dict]:
    """Stack one case's channels as R, G, B in `channels` order (one channel: replicated like grayscale), each
    read as 8-bit gray first (RGB exports go through PIL's ITU-R 601 luma; R=G=B stays exact). Channels of
    different sizes skip the case: a PNG carries no spacing or field of view, and T2W and DWI/ADC usually differ
    in both, so resizing one onto the other would silently misregister them; resample when exporting instead."""
    missing = [c for c in channels if c not in found]
    if missing:
        raise Unusable(f"missing channel {', '.join(missing)} (has {', '.join(sorted(found)) or 'none'})")
    grays, data = [], {}
    for channel in channels:
        rel = found[channel].relative_to(folder).as_posix()
        try:
            data[rel] = _bytes(found[channel])
            grays.append(_read(found[channel], data[rel]).convert("L"))
        except Unusable as e:
            raise Unusable(f"channel {channel} ({rel}): {e}") from None
    if len({g.size for g in grays}) > 1:
        sizes = ", ".join(f"{c} {g.width}x{g.height}" for c, g in zip(channels, grays, strict=True))
        raise Unusable(f"channel sizes differ ({sizes}); resample them to one grid when exporting")
    return Image.merge("RGB", grays if len(grays) == 3 else grays * 3), data


def _fingerprint(data: dict[str, bytes]) -> str:
    """sha256 of the `sha256sum` listing ("<hex>  <relative path>\\n") of the files used (skipped files are not),
    sorted by path, so an auditor can recompute it: `cd DATA; sha256sum FILES... | sha256sum`, FILES in
    code-point (LC_ALL=C sort) order."""
    lines = "".join(f"{hashlib.sha256(data[rel]).hexdigest()}  {rel}\n" for rel in sorted(data))
    return hashlib.sha256(lines.encode()).hexdigest()


def _nothing_usable(folder: Path, skipped: list, channels: list | None) -> str:
    """The one-line "no usable image" message: what was found, the most common skip reason, and a fix."""
    files = _walk(folder)
    extensions = Counter(p.suffix.lower() or "(none)" for p in files)
    found = ", ".join(f"{n} {ext}" for ext, n in extensions.most_common(5)) or "nothing"
    kinds = [reason.split(":")[0].split(" (")[0] for _, reason in skipped]   # "wrong size: 64x48, ..." -> kind
    kind = Counter(kinds).most_common(1)[0][0] if kinds else ""
    common = f", most often '{kind}', e.g. {': '.join(skipped[kinds.index(kind)])}" if kinds else ""
    if not files:
        fix = "is this the right folder?"
    elif not any(p.suffix.lower() in EXTENSIONS or is_volume(p) or is_dicom(p) for p in files):
        fix = f"images must be {' '.join(EXTENSIONS)}, DICOM, or volumes (.nii, .nii.gz, .mha, .mhd, .nrrd)"
    elif channels:
        fix = f"with --channels {','.join(channels)}, name files CASE/{channels[0]}.png or CASE_{channels[0]}.png"
    else:
        fix = "fix or re-export those files, or choose another --preprocess"
    return f"{folder}: no usable image ({len(files)} file(s): {found}; {len(skipped)} skipped{common}); {fix}"


def _item_images(folder: Path, name: str, source, channels, options) -> tuple[list, dict]:
    """([(name, 8-bit image, patient)], {relative path: bytes}) of one file or case (`source`: a file or
    {channel: file}). Volumes give one image per chosen slice, all of one patient: medti.medical.slices.item."""
    with _medical(source):
        volume = volume_item(name, source, channels, options)   # None: not a volume (or a case of volumes)
    if volume:
        images, patient, files = volume
        return [(n, im, patient) for n, im in images], {f.relative_to(folder).as_posix(): _bytes(f) for f in files}
    if channels:
        image, data = _load_case(folder, source, channels)
    else:
        data = {name: _bytes(source)}
        image = _read(source, data[name], options.window)
    return [(name, image, image.info.get("patient") or name)], data


def _checked(preprocess: str, resolution: int, channels: list[str] | None) -> list[str] | None:
    """load_dataset's own arguments checked; the channel names lower-cased (they match files in any case)."""
    if preprocess not in PREPROCESS:
        raise DataError(f"preprocess '{preprocess}' is not one of {', '.join(PREPROCESS)}")
    if resolution < 1:
        raise DataError(f"resolution must be positive, got {resolution}")
    channels = None if channels is None else [c.lower() for c in channels]
    if channels is not None and (len(channels) not in (1, 3) or len(set(channels)) != len(channels)):
        raise DataError(f"channels must be 3 distinct names (stacked as R, G, B) or 1, got {channels}")
    return channels


def load_dataset(folder, resolution: int, preprocess: str = "center", channels: list[str] | None = None,
                 strict: bool = False, window=None, *, plane: str = "axial", slices: str = "all",
                 slice_mask: str = "") -> Dataset:
    """All usable images under `folder`, unflipped (flips are the trainer's). Unusable files/cases go to `skipped`;
    with strict=True the first one is a DataError instead. No usable image at all is always a DataError.
    Volumes become one image per slice chosen by `plane`, `slices`, `slice_mask` (medti.medical.slices)."""
    folder, channels = Path(folder), _checked(preprocess, resolution, channels)
    options = check_options(plane, slices, slice_mask, window)   # a bad flag: a MedicalError naming it
    files = [p for p in find_images(folder) if not options.is_mask(p)]   # a case's mask is not a training image
    skipped: list[tuple[str, str]] = []

    def skip(name: str, reason: str):
        if strict:
            raise DataError(f"{folder / name}: {reason}")
        skipped.append((name, reason))

    arrays, names, patients, used = [], [], [], {}
    items = (_group_cases(folder, files, channels, skip).items() if channels
             else [(p.relative_to(folder).as_posix(), p) for p in files])   # (name, file or {channel: file})
    for name, source in items:
        try:
            images, data = _item_images(folder, name, source, channels, options)
        except Unusable as e:
            skip(name, str(e))
            continue
        for name, image, patient in images:   # one image, or a volume's slices: an all-black slice skips alone
            try:
                image = _fit(image, resolution, preprocess)
            except Unusable as e:
                skip(name, str(e))
                continue
            arrays.append(np.asarray(image.convert("RGB")))   # [R, R, 3] uint8; grayscale replicated to 3 channels
            names.append(name)
            patients.append(patient)
        used.update(data)
    if not arrays:
        raise DataError(_nothing_usable(folder, skipped, channels))
    # [N, R, R, 3] uint8 -> [N, 3, R, R] float32 in [-1, 1]; 0 -> -1 and 255 -> 1 exactly
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous().float().div_(127.5).sub_(1)
    return Dataset(images, names, patients, skipped, _fingerprint(used))


if __name__ == "__main__":   # `python -m medti.data preview ...`: the command lives in medti/preview.py
    from medti.preview import main
    raise SystemExit(main())
