"""The image sets that evaluation and the audit compare: a folder read like training data (through
medti.dataset.folder.read_items, the reader training uses: DICOM series, volumes and --channels cases included), or a
generation run (its manifest.jsonl, or a folder that holds one), each image kept as uint8 RGB at its own size.

Why uint8 at the native size: torch-fidelity's and torchmetrics' feature extractors take uint8 images and resize
them themselves (to 299 for Inception, 224 for DINOv2), so the network code owns the one resize, exactly as the
reference does. Sets of different sizes are therefore fine; MS-SSIM and the audit bring pairs to one size.
The audit alone also applies medti.train's --preprocess to its --train folder (Reading.preprocess): a memorising
model reproduces the squares it was trained on, not the files as stored.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image

from minisd.errors import UserError, arg

from ..dataset.folder import DataError, fingerprint_of, item_pseudonym, parse_channels, read_items, survey_folder
from ..dataset.patients import keys
from ..dataset.preprocess import Unusable, check_not_flat, fit
from ..dataset.report import reason_kind, warn_skipped, warn_survey
from ..dataset.sources import decode, file_bytes
from ..files.images import library_warnings
from ..files.pseudonyms import Numbering, image_name, key_rows, skipped_names
from ..generation.manifest import MERGED
from ..medical.slices import SliceOptions, check_options
from ..medical.window import parse_window
from ..training.config import TrainConfig

# medti.train's flags that decide what a folder's images are, taken by evaluate (--real) and the audit (--train)
# under the same names and helps (medti.training.config.add_flags). --preprocess is not among them: evaluation keeps
# the native size (see above), the audit adds it itself; nor --strict: a skipped file is listed, as in training.
DATA_FLAGS = ("channels", "window", "plane", "slices", "slice_mask")


class SetError(UserError):
    """An image set that cannot be used, in one line that names the folder or file and the flag."""


@dataclass
class ImageSet:
    images: list            # one torch.uint8 tensor [3, H, W] per image, RGB (gray replicated)
    names: list             # relative POSIX paths (to the folder, or to the manifest's folder), row order
    root: Path              # the folder the names are relative to
    skipped: list = field(default_factory=list)   # (name, reason)
    records: dict = field(default_factory=dict)   # name -> manifest record (prompt, seed, ...) for a run
    # per image: its patient as training reads it (the DICOM PatientID, else the case folder or file; for a run,
    # the image's own name). In memory only: outputs name patients by pseudonyms() alone.
    patients: list = field(default_factory=list)
    sizes: list = field(default_factory=list)   # per image: (width, height) as read, before any reduction
    # per image: how files meant to be shared name it (medti.files.pseudonyms), `img-<content hash>[#axial042]`
    pseudonyms: list = field(default_factory=list)
    fingerprint: str = ""   # sha256 over the files read, as training's (medti.dataset.folder.fingerprint_of)

    @property
    def key(self) -> list:
        """(pseudonym, name) of each image, then of each file left out: the rows of names.private.tsv."""
        return key_rows(self.pseudonyms, self.names, self.skipped)


@dataclass(frozen=True)
class Reading:
    """How a folder's images are read: the data flags, checked (reading())."""
    channels: list | None = None
    options: SliceOptions = field(default_factory=check_options)
    # medti.train's --preprocess at `resolution` (medti.dataset.preprocess.fit), applied before any reduction; None: the
    # images as read (evaluation, every synthetic set). The audit sets both once it knows the synthetic size.
    preprocess: str | None = None
    resolution: int = 0
    # a set read as medti.train reads --data (evaluation's --real, the audit's --train: reading()) leaves out a flat
    # image as training does (medti.dataset.preprocess.check_not_flat); a synthetic set keeps it: it is the model's
    # output, and dropping it would flatter the figures
    as_training: bool = False


def shared_skipped(skipped: list) -> list:
    """[pseudonym, kind of reason] of each file left out of a real or training set, as shared reports give them: a
    reason may name files (reason_kind keeps what cannot), and names.private.tsv maps the pseudonym to the file."""
    return [[name, reason_kind(why)] for name, (_, why) in zip(skipped_names(skipped), skipped, strict=True)]


def reading(args) -> Reading:
    """The data flags of `args` (DATA_FLAGS, as add_flags made them) checked before any image is read; a mistake
    is one line naming the flag."""
    try:
        channels = parse_channels(args.channels)   # training's own rule for --channels (medti.dataset)
    except DataError as e:
        raise SetError(f"--channels {args.channels}: {e}") from None
    window = parse_window(args.window, "--window") if args.window else None
    return Reading(channels, check_options(args.plane, args.slices, args.slice_mask, window), as_training=True)


def set_flags(args) -> list:
    """The data flags set to something other than medti.train's default (for a set they cannot apply to)."""
    return [f"--{name.replace('_', '-')}" for name in DATA_FLAGS if getattr(args, name) != getattr(TrainConfig, name)]


def _manifest_name(rec, path: Path, flag: str, number: int) -> str:
    """A record's "file": a relative path inside the manifest's folder. An absolute path or one with `..` would
    score an image outside the set the user named, without a word."""
    name = rec.get("file") if isinstance(rec, dict) else None
    if not isinstance(name, str) or not name:
        raise SetError(f"{arg(flag)} {path}: line {number} is not a manifest record with a \"file\" name; give the "
                       "image folder instead")
    if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts or "\\" in name:
        raise SetError(f"{arg(flag)} {path}: line {number} names {name[:80]!r}, outside the manifest's folder; a "
                       "manifest names its images by their path inside that folder")
    return name


