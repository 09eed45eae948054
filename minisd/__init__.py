"""minisd: Stable Diffusion 1.x and 2.x from scratch, loading the official checkpoint files and diffusers folders."""
from .clip import TextConfig, TextTransformer
from .clip_openai import OpenAITextConfig, OpenAITextTransformer
from .conditioning import TextConditioning
from .config import LoadError, ModelConfig, load_config, presets
from .image_conditioning import ImageConditioning, ImageConfig
from .load import StableDiffusion, build, load
from .unet import UNetConfig, UNetModel
from .vae import AutoencoderKL, VAEConfig

__all__ = ["load", "build", "load_config", "presets", "LoadError", "ModelConfig", "StableDiffusion",
           "UNetConfig", "UNetModel", "VAEConfig", "AutoencoderKL", "TextConfig", "TextTransformer",
           "OpenAITextConfig", "OpenAITextTransformer", "TextConditioning", "ImageConditioning", "ImageConfig"]
