"""timm's DINOv2-with-registers releases (timm/vit_*_patch14_reg4_dinov2.lvd142m) read into minisd/dino.py's
network, whose attribute paths are transformers' names: the config.json timm writes, and its tensor names.

Why a rename table rather than a second network: the two layouts hold the same numbers in other places. timm
(models/vision_transformer.py, _convert_dinov2 and VisionTransformer with no_embed_class=True) fuses query, key and
value into one `attn.qkv` (rows in that order), calls layer scale `ls1.gamma`, and stores the class token with its
position already added (`cls_token` = original cls_token + pos_embed[:, 0]) and a position table of the patches
only. Loading puts the class token's row of our table at zero, which gives the same sum, and splits `qkv` in thirds.
"""
import json
import re

import torch

from .config import LoadError, check_value
from .dino import DINOv2RegConfig
from .dino_prepare import from_timm

# timm's architecture names -> the facts its model functions state (vision_transformer.py, vit_*_reg4_dinov2):
# every one patch 14, 4 registers, trained at 518 px, layer scale; the giant's feed-forward is SwiGLU.
ARCHITECTURES = {
    "vit_small_patch14_reg4_dinov2": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    "vit_base_patch14_reg4_dinov2": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "vit_large_patch14_reg4_dinov2": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
    "vit_giant_patch14_reg4_dinov2": dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24,
                                          use_swiglu_ffn=True),
}
# model_args (timm's create_model arguments, saved when they differ from the architecture's) -> our field names.
MODEL_ARGS = {"embed_dim": "hidden_size", "depth": "num_hidden_layers", "num_heads": "num_attention_heads",
              "patch_size": "patch_size", "reg_tokens": "num_register_tokens", "qkv_bias": "qkv_bias"}
# Arguments without effect on the features: training-time initial values, the classifier's pooling, and
# dynamic_img_size (minisd resamples positions for any input size, as timm does with it set).
IGNORED_ARGS = {"init_values", "global_pool", "dynamic_img_size", "drop_path_rate", "drop_rate"}
ONLY_ARGS = {"in_chans": 3, "num_classes": 0, "no_embed_class": True, "class_token": True}
TOP_FIELDS = {"architecture", "num_classes", "num_features", "global_pool", "model_args", "pretrained_cfg",
              "label_names", "label_descriptions"}


def is_timm(data: dict) -> bool:
    """timm's config.json names an `architecture`; transformers' a `model_type`."""
    return "architecture" in data and "model_type" not in data


def _image_size(path, value) -> int:
    side = value if isinstance(value, int) else value[0] if isinstance(value, list) and len(set(value)) == 1 else 0
    if isinstance(side, bool) or not isinstance(side, int) or side <= 0:
        raise LoadError(f"{path}: model_args.img_size {json.dumps(value)} is not supported; give one side (square)")
    return side


