"""Getting a preset's official file: download it with huggingface_hub, fail fast offline, verify it.

Why a module of its own: `minisd.load` is about the model (keys, shapes, dtypes); where a file comes from and
whether it is the official one is a separate job, and the only part of minisd that touches the network.

Why minisd keeps no hash cache: huggingface_hub's cache is content-addressed. It stores a Git-LFS file under
`blobs/<etag>`, and an LFS file's etag is its sha256 (huggingface_hub file_download.py: `blob_path =
os.path.join(storage_folder, "blobs", etag)`; its cache docs: blobs are "identified by their git-sha or sha256").
So the file is hashed once, when this call downloads it; on later loads a blob named by the preset's sha256 with
the preset's size is that file. medti, which records the hash of any model with every image, keeps its own cache
(medti/files/hashes.py) for files that do not name their hash.
"""
import hashlib
import os
import shutil
import socket
import sys
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from .config import LoadError, presets
from .errors import INTERFACE

# How long to wait for a TCP connection to the hub before calling it offline. A reachable hub answers in well under
# a second; 3 s leaves room for a slow link, and is what an offline user waits instead of huggingface_hub's ~25 s
# of HEAD retries (measured here: 28 s before this check).
PROBE_SECONDS = 3.0
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def sha256_file(path) -> str:
    """sha256 of a file's bytes, read in 16 MiB chunks (memory stays flat for a 5 GB checkpoint)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def local_copy_hint(name: str) -> str:
    """How to load a copy of a preset's file from disk, in the words of the interface in use."""
    filename = presets()[name]["filename"]
    if INTERFACE.get() == "cli":
        return f"--model /path/to/{filename} --config {name}"
    return f"minisd.load('/path/to/{filename}', config='{name}')"


def hub_reachable(endpoint: str) -> bool:
    """Whether a TCP connection to the hub's host opens within PROBE_SECONDS. Behind a proxy a direct connection
    says nothing, so then we leave it to huggingface_hub (True)."""
    if any(os.environ.get(v) for v in PROXY_VARIABLES):
        return True
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=PROBE_SECONDS).close()
        return True
    except OSError:   # no DNS, no route, refused, timed out: all mean "cannot download now"
        return False


def fetch(name: str) -> Path:
    """The verified local path of preset `name`'s file: from huggingface_hub's cache, or downloaded into it."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    preset = presets()[name]
    repo, filename = preset["repo"], preset["filename"]
    cached = try_to_load_from_cache(repo, filename)
    cached = Path(cached) if isinstance(cached, str) else None   # it returns a sentinel object for "known absent"
    offline = constants.HF_HUB_OFFLINE or not hub_reachable(constants.ENDPOINT)
    if offline and cached is None:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{constants.ENDPOINT} cannot be reached"
        raise LoadError(f"preset {name}: {repo}/{filename} is not downloaded yet and {why}; connect and retry, or "
                        f"get the file elsewhere and load it with {local_copy_hint(name)}")
    try:
        # Offline with a cached copy: local_files_only skips the HEAD request (and its retries) entirely.
        path = Path(hf_hub_download(repo, filename, local_files_only=offline))
    except Exception as e:   # no access, hub errors, disk full: all end the same way for the user
        raise LoadError(f"cannot download {repo}/{filename} ({type(e).__name__}); set HF_HUB_OFFLINE=1 to use "
                        f"downloaded files only, or load a local copy with {local_copy_hint(name)}") from None
    verify(path, preset, name, downloaded_now=cached is None)
    return path


def verify(path: Path, preset: dict, name: str, downloaded_now: bool):
    """The file is the preset's: size first (cheap), then sha256. Hashing 5 GB takes several seconds, so it is done
    when the file was downloaded now, or when its blob is not named by the preset's sha256 (see the docstring)."""
    size = path.stat().st_size
    if preset.get("size") and size != preset["size"]:
        raise LoadError(f"{path}: {size} bytes, but preset {name} is {preset['size']} bytes; delete it and retry")
    expected = preset.get("sha256")
    if not expected or (not downloaded_now and path.resolve().name == expected):
        return
    if sha256_file(path) != expected:
        raise LoadError(f"{path}: sha256 differs from preset {name}'s ({expected[:12]}...); "
                        "the download is corrupt or not the official file -- delete it and retry")


def download_file(url: str, target: Path, sha256_prefix: str, hint: str) -> Path:
    """A plain URL -> `target`, atomically: a temporary name in the target's folder, fsync, then a rename only if the
    file's sha256 starts with `sha256_prefix` (torch.hub's file naming carries it). A failed or interrupted download
    leaves nothing behind. `hint`, what the user can do instead, ends every error. For files outside the HF hub
    (torch-fidelity's Inception weights); the caller probes with hub_reachable first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    print(f"downloading {url} to {target}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
            f.flush()
            os.fsync(f.fileno())
        if not sha256_file(tmp).startswith(sha256_prefix):
            raise LoadError(f"{url}: the download's sha256 does not start with {sha256_prefix} (corrupt); retry, or "
                            f"{hint}")
        os.replace(tmp, target)
    except OSError as e:   # urllib's URLError/HTTPError, timeouts and disk errors are all OSError
        raise LoadError(f"cannot download {url} ({type(e).__name__}); {hint}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target
