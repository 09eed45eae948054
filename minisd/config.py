"""What a model is: the three networks' configs, the variant (eps or v), the native size, and the preset table.

The JSON config format (documented in the README) has sections `unet`, `vae`, `text` with the original ldm
YAML / OpenCLIP field names and top-level `prediction`, `scale_factor`, `resolution`; a missing key takes the SD2
value. Presets in weights/presets.json use the same format plus the file's repo, name, size and sha256.
"""
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from .clip import TextConfig
from .errors import UserError
from .paths import weights_dir
from .unet import UNetConfig
from .vae import VAEConfig


class LoadError(UserError):
    """A problem with the user's file or config, stated in one line."""


def default_dtype(device) -> torch.dtype:
    """The project's one dtype default: fp16 on CUDA (SD2's weights are published for it and an 8 GB GPU needs
    it), fp32 elsewhere (CPUs without native half-precision kernels emulate it slowly)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build SD2 from a file: the three networks, the variant and the native size."""
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
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


def parse_config(data: dict, source: str) -> ModelConfig:
    """A ModelConfig from the JSON format (sections unet/vae/text with the original names; missing = SD2)."""
    extra = {"repo", "filename", "size", "sha256", "sha256_prefix", "sources", "note", "_comment"}
    sections = {"unet": UNetConfig, "vae": VAEConfig, "text": TextConfig}
    top = {f.name for f in fields(ModelConfig)} - set(sections)
    kwargs = {}
    for key, value in data.items():
        if key in sections:
            known = {f.name for f in fields(sections[key])}
            bad = sorted(set(value) - known)
            if bad:
                raise LoadError(f"{source}: unknown field {key}.{bad[0]}; {key} takes {', '.join(sorted(known))}")
            tuples = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
            kwargs[key] = sections[key](**tuples)
        elif key in top:
            kwargs[key] = value
        elif key not in extra:
            raise LoadError(f"{source}: unknown field {key!r}; expected unet, vae, text, {', '.join(sorted(top))}")
    if kwargs.get("prediction", "eps") not in ("eps", "v"):
        raise LoadError(f"{source}: prediction must be \"eps\" or \"v\", not {kwargs['prediction']!r}")
    return ModelConfig(**kwargs)


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
