"""Loading SD2 from the official single-file checkpoint layout.

Every key of the file goes to exactly one place: a component, by the prefix table below, loaded with a
strict `load_state_dict`; or the named ignore list. Anything else is an error that names the key. Modules
are built on the meta device and the file's tensors assigned to them, so memory stays near the weights' size.
"""
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .clip import TextTransformer
from .config import LoadError, ModelConfig, default_dtype, load_config, presets
from .schedule import alphas_cumprod
from .tokenizer import Tokenizer
from .unet import UNetModel
from .vae import AutoencoderKL

# Official checkpoint prefixes (ldm's LatentDiffusion attribute names) -> our components.
PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": "cond_stage_model.model."}

# Tensors the file holds that SD2 inference never reads: ldm's 12 DDPM schedule buffers (we compute the
# schedule; `alphas_cumprod` is compared with it as a self-check) and CLIP's contrastive head. The text
# tower's last block is ignored too (see `ignored_prefixes`).
IGNORED = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale",
)

# What foreign layouts look like, for error messages: key prefix -> what the file probably is.
FOREIGN = {
    "cond_stage_model.transformer.": "an SD1.x checkpoint (OpenAI CLIP ViT-L/14 text encoder, 768 wide)",
    "conditioner.": "an SDXL checkpoint",
    "model_ema.": "a training checkpoint with an EMA copy; use the ema-pruned release file",
    "down_blocks.": "a diffusers UNet file; convert the whole folder with tools/convert_diffusers.py",
    "text_model.": "a transformers CLIP text encoder file; convert the whole folder with tools/convert_diffusers.py",
    "encoder.down_blocks.": "a diffusers VAE file; convert the whole folder with tools/convert_diffusers.py",
}


class TensorFile:
    """Uniform read access to a `.safetensors` file (lazy, tensor by tensor) or a weights-only pickle."""

    def __init__(self, path: Path):
        self.path = path
        if path.suffix == ".safetensors":
            try:
                self._st = safe_open(str(path), framework="pt", device="cpu")
            except Exception as e:   # safetensors raises its own error types for a corrupt header
                raise LoadError(f"{path}: not a readable .safetensors file ({e})") from None
            self.keys = set(self._st.keys())
        else:
            self._st, self._dict = None, self._read_pickle(path)
            self.keys = set(self._dict)

    @staticmethod
    def _read_pickle(path: Path) -> dict:
        # Never a full unpickle: weights_only=True allows tensors and plain containers only.
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise LoadError(f"{path}: refused by torch.load(weights_only=True) ({type(e).__name__}); official .ckpt "
                            "files pickle a Lightning object -- use the model's .safetensors file instead") from None
        data = data.get("state_dict", data) if isinstance(data, dict) else data
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise LoadError(f"{path}: holds no state dict of tensors")
        return data

    def shape(self, key: str) -> tuple:
        return tuple(self._st.get_slice(key).get_shape()) if self._st else tuple(self._dict[key].shape)

    def get(self, key: str) -> torch.Tensor:
        return self._st.get_tensor(key) if self._st else self._dict[key]


def ignored_prefixes(cfg: ModelConfig) -> tuple:
    # SD2 runs text blocks 0..layers-2 ("penultimate"); the last block is stored but never used.
    return (f"cond_stage_model.model.transformer.resblocks.{cfg.text.layers - 1}.",)


def check_keys(file: TensorFile, cfg: ModelConfig):
    """Every key is a component's or ignored by name; otherwise say what the file looks like."""
    skip = ignored_prefixes(cfg)
    for key in sorted(file.keys):
        if key in IGNORED or key.startswith(skip) or key.startswith(tuple(PREFIXES.values())):
            continue
        hint = next((what for prefix, what in FOREIGN.items() if key.startswith(prefix)), None)
        raise LoadError(f"{file.path}: unexpected key {key}" + (f" -- this looks like {hint}" if hint else
                        " (not part of the SD2 single-file layout)"))


def load_component(file: TensorFile, prefix: str, module: torch.nn.Module, skip: tuple, dtype, device):
    """Strict load of one meta-built component: names and shapes must match exactly."""
    expected = module.state_dict()
    present = {k[len(prefix):] for k in file.keys
               if k.startswith(prefix) and k not in IGNORED and not k.startswith(skip)}
    missing, unexpected = sorted(set(expected) - present), sorted(present - set(expected))
    if unexpected:
        raise LoadError(f"{file.path}: unexpected key {prefix}{unexpected[0]}" +
                        (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "") +
                        " -- the file's architecture differs from the config; pass a matching config=")
    if missing:
        raise LoadError(f"{file.path}: missing key {prefix}{missing[0]}" +
                        (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") +
                        " -- not a complete SD2 single-file checkpoint")
    for name, tensor in expected.items():
        found = file.shape(prefix + name)
        if found != tuple(tensor.shape):
            hint = (" -- a 768-wide text tower: this is an SD1.x file, minisd loads SD2 files"
                    if name == "token_embedding.weight" and found[-1:] == (768,) else
                    " -- pass a config= that matches this file")
            raise LoadError(f"{file.path}: {prefix}{name} has shape {list(found)}, "
                            f"expected {list(tensor.shape)}{hint}")
    # Cast tensor by tensor as it is read, so a fp32 file loaded as fp16 never holds both copies.
    state = {name: file.get(prefix + name).to(device=device, dtype=dtype) for name in expected}
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def sha256_of(path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) in ~/.cache/medti/sha256.json ($MEDTI_CACHE): hashing
    5 GB takes a while, and generation records the model's hash with every image."""
    path = Path(path).resolve()
    stat = path.stat()
    memo = Path(os.environ.get("MEDTI_CACHE", Path.home() / ".cache" / "medti")) / "sha256.json"
    seen = json.loads(memo.read_text()) if memo.is_file() else {}
    stamp = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    if stamp not in seen:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
        seen[stamp] = digest.hexdigest()
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(seen, indent=1))
        os.replace(tmp, memo)
    return seen[stamp]


