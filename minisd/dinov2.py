"""DINOv2 ViT image features for FD-DINOv2, loading the Hugging Face releases (facebook/dinov2-*).

Sources: names and block layout from transformers' models/dinov2/modeling_dinov2.py (what `save_pretrained` writes,
as in the hub files), the position interpolation from facebookresearch/dinov2 dinov2/models/vision_transformer.py
(the torch.hub model torch-fidelity runs), the image preparation from torch-fidelity's feature_extractor_dinov2.py.

Features are the CLS token after the final layer norm: the hub model's output and transformers' `pooler_output`.
Why the hub model's interpolation, not transformers': they differ. At 224 px, a release trained at 518 px (37x37
patches) needs a 16x16 grid: the hub model passes bicubic interpolate scale_factor (16 + 0.1) / 37, which torch also
takes as the sampling step, transformers 5.x passes size=(16, 16) (step 37 / 16; older versions had the offset).
FD-DINOv2 is defined with the hub model (torch-fidelity), so we follow it; tests/test_dinov2.py measures the gap.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .resize import resize_like_tf1

INPUT_SIZE = 224                                            # torch-fidelity's FeatureExtractorDinoV2.INPUT_IMAGE_SIZE
MEAN = tuple(255 * m for m in (0.485, 0.456, 0.406))       # ImageNet mean and std on the 0..255 scale, as
STD = tuple(255 * s for s in (0.229, 0.224, 0.225))        # torch-fidelity normalises (no /255 before)
INTERPOLATE_OFFSET = 0.1   # the hub model's work-around for dino issue 8, kept: it changes the result (see below)


@dataclass(frozen=True)
class DINOv2Config:
    """transformers' Dinov2Config names; defaults are the facebook/dinov2-base release (trained at 518 px)."""
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 14
    image_size: int = 518
    layer_norm_eps: float = 1e-6
    layerscale_value: float = 1.0   # the initial layer scale only; the trained values are in the file
    use_swiglu_ffn: bool = False    # True for dinov2-giant
    qkv_bias: bool = True


def interpolate_positions(table, height: int, width: int, patch: int):
    """The trained position table [1, 1 + M*M, D] -> [1, 1 + rows*cols, D] for a height x width input, as the hub
    model computes it (bicubic, no antialiasing, in float32). The CLS token's position is not interpolated."""
    rows, cols = height // patch, width // patch
    m = math.isqrt(table.shape[1] - 1)
    # Why return early: at its own grid (square input) the reference uses the table as trained; the offset would not.
    if (rows, cols) == (m, m) and height == width:
        return table
    # [1, M*M, D] -> [1, D, M, M]
    grid = table[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
    # Why scale_factor with the 0.1 offset and not size=(rows, cols): torch samples at (i + 0.5) / scale - 0.5, so
    # the offset shifts every sample (by up to 0.2 of a trained cell at 16 of 37); FD-DINOv2 was defined with it.
    # Output size floor(M * (rows + 0.1) / M) = rows: the offset keeps float error from giving rows - 1.
    scale = ((rows + INTERPOLATE_OFFSET) / m, (cols + INTERPOLATE_OFFSET) / m)
    grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False)
    # [1, D, rows, cols] -> [1, rows*cols, D]
    patches = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1).to(table.dtype)
    return torch.cat([table[:, :1], patches], dim=1)


class Embeddings(nn.Module):
    """Patches -> tokens, a CLS token in front, position embeddings added (transformers' Dinov2Embeddings)."""

    def __init__(self, cfg: DINOv2Config):
        super().__init__()
        self.patch_size = cfg.patch_size
        grid = cfg.image_size // cfg.patch_size   # the trained grid: 518 // 14 = 37 for the releases
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        # Why, though inference never masks: iBOT training swapped masked patches for it; the release stores it.
        self.mask_token = nn.Parameter(torch.zeros(1, cfg.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, grid * grid + 1, cfg.hidden_size))
        self.patch_embeddings = nn.Module()
        self.patch_embeddings.projection = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, cfg.patch_size)

    def forward(self, pixels):
        # [N, 3, H, W] -> [N, D, H/p, W/p] -> [N, HW/p^2, D]
        patches = self.patch_embeddings.projection(pixels).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(pixels), -1, -1), patches], dim=1)
        return tokens + interpolate_positions(self.position_embeddings, *pixels.shape[2:], self.patch_size)


