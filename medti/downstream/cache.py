"""Features computed once per image and kept: OUT/features/<network>.safetensors holds one float32 row per image,
named by the sha256 of the image as the network is given it (its uint8 pixels and their shape).

Why the pixels' hash and not the file's: a volume's slices, a DICOM series and a --channels case are images that no
single file is, and the same file read with another --window is another image; the decoded pixels are exactly what
the network sees. The file's name is a hash of the network's name and weights' sha256, so features of two networks
(or two releases of one) never mix. The file is rewritten atomically after every CHUNK new images, so an interrupted
run keeps what it computed and a re-run computes only the rest.
"""
import hashlib
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..files.atomic import safetensors_bytes, write_atomic
from ..quality.features import Network, encode

CHUNK = 256   # images encoded between two saves: at most this many are computed again after an interruption
FOLDER = "features"


def image_sha256(image: torch.Tensor) -> str:
    """sha256 of an image's uint8 pixels [3, H, W], shape first: two images with the same bytes in other shapes
    differ."""
    digest = hashlib.sha256(str(tuple(image.shape)).encode())
    digest.update(image.contiguous().numpy().tobytes())
    return digest.hexdigest()


def cache_file(out: Path, net: Network) -> Path:
    tag = hashlib.sha256(f"{net.name}\n{net.weights_sha256}".encode()).hexdigest()[:16]
    return Path(out) / FOLDER / f"{tag}.safetensors"


def read_cache(path: Path) -> dict:
    """{image sha256: feature row} from a cache file; a damaged file is started afresh (it is ours, and only costs
    the time to compute it again)."""
    if not path.is_file():
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError):
        return {}


def cached_features(out: Path, net: Network, images: list, what: str, batch: int, progress=None) -> tuple:
    """([N, dim] float32 features of `images`, how many were read from the cache). New images are encoded in
    chunks of CHUNK, the cache rewritten after each."""
    path = cache_file(out, net)
    path.parent.mkdir(parents=True, exist_ok=True)
    cache = read_cache(path)
    keys = [image_sha256(image) for image in images]
    todo = list(dict.fromkeys(k for k in keys if k not in cache))
    reused = sum(k in cache for k in keys)
    rows = {k: i for i, k in enumerate(keys)}
    for start in range(0, len(todo), CHUNK):
        part = todo[start:start + CHUNK]
        features = encode(net, [images[rows[k]] for k in part], what, batch, progress)
        cache.update({k: row.clone() for k, row in zip(part, features, strict=True)})
        write_atomic(path, safetensors_bytes(cache, {"network": net.name, "weights_sha256": net.weights_sha256}))
    return torch.stack([cache[k] for k in keys]).float(), reused
