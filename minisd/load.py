"""Loading SD1 and SD2 from the official single-file checkpoint layout, or from a diffusers folder.

Every key of the file goes to exactly one place: a component, by the prefix table below, loaded with a
strict `load_state_dict`; or the named ignore list. Anything else is an error that names the key. Modules
are built on the meta device and the file's tensors assigned to them, so memory stays near the weights' size.
A diffusers folder is read through minisd.diffusers, which presents it under the official key names.
"""
from dataclasses import dataclass
from pathlib import Path

import torch

from . import clip, clip_openai
from .conditioning import TextConditioning
from .config import LoadError, ModelConfig, default_dtype, load_config, presets
from .errors import arg, spoken
from .hub import fetch
from .image_conditioning import METADATA_KEY, PROJECTION, ImageConditioning, ImageConfig, open_encoder, read_config
from .schedule import alphas_cumprod
from .tensorfile import FLOATS, UNET, VAE, TensorFile, check_finite
from .unet import UNetModel
from .vae import AutoencoderKL

# The text tower's prefix is its module's PREFIX (TEXT), since SD1 and SD2 store different towers under
# cond_stage_model; the UNet's and the VAE's are minisd.tensorfile's UNET and VAE.
TEXT = {"openclip": clip, "openai": clip_openai}   # text.tower -> the module with its PREFIX and IGNORED keys

# Tensors every file may hold that inference never reads: ldm's 12 DDPM schedule buffers (we compute the
# schedule; `alphas_cumprod` is compared with it as a self-check). The towers add their own (TEXT), and blocks
# a `layer` setting never runs are skipped by prefix (TextConfig.unused).
SCHEDULE = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)

# The two scalars of ldm's EMA bookkeeping, which SD1 release files keep (1145 tensors in v1-5-pruned-emaonly =
# 1131 weights + 12 schedule buffers + these; A1111 skips them by name too, vae_ignore_keys).
EMA_SCALARS = ("model_ema.decay", "model_ema.num_updates")

# What foreign layouts look like, for error messages: key prefix -> what the file probably is. The two text
# prefixes are here too: the one the config does not name means the config is for the other generation.
FOREIGN = {
    clip_openai.PREFIX: "an SD1.x checkpoint (OpenAI CLIP text tower); pass an SD1 config such as the preset sd15",
    clip.PREFIX: "an SD2.x checkpoint (OpenCLIP text tower); pass an SD2 config such as the preset sd21-base",
    "conditioner.": "an SDXL checkpoint, which minisd does not load",
    "model_ema.": "a training checkpoint with an EMA copy; use the ema-pruned release file",
    "down_blocks.": "a diffusers UNet file; load the whole diffusers folder instead (it holds unet/, vae/, ...)",
    "text_model.": "a transformers CLIP text encoder file; load the whole diffusers folder instead",
    "encoder.down_blocks.": "a diffusers VAE file; load the whole diffusers folder instead",
    PROJECTION: f"an image-conditioned model whose metadata lost its {METADATA_KEY} entry, which states "
                "what it is conditioned on; use the file as training saved it",
}


def ignored(cfg: ModelConfig) -> tuple:
    """Keys stored in the files of this model that nothing reads."""
    return SCHEDULE + EMA_SCALARS + TEXT[cfg.text.tower].IGNORED


def components(sd) -> dict:
    """Checkpoint prefix -> the module loaded from the keys under it (the image projection where there is one)."""
    projection = {PROJECTION: sd.image.proj} if sd.image is not None and sd.image.proj is not None else {}
    return {UNET: sd.unet, VAE: sd.vae, TEXT[sd.config.text.tower].PREFIX: sd.text.tower, **projection}


def state_dict(sd, replace: dict | None = None) -> dict:
    """The model's weights under the official single-file key names (what `load` reads back). `replace`:
    {official key: tensor} written instead of the model's own (a fine-tune's EMA of its weights)."""
    replace = replace or {}
    return {prefix + k: replace.get(prefix + k, v) for prefix, module in components(sd).items()
            for k, v in module.state_dict().items()}


