"""The sha256 of model and embedding files, remembered between runs.

Why medti keeps this cache, not minisd: medti records the hash of the model (any file, also a local one that does
not name its hash) and of every embedding with each image and each trained embedding, so it hashes 5 GB files at
every run without it. minisd only verifies preset downloads, which huggingface_hub's content-addressed cache
makes cheap (minisd/hub.py).

The cache is a convenience, never trusted: a file it cannot read or parse, or an entry of the wrong form, is
ignored and rebuilt; an entry counts only for the same path, size and modification time (ns), so a changed file
is hashed again; and a cache that cannot be written (read-only home) only costs the time to hash again next run.
"""
import hashlib
import json
import os
import re
from pathlib import Path

from minisd.hub import sha256_file

from .atomic import write_atomic

FORMAT = 1   # bumped if the layout below changes; a cache of another format is rebuilt
HEX64 = re.compile(r"[0-9a-f]{64}")


def cache_path() -> Path:
    """~/.cache/medti/sha256.json, or $MEDTI_CACHE/sha256.json."""
    return Path(os.environ.get("MEDTI_CACHE", Path.home() / ".cache" / "medti")) / "sha256.json"


def read_cache(path: Path) -> dict:
    """{resolved path: {"size", "mtime_ns", "sha256"}} of the entries that have the right form; {} if unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):   # absent, unreadable, or not JSON (a torn or foreign file)
        return {}
    files = data.get("files") if isinstance(data, dict) and data.get("format") == FORMAT else None
    if not isinstance(files, dict):
        return {}
    return {name: entry for name, entry in files.items() if isinstance(entry, dict)
            and isinstance(entry.get("size"), int) and isinstance(entry.get("mtime_ns"), int)
            and isinstance(entry.get("sha256"), str) and HEX64.fullmatch(entry["sha256"])}


def sha256_of(path) -> str:
    """sha256 of a file, hashed once per (path, size, mtime) and remembered in cache_path(); of a folder (a
    diffusers model), see folder_sha256."""
    path = Path(path).resolve()
    if path.is_dir():
        return folder_sha256(path)
    stat = path.stat()
    memo = cache_path()
    files = read_cache(memo)
    entry = files.get(str(path))
    if entry and (entry["size"], entry["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns):
        return entry["sha256"]
    digest = sha256_file(path)
    # One entry per path: a changed file replaces its old entry, so the cache does not grow with every edit.
    files[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(memo, json.dumps({"format": FORMAT, "files": files}, indent=1, sort_keys=True).encode())
    except OSError:   # read-only or full home: the hash is still right, only not remembered
        pass
    return digest


def folder_sha256(folder: Path) -> str:
    """A diffusers folder has no one file to hash: the sha256 of its listing, one line "relative/path sha256" per
    file in sorted order, each file hashed (and cached) by sha256_of. Hidden files and folders (.cache/ left by a
    hub download, .DS_Store) are not part of the model and are left out; renaming or changing any other file changes
    the hash."""
    files = sorted(f for f in folder.rglob("*") if f.is_file() and
                   not any(part.startswith(".") for part in f.relative_to(folder).parts))
    listing = "".join(f"{f.relative_to(folder).as_posix()} {sha256_of(f)}\n" for f in files)
    return hashlib.sha256(listing.encode()).hexdigest()
