"""Loading SD2 from the official single-file checkpoint layout.

Every key of the file goes to exactly one place: a component, by the prefix table below, loaded with a
strict `load_state_dict`; or the named ignore list. Anything else is an error that names the key. Modules
are built on the meta device and the file's tensors assigned to them, so memory stays near the weights' size.
"""
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .clip import TextTransformer
from .config import LoadError, ModelConfig, default_dtype, load_config, presets
from .errors import arg
from .hub import fetch
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

# The float dtypes a weight may be stored in (safetensors' names). Anything else (I8, U8: a quantised file; BOOL)
# would be cast to float silently and give garbage or NaN images, so it is refused by name.
FLOATS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


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

    def dtype(self, key: str) -> str:
        """The stored dtype in safetensors' names (F16, BF16, F32, I8, ...), read from the header only."""
        if self._st:
            return self._st.get_slice(key).get_dtype()
        found = self._dict[key].dtype
        return next((name for name, dtype in FLOATS.items() if dtype == found), str(found).replace("torch.", ""))

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


def check_stored(file: TensorFile, prefix: str, expected: dict):
    """Shapes and dtypes from the file's header, before any tensor is read."""
    for name, tensor in expected.items():
        found = file.shape(prefix + name)
        if found != tuple(tensor.shape):
            hint = (" -- a 768-wide text tower: this is an SD1.x file, minisd loads SD2 files"
                    if name == "token_embedding.weight" and found[-1:] == (768,) else
                    f" -- pass a {arg('config')} that matches this file")
            raise LoadError(f"{file.path}: {prefix}{name} has shape {list(found)}, "
                            f"expected {list(tensor.shape)}{hint}")
        stored = file.dtype(prefix + name)
        if stored not in FLOATS:
            raise LoadError(f"{file.path}: {prefix}{name} is stored as {stored}, not as floats -- a quantised or "
                            f"damaged file? minisd loads weights stored as {', '.join(FLOATS)}")


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


def load_component(file: TensorFile, prefix: str, module: torch.nn.Module, skip: tuple, dtype, device):
    """Strict load of one meta-built component: names, shapes and float dtypes must match, values be finite."""
    expected = module.state_dict()
    present = {k[len(prefix):] for k in file.keys
               if k.startswith(prefix) and k not in IGNORED and not k.startswith(skip)}
    missing, unexpected = sorted(set(expected) - present), sorted(present - set(expected))
    if unexpected:
        raise LoadError(f"{file.path}: unexpected key {prefix}{unexpected[0]}" +
                        (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "") +
                        f" -- the file's architecture differs from the config; pass a matching {arg('config')}")
    if missing:
        raise LoadError(f"{file.path}: missing key {prefix}{missing[0]}" +
                        (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") +
                        " -- not a complete SD2 single-file checkpoint")
    check_stored(file, prefix, expected)
    # Cast tensor by tensor as it is read, so a fp32 file loaded as fp16 never holds both copies.
    state = {name: file.get(prefix + name).to(device=device, dtype=dtype) for name in expected}
    check_finite(file, prefix, state, dtype)
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def check_schedule(file: TensorFile):
    """The file's alphas_cumprod, if it has one, is SD2's schedule -- compared at the precision the file stores.

    Tolerance: |file - ours| <= 1e-6 + eps(file dtype) * |ours|. ldm computes the schedule in float64 and stores
    it rounded to the file's dtype; ours is float32 (minisd.schedule, as diffusers computes it). In float32 files
    the two differ by < 1e-7 absolute (the 1e-6 term). Rounded to fp16 or bf16 they can land on neighbouring
    values where the exact value lies near a rounding boundary: one unit in the last place of that dtype, at most
    eps * |value| (fp16: 2**-10, bf16: 2**-7 relative). A different schedule differs by far more: SD1's linear
    betas are 0.25 apart at t = 500."""
    if "alphas_cumprod" not in file.keys:
        return
    theirs = file.get("alphas_cumprod")
    name = file.dtype("alphas_cumprod")
    ours = alphas_cumprod()
    if name not in FLOATS or tuple(theirs.shape) != tuple(ours.shape):
        raise LoadError(f"{file.path}: its alphas_cumprod is {name} {list(theirs.shape)}, not SD2's float [1000]")
    tolerance = 1e-6 + torch.finfo(FLOATS[name]).eps * ours.abs()
    if not ((theirs.double() - ours.double()).abs() <= tolerance).all():
        raise LoadError(f"{file.path}: its alphas_cumprod is not SD2's schedule (linear 0.00085..0.012 in sqrt "
                        "beta) -- a model trained with another noise schedule, which minisd does not sample")


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


def spoken(name: str, cli_value: str, python_value: str | None = None) -> str:
    """An argument with its value as the user types it: `config='x'` in Python, `--config x` on the command line
    (minisd.errors.arg says which interface is in use)."""
    flag = arg(name)
    return f"{flag}{python_value or repr(cli_value)}" if flag.endswith("=") else f"{flag} {cli_value}"


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
        raise LoadError(f"{path}: which model is this? " + (f"pass {spoken('config', guess)}" if guess else
                        f"pass a preset name or a JSON config file as {arg('config')}") + " (minisd does not guess)")
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
    check_schedule(file)
    sd = build(cfg)
    skip = ignored_prefixes(cfg)
    for name, prefix in PREFIXES.items():
        load_component(file, prefix, getattr(sd, name), skip, dtype, device)
    sd.path, sd.preset = path, preset
    return sd


