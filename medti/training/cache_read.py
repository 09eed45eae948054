"""Training from an on-disk latent cache: `python -m medti.train --cache CACHE ...` (written by `python -m medti.data
encode`, medti.training.cache_write).

The cache is read as the trainer's Session.cache mapping ("mean", "logvar", "once", "tokens" columns indexed by a
list of rows, and "captions"), one row at a time by byte offset (os.pread), never a whole shard: memory stays flat
in the number of images. Row r of a column is image r % N, mirrored when r >= N (--flip), N the images in the
cache: the rows of the in-memory cache (medti.training.objective.cache_latents), in the same order.

What is checked before a step runs, one line each: the manifest (absent: the cache is still being written or its
encode was killed), its format, the model (sha256) and --resolution, --flip and the other data flags against what the
cache was made with, every shard present with the size its header states and the sha256 the manifest states.
"""
import dataclasses
import json
import os
import struct
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from minisd.errors import arg
from minisd.hub import sha256_file

from . import TrainError, check_folder
from .cache_write import FORMAT, MANIFEST

# the TrainConfig fields a cache fixes (they decide its rows): a flag typed with another value is refused
FIXED = ("resolution", "preprocess", "channels", "window", "plane", "slices", "strict", "flip", "captions")
OPEN_FILES = 64   # shards held open at once (a cache of 100,000 images at 256 per shard has 391)
DTYPES = {"F32": np.float32}


class Shards:
    """The shards' files, opened as needed (an LRU of OPEN_FILES descriptors), and each tensor's place in them."""

    def __init__(self, folder: Path, records: list):
        self.folder, self.records, self.open = folder, records, OrderedDict()
        self.layout = [self._header(folder / record["file"]) for record in records]

    def _header(self, path: Path) -> dict:
        """{name: (dtype, shape, byte offset in the file)} from the safetensors header; the file's size checked."""
        try:
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
            size = path.stat().st_size
        except FileNotFoundError:
            raise TrainError(f"{arg('cache')} {self.folder}: {path.name} is missing; re-run the encode command "
                             "(python -m medti.data encode) that made this cache") from None
        except (OSError, ValueError, struct.error) as e:
            raise TrainError(f"{arg('cache')} {self.folder}: {path.name} is not a shard ({e}); re-run the encode "
                             "command that made this cache") from None
        tensors = {name: (h["dtype"], h["shape"], 8 + length + h["data_offsets"][0]) for name, h in header.items()
                   if name != "__metadata__"}
        end = 8 + length + max(h["data_offsets"][1] for name, h in header.items() if name != "__metadata__")
        if end != size:
            raise TrainError(f"{arg('cache')} {self.folder}: {path.name} is {size} bytes where its header states "
                             f"{end} (cut short or corrupt); re-run the encode command that made this cache")
        return tensors

    def descriptor(self, index: int) -> int:
        if index in self.open:
            self.open.move_to_end(index)
        else:
            if len(self.open) == OPEN_FILES:
                os.close(self.open.popitem(last=False)[1])
            self.open[index] = os.open(self.folder / self.records[index]["file"], os.O_RDONLY)
        return self.open[index]

    def row(self, index: int, name: str, row: int) -> np.ndarray:
        """One row of tensor `name` of shard `index`, read from its byte offset alone."""
        dtype, shape, offset = self.layout[index][name]
        size = int(np.prod(shape[1:])) * 4
        raw = os.pread(self.descriptor(index), size, offset + row * size)
        return np.frombuffer(raw, dtype=DTYPES[dtype]).reshape(shape[1:])


class Column:
    """One column of the cache: len() rows, indexed by a list of rows -> a [len(rows), ...] float32 tensor."""

    def __init__(self, cache: "ShardCache", name: str):
        self.cache, self.name = cache, name

    def __len__(self) -> int:
        return self.cache.rows

    def __getitem__(self, rows) -> torch.Tensor:
        rows = [rows] if isinstance(rows, int) else list(rows)
        return torch.from_numpy(np.stack([self.cache.read(self.name, int(r)) for r in rows]))

    def __iter__(self):
        return (self[[r]][0] for r in range(len(self)))


class ShardCache(dict):
    """The Session.cache mapping over a cache folder: "mean", "logvar", "once" (and "tokens" when it was encoded
    with an image encoder) as Columns, "captions" as the list of each image's caption."""

    def __init__(self, folder: Path, manifest: dict):
        self.manifest, self.images, self.rows = manifest, manifest["images"], manifest["rows"]
        self.size = manifest["shard_size"]
        self.shards = Shards(folder, manifest["shards"])
        names = set(self.shards.layout[0]) if self.shards.layout else set()
        super().__init__({name: Column(self, name) for name in sorted(names)}, captions=manifest["texts"])

    def read(self, name: str, row: int) -> np.ndarray:
        """Row `row` of the cache: image row % N of shard (row % N) // size, its mirror image's row after the
        shard's own images (cache_write.encode_shard)."""
        if not 0 <= row < self.rows:
            raise IndexError(f"row {row} of a cache of {self.rows}")
        image, mirrored = row % self.images, row >= self.images
        index, local = divmod(image, self.size)
        count = self.shards.records[index]["count"]
        return self.shards.row(index, name, local + count * mirrored)


def check_source(cfg):
    """--data or --cache, one of them; with --cache no --val-fraction (a held-out share of a cache is not made:
    give --val DIR, a folder of validation images, instead)."""
    if not cfg.cache:
        return check_folder("data", cfg.data, "training images")
    if cfg.data:
        raise TrainError(f"{arg('data')} and {arg('cache')}: give one of them (the cache holds the images' latents)")
    if cfg.val_fraction:
        raise TrainError(f"{arg('val_fraction')} with {arg('cache')}: no share of a cache is held out; give "
                         f"{arg('val')} DIR, a folder of validation images, instead")
    read_manifest(Path(cfg.cache))


