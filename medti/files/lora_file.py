"""LoRA files: write the kohya/A1111 layout, read it and diffusers/PEFT files, onto minisd's UNet and text towers.

Formats (facts read from each project's source; no code taken from them):
  * kohya-ss/sd-scripts networks/lora.py (LoRANetwork, save_weights), which A1111 (extensions-builtin/Lora) and
    ComfyUI read: one module name per adapted layer, "lora_unet_" / "lora_te_" + the DIFFUSERS module path with
    "." -> "_" (kohya trains SD1/SD2 on diffusers' UNet and transformers' CLIPTextModel, so SD2's text tower has
    separate q/k/v there too), then `.lora_down.weight` [r, in], `.lora_up.weight` [out, r], `.alpha` (0-dim).
    1x1 convs (SD1's proj_in/proj_out) store [r, in, 1, 1] and [out, r, 1, 1]. Metadata `ss_network_module`,
    `ss_network_dim`, `ss_network_alpha`, `ss_v2` (sd-scripts train_network.py).
  * diffusers/PEFT (diffusers loaders/lora_pipeline.py, StableDiffusionLoraLoaderMixin.save_lora_weights):
    "unet." / "text_encoder." + module path + `.lora_A.weight` (down) / `.lora_B.weight` (up); older diffusers
    files `.lora.down.weight` / `.lora.up.weight`. No alpha stored means alpha = rank (scale 1), as diffusers reads it.
  * ours = kohya's layout with metadata like our embeddings' (format, base_model, base_sha256, rank, alpha, targets,
    and whatever the trainer adds), float32, keys sorted, written atomically; diffusers' `load_lora_weights` reads it.

Names: our module paths are the official checkpoint's (ldm / OpenCLIP); diffusers' are found through
minisd.diffusers_keys (diffusers -> ours), run over every diffusers path a model can have: one naming table only.
"""
import json
import math
import re
from pathlib import Path

import torch

from minisd import lora
from minisd.errors import UserError, excerpt
from minisd.tensorfile import open_safetensors

from .atomic import safetensors_bytes, write_atomic
from .embedding_file import WIDTHS
from .lora_names import kohya_names

FORMAT = "kohya-lora"                              # our metadata "format"
PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha",        # kohya
         "lora_A.weight": "down", "lora_B.weight": "up", "lora.down.weight": "down",  # PEFT; older diffusers
         "lora.up.weight": "up"}
PEFT_KEY = re.compile(r"(unet|text_encoder)\.(.+?)\.(lora_A\.weight|lora_B\.weight|lora\.down\.weight|lora\.up\.weight"
                      r"|alpha)")
KOHYA_KEY = re.compile(r"(lora_(?:unet|te)_[^.]+)\.(lora_down\.weight|lora_up\.weight|alpha)")
COMPONENTS = {"unet": "lora_unet_", "text_encoder": "lora_te_"}   # diffusers component -> kohya prefix


# alpha / rank scales a layer's update: kohya's recipes set alpha = rank or below (scale <= 1); a file whose scale is
# a hundred times that was not trained so (alpha 1e38 made NaN images blamed on the model).
MAX_ALPHA_SCALE = 100.0


class LoRAFileError(UserError):
    """A LoRA file we refuse; the message is one line naming the file and what was found."""


def _adapters(unet, tower) -> dict[str, lora.LoRA]:
    found = {f"unet.{k}": v for k, v in lora.adapters(unet).items()}
    return found | ({f"text.{k}": v for k, v in lora.adapters(tower).items()} if tower is not None else {})


def _layer(unet, tower, name: str):
    """The wrapped or wrappable layer an adapter path belongs to (`x.lora` -> x, `attn.lora_q` -> attn)."""
    component, _, path = name.partition(".")
    return (unet if component == "unet" else tower).get_submodule(path.rpartition(".")[0])


