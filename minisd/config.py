"""What a model is: the three networks' configs, the variant (eps or v), the native size, and the preset table.

The JSON config format (documented in docs/models.md) has sections `unet`, `vae`, `text` with the original ldm
YAML / OpenCLIP (SD2) / transformers CLIPTextConfig (SD1: `"tower": "openai"`) field names and top-level
`prediction`, `scale_factor`, `resolution`; a missing key takes the SD2 value. Presets in weights/presets.json use
the same format plus the file's repo, name, size and sha256.
"""
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from .clip import LAYERS, TextConfig
from .clip_openai import OpenAITextConfig
from .errors import INTERFACE, UserError, arg
from .paths import weights_dir
from .tokenizer import CONTEXT_LENGTH
from .unet import UNetConfig
from .vae import VAEConfig


class LoadError(UserError):
    """A problem with the user's file or config, stated in one line."""


def default_dtype(device) -> torch.dtype:
    """The project's one dtype default: fp16 on CUDA (SD2's weights are published for it and an 8 GB GPU needs
    it), fp32 elsewhere (CPUs without native half-precision kernels emulate it slowly)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# The largest image side, in pixels, that medti trains on, previews or generates. SD1 and SD2 were trained at 512
# and 768. At 4096 the VAE decode of one image alone holds about 28 GB in fp16 (medti.generation.preflight's
# measured 6.5 values per pixel and channel of the VAE's 128-channel top level), more than a consumer GPU has, and
# the UNet's first level attends over 262,144 latent positions. A larger side is taken for a typo and refused
# before anything loads, instead of a run that dies of MemoryError or samples for hours.
MAX_SIDE = 4096


def check_side(name: str, pixels: int):
    """An image side given as `name` (`resolution`, `width`, ...): 1 to MAX_SIDE pixels, else one line naming it.
    (Whether it is a multiple of what the model needs, 64 for SD1 and SD2, is known once the model is.)"""
    if not 1 <= pixels <= MAX_SIDE:
        raise UserError(f"{arg(name)} {pixels}: must be from 1 to {MAX_SIDE} pixels (SD1 and SD2 are made for "
                        f"512 and 768; one {MAX_SIDE}-pixel image already needs about 28 GB to decode)")


def resolve_device(name: str) -> torch.device:
    """A device name (`--device` of every command) as a torch.device that exists here, or a UserError that says
    which ones do."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"{arg('device')} {name!r}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            use = "--device cpu" if INTERFACE.get() == "cli" else "device='cpu'"
            raise UserError(f"{arg('device')} {name}: no CUDA GPU is visible to torch here; use {use}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"{arg('device')} {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise UserError(f"{arg('device')} {name}: only cpu and cuda are supported")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """fp32|fp16|bf16 by name (`--dtype`), or the project's default for the device (default_dtype above)."""
    if not name:
        return default_dtype(device)
    if name not in DTYPES:
        raise UserError(f"{arg('dtype')} {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build SD1 or SD2 from a file: the three networks, the variant and the native size."""
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig | OpenAITextConfig = field(default_factory=TextConfig)
    prediction: str = "eps"         # "eps" (-base files) or "v" (768-v files)
    scale_factor: float = 0.18215   # latent scale: latents are divided by this before decoding
    resolution: int = 512           # native image size in pixels

    @property
    def latent_factor(self) -> int:
        """Pixels per latent pixel: the VAE halves the size at every level but the last (SD2: 8)."""
        return 2 ** (len(self.vae.ch_mult) - 1)

    @property
    def inpainting(self) -> bool:
        """A 9-channel inpainting UNet (4 latent + 1 mask + 4 masked-image latent channels), which needs an init
        image and a mask to run at all."""
        return self.unet.in_channels == 9

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this, so the UNet can halve the latent at each level (SD2: 64)."""
        return self.latent_factor * 2 ** (len(self.unet.channel_mult) - 1)


def presets() -> dict:
    return json.loads((weights_dir() / "presets.json").read_text())["presets"]


SECTIONS = {"unet": UNetConfig, "vae": VAEConfig, "text": TextConfig}
# text.tower -> the text section's dataclass: OpenCLIP's names for SD2's tower, transformers' for SD1's. Stated in
# the config (default SD2's), never inferred from a file.
TOWERS = {"openclip": TextConfig, "openai": OpenAITextConfig}
# The string fields and their values.
CHOICES = {"prediction": ("eps", "v"), "text.tower": tuple(TOWERS), "text.layer": tuple(LAYERS)}
EXTRA = {"repo", "filename", "size", "sha256", "sha256_prefix", "sources", "note", "_comment"}   # preset facts
GROUPS = 32   # every GroupNorm of SD2's UNet and VAE has 32 groups (ldm normalization(), Normalize())
# Fields where -1 is a value: ldm's "not set" for the head rule (SD2 sets num_head_channels, SD1 num_heads).
UNSET = {"unet.num_head_channels", "unet.num_heads"}


def check_value(source: str, key: str, value, default):
    """One field's JSON value against the type of its SD2 default: a wrong type would surface as a traceback
    deep in torch (`"32"` channels), a bool is not an int here although Python says it is, and sizes are positive."""
    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        unset = key in UNSET and value == -1
        ok = isinstance(value, int) and not isinstance(value, bool) and (value > 0 or unset)
        want = "a positive integer" + (" or -1 (not set)" if key in UNSET else "")
    elif isinstance(default, float):   # scale_factor: latents are divided by it, so 0 or NaN gives NaN images
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
        want = "a positive finite number (SD2: 0.18215)"
    elif isinstance(default, tuple):
        ok = isinstance(value, list) and len(value) > 0 and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
        want = "a non-empty list of positive integers"
    else:
        ok, want = value in CHOICES[key], " or ".join(json.dumps(c) for c in CHOICES[key])
    if not ok:
        raise LoadError(f"{source}: {key} must be {want}, not {json.dumps(value)}")
    return tuple(value) if isinstance(default, tuple) else value


def read_section(source: str, key: str, value) -> object:
    """One of unet/vae/text: an object of known fields with valid values -> its dataclass (for text, the one
    its `tower` names)."""
    cls = SECTIONS[key]
    if key == "text" and isinstance(value, dict) and "tower" in value:
        cls = TOWERS[check_value(source, "text.tower", value["tower"], "")]
    known = {f.name: f for f in fields(cls)}
    if not isinstance(value, dict):
        raise LoadError(f"{source}: {key} must be an object of fields ({', '.join(sorted(known))}), "
                        f"not {json.dumps(value)}")
    bad = sorted(set(value) - set(known))
    if bad:
        raise LoadError(f"{source}: unknown field {key}.{bad[0]}; {key} takes {', '.join(sorted(known))}")
    defaults = cls()
    return cls(**{k: check_value(source, f"{key}.{k}", v, getattr(defaults, k)) for k, v in value.items()})


def check_consistent(source: str, cfg: "ModelConfig"):
    """What the types cannot say but the networks need to be built and run; each would otherwise fail in torch."""
    unet, levels = cfg.unet, range(len(cfg.unet.channel_mult))
    for ds in unet.attention_resolutions:   # ldm: level i has downsampling factor ds = 2**i
        if ds not in [2 ** i for i in levels]:
            raise LoadError(f"{source}: unet.attention_resolutions has {ds}, which matches no level of "
                            f"unet.channel_mult (factors {[2 ** i for i in levels]}); it would add no attention")
    for key, width, mults in (("unet.model_channels", unet.model_channels, unet.channel_mult),
                              ("vae.ch", cfg.vae.ch, cfg.vae.ch_mult)):
        if any(width * m % GROUPS for m in mults):
            raise LoadError(f"{source}: {key} {width} x channel_mult {list(mults)} gives widths that are not "
                            f"multiples of {GROUPS}, the GroupNorm group count")
    attended = [unet.model_channels * unet.channel_mult[i] for i in levels
                if 2 ** i in unet.attention_resolutions or i == levels[-1]]   # the middle block always attends
    # ldm's head rule (minisd.unet.head_width): num_head_channels if set, else num_heads
    head_key = "num_head_channels" if unet.num_head_channels != -1 else "num_heads"
    heads = getattr(unet, head_key)
    if heads == -1:
        raise LoadError(f"{source}: unet.num_head_channels and unet.num_heads are both -1; set one "
                        "(SD2: num_head_channels 64, SD1: num_heads 8)")
    if any(width % heads for width in attended):
        raise LoadError(f"{source}: unet.{head_key} {heads} does not divide the attention widths {attended}")
    text = cfg.text
    if text.width % text.heads:
        raise LoadError(f"{source}: the text tower's {text.heads} heads do not divide its width {text.width}")
    if text.context_length != CONTEXT_LENGTH:
        raise LoadError(f"{source}: the text tower's context length must be {CONTEXT_LENGTH}, the tokenizer's")
    if unet.context_dim != text.width:   # cross-attention reads the text tower's output
        raise LoadError(f"{source}: unet.context_dim {unet.context_dim} differs from the {text.tower} text tower's "
                        f"width {text.width} (SD1: 768, SD2: 1024)")
    if cfg.resolution % cfg.size_multiple:
        raise LoadError(f"{source}: resolution {cfg.resolution} is not a multiple of {cfg.size_multiple}")


def parse_config(data: dict, source: str) -> ModelConfig:
    """A ModelConfig from the JSON format (sections unet/vae/text with the original names; missing = SD2).
    Any value of the wrong type or a combination the networks cannot be built with is one LoadError naming the
    source and the key."""
    if not isinstance(data, dict):
        raise LoadError(f"{source}: a config is a JSON object such as {{\"unet\": {{...}}, \"prediction\": "
                        f"\"eps\"}}, not {type(data).__name__}")
    top = {f.name for f in fields(ModelConfig)} - set(SECTIONS)
    defaults, kwargs = ModelConfig(), {}
    for key, value in data.items():
        if key in SECTIONS:
            kwargs[key] = read_section(source, key, value)
        elif key in top:
            kwargs[key] = check_value(source, key, value, getattr(defaults, key))
        elif key not in EXTRA:
            raise LoadError(f"{source}: unknown field {key!r}; expected unet, vae, text, {', '.join(sorted(top))}")
    cfg = ModelConfig(**kwargs)
    check_consistent(source, cfg)
    return cfg


def load_config(config) -> ModelConfig:
    """config: a ModelConfig, a dict in the JSON format, a preset name, or a path to a JSON file."""
    if isinstance(config, ModelConfig):
        return config
    if isinstance(config, dict):
        return parse_config(config, "config")
    table = presets()
    if str(config) in table:
        return parse_config(table[str(config)], f"preset {config}")
    path = Path(config)
    if not path.is_file():
        raise LoadError(f"config {config}: neither a preset ({', '.join(table)}) nor a JSON file")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(f"{path}: not a readable JSON config ({e})") from None
    return parse_config(data, str(path))