def read_manifest(path: Path, flag: str) -> dict:
    """name -> record from a manifest.jsonl, in file order; a damaged line is an error, not a silent skip."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise SetError(f"{arg(flag)} {path}: not UTF-8 text (byte {e.start}); a manifest is JSON lines, as "
                       "medti.generate writes it") from None
    records = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        records[_manifest_name(rec, path, flag, number)] = rec
    return records


def _files(path: Path, flag: str) -> tuple[Path, list | None, dict]:
    """(root, image paths, manifest records) for a manifest file or a folder with one; (the folder, None, {}) for
    a folder, which read_items lists itself."""
    if path.is_file() and path.suffix == ".jsonl":
        records = read_manifest(path, flag)
        return path.parent, [path.parent / name for name in records], records
    if path.is_dir() and (path / MERGED).is_file():
        # A generation run: its manifest names the images, so grid.png (the --grid contact sheet) stays out.
        return _files(path / MERGED, flag)
    if path.is_dir():
        return path, None, {}
    hint = "no such folder or file" if not path.exists() else "not a folder of images or a manifest.jsonl"
    raise SetError(f"{arg(flag)} {path}: {hint}")


def to_uint8(image) -> torch.Tensor:
    """A PIL image (8-bit L or RGB) as a uint8 tensor [3, H, W]; gray is replicated to three channels."""
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).contiguous()


def _small(image, max_side: int | None, how: Reading):
    """(uint8 image, size as read): left out when flat and read as training reads (Reading.as_training), preprocessed
    when `how` says so (training's fit() on the full image, as training applies it), then reduced; the Unusable of
    either (a flat image, a wrong size under --preprocess none) propagates."""
    size = image.size
    if how.as_training:
        check_not_flat(image)
    if how.preprocess:
        image = fit(image, how.resolution, how.preprocess)
    if max_side and max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.LANCZOS)
    return to_uint8(image), size


def _run_images(root: Path, files: list, max_side, how: Reading, skipped: list, used: dict):
    """(name, (uint8 image, size), patient, pseudonym) of each image a manifest lists, read file by file (a run's
    images are PNG or DICOM files of their own; each is its own "patient"); their bytes go to `used`."""
    numbering = Numbering()
    for file in files:
        name = file.relative_to(root).as_posix()
        try:
            if not file.is_file():
                raise Unusable("listed in the manifest but missing")
            data = {name: file_bytes(file)}
            with library_warnings():   # a reader's own warning lines held back, as for every file read
                image = decode(file, data[name])
            used.update(data)
            yield name, _small(image, max_side, how), name, numbering.item(data)
        except Unusable as e:
            skipped.append((name, str(e)))


def _folder_images(folder: Path, how: Reading, max_side, skipped: list, survey, used: dict):
    """(name, (uint8 image, size), patient, pseudonym) of each image of a folder, exactly as training lists, reads
    and names them (and preprocesses them, when `how` says so); the files' sha256 go to `used`, for the fingerprint,
    and their bytes are dropped at once."""
    numbering = Numbering()
    for images, data in read_items(folder, how.channels, how.options, lambda name, why: skipped.append((name, why)),
                                   survey=survey):
        item = item_pseudonym(numbering, images, data)
        used.update(data)
        for name, image, patient in images:   # a volume's slices: one that preprocess makes unusable skips alone
            try:
                yield name, _small(image, max_side, how), patient, image_name(item, name)
            except Unusable as e:
                skipped.append((name, str(e)))


def load_set(path, flag: str, minimum: int = 1, max_side: int | None = None, how: Reading = Reading()) -> ImageSet:
    """Every usable image of a set; unusable files are listed in `skipped`. Fewer than `minimum` usable images is
    a SetError that names the flag, the path and what was skipped. `max_side`: images larger than that are reduced
    (aspect kept, Lanczos) as they are read, for users of the set that never look closer (the audit); evaluation
    keeps the native size, because its networks' resize from the full image is part of the reference figures.
    `how`: the data flags for a folder (a run's images are read as they are, preprocessed if `how` says so)."""
    path = Path(path)
    root, files, records = _files(path, flag)
    skipped, survey, used = [], survey_folder(root) if files is None else None, {}
    rows = list(_run_images(root, files, max_side, how, skipped, used) if files is not None else
                _folder_images(root, how, max_side, skipped, survey, used))
    names, read, patients, pseudonyms = ([row[i] for row in rows] for i in range(4))
    patients, replaced = keys(patients)   # as training keys them: a placeholder PatientID by study
    if survey is not None:
        survey.placeholders = replaced
    images, sizes = [image for image, _ in read], [size for _, size in read]
    if len(images) < minimum:   # before the warnings: the one line says what was skipped itself
        found = f"{len(images)} usable image(s)" + (f", {len(skipped)} skipped, e.g. {': '.join(skipped[0])}"
                                                   if skipped else "")
        raise SetError(f"{arg(flag)} {path}: {found}; at least {minimum} needed")
    warn_skipped(skipped, arg(flag))
    warn_survey(survey, arg(flag))
    return ImageSet(images, names, root, skipped, {n: records[n] for n in names if n in records}, patients, sizes,
                    pseudonyms, fingerprint_of(used))
