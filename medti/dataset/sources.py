"""What the files under a data folder are, and how each is read: a 2-D image (PNG, TIFF, JPEG, a DICOM radiograph),
a volume (NIfTI, MetaImage, NRRD, a DICOM series or multi-frame file: one image per chosen slice), or a case of
--channels stacked as R, G, B. medti.dataset (training and validation) and medti.quality (evaluation and the audit)
read folders through `items` and `item_images`, so every set obeys one rule."""
import io
import os
import stat
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from PIL import Image

from ..files.images import REFUSED_MODES, WIDE_MODES, ImageError, library_warnings, to_8bit
from ..medical import MedicalError, MissingExtra
from ..medical.dicom import training_image
from ..medical.dicom_series import DicomVolume, find_volumes
from ..medical.slices import data_files, stem
from ..medical.slices import item as volume_item
from .preprocess import Unusable
from .survey import Survey, is_image_name


def _to_8bit(image: Image.Image) -> Image.Image:
    """medti.files.images.to_8bit (16-bit and float images rescaled from their own range), a failure as a skip."""
    try:
        return to_8bit(image)
    except ImageError as e:
        raise Unusable(str(e)) from None


def file_bytes(path: Path) -> bytes:
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
def medical_errors(source):
    """A MedicalError as Unusable minus its leading path, which the skip list names already (a DICOM volume's: just
    the file's name, to say which of its files); MissingExtra passes (the run's problem, not the file's)."""
    try:
        yield
    except MissingExtra:
        raise
    except MedicalError as e:
        text, paths = str(e), source.paths if isinstance(source, DicomVolume) else [source]
        for path in paths:
            if text.startswith(f"{path}: "):
                text = text.removeprefix(f"{path}: ")
                text = f"{Path(path).name}: {text}" if len(paths) > 1 else text
                break
        raise Unusable(text) from None


