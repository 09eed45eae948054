"""The SD2 denoising UNet (and SD1's, which differs only in three config options).

Source: ldm/modules/diffusionmodules/openaimodel.py (UNetModel, ResBlock, Downsample, Upsample) of
Stability-AI/stablediffusion, configured by configs/stable-diffusion/v2-inference(-v).yaml (SD1: v1-inference.yaml
of CompVis/stable-diffusion: num_heads 8, num_head_channels -1, 1x1-conv projections, context_dim 768). Module paths are
the checkpoint keys under `model.diffusion_model.`; unused Sequential slots hold parameterless layers
(SiLU, Dropout) so that indices such as `in_layers.2` and `out_layers.3` line up.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import SpatialTransformer


@dataclass(frozen=True)
class UNetConfig:
    """Field names from `unet_config.params` of the SD2 YAML; defaults are SD2 (base and 768-v alike).
    SD1 (v1-inference.yaml) sets num_heads=8, num_head_channels=-1, use_linear_in_transformer=False,
    context_dim=768; -1 is ldm's "not set" for the two head fields (see `head_width`)."""
    in_channels: int = 4              # 9 for the inpainting model: latent + mask + masked-image latent
    out_channels: int = 4
    model_channels: int = 320
    attention_resolutions: tuple = (4, 2, 1)   # downsampling factors whose levels get a SpatialTransformer
    num_res_blocks: int = 2
    channel_mult: tuple = (1, 2, 4, 4)
    num_head_channels: int = 64       # SD2: fixed head width, heads = channels // 64; -1: use num_heads
    num_heads: int = -1               # SD1: fixed head count 8, width = channels // 8; -1 (SD2): unused
    transformer_depth: int = 1
    # Why 1024: SD2's text tower (OpenCLIP ViT-H/14) is 1024 wide; SD1's (OpenAI CLIP ViT-L/14) 768.
    context_dim: int = 1024
    # Why a flag: SD2 projects proj_in/proj_out with Linear layers (weight [C, C]); SD1 (false) with 1x1 convs
    # (weight [C, C, 1, 1]), the same maths on other stored shapes -- attention.Conv1x1.
    use_linear_in_transformer: bool = True
    # Not in the YAML: ldm set it globally (ATTN_PRECISION), diffusers per model (`upcast_attention`).
    upcast_attention: bool = False


def head_width(cfg: UNetConfig, channels: int) -> int:
    """Width of each attention head at a level with `channels` features, by ldm's rule (openaimodel.py UNetModel):
    a set num_head_channels wins, otherwise the width follows from the fixed count num_heads.

    Why two rules: SD2 fixes the width (64: 5/10/20 heads at 320/640/1280 channels), SD1 fixes the count (8 heads:
    widths 40/80/160). The weights have the same shapes either way, but the split into heads is trained into them.
    """
    if cfg.num_head_channels != -1:
        return cfg.num_head_channels
    if cfg.num_heads == -1:
        raise ValueError("UNetConfig: set num_head_channels (SD2: 64) or num_heads (SD1: 8); both are -1")
    return channels // cfg.num_heads


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
    """Sinusoidal embedding of (possibly fractional) timesteps t: [B] -> [B, dim].

    Why cos before sin: ldm concatenates [cos, sin] (diffusers needs `flip_sin_to_cos=True` to match);
    the order is baked into the trained `time_embed.0` weights.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 and cast back (ldm's GroupNorm32): fp16 statistics over large feature
    maps lose precision. eps stays torch's 1e-5 here, unlike the 1e-6 of the transformer and the VAE."""

    def forward(self, x):
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class ResBlock(nn.Module):
    """Two 3x3 convs with the time embedding added in between; 1x1 conv skip when the width changes."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(32, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(32, out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]   # [B, C] -> [B, C, 1, 1]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv with symmetric padding 1 (the VAE pads asymmetrically; the UNet does not)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """One UNet block: a Sequential whose layers each take what they need (ldm's class of the same name).
    This isinstance dispatch is the only place the model looks at what kind of layer it runs."""

    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__()
        self.cfg = cfg
        mc, emb_ch = cfg.model_channels, cfg.model_channels * 4

        def res(cin, cout):
            return ResBlock(cin, emb_ch, cout)

        def attn(ch):
            return SpatialTransformer(ch, head_width(cfg, ch), cfg.transformer_depth, cfg.context_dim,
                                      cfg.use_linear_in_transformer, cfg.upcast_attention)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))

        # Encoder: num_res_blocks blocks per level, a Downsample block between levels.
        blocks = [TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))]
        skip_channels, ch, ds = [mc], mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [res(ch, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(attn(ch))
                blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2
        self.input_blocks = nn.ModuleList(blocks)

        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch), res(ch, ch))

        # Decoder: one block more per level, each concatenating a skip from the encoder; Upsample at the end
        # of every level but the last.
        blocks = []
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(attn(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                blocks.append(TimestepEmbedSequential(*layers))
        self.output_blocks = nn.ModuleList(blocks)

        self.out = nn.Sequential(GroupNorm32(32, ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    def forward(self, x, t, context):
        """x: [B, in_channels, h, w] latents; t: timestep(s), scalar or [B], may be fractional;
        context: [B, 77, context_dim] text. Returns the raw model output (eps or v) [B, out_channels, h, w]."""
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(x.dtype))
        skips, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)   # concatenate along channels
        return self.out(h)
