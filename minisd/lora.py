"""LoRA: rank-r adapters around frozen layers of the UNet and the text towers (Hu et al. 2021, arXiv:2106.09685).

A layer y = W x + b becomes y = W x + b + s * up(down(x)), s = alpha / rank * weight. Conventions followed (facts
read from each project's source, no code taken):
  * kohya-ss/sd-scripts networks/lora.py (LoRAModule): the names `lora_down` [r, in] and `lora_up` [out, r], a
    stored `alpha`, scale alpha / r (alpha missing or 0 -> alpha = r), down kaiming-uniform (a = sqrt(5)), up zero;
    1x1 convs get 1x1-conv adapters.
  * peft tuners/lora/layer.py (LoraLayer.update_layer, reset_lora_parameters): lora_A = down, lora_B = up,
    scaling lora_alpha / r, the same initialisation: the adapted model starts equal to the base model.

How it attaches: the adapted layer is replaced by a wrapper that registers the base layer's own Parameters under the
same names (`to_q.weight` stays `to_q.weight`), so every checkpoint key of the model is unchanged and the adapters
appear beside them (`to_q.lora.lora_down.weight`). The base Parameters are never copied nor written: they stay
bit-identical and frozen. Adapters live in fp32 whatever the base runs in (fp16/bf16 training of an fp32 delta):
the input is cast to fp32 for the adapter and its output back to the layer's dtype. `remove` puts the original
modules back; `merge` first adds the deltas into their weights (for a new checkpoint, or faster sampling).
"""
import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Conv1x1, attention
from .clip import SelfAttention

QKV = "qkv"   # the row blocks of OpenCLIP's fused in_proj, in nn.MultiheadAttention's order
# What can be adapted, as regular expressions over module paths (full match). The UNet's (ldm SpatialTransformer):
# attention projections in every transformer block, the gated feed-forward, the 1x1-conv (SD1) or Linear (SD2)
# projections around the blocks. The text tower's self-attention: SD1's separate q/k/v/out projections, or SD2's
# whole attention module (fused in_proj + out_proj, see LoRAFusedAttention); and its MLP (SD1 fc1/fc2, SD2
# c_fc/c_proj), which kohya adapts by default (sd-scripts TEXT_ENCODER_TARGET_REPLACE_MODULE: CLIPAttention, CLIPMLP),
# so most kohya SD1 files carry it.
TARGETS = {
    "attention": r".+\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)",
    "ff": r".+\.transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)",
    "proj": r".+\.proj_(in|out)",
    "text": r"encoder\.layers\.\d+\.self_attn\.(q|k|v|out)_proj|transformer\.resblocks\.\d+\.attn",
    "text_ff": r"encoder\.layers\.\d+\.mlp\.fc[12]|transformer\.resblocks\.\d+\.mlp\.c_(fc|proj)",
}
UNET_TARGETS, TEXT_TARGETS = ("attention", "ff", "proj"), ("text", "text_ff")
DEFAULT = ("attention",)   # kohya's and diffusers' (train_dreambooth_lora.py) default: the UNet's attention