class Attention(nn.Module):
    """Self-attention. Why attention.attention.query and attention.output.dense: transformers' first Dinov2Attention
    held a self-attention and an output module; the releases keep those names (the hub model's one `qkv` split)."""

    def __init__(self, cfg: DINOv2Config):
        super().__init__()
        width, self.heads = cfg.hidden_size, cfg.num_attention_heads
        self.attention = nn.Module()
        self.attention.query = nn.Linear(width, width, bias=cfg.qkv_bias)
        self.attention.key = nn.Linear(width, width, bias=cfg.qkv_bias)
        self.attention.value = nn.Linear(width, width, bias=cfg.qkv_bias)
        self.output = nn.Module()
        self.output.dense = nn.Linear(width, width)

    def forward(self, x):
        a = self.attention
        return self.output.dense(attention(a.query(x), a.key(x), a.value(x), self.heads))


class MLP(nn.Module):
    def __init__(self, cfg: DINOv2Config):
        super().__init__()
        hidden = int(cfg.hidden_size * cfg.mlp_ratio)
        self.fc1, self.fc2 = nn.Linear(cfg.hidden_size, hidden), nn.Linear(hidden, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))   # exact (erf) GELU: hidden_act "gelu", the hub model's nn.GELU


class SwiGLU(nn.Module):
    """dinov2-giant's feed-forward (the hub's SwiGLUFFNFused): one projection gives gate and value, silu(gate) *
    value. Why 2/3 of the MLP width: three matrices then hold what a plain MLP's two do (rounded up to 8s)."""

    def __init__(self, cfg: DINOv2Config):
        super().__init__()
        hidden = (int(int(cfg.hidden_size * cfg.mlp_ratio) * 2 / 3) + 7) // 8 * 8
        self.weights_in = nn.Linear(cfg.hidden_size, 2 * hidden)   # [gate; value], gate first
        self.weights_out = nn.Linear(hidden, cfg.hidden_size)

    def forward(self, x):
        gate, value = self.weights_in(x).chunk(2, dim=-1)
        return self.weights_out(F.silu(gate) * value)


class LayerScale(nn.Module):
    """A learned per-channel gain on each residual branch (LayerScale, Touvron et al. 2021, as DINOv2 trains it)."""

    def __init__(self, cfg: DINOv2Config):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.full((cfg.hidden_size,), cfg.layerscale_value))

    def forward(self, x):
        return x * self.lambda1


class Layer(nn.Module):
    """Pre-norm ViT block, each branch scaled before the residual add (transformers' Dinov2Layer, hub `Block`)."""

    def __init__(self, cfg: DINOv2Config):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attention = Attention(cfg)
        self.layer_scale1 = LayerScale(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SwiGLU(cfg) if cfg.use_swiglu_ffn else MLP(cfg)
        self.layer_scale2 = LayerScale(cfg)

    def forward(self, x):
        x = x + self.layer_scale1(self.attention(self.norm1(x)))
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


class DINOv2(nn.Module):
    """Normalised images [N, 3, H, W] -> CLS features [N, hidden_size] (transformers' Dinov2Model.pooler_output)."""

    def __init__(self, cfg: DINOv2Config = DINOv2Config()):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels):
        x = self.embeddings(pixels)
        for layer in self.encoder.layer:
            x = layer(x)
        # Layer norm works per token, so normalising the CLS token alone equals normalising all, then taking it.
        return self.layernorm(x[:, 0])


def prepare(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [N, 3, H, W] -> float32 [N, 3, 224, 224], as torch-fidelity's FeatureExtractorDinoV2 prepares
    them: TF 1.x bilinear resize on the 0..255 values, then ImageNet mean/std (scaled by 255), bit for bit."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"DINOv2 features take uint8 images [N, 3, H, W], not {images.dtype} {list(images.shape)}")
    x = resize_like_tf1(images.float(), INPUT_SIZE)
    mean, std = (torch.tensor(v, device=x.device)[:, None, None] for v in (MEAN, STD))
    return (x - mean) / std


@torch.no_grad()
def features(model: DINOv2, images: torch.Tensor) -> torch.Tensor:
    """uint8 images [N, 3, H, W] (any size) -> float32 features [N, hidden_size], on the model's device."""
    weight = model.embeddings.cls_token
    return model(prepare(images.to(weight.device)).to(weight.dtype)).float()