def write(path, unet, tower=None, meta: dict | None = None) -> None:
    """The adapters attached to `unet` (and `tower`) as one kohya-layout safetensors file, float32 (bit-exact on
    reading back), with metadata: ours plus the ss_* fields kohya's tools show."""
    adapters, names = _adapters(unet, tower), kohya_names(unet, tower)
    if not adapters:
        raise LoRAFileError(f"{path}: no LoRA adapters attached; nothing to write")
    tensors = {}
    for name, adapter in adapters.items():
        down, up = adapter.lora_down.weight.detach().float(), adapter.lora_up.weight.detach().float()
        if getattr(_layer(unet, tower, name), "weight", torch.empty(0)).dim() == 4:   # a 1x1 conv: conv adapters
            down, up = down[:, :, None, None], up[:, :, None, None]
        key = names[name]
        tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                    f"{key}.alpha": torch.tensor(adapter.alpha)}
    ranks = sorted({a.rank for a in adapters.values()})
    alphas = sorted({a.alpha for a in adapters.values()})
    layers = [name.partition(".")[2].rpartition(".")[0] for name in adapters]
    kinds = [k for k, p in lora.TARGETS.items() if any(re.fullmatch(p, layer) for layer in layers)]
    ours = {"format": FORMAT, "rank": ",".join(map(str, ranks)), "alpha": ",".join(f"{a:g}" for a in alphas),
            "targets": ",".join(kinds), "ss_network_module": "networks.lora", "ss_network_dim": str(ranks[-1]),
            "ss_network_alpha": f"{alphas[-1]:g}", "ss_v2": str(unet.cfg.use_linear_in_transformer)}
    write_atomic(path, safetensors_bytes(tensors, metadata={k: str(v) for k, v in (meta or {}).items()} | ours))


def _open(path: Path) -> tuple[dict, dict]:
    """(tensors, metadata) of a .safetensors file, or of a diffusers `.bin` (torch.load, weights only)."""
    if not path.exists():   # not relayed as Python's "[Errno 2] No such file or directory: ..."
        raise LoRAFileError(f"{path}: no such file")
    try:
        if path.suffix == ".safetensors":
            with open_safetensors(path) as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        return dict(torch.load(path, map_location="cpu", weights_only=True)), {}
    except Exception as err:   # the library's own message, on one line
        why = excerpt(str(err).splitlines()[0])
        if why.startswith("Weights only load failed"):   # torch's advice there (weights_only=False) is no flag of ours
            why = "not .safetensors, nor a torch file of tensors alone: pickled code is never run"
        raise LoRAFileError(f"{path}: not a readable LoRA file ({why})") from None


def _kohya_key(key: str) -> tuple[str, str] | None:
    """Any supported key -> (kohya module name, "down" | "up" | "alpha"); None if it is in no format we read."""
    if m := KOHYA_KEY.fullmatch(key):
        return m[1], PARTS[m[2]]
    key = "unet." + key if key.startswith(("down_blocks.", "mid_block.", "up_blocks.")) else key   # unprefixed
    if m := PEFT_KEY.fullmatch(key):
        # transformers 5's CLIPTextModel has no `text_model` level, so diffusers with it writes
        # `text_encoder.encoder.layers...`; with transformers 4 (and in kohya names) the level is there.
        module = "text_model." + m[2] if m[1] == "text_encoder" and m[2].startswith("encoder.") else m[2]
        return COMPONENTS[m[1]] + module.replace(".", "_"), PARTS[m[3]]
    return None


def _peft_alphas(path: Path, meta: dict) -> dict[str, float]:
    """kohya prefix -> lora_alpha from diffusers' `lora_adapter_metadata` (JSON {"unet.lora_alpha": 8, ...}, written
    by save_lora_weights since diffusers 0.34); PEFT files keep alpha there, not in tensors."""
    try:
        packed = json.loads(meta.get("lora_adapter_metadata", "{}"))
    except ValueError:
        raise LoRAFileError(f"{path}: metadata lora_adapter_metadata is not JSON") from None
    for component in COMPONENTS:
        if packed.get(f"{component}.alpha_pattern"):   # per-layer alphas by regex: not read, so refused
            raise LoRAFileError(f"{path}: {component}.alpha_pattern (per-layer alphas) is not supported")
    return {prefix: float(packed[f"{c}.lora_alpha"]) for c, prefix in COMPONENTS.items() if f"{c}.lora_alpha" in packed}


