"""minisd: Stable Diffusion 2 from scratch, loading the official checkpoint files."""
from .clip import TextConfig, TextTransformer
from .config import LoadError, ModelConfig, load_config, presets
from .load import StableDiffusion, build, load
from .unet import UNetConfig, UNetModel
from .vae import AutoencoderKL, VAEConfig

__all__ = ["load", "build", "load_config", "presets", "LoadError", "ModelConfig", "StableDiffusion",
           "UNetConfig", "UNetModel", "VAEConfig", "AutoencoderKL", "TextConfig", "TextTransformer"]
