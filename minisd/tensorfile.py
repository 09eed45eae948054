"""The official single-file layout, read tensor by tensor: a `.safetensors` file (lazily) or a weights-only pickle,
the float dtypes a weight may be stored in, the component prefixes, and the check that no weight is NaN or
infinite. minisd.load builds models from it; minisd.diffusers presents a diffusers folder through the same
interface; the DINOv2 loader reads its release file with it.
"""
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from .config import LoadError
from .errors import spoken

# Official checkpoint prefixes (ldm's LatentDiffusion attribute names) of the UNet and the VAE.
UNET, VAE = "model.diffusion_model.", "first_stage_model."

# The float dtypes a weight may be stored in (safetensors' names). Anything else (I8, U8: a quantised file; BOOL)
# would be cast to float silently and give garbage or NaN images, so it is refused by name.
FLOATS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


@contextmanager
def utf8_name(path):
    """A name of the file at `path` that is valid UTF-8: `path` itself, or for a name in another encoding (which
    Python holds surrogate-escaped, PEP 383) a symbolic link to it with a plain name, in a temporary folder for the
    duration. safetensors' Rust reader and torch's memory-mapped load take a path only as UTF-8 text, and refuse
    such a name as if the file were damaged; through the link they read the file itself, lazily as ever (a
    mapping, once made, outlives the link)."""
    name = str(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        with tempfile.TemporaryDirectory() as folder:
            link = os.path.join(folder, "file")
            os.symlink(os.path.abspath(name), link)
            yield link
        return
    yield name


def open_safetensors(path):
    """safetensors' lazy reader (safe_open, PyTorch tensors on the CPU) of the file at `path`, whatever the encoding
    of its name: every .safetensors file medti and minisd read is opened here."""
    with utf8_name(path) as name:
        return safe_open(name, framework="pt", device="cpu")


class TensorFile:
    """Uniform read access to a `.safetensors` file (lazy, tensor by tensor) or a weights-only pickle."""

    def __init__(self, path: Path):
        self.path = path
        if path.suffix == ".safetensors":
            try:
                self._st = open_safetensors(path)
            except Exception as e:   # safetensors raises its own error types for a corrupt header
                raise LoadError(f"{path}: not a readable .safetensors file ({e})") from None
            self.keys = set(self._st.keys())
            self.metadata = self._st.metadata() or {}   # the header's __metadata__: str -> str
        else:
            self._st, self._dict = None, self._read_pickle(path)
            self.keys, self.metadata = set(self._dict), {}

    @staticmethod
    def _read_pickle(path: Path) -> dict:
        # Never a full unpickle: weights_only=True allows tensors and plain containers only.
        try:
            with utf8_name(path) as name:
                data = torch.load(name, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise LoadError(f"{path}: refused by torch.load(weights_only=True) ({type(e).__name__}); official .ckpt "
                            "files pickle a Lightning object -- use the model's .safetensors file instead") from None
        data = data.get("state_dict", data) if isinstance(data, dict) else data
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise LoadError(f"{path}: holds no state dict of tensors")
        return data

    def shape(self, key: str) -> tuple:
        return tuple(self._st.get_slice(key).get_shape()) if self._st else tuple(self._dict[key].shape)

    def dtype(self, key: str) -> str:
        """The stored dtype in safetensors' names (F16, BF16, F32, I8, ...), read from the header only."""
        if self._st:
            return self._st.get_slice(key).get_dtype()
        found = self._dict[key].dtype
        return next((name for name, dtype in FLOATS.items() if dtype == found), str(found).replace("torch.", ""))

    def get(self, key: str) -> torch.Tensor:
        return self._st.get_tensor(key) if self._st else self._dict[key]


def check_finite(file: TensorFile, prefix: str, state: dict, dtype):
    """Refuse NaN/inf weights, which give black or NaN images without a word. Checked after the cast, so a fp32
    weight beyond fp16's range (65504) that became inf is caught too, and named as such.

    Per tensor one reduction, min and max (torch.aminmax): NaN propagates through both and +-inf shows in one, so
    both are finite exactly when every element is; no overflow, unlike a sum in half precision. One
    synchronisation per component. Cost, measured on a shared 2-core CPU: 0.4-0.6 s per 2.5 GB of fp32 or fp16
    weights -- about one read of the bytes, less than casting an fp16 file to fp32 (0.5-5 s per 2.5 GB there); on
    a GPU, milliseconds. The tiny test model (924 tensors, 19 MB): 17 ms with one thread (0.8 s with two threads
    on that VM under load, where every parallel op waits for a busy core). It reads every weight at load rather
    than at the first UNet call."""
    quick = torch.stack([torch.stack(torch.aminmax(t)).float() for t in state.values()])
    if bool(torch.isfinite(quick).all()):
        return
    name = next(name for name, tensor in state.items() if not torch.isfinite(tensor).all())
    if torch.isfinite(file.get(prefix + name)).all():
        fp32 = spoken("dtype", "fp32", "torch.float32")
        raise LoadError(f"{file.path}: {prefix}{name} overflows {str(dtype).replace('torch.', '')} -- its values "
                        f"exceed that dtype's range; load it in float32 ({fp32})")
    raise LoadError(f"{file.path}: {prefix}{name} holds NaN or inf values -- a damaged file or one saved from a "
                    "diverged training run; use another copy of the model")
