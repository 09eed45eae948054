"""minisd: Stable Diffusion 2 from scratch, loading the official checkpoint files."""
from .clip import TextConfig, TextTransformer
from .load import LoadError, ModelConfig, StableDiffusion, build, load, load_config, presets
from .unet import UNetConfig, UNetModel
from .vae import AutoencoderKL, VAEConfig

__all__ = ["load", "build", "load_config", "presets", "LoadError", "ModelConfig", "StableDiffusion",
           "UNetConfig", "UNetModel", "VAEConfig", "AutoencoderKL", "TextConfig", "TextTransformer"]
