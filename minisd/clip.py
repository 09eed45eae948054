"""OpenCLIP ViT-H/14 text tower, as SD2 uses it for conditioning.

Sources: open_clip/transformer.py (TextTransformer, ResidualAttentionBlock) of mlfoundations/open_clip and
FrozenOpenCLIPEmbedder in ldm/modules/encoders/modules.py of Stability-AI/stablediffusion (layer
"penultimate"). Module paths are the checkpoint keys under `cond_stage_model.model.`.
"""
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .tokenizer import PAD

PREFIX = "cond_stage_model.model."   # ldm FrozenOpenCLIPEmbedder's `model`, in the official SD2 files
# CLIP's contrastive head, stored in the files and never used for conditioning.
IGNORED = (PREFIX + "text_projection", PREFIX + "logit_scale")
LAYERS = {"last": 0, "penultimate": 1}   # `layer` -> how many of the final blocks are skipped


@dataclass(frozen=True)
class TextConfig:
    """OpenCLIP `text_cfg` names; defaults are ViT-H/14's text tower as SD2 runs it."""
    width: int = 1024
    layers: int = 24
    heads: int = 16
    context_length: int = 77
    vocab_size: int = 49408
    tower: str = "openclip"       # the config JSON's text.tower: which class of text tower this is
    # SD2 was trained on "penultimate" (ldm FrozenOpenCLIPEmbedder layer="penultimate"): the output after block
    # 23 of 24, then ln_final. "last" runs all blocks; no released model uses it, it is there for symmetry with SD1.
    layer: str = "penultimate"

    @property
    def pad_id(self) -> int:
        """The padding id SD2 was trained with (minisd.tokenizer.PAD)."""
        return PAD

    def unused(self) -> tuple:
        """Key prefixes of blocks the file stores but `layer` never runs (the checkpoint's last block)."""
        return tuple(f"{PREFIX}transformer.resblocks.{i}." for i in range(self.layers - LAYERS[self.layer],
                                                                          self.layers))


class SelfAttention(nn.Module):
    """Causal multi-head self-attention stored as torch's nn.MultiheadAttention stores it (OpenCLIP uses that
    class): one fused `in_proj_weight` [3*width, width] in q, k, v order, then `out_proj`."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.normal_(self.in_proj_weight, std=width ** -0.5)   # loading overwrites these; they only matter
        nn.init.zeros_(self.in_proj_bias)                        # for a randomly initialised model

    def forward(self, x):
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        # Why causal: CLIP's text transformer is trained like a language model; position i sees 0..i only.
        return self.out_proj(attention(q, k, v, self.heads, causal=True))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        # exact (erf) GELU, not the tanh approximation: OpenCLIP's nn.GELU default
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=nn.GELU(),
                                             c_proj=nn.Linear(4 * width, width)))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    """Token ids [B, 77] -> conditioning [B, 77, width].

    Why one block fewer: SD2 conditions on the "penultimate" layer -- the output after block 23 of 24,
    then `ln_final`. We build only the blocks `cfg.layer` runs; the checkpoint's last block
    (`transformer.resblocks.23`, TextConfig.unused), `text_projection` and `logit_scale` (IGNORED) are
    skipped by name when loading. All 77 positions are returned (no pooling); padding positions too, since
    the UNet attends to them.
    """

    def __init__(self, cfg: TextConfig = TextConfig()):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.randn(cfg.context_length, cfg.width) * 0.01)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(
            ResidualAttentionBlock(cfg.width, cfg.heads) for _ in range(cfg.layers - LAYERS[cfg.layer]))
        self.ln_final = nn.LayerNorm(cfg.width)

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, under one name for both towers (gradient checkpointing wraps them)."""
        return self.transformer.resblocks

    def forward(self, ids):
        """ids: LongTensor [B, L], L <= context_length."""
        return self.forward_embeddings(self.token_embedding(ids))

    def forward_embeddings(self, x):
        """x: token embeddings [B, L, width]; lets textual inversion splice learned vectors in."""
        x = x + self.positional_embedding[: x.shape[1]]
        for block in self.transformer.resblocks:
            x = block(x)
        return self.ln_final(x)
