"""diffusers / transformers names -> ours: parameter names -> the official single-file names, one name at a time,
and the table of diffusers' config field names (which we map, which must hold minisd's value, which we ignore).

Naming facts read from diffusers 0.42 `diffusers/loaders/single_file_utils.py`, which converts the other way
(original -> diffusers: `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_open_clip_checkpoint`);
the mapping here is our own and is checked against that loader in tests/test_convert.py. Every function works on
NAMES: the UNet's per-level layout is passed in (from the folder's config), never guessed from the tensors.

A rename returns the official name (without the component prefix), DROP for a key that is deliberately left out,
or None for a key it does not know; the caller turns None into an error naming the key. Two names need more than a
rename, and `assemble` / `assembled_shape` state how: OpenCLIP's fused q/k/v `in_proj` (three transformers tensors
concatenated) and the VAE attention's 1x1 convs (transformers-style Linear weights [C, C] -> [C, C, 1, 1]).
"""
import re

import torch

DROP = ""   # a key that is known and intentionally not loaded

# Every parameter of diffusers 0.42 UNet2DConditionModel.__init__. MAPPED go into our config; FIXED must hold the
# value minisd computes (a list of all-equal values counts as that value); IGNORED do not change inference.
UNET_MAPPED = {"sample_size", "in_channels", "out_channels", "down_block_types", "up_block_types",
               "block_out_channels", "layers_per_block", "cross_attention_dim", "transformer_layers_per_block",
               "attention_head_dim", "num_attention_heads", "use_linear_projection", "upcast_attention"}
UNET_FIXED = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False, "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu",
    "norm_num_groups": 32, "norm_eps": 1e-5, "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "dual_cross_attention": False, "class_embed_type": None,
    "addition_embed_type": None, "addition_time_embed_dim": None, "num_class_embeds": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None, "attention_type": "default", "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None}
# dropout: training only. addition_embed_type_num_heads: read only with an addition_embed_type (which must be null).
UNET_IGNORED = {"dropout", "addition_embed_type_num_heads"}
VAE_MAPPED = {"in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
              "layers_per_block", "latent_channels", "scaling_factor"}
VAE_FIXED = {"act_fn": "silu", "norm_num_groups": 32, "shift_factor": None, "latents_mean": None, "latents_std": None,
             "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True}
# sample_size: the tile size of diffusers' tiled decoding (autoencoder_kl.py: tile_sample_min_size), not the
# model's size. force_upcast: diffusers' hint to decode fp16 models in fp32 -- a precision policy, not weights.
VAE_IGNORED = {"sample_size", "force_upcast"}

SCHEDULERS = {f"{name}Scheduler" for name in (
    "DDIM", "DDPM", "PNDM", "LMSDiscrete", "EulerDiscrete", "EulerAncestralDiscrete", "DPMSolverMultistep",
    "DPMSolverSinglestep", "Heun", "KDPM2", "KDPM2Ancestral", "UniPCMultistep", "DEISMultistep")}
# SD's training schedule (minisd.schedule); every other scheduler field is a sampler setting that does not change
# the model (timestep_spacing, steps_offset, set_alpha_to_one, clip_sample, use_karras_sigmas, ...): minisd's own
# samplers take those, so they are ignored here.
SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "trained_betas": None, "rescale_betas_zero_snr": False}
PREDICTION = {"epsilon": "eps", "v_prediction": "v"}


def _module(name: str, table: dict[str, str]) -> str | None:
    """Rename the module path before the final `.weight`/`.bias` by `table`; None if it is not in it."""
    module, _, param = name.rpartition(".")
    return f"{table[module]}.{param}" if module in table else None


def _join(head: str, tail: str | None) -> str | None:
    return None if tail is None else f"{head}.{tail}"


# diffusers ResnetBlock2D -> ldm ResBlock (Sequential indices hold SiLU/Dropout placeholders).
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def unet_name(key: str, layers_per_block: int, up_attention: tuple) -> str | None:
    """diffusers UNet2DConditionModel -> ldm openaimodel.UNetModel. up_attention[i]: up level i has cross-attention
    (up_block_types[i] is CrossAttnUpBlock2D)."""
    # ldm numbers blocks flat: per down level `num_res_blocks` (ResBlock[, SpatialTransformer]) entries + 1
    # downsampler; per up level `num_res_blocks + 1` entries, the last also holding the upsampler.
    per_level = layers_per_block + 1
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        side, level, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        block = f"input_blocks.{1 + level * per_level + j}" if side == "down" else \
            f"output_blocks.{level * per_level + j}"
        # Attentions keep diffusers' inner names and shapes (proj_in: SD2 Linear [C, C], SD1 1x1 conv [C, C, 1, 1])
        return _join(f"{block}.0", _module(rest, UNET_RESNET)) if kind == "resnets" else f"{block}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per_level}.0.op.{m[2]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", key):
        level = int(m[1])
        if level >= len(up_attention):
            return None
        # Upsample sits after the ResBlock and, in cross-attention levels, after the SpatialTransformer.
        return f"output_blocks.{(level + 1) * per_level - 1}.{2 if up_attention[level] else 1}.conv.{m[2]}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        # middle_block = ResBlock, SpatialTransformer, ResBlock
        j, rest = int(m[2]), m[3]
        return _join(f"middle_block.{2 * j}", _module(rest, UNET_RESNET)) if m[1] == "resnets" else \
            f"middle_block.{2 * j + 1}.{rest}"
    return _module(key, UNET_TOP)


VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
VAE_TOP = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"} | {
    name: name for name in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out",
                            "quant_conv", "post_quant_conv")}
# ldm's AttnBlock projections are 1x1 convs; diffusers' Attention stores them as Linear [C, C].
VAE_CONV_SHAPED = re.compile(r"(^|\.)(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")   # any prefix


def vae_name(key: str, levels: int) -> str | None:
    """diffusers AutoencoderKL -> ldm AutoencoderKL (Encoder/Decoder in ldm/modules/diffusionmodules/model.py).
    levels: len(block_out_channels)."""
    if m := re.fullmatch(r"(encoder\.down|decoder\.up)_blocks\.(\d+)\.(?:resnets\.(\d+)|\w+samplers\.0)\.(.+)", key):
        side, level, j, rest = m[1], int(m[2]), m[3], m[4]
        # Why reversed: ldm's Decoder builds `up` from the lowest resolution but stores it with insert(0, ...), so
        # decoder.up.0 is the full-resolution level, while diffusers' up_blocks.0 is the lowest-resolution one.
        level = level if side == "encoder.down" else levels - 1 - level
        sampler = side.split(".")[1] + "sample.conv"   # downsamplers.0.conv -> downsample.conv, same for up
        inner = _join(f"block.{j}", _module(rest, VAE_RESNET)) if j else _module(rest, {"conv": sampler})
        return None if level < 0 else _join(f"{side}.{level}", inner)
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return _join(f"{m[1]}.mid.block_{int(m[2]) + 1}", _module(m[3], VAE_RESNET))
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        return _join(f"{m[1]}.mid.attn_1", _module(m[2], VAE_ATTENTION))
    return _module(key, VAE_TOP)


TEXT_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
              "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
TEXT_TOP = {"embeddings.token_embedding": "token_embedding", "final_layer_norm": "ln_final"}
QKV = "qkv"   # nn.MultiheadAttention's in_proj stacks q, k, v in this order (OpenCLIP uses that class)


def openclip_name(key: str) -> str | tuple | None:
    """transformers CLIPTextModel (SD2: 23 layers, gelu) -> OpenCLIP text tower names (open_clip/transformer.py).
    q/k/v projections return (in_proj name, index among the QKV parts)."""
    key = key.removeprefix("text_model.")   # hub files have the prefix; transformers 5 saves without it
    if key == "embeddings.position_ids":
        return DROP   # a non-weight buffer (arange) that older transformers versions saved
    if key == "embeddings.position_embedding.weight":
        return "positional_embedding"   # OpenCLIP keeps a bare Parameter, not an nn.Embedding
    if m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
        return f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", QKV.index(m[2])
    if m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key):
        return _join(f"transformer.resblocks.{m[1]}", _module(m[2], TEXT_LAYER))
    return _module(key, TEXT_TOP)


def openai_name(key: str) -> str:
    """transformers CLIPTextModel (SD1) -> SD1's names: the same module paths under `text_model.` (ldm's
    FrozenCLIPEmbedder wraps that very class), so only the prefix differs between hub and transformers-5 saves."""
    key = key.removeprefix("text_model.")
    # position_ids: a saved arange buffer (older transformers); SD1 files ignore it by name (clip_openai.IGNORED).
    return DROP if key == "embeddings.position_ids" else key


def plan(keys, rename) -> dict[str, list[str]]:
    """official name -> the source keys it is made of (in concatenation order). ValueError naming the first key
    that does not map, or an official name with parts missing or doubled."""
    parts: dict[str, dict[int, str]] = {}
    for key in sorted(keys):
        target = rename(key)
        if target is None:
            raise ValueError(f"key {key} does not map to the official layout")
        if target == DROP:
            continue
        name, index = target if isinstance(target, tuple) else (target, 0)
        if index in parts.setdefault(name, {}):
            raise ValueError(f"keys {parts[name][index]} and {key} both map to {name}")
        parts[name][index] = key
    for name, found in parts.items():
        expected = len(QKV) if name.rsplit(".", 1)[-1].startswith("in_proj_") else 1
        if sorted(found) != list(range(expected)):
            raise ValueError(f"{name} needs the q, k and v projections; found only {sorted(found.values())}")
    return {name: [found[i] for i in sorted(found)] for name, found in parts.items()}


def assembled_shape(name: str, shapes: list[tuple]) -> tuple:
    """The official tensor's shape from its parts' shapes (headers only)."""
    if len(shapes) > 1:
        return (sum(s[0] for s in shapes), *shapes[0][1:])
    return (*shapes[0], 1, 1) if VAE_CONV_SHAPED.search(name) and len(shapes[0]) == 2 else tuple(shapes[0])


def assemble(name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    """The official tensor from its parts: q/k/v concatenated; a VAE attention Linear [C, C] as a conv [C, C, 1, 1]
    (the same numbers)."""
    if len(tensors) > 1:
        return torch.cat(tensors)
    tensor = tensors[0]
    return tensor[:, :, None, None] if VAE_CONV_SHAPED.search(name) and tensor.dim() == 2 else tensor