def _hint(entries: dict, width: int) -> str:
    """Which base the file was made for, from the text width its cross-attention (or text tower) reads."""
    found = {e["down"].shape[1] for name, e in entries.items()
             if "down" in e and ("attn2_to_k" in name or "_self_attn_" in name)}   # layers that read [.., width]
    if not found or found == {width}:
        return ""
    made = "/".join(f"{w} ({WIDTHS[w][0]})" if w in WIDTHS else str(w) for w in sorted(found))
    return f" -- the file reads text {made} wide; this model's text is {width}" + (
        f" ({WIDTHS[width][0]})" if width in WIDTHS else "")


def _other(tensors: dict) -> str:
    """What a file that is no LoRA may be instead, for the error: the two a user mixes up with one."""
    if any(k.startswith(("model.diffusion_model.", "cond_stage_model.", "first_stage_model.")) for k in tensors):
        return " -- it is a model checkpoint: load it with --model"
    if len(tensors) == 1 and next(iter(tensors.values())).dim() == 2:   # [vectors, width] under the token
        return " -- it looks like a textual-inversion embedding: give it to generate's --embeddings"
    return ""


def _entries(path: Path, tensors: dict, width: int) -> dict[str, dict]:
    """kohya module name -> {"down", "up"[, "alpha"]}, every key accounted for."""
    entries: dict[str, dict] = {}
    for key in sorted(tensors):
        parsed = _kohya_key(key)
        if parsed is None:
            raise LoRAFileError(f"{path}: key {key} is not a kohya (lora_unet_/lora_te_ ... lora_down/lora_up/alpha) "
                                "or diffusers/PEFT (unet./text_encoder. ... lora_A/lora_B) LoRA key" + _other(tensors))
        entries.setdefault(parsed[0], {})[parsed[1]] = tensors[key]
    for name, e in entries.items():
        if "down" not in e or "up" not in e:
            raise LoRAFileError(f"{path}: {name} has no {'lora_down' if 'down' not in e else 'lora_up'} weight"
                                + _hint(entries, width))
    return entries


def _check(path: Path, name: str, e: dict, layer_shape: tuple, hint: str):
    """The file's down [r, in] and up [out, r] (maybe with 1x1 conv dims) against the layer's [out, in]."""
    down, up = e["down"].flatten(1), e["up"].flatten(1)
    if not (down.is_floating_point() and up.is_floating_point()):
        raise LoRAFileError(f"{path}: {name} holds {down.dtype}/{up.dtype} weights; a LoRA's lora_down and lora_up "
                            "are floating-point tensors")
    if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
        raise LoRAFileError(f"{path}: {name} holds NaN or infinite values")
    alpha = e.get("alpha")
    if alpha is not None and not (torch.as_tensor(alpha).numel() == 1 and 0 < float(alpha) < math.inf):
        raise LoRAFileError(f"{path}: {name} has alpha {_shown(alpha)}; kohya stores one finite positive number per "
                            "layer (the scale is alpha / rank)")
    if alpha is not None and float(alpha) / down.shape[0] > MAX_ALPHA_SCALE:
        raise LoRAFileError(f"{path}: {name} has alpha {float(alpha):g} on rank {down.shape[0]}, a scale of "
                            f"{float(alpha) / down.shape[0]:g}; trained files stay near 1 (at most "
                            f"{MAX_ALPHA_SCALE:g})")
    if down.shape[1] != layer_shape[1] or up.shape[0] != layer_shape[0] or up.shape[1] != down.shape[0]:
        raise LoRAFileError(f"{path}: {name} has down {list(e['down'].shape)} and up {list(e['up'].shape)}, which do "
                            f"not fit this model's layer [{layer_shape[0]}, {layer_shape[1]}]" + hint)


