"""OpenAI CLIP ViT-L/14 text tower, as SD1.x uses it for conditioning.

Sources: FrozenCLIPEmbedder in ldm/modules/encoders/modules.py of CompVis/stable-diffusion (SD1 wraps
transformers' CLIPTextModel of openai/clip-vit-large-patch14), and transformers' models/clip/modeling_clip.py
(CLIPTextEmbeddings, CLIPAttention, CLIPMLP, CLIPEncoderLayer, CLIPTextTransformer), whose attribute names the
SD1 checkpoints store. Module paths are the checkpoint keys under `cond_stage_model.transformer.text_model.`.
"""
from dataclasses import dataclass

import torch
from torch import nn

from .attention import attention
from .clip import LAYERS
from .tokenizer import PAD_SD1

PREFIX = "cond_stage_model.transformer.text_model."
# Keys SD1 files may hold that the tower never reads. `embeddings.position_ids` (int64 [1, 77], 0..76) was a saved
# buffer in the transformers versions SD1 was released with; some files lack it (kohya-ss/sd-scripts pull #694).
# It is ignored by name, not loaded: positions are always
# 0..L-1, as in training. Files made by checkpoint mergers often store it as corrupted floats (0.583, 1.166, ...:
# A1111 pull #6728, arenasys/stable-diffusion-webui-model-toolkit issue #6). transformers (5.x, checked) keeps it
# as a non-persistent buffer, outside its state dict, so diffusers' single-file loader skips the stored values too
# (load_model_dict_into_meta drops keys the model's state dict lacks).
IGNORED = (PREFIX + "embeddings.position_ids",)


@dataclass(frozen=True)
class OpenAITextConfig:
    """transformers' CLIPTextConfig names; defaults are openai/clip-vit-large-patch14's text tower (SD1's)."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    vocab_size: int = 49408
    layer_norm_eps: float = 1e-5
    # Which hidden state conditions the UNet. SD1 was trained on "last" (ldm FrozenCLIPEmbedder's default).
    # "penultimate" is A1111's "Clip skip 2": the output of layer 11 of 12, then final_layer_norm
    # (modules/sd_hijack_clip.py: hidden_states[-2] -> final_layer_norm), which models fine-tuned that way expect.
    layer: str = "last"
    tower: str = "openai"         # the config JSON's text.tower: which class of text tower this is

    # The names the SD2 tower's config uses (TextConfig), so code around the towers reads either one.
    @property
    def width(self) -> int:
        return self.hidden_size

    @property
    def heads(self) -> int:
        return self.num_attention_heads

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings

    @property
    def pad_id(self) -> int:
        """SD1 pads with the end token (minisd.tokenizer.PAD_SD1)."""
        return PAD_SD1

    def unused(self) -> tuple:
        """Every layer is built (see OpenAITextTransformer), so no stored key is skipped."""
        return ()


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the sigmoid approximation of GELU that OpenAI trained CLIP with (transformers'
    hidden_act "quick_gelu"). It differs from exact GELU by up to 0.02 per activation, so it is not interchangeable."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with separate q/k/v projections (transformers' layout; OpenCLIP fuses them)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, width) for _ in range(3))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x):
        # Why causal: CLIP's text transformer is trained like a language model; position i sees 0..i only.
        # Scale head_dim**-0.5, SDPA's default, as transformers' CLIPAttention.
        return self.out_proj(attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=True))


class CLIPMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), QuickGELU(), nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: OpenAITextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg.hidden_size, cfg.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class OpenAITextTransformer(nn.Module):
    """Token ids [B, 77] -> conditioning [B, 77, 768], every position (the UNet attends to the padding too).

    All `num_hidden_layers` layers are built whatever `layer` says, so the state dict is the file's tower and loads
    strictly with no layer-dependent ignore list (the one unused layer under "penultimate" costs 7 M parameters);
    `layer` only sets how many run. The final layer norm applies in both cases, as in SD1 and A1111.
    """

    def __init__(self, cfg: OpenAITextConfig = OpenAITextConfig()):
        super().__init__()
        if cfg.layer not in LAYERS:
            raise ValueError(f"layer must be one of {', '.join(LAYERS)}, not {cfg.layer!r}")
        self.cfg = cfg
        self.depth = cfg.num_hidden_layers - LAYERS[cfg.layer]   # encoder layers run by forward
        self.embeddings = nn.Module()
        self.embeddings.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embeddings.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids):
        """ids: LongTensor [B, L], L <= max_position_embeddings."""
        return self.forward_embeddings(self.embeddings.token_embedding(ids))

    def forward_embeddings(self, x):
        """x: token embeddings [B, L, width]; lets textual inversion splice learned vectors in."""
        # positions 0..L-1 always (see IGNORED for the stored position_ids)
        x = x + self.embeddings.position_embedding.weight[: x.shape[1]]
        for layer in self.encoder.layers[: self.depth]:
            x = layer(x)
        return self.final_layer_norm(x)

    @property
    def blocks(self) -> nn.ModuleList:
        """The encoder layers, under one name for both towers (gradient checkpointing wraps them)."""
        return self.encoder.layers

    @property
    def token_embedding(self) -> nn.Embedding:
        """The token table under the name the SD2 tower uses, for textual inversion (not a second parameter)."""
        return self.embeddings.token_embedding
