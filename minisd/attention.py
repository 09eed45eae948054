"""Attention: the one numerical policy, and the UNet's spatial transformer built on it.

Sources: ldm/modules/attention.py of Stability-AI/stablediffusion (CrossAttention, FeedForward/GEGLU,
BasicTransformerBlock, SpatialTransformer). Attribute names are the official checkpoint keys.
"""
import torch.nn.functional as F
from torch import nn


def attention(q, k, v, heads: int, upcast: bool = False, causal: bool = False):
    """Multi-head scaled dot-product attention over token sequences.

    q: [B, N, heads*d], k and v: [B, M, heads*d] -> [B, N, heads*d]. The scale is d**-0.5 (SDPA's default,
    as in every SD2 attention). `upcast` runs the product in fp32 and casts back: SD2.1-v overflows in fp16
    without it (black or NaN images), which ldm handled with ATTN_PRECISION="fp32" and diffusers with
    `upcast_attention`. In fp32 it changes nothing.
    """
    b, n, inner = q.shape
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    # [B, L, heads*d] -> [B, heads, L, d]
    q, k, v = (t.reshape(b, -1, heads, inner // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    # [B, heads, N, d] -> [B, N, heads*d]
    return out.transpose(1, 2).reshape(b, n, inner).to(dtype)


class CrossAttention(nn.Module):
    """ldm CrossAttention: self-attention when context is None, else queries from x, keys/values from context."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int, upcast: bool):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        # index 1 held a Dropout in ldm; keeping the Sequential keeps the key `to_out.0`
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x, context):
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, self.upcast)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one projection gives value and gate; exact (erf) GELU on the gate."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # keys net.0.proj and net.2; net.1 was a Dropout
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention to the text, gated feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, upcast: bool):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, dim_head, upcast)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, upcast)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        h = self.norm1(x)
        x = x + self.attn1(h, h)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Conv1x1(nn.Conv2d):
    """SD1's projection: a 1x1 conv (weight [out, in, 1, 1]) applied to tokens [B, HW, C] -- the same maths
    as a Linear. It lets SpatialTransformer flatten first whichever projection the checkpoint stores."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, 1)

    def forward(self, x):
        return F.linear(x, self.weight.flatten(1), self.bias)


class SpatialTransformer(nn.Module):
    """Image features [B, C, H, W] attend to themselves and to the text, as a residual branch.

    SD2 (use_linear_in_transformer) projects with Linear layers and fixes the head width at 64, so the
    head count grows with the channels (5/10/20 heads at 320/640/1280); SD1 used 1x1 convs and 8 heads.
    """

    def __init__(self, channels: int, dim_head: int, depth: int, context_dim: int, use_linear: bool,
                 upcast: bool):
        super().__init__()
        heads = channels // dim_head
        proj = nn.Linear if use_linear else Conv1x1
        # GroupNorm eps 1e-6 here (ldm Normalize), unlike the UNet ResBlocks' 1e-5
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = proj(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, dim_head, context_dim, upcast) for _ in range(depth))
        self.proj_out = proj(channels, channels)

    def forward(self, x, context):
        b, c, h, w = x.shape
        # [B, C, H, W] -> [B, HW, C]
        tokens = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        # [B, HW, C] -> [B, C, H, W]
        return x + self.proj_out(tokens).transpose(1, 2).reshape(b, c, h, w)