def _shown(alpha) -> str:
    tensor = torch.as_tensor(alpha)
    return f"{tensor.item():g}" if tensor.numel() == 1 else f"of shape {list(tensor.shape)}"


def _layer_shape(layer) -> tuple:
    """[out, in] of the weight an adapter of `layer` changes (for SD2's attention: one q/k/v row block)."""
    if isinstance(layer, (lora.LoRAFusedAttention, lora.SelfAttention)):
        return layer.out_proj.weight.shape[1], layer.out_proj.weight.shape[1]
    return tuple(layer.weight.shape[:2])


def _plan(path: Path, tensors: dict, meta: dict, unet, tower) -> dict[str, dict]:
    """("unet." | "text.") + our adapter path -> the file's {"down", "up", "alpha"}, every key mapped and checked
    against the model (nothing is attached here)."""
    width = unet.cfg.context_dim
    entries, alphas = _entries(path, tensors, width), _peft_alphas(path, meta)
    for name, e in entries.items():   # a tensor alpha (kohya) wins; else the PEFT metadata's; else alpha = rank
        e.setdefault("alpha", alphas.get("lora_unet_" if name.startswith("lora_unet_") else "lora_te_"))
    ours = {kohya: name for name, kohya in kohya_names(unet, tower).items()}
    hint, plan = _hint(entries, width), {}
    for name, e in entries.items():
        if name not in ours:
            what = "text tower" if name.startswith("lora_te_") else "UNet"
            raise LoRAFileError(f"{path}: {name} is not an adaptable layer of this model's {what}" + (
                " (no text tower given)" if what == "text tower" and tower is None else "") + hint)
        layer = _layer(unet, tower, ours[name])
        if isinstance(layer, lora.WRAPPED):
            raise LoRAFileError(f"{path}: {name} already has a LoRA adapter; merge it first, then read this file")
        _check(path, name, e, _layer_shape(layer), hint)
        plan[ours[name]] = e
    return plan


def read(path, unet, tower=None, weight: float = 1.0) -> dict[str, str]:
    """Attach the adapters of a kohya or diffusers/PEFT LoRA file to `unet` (and `tower`) at strength `weight`;
    returns the file's metadata. Checked before anything is attached: a refused file leaves the model unchanged.
    A layer that already has an adapter is refused (merge the first file, then read the next)."""
    path = Path(path)
    tensors, meta = _open(path)
    plan = _plan(path, tensors, meta, unet, tower)
    for component, model in (("unet", unet), ("text", tower)):
        layers = sorted({lora.owner(model, n.partition(".")[2]) for n in plan if n.startswith(component + ".")})
        if layers:
            lora.attach(model, layers, rank=1)   # placeholders, replaced below by adapters of the file's shapes
    for name, e in plan.items():
        down, up = e["down"].flatten(1).float(), e["up"].flatten(1).float()
        alpha = None if e["alpha"] is None else float(e["alpha"])
        adapter = lora.LoRA(down.shape[1], up.shape[0], down.shape[0], alpha, weight)
        with torch.no_grad():
            adapter.lora_down.weight.copy_(down)
            adapter.lora_up.weight.copy_(up)
        component, _, adapter_path = name.partition(".")
        lora.install(unet if component == "unet" else tower, adapter_path, adapter)
    return meta


def info(path) -> str:
    """One line: how many layers, ranks, alphas and the metadata's targets and base model."""
    tensors, meta = _open(Path(path))
    entries = _entries(Path(path), tensors, 0)
    ranks = sorted({e["down"].shape[0] for e in entries.values()})
    return (f"{path}: {len(entries)} layers, rank {','.join(map(str, ranks))}, targets {meta.get('targets', '?')}, "
            f"base {meta.get('base_model', '?')}; metadata {json.dumps(meta, sort_keys=True)}")
