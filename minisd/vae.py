"""The SD2 autoencoder (KL-regularised, 8x downsampling, 4 latent channels).

Source: ldm/modules/diffusionmodules/model.py (Encoder, Decoder, ResnetBlock, AttnBlock) and
ldm/models/autoencoder.py (AutoencoderKL) of Stability-AI/stablediffusion, `first_stage_config` of the SD2
YAML. Module paths are the checkpoint keys under `first_stage_model.`.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .unet import Upsample  # nearest x2 then a 3x3 conv `conv`: the same block in both networks


@dataclass(frozen=True)
class VAEConfig:
    """Field names from `first_stage_config.params` (ddconfig + embed_dim); defaults are SD2's."""
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    in_channels: int = 3
    out_ch: int = 3


def Normalize(channels: int):
    # eps 1e-6 throughout the VAE (ldm's Normalize), not torch's default 1e-5
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """Pre-activation residual block without time embedding (ldm builds it with temb_channels=0)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = Normalize(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = Normalize(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; q/k/v/proj_out are 1x1 convs (weights [C, C, 1, 1])."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        # [B, C, H, W] -> [B, HW, C]
        q, k, v = (layer(y).flatten(2).transpose(1, 2) for layer in (self.q, self.k, self.v))
        out = attention(q, k, v, heads=1)
        # [B, HW, C] -> [B, C, H, W]
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        # Why asymmetric: ldm pads one pixel on the right and bottom only, then convolves without padding.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Level(nn.Module):
    """One resolution of the encoder (`down.i`) or decoder (`up.i`): ResnetBlocks, then an optional resampler.
    Where ldm has no resampler we put an Identity: it has no weights, so the keys are unchanged and
    forward needs no `if`."""

    def __init__(self, channels: list, resample_name: str, resample: nn.Module | None):
        super().__init__()
        pairs = zip(channels[:-1], channels[1:], strict=True)
        self.block = nn.ModuleList(ResnetBlock(cin, cout) for cin, cout in pairs)
        self.resample_name = resample_name   # "downsample" in the encoder, "upsample" in the decoder
        setattr(self, resample_name, resample or nn.Identity())

    def forward(self, x):
        for block in self.block:
            x = block(x)
        return getattr(self, self.resample_name)(x)


class Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(channels, channels), AttnBlock(channels), \
            ResnetBlock(channels, channels)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in (1, *cfg.ch_mult)]   # level i maps widths[i] -> widths[i + 1]
        last = len(cfg.ch_mult) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList(
            Level([widths[i]] + [widths[i + 1]] * cfg.num_res_blocks, "downsample",
                  Downsample(widths[i + 1]) if i != last else None) for i in range(last + 1))
        self.mid = Mid(widths[-1])
        self.norm_out = Normalize(widths[-1])
        # double_z: the encoder outputs mean and log-variance, 2 * z_channels
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = Mid(widths[-1])
        # Why this order: ldm builds the levels from the deepest up but stores `up[i]` at resolution i,
        # so `up.0` is the full-resolution level and the forward pass walks the list backwards.
        # Level i takes the width of level i + 1 (or the bottom width) to widths[i], in num_res_blocks + 1 blocks.
        inputs = widths[1:] + widths[-1:]
        self.up = nn.ModuleList(
            Level([inputs[i]] + [widths[i]] * (cfg.num_res_blocks + 1), "upsample",
                  Upsample(widths[i]) if i != 0 else None) for i in range(len(widths)))
        self.norm_out = Normalize(widths[0])
        self.conv_out = nn.Conv2d(widths[0], cfg.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x):
        """Images [B, 3, H, W] in [-1, 1] -> (mean, logvar), each [B, 4, H/8, W/8], unscaled latents."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        # ldm's DiagonalGaussianDistribution clamps the log-variance to [-30, 20]
        return mean, torch.clamp(logvar, -30.0, 20.0)

    def decode(self, z):
        """Unscaled latents [B, 4, h, w] -> images [B, 3, 8h, 8w], nominally in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x):
        return self.decode(self.encode(x)[0])


def posterior_sample(mean, logvar, noise):
    """One draw from the encoder's diagonal Gaussian posterior, mean + std * noise (ldm's
    DiagonalGaussianDistribution.sample), with noise ~ N(0, 1) supplied by the caller, who owns the generator:
    every posterior draw in the project goes through here, only the source of the noise differs."""
    return mean + torch.exp(0.5 * logvar) * noise