def check_keys(file, cfg: ModelConfig, image: ImageConfig | None = None):
    """Every key is a component's or ignored by name; otherwise say what the file looks like."""
    skip, names = cfg.text.unused(), ignored(cfg)
    own = (UNET, VAE, TEXT[cfg.text.tower].PREFIX) + ((PROJECTION,) if image and image.projection else ())
    for key in sorted(file.keys):
        if key in names or key.startswith(skip) or key.startswith(own):
            continue
        hint = next((what for prefix, what in FOREIGN.items() if key.startswith(prefix)), None)
        raise LoadError(f"{file.path}: unexpected key {key}" + (f" -- this looks like {hint}" if hint else
                        " (not part of the SD1/SD2 single-file layout)"))


def check_stored(file: TensorFile, prefix: str, expected: dict):
    """Shapes and dtypes from the file's header, before any tensor is read."""
    for name, tensor in expected.items():
        found = file.shape(prefix + name)
        if found != tuple(tensor.shape):
            generation = {768: "SD1.x", 1024: "SD2.x"}.get(found[-1] if found else 0)
            hint = (f" -- a {found[-1]}-wide text tower, as in {generation}: pass an {generation[:3]} "
                    f"{arg('config')}" if name.endswith("token_embedding.weight") and generation else
                    f" -- pass a {arg('config')} that matches this file")
            if prefix == PROJECTION and found[-1:] != tuple(tensor.shape)[-1:]:   # [C, W] or [C]: W is the metadata's
                hint = (f" -- the encoder width its metadata's {METADATA_KEY} states is not the "
                        "projection's; a damaged or hand-edited file")
            raise LoadError(f"{file.path}: {prefix}{name} has shape {list(found)}, "
                            f"expected {list(tensor.shape)}{hint}")
        stored = file.dtype(prefix + name)
        if stored not in FLOATS:
            raise LoadError(f"{file.path}: {prefix}{name} is stored as {stored}, not as floats -- a quantised or "
                            f"damaged file? minisd loads weights stored as {', '.join(FLOATS)}")