def decode(path: Path, data: bytes, window=None) -> Image.Image:
    """Decode one file's bytes to 8-bit L or RGB, or raise Unusable with the reason: training's rule, which
    medti.quality applies to a generation run's images too. DICOM files go through
    medti.medical.dicom (window: a medti.medical.window.Window, else the file's own, else min-max); its Patient
    is kept in the image's `info["patient"]`, in memory only."""
    if not data:
        raise Unusable("empty file (0 bytes)")
    if data[128:132] == b"DICM" or path.suffix.lower() == ".dcm":
        with medical_errors(path):
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
            shown = _to_8bit(image)
            if image.mode in WIDE_MODES:   # data.jsonl says which scale made the 8 bits
                shown.info["window"] = "min-max of the image (16-bit or float)"
            return shown
    except Image.UnidentifiedImageError:   # (Unusable is none of the classes caught here, so it passes through)
        raise Unusable(f"not an image PIL can read ({path.suffix} extension)") from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise Unusable(f"unreadable image: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None



def read_image(path: Path, window=None) -> Image.Image:
    """One file as training data reads it: 8-bit L or RGB (16-bit rescaled by medti.files.images.to_8bit), or Unusable
    with the reason. medti.quality reads evaluation and audit sets through this, so every set obeys one rule."""
    with library_warnings():
        return decode(path, file_bytes(path), window)


def _group_cases(folder: Path, entries: list, channels: list[str], skip) -> dict[str, dict]:
    """Match files to (case, channel); `entries` are (path, source): a file is its own source, and a DICOM series
    comes as (its folder, the DicomVolume), so `CASE/t2w/IM0001...` is channel t2w of case CASE. A file whose stem
    is a channel name (any case) belongs to the case named by its folder: `CASE/t2w.png` -> case "CASE". Otherwise
    the text after the stem's last underscore is the channel: `CASE_t2w.png` -> case "CASE" (or "sub/CASE" in a
    subfolder). The first rule wins. The layouts may be mixed: `p1/T2W.png` and `p1_adc.png` both belong to case
    "p1". Other files are skipped, listed."""
    cases: dict[str, dict] = {}
    for path, source in entries:
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
            skip(rel.as_posix(), f"duplicate channel: {case} {channel} is {_where(found[channel], folder)}")
            continue
        found[channel] = source
    return dict(sorted(cases.items()))


def _where(source, folder: Path) -> str:
    path = source.paths[0].parent if isinstance(source, DicomVolume) and len(source.paths) > 1 else \
        getattr(source, "paths", [source])[0]
    return path.relative_to(folder).as_posix()


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
            data[rel] = file_bytes(found[channel])
            grays.append(decode(found[channel], data[rel]).convert("L"))
        except Unusable as e:
            raise Unusable(f"channel {channel} ({rel}): {e}") from None
    if len({g.size for g in grays}) > 1:
        sizes = ", ".join(f"{c} {g.width}x{g.height}" for c, g in zip(channels, grays, strict=True))
        raise Unusable(f"channel sizes differ ({sizes}); resample them to one grid when exporting")
    return Image.merge("RGB", grays if len(grays) == 3 else grays * 3), data



def _inside(folder: Path, source):
    """A .mhd header names its data file (ElementDataFile), which may be any path: one outside the data folder
    (`../../other/scan.raw`, an absolute path) would train on, and fingerprint, a file nobody put in the set; it is
    refused, naming the path as the header gives it. Compared by path, not by following links."""
    top = os.path.normpath(os.path.abspath(folder))
    for path in source.values() if isinstance(source, dict) else [source]:
        if isinstance(path, Path) and path.name.lower().endswith(".mhd"):
            for extra in data_files(path)[1:]:
                if not os.path.normpath(os.path.abspath(extra)).startswith(top + os.sep):
                    raise Unusable(f"its data file (ElementDataFile) {os.path.relpath(extra, path.parent)} lies "
                                   "outside the data folder; keep it beside the .mhd, or convert to .mha")


def item_images(folder: Path, name: str, source, channels, options, captions: bool = False) -> tuple[list, dict]:
    """([(name, 8-bit image, patient)], {relative path: bytes}) of one file or case (`source`: a file or
    {channel: file}). Volumes give one image per chosen slice, all of one patient: medti.medical.slices.item.
    With `captions`, a 2-D file's caption file (its .txt twin, as A1111 and kohya read them) goes to info["caption"]
    as its bytes."""
    _inside(folder, source)
    with medical_errors(source):
        volume = volume_item(name, source, channels, options)   # None: not a volume (or a case of volumes)
    if volume:
        images, patient, files = volume
        return [(n, im, patient) for n, im in images], {f.relative_to(folder).as_posix(): file_bytes(f) for f in files}
    if channels:
        image, data = _load_case(folder, source, channels)
    else:
        data = {name: file_bytes(source)}
        image = decode(source, data[name], options.window)
        if captions and source.with_suffix(".txt").is_file():
            caption = source.with_suffix(".txt").relative_to(folder).as_posix()
            data[caption] = file_bytes(source.with_suffix(".txt"))
            image.info["caption"] = data[caption]   # bytes: medti.dataset.folder.caption_text checks and decodes
            image.info["caption_file"] = caption    # no part of the image's pseudonym
    patient = image.info.get("patient")   # a DICOM file's Patient (medti.dataset.patients keys it), else the file
    return [(name, image, replace(patient, fallback=name) if patient else name)], data


def _dicom_names(folder: Path, volumes: list) -> dict:
    """{DicomVolume: name}: a multi-frame file's relative path; a series', its folder (`ct/case1`), or with several
    series in that folder `ct/case1/series-3` (its Series Number, else its first file's name); series that would
    still share a name get their Series Description (`series-3-T2_AX`, medti.medical.dicom_series.safe_description),
    then a counter in path order (`series-3-2`). No UID and no patient attribute: names reach the terminal and
    the private key files, and UIDs are identifiers under DICOM's de-identification profile. Stable: the same files
    give the same names, run after run (a series added beside them may lengthen its neighbours' names)."""
    names, by_folder = {}, {}
    for v in volumes:
        first = v.paths[0].relative_to(folder)
        if len(v.paths) == 1:
            names[v] = first.as_posix()
        else:
            by_folder.setdefault(first.parent.as_posix(), []).append(v)
    for where, series in by_folder.items():
        own = [("series" if where == "." else where, None)] if len(series) == 1 else _distinct(series)
        for v, (name, _) in zip(series, own, strict=True):
            names[v] = name if len(series) == 1 or where == "." else f"{where}/{name}"
    return names


def _distinct(series: list) -> list:
    """Distinct names of the series of one folder, in their order: `series-N` (or the first file's name), then the
    description for those that share it, then a counter for those that still do."""
    names = [(f"series-{v.number}" if v.number is not None else v.paths[0].name, v) for v in series]
    for add in (lambda n, v, k: f"{n}-{v.description}" if v.description else n, lambda n, v, k: f"{n}-{k}"):
        shared = {n for n, _ in names if [m for m, _ in names].count(n) > 1}
        seen = {}
        for i, (n, v) in enumerate(names):
            if n in shared:
                seen[n] = seen.get(n, 0) + 1
                names[i] = (add(n, v, seen[n]), v)
    return names


def items(folder: Path, files: list[Path], channels: list[str] | None, skip, survey: Survey | None = None) -> list:
    """[(name, source)] in the order of each item's first file: each file, except that DICOM files forming a volume
    (a series, a multi-frame file: medti.medical.dicom_series.find_volumes) are one item, and a copy of a DICOM
    instance read already (its SOP Instance UID) is left out, listed in `survey.duplicates` as (copy, kept); with
    channels, the cases ({channel: source}), where a DICOM series is the channel its folder names. DICOM files are
    the files that are not images or volumes by their extension (medti.dataset.survey.listed has checked their
    content)."""
    dicom = [p for p in files if not is_image_name(p)]   # found by content (survey.listed), whatever the name
    found, copies = find_volumes(dicom)                  # no pydicom: MissingExtra, one line
    if survey is not None:
        survey.duplicates += [(c.relative_to(folder).as_posix(), k.relative_to(folder).as_posix()) for c, k in copies]
    volumes = [v for v in found if isinstance(v, DicomVolume)]
    inside = {p for v in volumes for p in v.paths[1:]} | {c for c, _ in copies}
    if channels:
        # a series stands for its folder (`CASE/t2w/`), a multi-frame file for itself (`CASE/t2w.dcm`)
        as_path = {v.paths[0]: (v.paths[0].parent if len(v.paths) > 1 else v.paths[0], v) for v in volumes}
        entries = [as_path.get(p, (p, p)) for p in files if p not in inside]
        return list(_group_cases(folder, entries, channels, skip).items())
    names = _dicom_names(folder, volumes)
    first = {v.paths[0]: (names[v], v) for v in volumes}
    return [first.get(p, (p.relative_to(folder).as_posix(), p)) for p in files if p not in inside]
