"""DINOv1 (Caron et al. 2021) as an image encoder for conditioning: the facebook/dino-vit{s,b}{8,16} releases.

Attribute paths are transformers' ViTModel keys, the layout those releases were converted to (transformers'
models/vit/convert_dino_to_pytorch.py, with `add_pooling_layer=False`: the files hold no pooler). Source of the
computation: transformers 5.23 models/vit/modeling_vit.py.

Global tokens: the class token after the final layer norm, [N, 1, D]. A ViTModel file that stores a pooler
(`pooler.dense`, saved by a ViTModel built with its default add_pooling_layer=True) adds its output, tanh(dense(CLS)),
as a second token. Why not for the releases: they have none, so transformers builds one with random weights at each
load (its "newly initialized: pooler.dense" warning) -- a token that would change every time the model is loaded.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .dino_prepare import Preparation
from .dinov2 import Attention  # transformers' ViTAttention = its Dinov2Attention: same modules, same names


@dataclass(frozen=True)
class ViTConfig:
    """transformers' ViTConfig names; defaults: facebook/dino-vitb16. Why layer_norm_eps 1e-12: the conversion
    wrote ViTConfig's default, not DINO's 1e-6, and transformers runs what config.json says; so do we."""
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-12
    image_size: int = 224
    patch_size: int = 16
    qkv_bias: bool = True
    add_pooling_layer: bool = False   # ViTModel's constructor argument, not in config.json: the file states it


def resample_positions(table, rows: int, cols: int):
    """The trained patch positions [1, M*M, D] -> [1, rows*cols, D] as transformers' ViTEmbeddings resamples them
    with interpolate_pos_encoding=True: bicubic to a size, no antialiasing (unlike DINOv2 with registers)."""
    m = round(table.shape[1] ** 0.5)
    if (rows, cols) == (m, m):
        return table
    # [1, M*M, D] -> [1, D, M, M] -> [1, D, rows, cols] -> [1, rows*cols, D]
    grid = table.reshape(1, m, m, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)


class Embeddings(nn.Module):
    """Patches -> [CLS, patches] with position embeddings added (transformers' ViTEmbeddings)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        grid = cfg.image_size // cfg.patch_size   # 224 // 16 = 14 for the releases
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, grid * grid + 1, cfg.hidden_size))
        self.patch_embeddings = nn.Module()
        self.patch_embeddings.projection = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, cfg.patch_size)

    def forward(self, pixels):
        # [N, 3, H, W] -> [N, D, H/p, W/p] -> [N, HW/p^2, D]
        patches = self.patch_embeddings.projection(pixels).flatten(2).transpose(1, 2)
        rows, cols = pixels.shape[2] // self.patch_size, pixels.shape[3] // self.patch_size
        table = self.position_embeddings
        cls = self.cls_token + table[:, :1]
        patches = patches + resample_positions(table[:, 1:], rows, cols)
        return torch.cat([cls.expand(len(pixels), -1, -1), patches], dim=1)


class Layer(nn.Module):
    """Pre-norm block (transformers' ViTLayer). Why `intermediate.dense` and `output.dense` for the MLP's two
    layers: transformers' ViT took BERT's module names; no layer scale (DINOv2 added it)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attention = Attention(cfg)
        self.layernorm_after = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.output = nn.Module()
        self.output.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        x = x + self.attention(self.layernorm_before(x))
        # exact (erf) GELU: hidden_act "gelu", as DINO's nn.GELU
        return x + self.output.dense(F.gelu(self.intermediate.dense(self.layernorm_after(x))))


class DINOv1(nn.Module):
    """Normalised images [N, 3, H, W] -> all tokens after the final layer norm [N, 1 + HW/p^2, D]
    (transformers' ViTModel.last_hidden_state, with interpolate_pos_encoding=True off the trained size)."""

    def __init__(self, cfg: ViTConfig = ViTConfig(), preparation: Preparation | None = None):
        super().__init__()
        # The release's image preparation (minisd.dino_prepare); the default is only a placeholder.
        self.config, self.preparation = cfg, preparation or Preparation()
        self.num_global_tokens = 1 + cfg.add_pooling_layer
        self.embeddings = Embeddings(cfg)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        if cfg.add_pooling_layer:
            self.pooler = nn.Module()
            self.pooler.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        # Why a function, chosen here: forward has no config branch (STYLE rule 6).
        self._global = self._cls_and_pooler if cfg.add_pooling_layer else self._cls

    def forward(self, pixels):
        x = self.embeddings(pixels)
        for layer in self.encoder.layer:
            x = layer(x)
        return self.layernorm(x)

    def _cls(self, tokens):
        return tokens[:, :1]

    def _cls_and_pooler(self, tokens):
        # transformers' ViTPooler: tanh(dense(CLS)) (pooler_act "tanh"), a token of the same width
        return torch.cat([tokens[:, :1], torch.tanh(self.pooler.dense(tokens[:, :1]))], dim=1)

    def global_tokens(self, pixels):
        """[N, 1, D] (CLS), or [N, 2, D] (CLS, pooler) for a file that stores a pooler."""
        return self._global(self(pixels))
