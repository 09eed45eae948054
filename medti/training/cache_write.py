"""Writing an on-disk latent cache: `python -m medti.data encode --data DIR --model M --out CACHE` (medti/data.py).

A set larger than memory is read one image at a time (medti.dataset.folder.Reading: the same skip rules and pseudonyms
as training from the folder), encoded by the VAE in shards of --shard-size images (a multiple of 4, so the VAE sees
exactly the chunks of 4 it sees when the whole set is encoded at once: medti.training.objective.cache_latents), and
written as

    CACHE/shard-00000.safetensors   mean, logvar, once [rows, 4, h, w] fp32 (+ tokens [rows, count, width] with an
                                    image encoder): the shard's images, then with --flip their mirror images
    CACHE/shard-00000.json          the shard's sha256 and what it was made from: written after the shard, so a
                                    shard without it is unfinished
    CACHE/manifest.json             written last: the cache is complete when it exists (medti.training.cache_read)
    CACHE/names.private.tsv         pseudonyms -> paths, the one file with paths in it: keep it private

A killed encode re-run with the same flags keeps every shard whose .json matches and whose bytes hash to the sha256
it states. Under torchrun, rank r encodes shards i with i % world == r; rank 0 writes the manifest after a barrier.
"""
import hashlib
import json
from pathlib import Path

from minisd.hub import sha256_file

from ..cli import end_status, status
from ..dataset.folder import Reading, as_tensor, pseudonyms
from ..files.atomic import safetensors_bytes, text_bytes, write_atomic
from ..files.pseudonyms import KEY, key_rows, write_key
from . import TrainError, distributed
from .objective import cache_latents, cache_tokens

FORMAT = 1               # the cache format's version, in the manifest: a reader refuses any other
MANIFEST = "manifest.json"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def digest(value) -> str:
    """sha256 of a JSON value's canonical text: how a shard's record names the settings and images it was made of."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def finished(folder: Path, index: int, settings: dict, names: list) -> dict | None:
    """The record of shard `index` if it was written with these settings from these images and its bytes still hash
    to the sha256 it states (a resumed encode keeps it), else None (it is encoded again)."""
    record_file = folder / shard_name(index).replace(".safetensors", ".json")
    try:
        record = json.loads(record_file.read_text())
    except (OSError, ValueError):
        return None
    if record.get("settings") != digest(settings) or record.get("images") != digest(names):
        return None
    if sha256_file(folder / shard_name(index)) != record.get("sha256"):
        return None
    return record


def write_shard(folder: Path, index: int, columns: dict, settings: dict, names: list) -> dict:
    """The shard, then its record (so a record always describes a whole shard)."""
    data = safetensors_bytes(columns)
    write_atomic(folder / shard_name(index), data)
    record = {"file": shard_name(index), "sha256": hashlib.sha256(data).hexdigest(), "images": digest(names),
              "count": len(names), "settings": digest(settings)}
    write_atomic(folder / shard_name(index).replace(".safetensors", ".json"), text_bytes(json.dumps(record)))
    return record


def encode_shard(sd, arrays: list, first: int, flip: bool, seed: int) -> dict:
    """The columns of one shard: cache_latents (and cache_tokens with an image encoder) of its images, whose index
    in the set starts at `first` (the --latents once draws are per image: objective.once_noise)."""
    images = as_tensor(arrays)
    columns = cache_latents(sd, images, flip, seed, first)
    if getattr(sd, "image", None) is not None:
        columns["tokens"] = cache_tokens(sd.image, images, flip)
    return columns


def encode(sd, reading: Reading, folder: Path, settings: dict, shard_size: int) -> dict:
    """Stream `reading` into shards in `folder` (this rank's shards only; the others are skipped unread by the VAE),
    then (rank 0, after every rank is done) the key file and the manifest. Returns the manifest."""
    rank, size = distributed.world()
    names, shared, patients, captions, arrays, written, kept = [], [], [], [], [], 0, 0
    files = len(reading.survey.found)

    def flush():
        nonlocal written, kept
        first = len(names) - len(arrays)   # the set's index of the shard's first image
        index = first // shard_size
        mine = shared[first:]
        what = f"left to rank {index % size}"
        if index % size == rank:
            if finished(folder, index, settings, mine):
                kept, what = kept + 1, "kept from an earlier run"
            else:
                write_shard(folder, index, encode_shard(sd, arrays, first, settings["flip"], settings["seed"]),
                            settings, mine)
                written, what = written + 1, "encoded"
        arrays.clear()
        if distributed.main_process():   # an archive takes hours: say how far it is, on one line rewritten in place
            status(f"--data ({files} file(s)): {len(names)} image(s) read; {shard_name(index)} {what}")

    for array, name, pseudonym, patient, _, caption in reading:
        arrays.append(array)
        names.append(name)
        shared.append(pseudonym)
        patients.append(patient)
        captions.append(caption)
        if len(arrays) == shard_size:
            flush()
    if arrays:
        flush()
    end_status()
    patients, fingerprint, _ = reading.finish(patients, len(names))
    if distributed.main_process():
        print(f"--out: {written} shard(s) encoded, {kept} kept from an earlier run (rank {rank})")
    distributed.barrier()   # every rank's shards are on disk before the manifest says the cache is complete
    manifest = {**settings, "images": len(names), "rows": len(names) * (2 if settings["flip"] else 1),
                "data_sha256": fingerprint, "pseudonyms": shared, "texts": captions,
                "patients": [pseudonyms(patients)[p] for p in patients]}
    if distributed.main_process():
        manifest["shards"] = collect(folder, settings, shared, shard_size)
        write_key(folder / KEY, key_rows(shared, names, reading.skipped))
        write_atomic(folder / MANIFEST, text_bytes(json.dumps(manifest, indent=1)))
    return manifest


def collect(folder: Path, settings: dict, shared: list, shard_size: int) -> list:
    """Every shard's record, verified (rank 0 reads the ones the other ranks wrote)."""
    records = []
    for index, first in enumerate(range(0, len(shared), shard_size)):
        record = finished(folder, index, settings, shared[first:first + shard_size])
        if record is None:
            raise TrainError(f"--out {folder}: {shard_name(index)} is missing or does not match its record after "
                             "encoding; re-run the same encode command")
        records.append({key: record[key] for key in ("file", "sha256", "count")})
    return records
