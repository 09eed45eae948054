"""The image sets that evaluation and the audit compare: a folder read like training data, or a generation run
(its manifest.jsonl, or a folder that holds one), each image kept as uint8 RGB at its own size.

Why uint8 at the native size: torch-fidelity's and torchmetrics' feature extractors take uint8 images and resize
them themselves (to 299 for Inception, 224 for DINOv2), so the network code owns the one resize, exactly as the
reference does. Sets of different sizes are therefore fine; MS-SSIM and the audit bring pairs to one size.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from minisd.errors import UserError, arg

from ..data import Unusable, find_images, read_image, warn_skipped
from ..manifest import MERGED


class SetError(UserError):
    """An image set that cannot be used, in one line that names the folder or file and the flag."""


@dataclass
class ImageSet:
    images: list            # one torch.uint8 tensor [3, H, W] per image, RGB (gray replicated)
    names: list             # relative POSIX paths (to the folder, or to the manifest's folder), row order
    root: Path              # the folder the names are relative to
    skipped: list = field(default_factory=list)   # (name, reason)
    records: dict = field(default_factory=dict)   # name -> manifest record (prompt, seed, ...) for a run


def read_manifest(path: Path, flag: str) -> dict:
    """name -> record from a manifest.jsonl, in file order; a damaged line is an error, not a silent skip."""
    records = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            records[rec["file"]] = rec
        except (json.JSONDecodeError, KeyError, TypeError):
            raise SetError(f"{arg(flag)} {path}: line {number} is not a manifest record with a \"file\"; "
                           "give the image folder instead") from None
    return records


def _files(path: Path, flag: str) -> tuple[Path, list, dict]:
    """(root, image paths, manifest records) for a folder, a folder with a manifest, or a manifest file."""
    if path.is_file() and path.suffix == ".jsonl":
        records = read_manifest(path, flag)
        return path.parent, [path.parent / name for name in records], records
    if path.is_dir() and (path / MERGED).is_file():
        # A generation run: its manifest names the images, so grid.png (the --grid contact sheet) stays out.
        return _files(path / MERGED, flag)
    if path.is_dir():
        return path, find_images(path), {}
    hint = "no such folder or file" if not path.exists() else "not a folder of images or a manifest.jsonl"
    raise SetError(f"{arg(flag)} {path}: {hint}")


def to_uint8(image) -> torch.Tensor:
    """A PIL image (8-bit L or RGB) as a uint8 tensor [3, H, W]; gray is replicated to three channels."""
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).contiguous()


def load_set(path, flag: str, minimum: int = 1, max_side: int | None = None) -> ImageSet:
    """Every usable image of a set; unusable files are listed in `skipped`. Fewer than `minimum` usable images is
    a SetError that names the flag, the path and what was skipped. `max_side`: images larger than that are reduced
    (aspect kept, Lanczos) as they are read, for users of the set that never look closer (the audit); evaluation
    keeps the native size, because its networks' resize from the full image is part of the reference figures."""
    path = Path(path)
    root, files, records = _files(path, flag)
    images, names, skipped = [], [], []
    for file in files:
        name = file.relative_to(root).as_posix()
        try:
            if not file.is_file():
                raise Unusable("listed in the manifest but missing")
            image = read_image(file)
            if max_side and max(image.size) > max_side:
                image.thumbnail((max_side, max_side), Image.LANCZOS)
            images.append(to_uint8(image))
            names.append(name)
        except Unusable as e:
            skipped.append((name, str(e)))
    warn_skipped(skipped, arg(flag))
    if len(images) < minimum:
        found = f"{len(images)} usable image(s)" + (f", {len(skipped)} skipped, e.g. {': '.join(skipped[0])}"
                                                   if skipped else "")
        raise SetError(f"{arg(flag)} {path}: {found}; at least {minimum} needed")
    return ImageSet(images, names, root, skipped, {n: records[n] for n in names if n in records})
