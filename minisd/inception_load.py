"""Finding, checking and loading torch-fidelity's Inception-v3 weights file for minisd.inception: torch.hub's
cache or a download (the file's own sha256 prefix checked), a file the user passes, and a strict load that
names any foreign tensor.
"""
from pathlib import Path
from urllib.parse import urlparse

import torch

from .config import LoadError
from .errors import arg
from .hub import download_file, hub_reachable, sha256_file
from .inception import InceptionV3
from .tensorfile import open_safetensors

URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"


FILENAME = URL.rsplit("/", 1)[1]


# torch.hub naming: the part of the file name after the last "-" is the start of the file's sha256.
OFFICIAL_SHA256_PREFIX = "6726825d"


# In the file, not in our model: the graph's 1008-way classifier (1000 ImageNet classes + 8 unused), for Inception
# Score, not FID. Its shape is still checked: torchvision's Inception-v3 files have our names but a 1000-way `fc`.
UNUSED = {"fc.weight": (1008, 2048), "fc.bias": (1008,)}


def fetch_hint() -> str:
    return f"fetch {URL} and pass it with {arg('inception')} FILE"


def read_tensors(path: Path) -> dict:
    """A state dict from a .safetensors file or a torch pickle."""
    if not path.is_file():
        raise LoadError(f"{path}: no such file; {fetch_hint()}")
    try:   # weights_only=True: tensors and plain containers only, never a full unpickle
        is_safetensors = path.suffix == ".safetensors"
        data = _safetensors(path) if is_safetensors else torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # truncated, corrupt, or a pickle of objects other than tensors: all refused alike
        raise LoadError(f"{path}: not a readable weights file ({type(e).__name__}; truncated, or a pickle of more "
                        f"than tensors); {fetch_hint()}") from None
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise LoadError(f"{path}: holds a {type(data).__name__}, not a state dict of tensors; {fetch_hint()}")
    return data


def _safetensors(path: Path) -> dict:
    with open_safetensors(path) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def checked_state_dict(path: Path, tensors: dict, model: InceptionV3) -> dict:
    """The file's tensors for `model`, as float32, after a strict check of names and shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # `num_batches_tracked`, batch norm's training counter: in torch-fidelity's module, not in the release file.
    missing = [k for k in expected if k not in tensors]
    unknown = [k for k in tensors if k not in expected and k not in UNUSED and not k.endswith(".num_batches_tracked")]
    wrong = [f"{k} has shape {list(tensors[k].shape)}, not {list(shape)}"
             for k, shape in {**expected, **UNUSED}.items() if k in tensors and tuple(tensors[k].shape) != shape]
    for problems, what in ((missing, "keys missing"), (unknown, "unknown keys"), (wrong, "wrong shapes")):
        if problems:
            raise LoadError(f"{path}: not torch-fidelity's Inception-v3 weights ({len(problems)} {what}, e.g. "
                            f"{problems[0]}); {fetch_hint()}")
    return {k: tensors[k].to(torch.float32).contiguous() for k in expected}


def load_inception(path) -> InceptionV3:
    """The network with the weights of `path` (.pth or .safetensors), float32, eval mode, on the CPU."""
    path = Path(path)
    with torch.device("meta"):   # no random init to overwrite: the file's tensors are assigned in place
        model = InceptionV3()
    model.load_state_dict(checked_state_dict(path, read_tensors(path), model), strict=True, assign=True)
    # channels_last: oneDNN's CPU convolutions ~1.5x faster (32 images at 299²: 3.2 -> 2.1 s); fp32 rounding only
    return model.to(memory_format=torch.channels_last).requires_grad_(False).eval()


def cache_path() -> Path:
    """Where torch-fidelity (and so torchmetrics) keeps the file: torch.hub's checkpoint folder, named by the URL."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FILENAME


def inception_weights(path=None) -> Path:
    """The weights file to use: `path` if given; else torch-fidelity's cached copy, downloaded into that cache
    (never into the project) if absent. Offline, a fast one-line error says what to fetch."""
    if path is not None:
        if not Path(path).is_file():
            raise LoadError(f"{arg('inception')} {path}: no such file; {fetch_hint()}")
        return Path(path)
    cached = cache_path()
    if cached.is_file():
        return cached
    if not hub_reachable(URL):   # a 3 s TCP probe instead of urllib's long timeouts
        raise LoadError(f"Inception-v3 weights for FID are not in {cached.parent} and {urlparse(URL).hostname} "
                        f"cannot be reached; {fetch_hint()}")
    return download_file(URL, cached, OFFICIAL_SHA256_PREFIX, fetch_hint())


def is_official(path) -> bool:
    """Whether a file is torch-fidelity's release (by sha256 prefix): only then is an FID comparable with papers."""
    return sha256_file(path).startswith(OFFICIAL_SHA256_PREFIX)