class LoRA(nn.Module):
    """The low-rank delta x -> scale * up(down(x)), in fp32. `weight` is the user's strength (A1111 <lora:name:0.8>,
    diffusers' adapter weight): it multiplies the scale and trains nothing."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float | None = None,
                 weight: float = 1.0, device=None):
        super().__init__()
        self.lora_down = nn.Linear(in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_up = nn.Linear(rank, out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)   # zero delta at the start (kohya, peft)
        # kohya: no alpha (or 0) means alpha = rank, i.e. scale 1; diffusers reads a file without alphas the same way
        self.rank, self.alpha = rank, float(alpha or rank)
        self.set_weight(weight)

    def set_weight(self, weight: float):
        # a Python float, fixed here: forward then never reads a tensor back from the device to scale
        self.weight, self.scale = float(weight), self.alpha / self.rank * float(weight)

    def forward(self, x):
        return self.lora_up(self.lora_down(x.float())) * self.scale

    def delta(self) -> torch.Tensor:
        """The fp32 weight change scale * up @ down [out, in] that `merge` adds."""
        return self.scale * (self.lora_up.weight @ self.lora_down.weight)


class LoRALinear(nn.Module):
    """A Linear or SD1's 1x1 conv (minisd.attention.Conv1x1, which already applies F.linear to tokens) with a delta.
    `weight` and `bias` are the base layer's Parameters themselves; `weight.flatten(1)` is the conv's [out, in, 1, 1]
    as [out, in] and a no-op for a Linear, so one forward serves both."""

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None):
        super().__init__()
        # A tuple, so the original is not registered as a child: its Parameters are ours already, under its names.
        self.base = (base,)
        self.weight, self.bias = base.weight, base.bias
        out_features, in_features = base.weight.shape[:2]
        self.lora = LoRA(in_features, out_features, rank, alpha, device=base.weight.device)

    def forward(self, x):
        out = F.linear(x, self.weight.flatten(1), self.bias)
        return out + self.lora(x).to(out.dtype)

    @torch.no_grad()
    def merge_(self):
        """W += delta (reshaped to [out, in, 1, 1] for a conv), computed in fp32 and rounded once."""
        self.weight.copy_((self.weight.float() + self.lora.delta().reshape(self.weight.shape)).to(self.weight.dtype))


class LoRAFusedAttention(nn.Module):
    """SD2's text-tower attention (minisd.clip.SelfAttention) with LoRA on q, k, v and out.

    Why a wrapper of the whole module: OpenCLIP stores q, k and v as ONE `in_proj_weight` [3w, w] used in F.linear,
    so there is no q layer to wrap. The files people use (kohya, diffusers) come from transformers' CLIPTextModel,
    which has separate q_proj/k_proj/v_proj: the LoRA is three deltas, one per row block of in_proj, plus out_proj.
    forward is SelfAttention.forward with the three deltas added to the fused projection (tests/test_lora.py checks
    it against transformers + peft)."""

    def __init__(self, base: SelfAttention, rank: int, alpha: float | None = None):
        super().__init__()
        self.base = (base,)   # not a child, as in LoRALinear
        self.heads = base.heads
        self.in_proj_weight, self.in_proj_bias = base.in_proj_weight, base.in_proj_bias
        self.out_proj = LoRALinear(base.out_proj, rank, alpha)
        width, device = base.out_proj.in_features, base.in_proj_weight.device
        self.lora_q, self.lora_k, self.lora_v = (LoRA(width, width, rank, alpha, device=device) for _ in QKV)

    def forward(self, x):
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)                       # [B, L, 3w]
        delta = torch.cat([self.lora_q(x), self.lora_k(x), self.lora_v(x)], dim=-1)    # [B, L, 3w], q k v order
        q, k, v = (qkv + delta.to(qkv.dtype)).chunk(3, dim=-1)
        # Why causal: CLIP's text transformer is trained like a language model; position i sees 0..i only.
        return self.out_proj(attention(q, k, v, self.heads, causal=True))

    @torch.no_grad()
    def merge_(self):
        """in_proj += [dq; dk; dv] (out_proj is a LoRALinear of its own and merges itself)."""
        delta = torch.cat([self.lora_q.delta(), self.lora_k.delta(), self.lora_v.delta()])
        self.in_proj_weight.copy_((self.in_proj_weight.float() + delta).to(self.in_proj_weight.dtype))


# Which wrapper adapts which layer class. Exact types: a subclass might compute something else.
WRAPPERS = {nn.Linear: LoRALinear, Conv1x1: LoRALinear, SelfAttention: LoRAFusedAttention}
WRAPPED = (LoRALinear, LoRAFusedAttention)


def targets(model: nn.Module, kinds=DEFAULT) -> list[str]:
    """Paths of the layers of `model` that the target kinds (keys of TARGETS) select, in module order, adapted
    already or not. A kind that selects nothing in this model (the text kind in a UNet) is simply empty."""
    unknown = set(kinds) - set(TARGETS)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {', '.join(TARGETS)}")
    pattern = "|".join(f"(?:{TARGETS[k]})" for k in kinds)
    return [name for name, module in model.named_modules()
            if re.fullmatch(pattern, name) and (type(module) in WRAPPERS or isinstance(module, WRAPPED))]


def _replace(model: nn.Module, name: str, module: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)   # works for Sequential/ModuleList indices ("to_out.0")


def attach(model: nn.Module, names: list[str], rank: int, alpha: float | None = None) -> dict[str, LoRA]:
    """Wrap the layers `names` (from `targets`) with fresh rank-`rank` adapters and freeze the whole model: only
    the adapters train (`parameters`). Returns `adapters(model)`. Attach after casting the model to its run dtype:
    a later `model.half()` would cast the adapters too."""
    model.requires_grad_(False)
    for name in names:
        layer = model.get_submodule(name)
        if isinstance(layer, WRAPPED):
            raise ValueError(f"{name} already has a LoRA adapter; merge or remove it first")
        _replace(model, name, WRAPPERS[type(layer)](layer, rank, alpha))
    return adapters(model)


def adapters(model: nn.Module) -> dict[str, LoRA]:
    """Module path -> adapter, e.g. `input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora` (a Linear's),
    `transformer.resblocks.0.attn.lora_q` (a row block of SD2's fused in_proj)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRA)}


def owner(model: nn.Module, adapter: str) -> str:
    """The layer path `attach` takes for an adapter path (as `adapters` names them): `x.lora` -> x, `attn.lora_q` ->
    attn, and SD2's `attn.out_proj.lora` -> attn (its LoRAFusedAttention adapts out_proj too)."""
    layer = adapter.rpartition(".")[0]
    parent = layer.rpartition(".")[0]
    fused = layer.endswith(".out_proj") and isinstance(model.get_submodule(parent), (SelfAttention, LoRAFusedAttention))
    return parent if fused else layer


def install(model: nn.Module, name: str, lora: LoRA):
    """Put `lora` at the adapter path `name` (as `adapters` names them), replacing the one there: files may hold
    a different rank or alpha per layer (kohya's rank_pattern/alpha_pattern, peft's rank_pattern)."""
    old = model.get_submodule(name)
    if not isinstance(old, LoRA) or old.lora_up.weight.shape[0] != lora.lora_up.weight.shape[0] or \
            old.lora_down.weight.shape[1] != lora.lora_down.weight.shape[1]:
        raise ValueError(f"{name}: no adapter of that layer's shape to replace")
    _replace(model, name, lora.to(old.lora_up.weight.device))


def parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter weights (down and up of every adapter), in module order."""
    return [p for lora in adapters(model).values() for p in lora.parameters()]


def set_weight(model: nn.Module, weight: float):
    """Set every adapter's user strength (1 = as trained)."""
    for lora in adapters(model).values():
        lora.set_weight(weight)


def remove(model: nn.Module) -> nn.Module:
    """Put the original layers back, adapters dropped. The base weights are those the wrappers shared (unchanged,
    or merged by `merge`)."""
    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, WRAPPED)]
    for name, wrapper in wrapped:   # outer before inner: an inner one (a fused out_proj) goes with its parent
        if isinstance(model.get_submodule(name), WRAPPED):
            _replace(model, name, wrapper.base[0])
    return model


def merge(model: nn.Module, weight: float | None = None) -> nn.Module:
    """Add every adapter into its base weight (W += weight * alpha / rank * up @ down; SD2's q/k/v deltas into the
    row blocks of in_proj) and remove the adapters. `weight` overrides the adapters' strength."""
    if weight is not None:
        set_weight(model, weight)
    for module in list(model.modules()):
        if isinstance(module, WRAPPED):
            module.merge_()
    return remove(model)