def read_manifest(folder: Path) -> dict:
    """The manifest, or one line: no cache folder, a cache still being written (no manifest yet), another format."""
    if not folder.is_dir():
        raise TrainError(f"{arg('cache')} {folder}: no such folder; make it with python -m medti.data encode")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        written = any(folder.glob("shard-*.json"))
        state = "is still being written, or its encode was stopped" if written else "holds no cache"
        raise TrainError(f"{arg('cache')} {folder}: {state} (no {MANIFEST}); wait for the encode to finish, or "
                         "re-run the same encode command to complete it") from None
    except (OSError, ValueError) as e:
        raise TrainError(f"{arg('cache')} {folder}: {MANIFEST} cannot be read ({e}); re-run the encode "
                         "command that made this cache") from None
    if manifest.get("format") != FORMAT:
        raise TrainError(f"{arg('cache')} {folder}: cache format {manifest.get('format')!r}, this medti reads "
                         f"{FORMAT}; re-run python -m medti.data encode with this medti")
    return manifest


def verify(folder: Path, manifest: dict):
    """Every shard's bytes against the sha256 the manifest states (read in pieces: memory stays flat)."""
    for record in manifest["shards"]:
        path = folder / record["file"]
        if not path.is_file():
            raise TrainError(f"{arg('cache')} {folder}: {record['file']} is missing; re-run the encode command "
                             "(python -m medti.data encode) that made this cache")
        if sha256_file(path) != record["sha256"]:
            raise TrainError(f"{arg('cache')} {folder}: {record['file']} does not match its sha256 in {MANIFEST} "
                             "(corrupt or changed); re-run the encode command that made this cache")


def mismatch(name: str, typed, made, cache) -> str:
    """The refusal of a data flag typed otherwise than the cache was encoded, in the words the user types: a switch
    (--flip, --captions, --strict) is given or not, never "--flip False", and an empty value is "without --window"."""
    flag = arg(name)
    if isinstance(made, bool):
        if made:   # the cache's rows were made with the switch: a run from it has it too
            return f"{arg('cache')} {cache} was encoded with {flag}; add {flag}, or encode another cache without it"
        return f"{flag}: {arg('cache')} {cache} was encoded without {flag}; drop {flag}, or encode another with it"
    how = f"with {flag} {made}" if made not in ("", None) else f"without {flag}"
    return (f"{flag} {typed}: {arg('cache')} {cache} was encoded {how}; leave the flag out (the cache's is used), "
            "or encode another cache with it")


def with_cache_settings(cfg, manifest: dict):
    """cfg with the data flags the cache was made with (so the run's saved settings say what it trained on); a flag
    typed with another value is refused, naming both; --flip and --captions must be typed as the cache was made."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    for name in FIXED:
        typed, made = getattr(cfg, name), manifest[name]
        # --flip and --captions are refused unless typed as made: a flag that is off cannot say "as the cache"
        if typed != made and (typed != defaults[name] or name in ("flip", "captions")):
            raise TrainError(mismatch(name, typed, made, cfg.cache))
    if cfg.latents == "once" and cfg.seed != manifest["seed"]:
        raise TrainError(f"{arg('seed')} {cfg.seed}: {arg('cache')} {cfg.cache} drew its --latents once samples "
                         f"with --seed {manifest['seed']}; pass that seed, or encode the cache with this one")
    return dataclasses.replace(cfg, **{name: manifest[name] for name in FIXED})


def check_encoder(cfg, manifest: dict, encoder_sha256: str | None):
    """An image-conditioned run (--condition, --encoder) needs the tokens of its own encoder in the cache: the same
    release name (a folder by its last component, as the cache records it) and the same weights (sha256)."""
    made = manifest.get("encoder")
    if not cfg.condition:
        return
    if not made:
        raise TrainError(f"{arg('condition')} {cfg.condition}: {arg('cache')} {cfg.cache} holds no image tokens; "
                         f"encode it with --condition {cfg.condition} --encoder ENCODER")
    name = cfg.encoder if cfg.encoder == made["name"] else Path(cfg.encoder).name
    if made["name"] != name or made["sha256"] != encoder_sha256:
        raise TrainError(f"{arg('encoder')} {cfg.encoder}: {arg('cache')} {cfg.cache} holds the tokens of another "
                         f"encoder ({made['name']}, weights sha256 {made['sha256'][:12]}...); pass that encoder, or "
                         "encode another cache with this one")


def open_cache(cfg, model_sha256: str, encoder_sha256: str | None = None):
    """(cfg with the cache's data flags, the ShardCache) for --cache, after every check. encoder_sha256: of the
    weights of the run's --encoder, which must be the cache's (its tokens are that encoder's)."""
    folder = Path(cfg.cache)
    manifest = read_manifest(folder)
    if manifest["model_sha256"] != model_sha256:
        raise TrainError(f"{arg('cache')} {folder}: encoded with another model (sha256 {manifest['model_sha256'][:12]}"
                         f"..., {arg('model')} is {model_sha256[:12]}...): its VAE's latents are not this model's; "
                         "encode the cache with this model")
    check_encoder(cfg, manifest, encoder_sha256)
    cfg = with_cache_settings(cfg, manifest)
    verify(folder, manifest)
    return cfg, ShardCache(folder, manifest)