def _swiglu_width(path, fields: dict, ratio):
    """timm gives the giant's packed SwiGLU width as mlp_ratio * width (2 x 4096 for 1536); ours follows DINOv2's
    rule from mlp_ratio 4 (two thirds, rounded up to 8s, see minisd/dinov2.py SwiGLU). The two must agree."""
    width = fields.get("hidden_size", 1536)
    ours = 2 * ((int(int(width * 4.0) * 2 / 3) + 7) // 8 * 8)
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or int(width * ratio) != ours:
        raise LoadError(f"{path}: model_args.mlp_ratio {json.dumps(ratio)} gives a SwiGLU width other than DINOv2's "
                        f"({ours} for width {width}: mlp_ratio {ours / width})")


def read_config(path, data: dict) -> tuple:
    """timm's config.json (already parsed) -> (DINOv2RegConfig, Preparation)."""
    name = data.get("architecture")
    if name not in ARCHITECTURES:
        raise LoadError(f"{path}: timm architecture {json.dumps(name)} is not a DINOv2 with registers that minisd "
                        f"reads ({', '.join(ARCHITECTURES)})")
    unknown = sorted(set(data) - TOP_FIELDS)
    if unknown:
        raise LoadError(f"{path}: unknown field {unknown[0]} in timm's config.json")
    if data.get("num_classes", 0) != 0:
        raise LoadError(f"{path}: num_classes {data['num_classes']}: a classifier on top of the backbone; minisd "
                        "reads the backbone release (num_classes 0)")
    fields = dict(ARCHITECTURES[name], image_size=518, patch_size=14, num_register_tokens=4, layerscale_value=1.0)
    args = data.get("model_args") or {}
    for key, value in args.items():
        if key in MODEL_ARGS:
            fields[MODEL_ARGS[key]] = check_value(str(path), f"model_args.{key}", value,
                                                  getattr(DINOv2RegConfig, MODEL_ARGS[key]))
        elif key == "img_size":
            fields["image_size"] = _image_size(path, value)
        elif key == "mlp_ratio" and not fields.get("use_swiglu_ffn"):
            fields["mlp_ratio"] = check_value(str(path), "model_args.mlp_ratio", value, 4.0)
        elif key in ONLY_ARGS and value != ONLY_ARGS[key]:
            raise LoadError(f"{path}: model_args.{key} {json.dumps(value)} is not supported; the DINOv2 releases "
                            f"use {json.dumps(ONLY_ARGS[key])}")
        elif key not in ONLY_ARGS and key not in IGNORED_ARGS and key != "mlp_ratio":
            raise LoadError(f"{path}: unknown model_args field {key}; minisd reads "
                            f"{', '.join(sorted([*MODEL_ARGS, 'img_size', 'mlp_ratio', *ONLY_ARGS, *IGNORED_ARGS]))}")
    if "mlp_ratio" in args and fields.get("use_swiglu_ffn"):   # after the loop: it depends on embed_dim
        _swiglu_width(path, fields, args["mlp_ratio"])
    cfg = DINOv2RegConfig(**fields)
    if cfg.hidden_size % cfg.num_attention_heads:
        raise LoadError(f"{path}: embed_dim {cfg.hidden_size} does not split into {cfg.num_attention_heads} heads")
    return cfg, from_timm(path, data.get("pretrained_cfg") or {})


# Ours -> timm, applied in order to each of our names ({i}, the block index, carries over).
RENAMES = [("embeddings.patch_embeddings.projection.", "patch_embed.proj."), ("embeddings.cls_token", "cls_token"),
           ("embeddings.register_tokens", "reg_token"), ("embeddings.position_embeddings", "pos_embed"),
           ("encoder.layer.", "blocks."), (".attention.output.dense.", ".attn.proj."),
           (".layer_scale1.lambda1", ".ls1.gamma"), (".layer_scale2.lambda1", ".ls2.gamma"),
           (".mlp.weights_in.", ".mlp.fc1."), (".mlp.weights_out.", ".mlp.fc2."), ("layernorm.", "norm.")]
QKV = re.compile(r"\.attention\.attention\.(query|key|value)\.")


def timm_name(ours: str) -> tuple:
    """(timm's key, which third of the fused qkv it is or None) for one of our parameter names."""
    third = None
    match = QKV.search(ours)
    if match:
        third = ("query", "key", "value").index(match.group(1))
        ours = QKV.sub(".attn.qkv.", ours)
    for mine, theirs in RENAMES:
        ours = ours.replace(mine, theirs)
    return ours, third


def timm_shapes(expected: dict) -> dict:
    """timm's key -> shape, for our parameters `expected` (name -> shape)."""
    shapes = {}
    for name, shape in expected.items():
        key, third = timm_name(name)
        shape = list(shape)
        if third is not None:
            shape[0] *= 3
        elif name == "embeddings.position_embeddings":
            shape[1] -= 1   # no class-token row: timm folded it into cls_token
        shapes[key] = tuple(shape)
    return shapes


def timm_state(tensors: dict, names) -> dict:
    """timm's tensors (its key -> tensor) -> ours (name -> tensor) for our parameter `names`: qkv split in
    thirds, a zero row put in front of the position table for the class token (whose position timm folded in)."""
    state = {}
    for name in names:
        key, third = timm_name(name)
        tensor = tensors[key]
        if third is not None:
            tensor = tensor.chunk(3, dim=0)[third]
        elif name == "embeddings.position_embeddings":
            tensor = torch.cat([tensor.new_zeros(1, 1, tensor.shape[2]), tensor], dim=1)
        state[name] = tensor
    return state
