"""DINOv2 with registers as an image encoder for conditioning: the global tokens of an image.

Attribute paths are transformers' Dinov2WithRegistersModel keys (the facebook/dinov2-with-registers-* files); the
same network as timm stores it (timm/vit_*_patch14_reg4_dinov2, the file DiNO-Diffusion used) loads through the
rename table in minisd/dino_keys.py. The blocks are minisd/dinov2.py's: registers change only the token sequence.
Sources: transformers 5.23 models/dinov2_with_registers/modeling_dinov2_with_registers.py, timm 1.0
models/vision_transformer.py, Darcet et al. 2024 "Vision Transformers Need Registers".

The global tokens (`global_tokens`, [N, 1 + R, D]) are the class token and the R register tokens after the final
layer norm -- what DiNO-Diffusion (Jimenez-Perez et al. 2024) conditions on. No pooler: transformers'
`pooler_output` for these models is the normalised class token itself, already the first global token. Patch
tokens are left out on purpose: they carry so much local detail that a diffusion model conditioned on them learns
to copy its training images.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .dino_prepare import Preparation, prepare
from .dinov2 import DINOv2Config, Layer


@dataclass(frozen=True)
class DINOv2RegConfig(DINOv2Config):
    """transformers' Dinov2WithRegistersConfig names; defaults: facebook/dinov2-with-registers-base (518 px)."""
    num_register_tokens: int = 4


def resample_positions(table, rows: int, cols: int):
    """The trained patch positions [1, M*M, D] -> [1, rows*cols, D]: bicubic with antialiasing, to a size, in
    float32. Why this one: transformers' Dinov2WithRegistersEmbeddings, timm's resample_abs_pos_embed and the
    original dinov2_vit*14_reg hub models (interpolate_antialias=True, interpolate_offset=0) all resample so; the
    models without registers used another rule (minisd/dinov2.py)."""
    m = round((table.shape[1]) ** 0.5)
    if (rows, cols) == (m, m):
        return table
    # [1, M*M, D] -> [1, D, M, M]
    grid = table.float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False, antialias=True)
    # [1, D, rows, cols] -> [1, rows*cols, D]
    return grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1).to(table.dtype)


class Embeddings(nn.Module):
    """Patches -> [CLS, registers, patches] (transformers' Dinov2WithRegistersEmbeddings). Why no mask_token: the
    file stores it (iBOT masking while training), inference never uses it; the loader lists it as ignored."""

    def __init__(self, cfg: DINOv2RegConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        grid = cfg.image_size // cfg.patch_size   # the trained grid: 518 // 14 = 37 for the releases
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_register_tokens, cfg.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, grid * grid + 1, cfg.hidden_size))
        self.patch_embeddings = nn.Module()
        self.patch_embeddings.projection = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, cfg.patch_size)

    def forward(self, pixels):
        # [N, 3, H, W] -> [N, D, H/p, W/p] -> [N, HW/p^2, D]
        patches = self.patch_embeddings.projection(pixels).flatten(2).transpose(1, 2)
        rows, cols = pixels.shape[2] // self.patch_size, pixels.shape[3] // self.patch_size
        table = self.position_embeddings
        cls = self.cls_token + table[:, :1]   # the class token's position is never resampled
        patches = patches + resample_positions(table[:, 1:], rows, cols)
        # Why the registers carry no position: they are added after the positions, between CLS and the patches.
        n = len(pixels)
        return torch.cat([cls.expand(n, -1, -1), self.register_tokens.expand(n, -1, -1), patches], dim=1)


class DINOv2Reg(nn.Module):
    """Normalised images [N, 3, H, W] -> all tokens after the final layer norm [N, 1 + R + HW/p^2, D]
    (transformers' Dinov2WithRegistersModel.last_hidden_state); `global_tokens` keeps the first 1 + R."""

    def __init__(self, cfg: DINOv2RegConfig = DINOv2RegConfig(), preparation: Preparation | None = None):
        super().__init__()
        # The release's image preparation (minisd.dino_prepare); the default is only a placeholder.
        self.config, self.preparation = cfg, preparation or Preparation()
        self.num_global_tokens = 1 + cfg.num_register_tokens
        self.embeddings = Embeddings(cfg)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels):
        x = self.embeddings(pixels)
        for layer in self.encoder.layer:
            x = layer(x)
        return self.layernorm(x)

    def global_tokens(self, pixels):
        """[N, 1 + R, D]: the class token, then the registers, normalised."""
        return self(pixels)[:, :self.num_global_tokens]


@torch.no_grad()
def encode(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB images [N, 3, H, W] -> float32 global tokens [N, G, D] on the model's device, the images prepared
    as the model's release prepares them (model.preparation). G = model.num_global_tokens: 1 + R for DINOv2 with
    registers (CLS, registers), 1 for DINOv1 (CLS) -- 2 where a DINOv1 file stores a pooler (CLS, pooler)."""
    weight = model.embeddings.cls_token
    pixels = prepare(model.preparation, images).to(device=weight.device, dtype=weight.dtype)
    return model.global_tokens(pixels).float()