def fetch(name: str) -> Path:
    """Download one preset's file with huggingface_hub into its standard cache, and verify it."""
    preset = presets()[name]
    from huggingface_hub import hf_hub_download
    try:
        path = Path(hf_hub_download(preset["repo"], preset["filename"]))
    except Exception as e:   # offline, no access, hub errors: all end the same way for the user
        raise LoadError(f"cannot download {preset['repo']}/{preset['filename']} ({type(e).__name__}); "
                        f"offline? get the file elsewhere and use minisd.load('/path/to/{preset['filename']}', "
                        f"config='{name}')") from None
    verify(path, preset, name)
    return path


def verify(path: Path, preset: dict, name: str):
    """The downloaded file is the preset's: size first (cheap), then sha256 (once per file, see sha256_of)."""
    size = path.stat().st_size
    if preset.get("size") and size != preset["size"]:
        raise LoadError(f"{path}: {size} bytes, but preset {name} is {preset['size']} bytes; delete it and retry")
    if preset.get("sha256") and sha256_of(path) != preset["sha256"]:
        raise LoadError(f"{path}: sha256 differs from preset {name}'s ({preset['sha256'][:12]}...); "
                        "the download is corrupt or not the official file -- delete it and retry")


@dataclass
class StableDiffusion:
    """The loaded model: components as attributes, plus the facts samplers need."""
    tokenizer: Tokenizer
    text_encoder: TextTransformer
    unet: UNetModel
    vae: AutoencoderKL
    config: ModelConfig
    path: Path | None = None
    preset: str | None = None

    @property
    def scale_factor(self) -> float:
        return self.config.scale_factor

    @property
    def prediction(self) -> str:
        return self.config.prediction


def build(cfg: ModelConfig, device="meta") -> StableDiffusion:
    """The three networks of a config, on `device` (meta: shapes only, no memory)."""
    with torch.device(device):
        return StableDiffusion(Tokenizer(), TextTransformer(cfg.text), UNetModel(cfg.unet), AutoencoderKL(cfg.vae),
                               cfg)


def resolve(model, config) -> tuple:
    """(file path, ModelConfig, preset name or None) for a preset name or a local file."""
    table = presets()
    if config is None and str(model) in table:
        return fetch(str(model)), load_config(str(model)), str(model)
    path = Path(model)
    if path.is_dir():
        what = "a diffusers folder: convert it with python tools/convert_diffusers.py" \
            if (path / "unet").is_dir() else "a folder"
        raise LoadError(f"{path}: {what}; minisd loads one single-file checkpoint (.safetensors)")
    if not path.is_file():
        raise LoadError(f"{model}: no such file, and not a preset ({', '.join(table)})")
    if config is None:
        guess = next((n for n, p in table.items() if p["filename"] == path.name), None)
        raise LoadError(f"{path}: which model is this? pass config=" +
                        (f"'{guess}'" if guess else "a preset name or a JSON config") + " (minisd does not guess)")
    return path, load_config(config), str(config) if str(config) in table else None


def load(model, config=None, dtype=None, device=None) -> StableDiffusion:
    """Load SD2 from a preset name ("sd2-base", ...; downloaded once) or a local single-file checkpoint.

    config: a preset name, a JSON config path or dict (needed for a local file). dtype: default fp16 on CUDA,
    fp32 elsewhere. device: default "cpu".
    """
    path, cfg, preset = resolve(model, config)
    device = torch.device(device or "cpu")
    dtype = dtype or default_dtype(device)
    file = TensorFile(path)
    check_keys(file, cfg)
    if "alphas_cumprod" in file.keys:
        ours = alphas_cumprod()
        theirs = file.get("alphas_cumprod").float()
        if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=0, atol=1e-6):
            raise LoadError(f"{path}: its alphas_cumprod is not SD2's schedule (linear 0.00085..0.012 in sqrt beta)")
    sd = build(cfg)
    skip = ignored_prefixes(cfg)
    for name, prefix in PREFIXES.items():
        load_component(file, prefix, getattr(sd, name), skip, dtype, device)
    sd.path, sd.preset = path, preset
    return sd