def load_component(file, prefix: str, module: torch.nn.Module, skip: tuple, dtype, device, names=SCHEDULE):
    """Strict load of one meta-built component: names, shapes and float dtypes must match, values be finite.
    Keys in `names` or under a prefix in `skip` are left out."""
    expected = module.state_dict()
    present = {k[len(prefix):] for k in file.keys
               if k.startswith(prefix) and k not in names and not k.startswith(skip)}
    missing, unexpected = sorted(set(expected) - present), sorted(present - set(expected))
    if unexpected:
        raise LoadError(f"{file.path}: unexpected key {prefix}{unexpected[0]}" +
                        (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "") +
                        f" -- the file's architecture differs from the config; pass a matching {arg('config')}")
    if missing:
        raise LoadError(f"{file.path}: missing key {prefix}{missing[0]}" +
                        (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") +
                        " -- not a complete checkpoint of this model")
    check_stored(file, prefix, expected)
    # Cast tensor by tensor as it is read, so a fp32 file loaded as fp16 never holds both copies.
    state = {name: file.get(prefix + name).to(device=device, dtype=dtype) for name in expected}
    check_finite(file, prefix, state, dtype)
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def check_schedule(file):
    """The file's alphas_cumprod, if it has one, is SD's schedule (SD1 and SD2 share it) -- compared at the
    precision the file stores.

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
        raise LoadError(f"{file.path}: its alphas_cumprod is {name} {list(theirs.shape)}, not SD's float [1000]")
    tolerance = 1e-6 + torch.finfo(FLOATS[name]).eps * ours.abs()
    if not ((theirs.double() - ours.double()).abs() <= tolerance).all():
        raise LoadError(f"{file.path}: its alphas_cumprod is not SD's schedule (linear 0.00085..0.012 in sqrt "
                        "beta) -- a model trained with another noise schedule, which minisd does not sample")


@dataclass
class StableDiffusion:
    """The loaded model: components as attributes, plus the facts samplers need. `text` owns the tokenizer,
    the text tower (`text.tower`) and any textual-inversion vectors; `image`, for an image-conditioned model, the
    image encoder and projection (minisd/image_conditioning.py), None otherwise."""
    text: TextConditioning
    unet: UNetModel
    vae: AutoencoderKL
    config: ModelConfig
    path: Path | None = None
    preset: str | None = None
    image: ImageConditioning | None = None

    @property
    def scale_factor(self) -> float:
        return self.config.scale_factor

    @property
    def prediction(self) -> str:
        return self.config.prediction


def build(cfg: ModelConfig, device="meta", image: ImageConfig | None = None) -> StableDiffusion:
    """The three networks of a config, on `device` (meta: shapes only, no memory); with `image`, the image
    conditioning's projection too (its encoder is loaded separately: minisd.image_conditioning.open_encoder)."""
    with torch.device(device):
        return StableDiffusion(TextConditioning(cfg.text), UNetModel(cfg.unet), AutoencoderKL(cfg.vae), cfg,
                               image=ImageConditioning(image, cfg.unet.context_dim) if image else None)


def resolve(model, config) -> tuple:
    """(file, ModelConfig, preset name or None) for a preset name, a local file or a diffusers folder; the file
    is a TensorFile, or for a folder minisd.diffusers' view of it under the official key names."""
    table = presets()
    if config is None and str(model) in table:
        return TensorFile(fetch(str(model))), load_config(str(model)), str(model)
    path = Path(model)
    if path.is_dir():
        if config is not None:   # the folder's own config.json files state the architecture
            raise LoadError(f"{path}: a diffusers folder states its own configuration; leave out {arg('config')}")
        from .diffusers import open_folder  # not needed for single files
        return (*open_folder(path), None)
    if not path.is_file() and str(model) in table:   # a preset name, but with a config of the user's
        raise LoadError(f"{spoken('model', str(model))}: a preset, which comes with its own configuration; leave out "
                        f"{arg('config')} (it is for a file outside the presets)")
    if not path.is_file():
        raise LoadError(f"{spoken('model', str(model))}: no such file, and not a preset ({', '.join(table)})")
    if config is None:
        guess = next((n for n, p in table.items() if p["filename"] == path.name), None)
        raise LoadError(f"{path}: which model is this? " + (f"pass {spoken('config', guess)}" if guess else
                        f"pass a preset name or a JSON config file as {arg('config')}") + " (minisd does not guess)")
    return TensorFile(path), load_config(config), str(config) if str(config) in table else None


def load(model, config=None, dtype=None, device=None, encoder=None) -> StableDiffusion:
    """Load SD1 or SD2 from a preset name ("sd21-base", "sd15", ...; downloaded once), a local single-file
    checkpoint or a diffusers folder.

    config: a preset name, a JSON config path or dict (needed for a local file; a folder has its own). dtype:
    default fp16 on CUDA, fp32 elsewhere. device: default "cpu". An image-conditioned file (its metadata states
    `image_condition`) loads its DINO encoder too, float32: the release the metadata names, or `encoder`, a folder
    or hub name of a copy of it.
    """
    file, cfg, preset = resolve(model, config)
    device = torch.device(device or "cpu")
    dtype = dtype or default_dtype(device)
    image = read_config(file.metadata, cfg.unet.context_dim, str(file.path))
    check_keys(file, cfg, image)
    check_schedule(file)
    sd = build(cfg, image=image)
    for prefix, module in components(sd).items():
        load_component(file, prefix, module, cfg.text.unused(), dtype, device, ignored(cfg))
    if image is not None:
        sd.image.encoder = open_encoder(image, encoder, device)
    elif encoder is not None:
        raise LoadError(f"{file.path}: a text-conditioned model (its metadata states no {METADATA_KEY}); "
                        f"leave out {arg('encoder')}")
    sd.path, sd.preset = file.path, preset
    return sd


