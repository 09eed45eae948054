"""Convert a diffusers-format SD2 folder into one official single-file checkpoint (ldm/OpenCLIP names).

    python tools/convert_diffusers.py FOLDER OUT.safetensors [--config-out OUT.json]

FOLDER holds `unet/`, `vae/`, `text_encoder/` (each: config.json + weights as *.safetensors, or *.bin read with
`torch.load(weights_only=True)`) and `scheduler/` (scheduler_config.json). OUT gets the tensors under the official
prefixes `model.diffusion_model.` (UNet), `first_stage_model.` (VAE) and `cond_stage_model.model.` (OpenCLIP text
tower). Nothing is invented: no `resblocks.23`, `text_projection`, `logit_scale` or DDPM schedule buffers, which
SD2 never uses. Every input tensor is renamed or the conversion fails naming it.

The config JSON (default: OUT with a .json suffix) is medti's own format; names follow the ldm YAML / OpenCLIP:
    {"unet": {"model_channels", "channel_mult", "num_res_blocks", "attention_resolutions" (downsampling factors
              with cross-attention, as in the YAML: SD2 [4, 2, 1]), "num_head_channels" [, "num_heads"], "context_dim",
              "transformer_depth", "use_linear_in_transformer", "in_channels", "out_channels", "upcast_attention"},
     "vae": {"ch", "ch_mult", "num_res_blocks", "z_channels", "embed_dim", "in_channels", "out_ch"},
     "text": {"width", "layers" (OpenCLIP's count: diffusers' 23 + the unused 24th), "heads", "context_length",
              "vocab_size"},
     "prediction": "eps" | "v", "scale_factor": float}

Naming facts read from diffusers 0.42 `diffusers/loaders/single_file_utils.py` (the reverse, original->diffusers,
converter: `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_open_clip_checkpoint`); the
mapping below is our own and is checked against that loader in tests/test_convert.py.
"""

import argparse
import json
import os
import pickle
import re
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": "cond_stage_model.model."}


class ConvertError(ValueError):
    """Bad input; the CLI prints the message as one line."""


def _rename(name: str, table: dict[str, str], key: str = "") -> str:
    """Rename the module path before the final `.weight`/`.bias`; an unknown one is an error naming `key`."""
    module, _, param = name.rpartition(".")
    if module not in table:
        raise ConvertError(f"unmapped key {key or name!r}")
    return f"{table[module]}.{param}"


# diffusers ResnetBlock2D -> ldm ResBlock (Sequential indices hold SiLU/Dropout placeholders).
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def convert_unet(state_dict: dict) -> dict:
    """diffusers UNet2DConditionModel -> ldm openaimodel.UNetModel names (no prefix)."""
    # ldm numbers blocks flat: per down level `num_res_blocks` (ResBlock[, SpatialTransformer]) entries + 1
    # downsampler; per up level `num_res_blocks + 1` entries, the last also holding the upsampler.
    resnets = {int(m[1]) for k in state_dict if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))}
    per_level = len(resnets) + 1
    out = {}
    for key, tensor in state_dict.items():
        if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            side, level, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
            block = f"input_blocks.{1 + level * per_level + j}" if side == "down" else \
                f"output_blocks.{level * per_level + j}"
            # Attentions keep diffusers' inner names and shapes (proj_in: SD2 Linear [C, C], SD1 1x1 conv [C, C, 1, 1])
            new = f"{block}.0.{_rename(rest, UNET_RESNET, key)}" if kind == "resnets" else f"{block}.1.{rest}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", key):
            new = f"input_blocks.{(int(m[1]) + 1) * per_level}.0.op.{m[2]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", key):
            # Upsample sits after the ResBlock and, in cross-attention levels, after the SpatialTransformer.
            has_attention = any(k.startswith(f"up_blocks.{m[1]}.attentions.") for k in state_dict)
            new = f"output_blocks.{(int(m[1]) + 1) * per_level - 1}.{2 if has_attention else 1}.conv.{m[2]}"
        elif m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
            # middle_block = ResBlock, SpatialTransformer, ResBlock
            kind, j, rest = m[1], int(m[2]), m[3]
            new = f"middle_block.{2 * j}.{_rename(rest, UNET_RESNET, key)}" if kind == "resnets" else \
                f"middle_block.{2 * j + 1}.{rest}"
        else:
            new = _rename(key, UNET_TOP)
        out[new] = tensor
    return out


VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
VAE_TOP = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"} | {
    name: name for name in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out",
                            "quant_conv", "post_quant_conv")}


def convert_vae(state_dict: dict) -> dict:
    """diffusers AutoencoderKL -> ldm AutoencoderKL (Encoder/Decoder in ldm/modules/diffusionmodules/model.py)."""
    # Why reversed: ldm's Decoder builds `up` from the lowest resolution but stores it with insert(0, ...), so
    # decoder.up.0 is the full-resolution level, while diffusers' up_blocks.0 is the lowest-resolution one.
    n_up = 1 + max((int(m[1]) for k in state_dict if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))), default=-1)
    out = {}
    for key, tensor in state_dict.items():
        pattern = r"(encoder\.down|decoder\.up)_blocks\.(\d+)\.(?:resnets\.(\d+)|\w+samplers\.0)\.(.+)"
        if m := re.fullmatch(pattern, key):
            side, level, j, rest = m[1], int(m[2]), m[3], m[4]
            level = level if side == "encoder.down" else n_up - 1 - level
            sampler = side.split(".")[1] + "sample.conv"  # downsamplers.0.conv -> downsample.conv, same for up
            inner = f"block.{j}.{_rename(rest, VAE_RESNET, key)}" if j else _rename(rest, {"conv": sampler}, key)
            new = f"{side}.{level}.{inner}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{_rename(m[3], VAE_RESNET, key)}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
            new = f"{m[1]}.mid.attn_1.{_rename(m[2], VAE_ATTENTION, key)}"
            if tensor.dim() == 2:  # Linear [C, C] -> 1x1 conv [C, C, 1, 1]: same numbers, ldm uses Conv2d
                tensor = tensor[:, :, None, None]
        else:
            new = _rename(key, VAE_TOP)
        out[new] = tensor
    return out


TEXT_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
              "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
TEXT_TOP = {"embeddings.token_embedding": "token_embedding", "final_layer_norm": "ln_final"}


def convert_text(state_dict: dict) -> dict:
    """transformers CLIPTextModel (23 layers) -> OpenCLIP text tower names (open_clip/model.py, transformer.py)."""
    out, qkv = {}, {}
    for key, tensor in state_dict.items():
        key = key.removeprefix("text_model.")  # hub files have the prefix; transformers 5 saves without it
        if key == "embeddings.position_ids":
            continue  # a non-weight buffer (arange) that older transformers versions saved
        if key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = tensor  # OpenCLIP keeps a bare Parameter, not an nn.Embedding
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            qkv[(int(m[1]), m[3], m[2])] = tensor
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key):
            out[f"transformer.resblocks.{m[1]}.{_rename(m[2], TEXT_LAYER, key)}"] = tensor
        else:
            out[_rename(key, TEXT_TOP)] = tensor
    # OpenCLIP uses nn.MultiheadAttention: q, k, v stacked in one [3*width, width] in_proj, in that order.
    for layer, param in sorted({(layer, param) for layer, param, _ in qkv}):
        parts = [qkv.get((layer, param, name)) for name in "qkv"]
        if any(p is None for p in parts):
            raise ConvertError(f"text encoder layer {layer}: q/k/v_proj.{param} incomplete")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat(parts)
    return out


def _need(ok: bool, message: str):
    if not ok:
        raise ConvertError(f"unsupported: {message}")


def _unet_config(u: dict) -> dict:
    widths, levels = u["block_out_channels"], u["down_block_types"]
    _need(u.get("_class_name") == "UNet2DConditionModel", "_class_name must be UNet2DConditionModel")
    _need(len(widths) == len(levels) > 0 and all(w % widths[0] == 0 for w in widths), "block_out_channels")
    _need(set(levels) <= {"CrossAttnDownBlock2D", "DownBlock2D"}, f"down_block_types {levels}")
    _need(isinstance(u.get("layers_per_block"), int), "layers_per_block must be one int")
    _need(u.get("addition_embed_type") is None and u.get("class_embed_type") is None, "extra embeddings")
    # Why: diffusers' `attention_head_dim` is the head COUNT (SD2 5/10/20/20: ldm's width 64; SD1 8: ldm's num_heads)
    heads = u.get("num_attention_heads") or u["attention_head_dim"]
    heads = heads if isinstance(heads, list) else [heads] * len(widths)
    head_channels = {w / h for w, h in zip(widths, heads, strict=True)}
    equal_width = len(head_channels) == 1 and float(next(iter(head_channels))).is_integer()
    _need(equal_width or len(set(heads)) == 1, f"attention_head_dim {heads}: neither head widths nor counts equal")
    sd1_rule = {"num_head_channels": -1, "num_heads": heads[0]}   # a fixed head count, widths differ per level
    depth = u.get("transformer_layers_per_block", 1)
    _need(isinstance(depth, int) or len(set(depth)) == 1, "transformer_layers_per_block must be equal")
    cross_levels = [i for i, block in enumerate(levels) if block.startswith("CrossAttn")]
    return {"model_channels": widths[0], "channel_mult": [w // widths[0] for w in widths],
            "num_res_blocks": u["layers_per_block"],
            "attention_resolutions": [2**i for i in reversed(cross_levels)],  # YAML order: [4, 2, 1]
            **({"num_head_channels": int(head_channels.pop())} if equal_width else sd1_rule),
            "context_dim": u["cross_attention_dim"], "transformer_depth": depth if isinstance(depth, int) else depth[0],
            "use_linear_in_transformer": bool(u.get("use_linear_projection", False)),
            "in_channels": u.get("in_channels", 4), "out_channels": u.get("out_channels", 4),
            "upcast_attention": bool(u.get("upcast_attention", False))}


def _vae_config(v: dict) -> dict:
    widths = v["block_out_channels"]
    _need(v.get("_class_name") == "AutoencoderKL", "_class_name must be AutoencoderKL")
    _need(len(widths) > 0 and all(w % widths[0] == 0 for w in widths), "block_out_channels")
    _need(v.get("use_quant_conv", True) and v.get("use_post_quant_conv", True), "quant convs required")
    return {"ch": widths[0], "ch_mult": [w // widths[0] for w in widths],
            "num_res_blocks": v.get("layers_per_block", 1), "z_channels": v.get("latent_channels", 4),
            "embed_dim": v.get("latent_channels", 4), "in_channels": v.get("in_channels", 3),
            "out_ch": v.get("out_channels", 3)}


def _text_config(t: dict) -> dict:
    _need(t.get("model_type") == "clip_text_model" and t.get("architectures") in (None, ["CLIPTextModel"]),
          "model_type must be clip_text_model, architectures ['CLIPTextModel']")
    _need(t.get("hidden_act") == "gelu", f"hidden_act {t.get('hidden_act')!r} (OpenCLIP uses exact 'gelu')")
    return {"width": t["hidden_size"], "layers": t["num_hidden_layers"] + 1,  # SD2 runs the penultimate block
            "heads": t["num_attention_heads"], "context_length": t["max_position_embeddings"],
            "vocab_size": t["vocab_size"]}


def _prediction(s: dict) -> str:
    prediction = {"epsilon": "eps", "v_prediction": "v"}.get(s.get("prediction_type", "epsilon"))
    _need(prediction is not None, f"prediction_type {s.get('prediction_type')!r}")
    return prediction


def _section(read, path: Path):
    """Apply `read` to the JSON at `path`, naming the file in any error."""
    try:
        return read(json.loads(path.read_text()))
    except FileNotFoundError:
        raise ConvertError(f"missing {path}") from None
    except KeyError as err:
        raise ConvertError(f"{path}: missing field {err}") from None
    except (ConvertError, AttributeError, TypeError, ValueError, ZeroDivisionError) as err:  # incl. bad JSON
        raise ConvertError(f"{path}: {err}") from None


def config_from_diffusers(folder) -> dict:
    """Read the four diffusers configs and restate them in ldm/OpenCLIP terms (see module docstring)."""
    folder = Path(folder)
    scheduler = folder / "scheduler" / "scheduler_config.json"
    scheduler = scheduler if scheduler.is_file() else folder / "scheduler" / "config.json"
    vae = folder / "vae" / "config.json"
    return {"unet": _section(_unet_config, folder / "unet" / "config.json"),
            "vae": _section(_vae_config, vae),
            "text": _section(_text_config, folder / "text_encoder" / "config.json"),
            "prediction": _section(_prediction, scheduler),
            "scale_factor": _section(lambda v: float(v.get("scaling_factor", 0.18215)), vae)}


def load_weights(subfolder: Path) -> dict:
    """All *.safetensors in `subfolder` (else all *.bin); a tensor found in two files is an error."""
    files = sorted(subfolder.glob("*.safetensors")) or sorted(subfolder.glob("*.bin"))
    if not files:
        raise ConvertError(f"{subfolder}: no *.safetensors or *.bin weights")
    state_dict, origin = {}, {}
    for path in files:
        try:
            part = load_file(path) if path.suffix == ".safetensors" else torch.load(path, "cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, SafetensorError, pickle.UnpicklingError) as err:
            reason = str(err).splitlines()[0] if str(err) else repr(err)
            raise ConvertError(f"{path}: cannot read weights ({reason})") from None
        for key, tensor in part.items():
            if key in origin:
                raise ConvertError(f"{subfolder}: {key!r} is in both {origin[key].name} and {path.name}")
            state_dict[key], origin[key] = tensor, path
    return state_dict


def convert_folder(folder) -> tuple[dict, dict]:
    """Return (official state dict with component prefixes, config) for a diffusers SD2 folder."""
    folder = Path(folder)
    for sub in (*PREFIXES, "scheduler"):
        if not (folder / sub).is_dir():
            raise ConvertError(f"missing subfolder {folder / sub}")
    config = config_from_diffusers(folder)
    converters = {"unet": convert_unet, "vae": convert_vae, "text_encoder": convert_text}
    out = {}
    for sub, prefix in PREFIXES.items():
        state_dict = load_weights(folder / sub)
        try:
            converted = converters[sub](state_dict)
        except ConvertError as err:
            raise ConvertError(f"{folder / sub}: {err}") from None
        out |= {prefix + key: tensor.contiguous() for key, tensor in converted.items()}
    return out, config


def write_outputs(state_dict: dict, config: dict, out: Path, config_out: Path):
    """Write both files to temporaries next to their targets, then rename: no half-written output on failure."""
    tmp_out, tmp_config = (path.with_name(f".{path.name}.{os.getpid()}.tmp") for path in (out, config_out))
    try:
        save_file(state_dict, tmp_out, metadata={"format": "pt"})
        tmp_config.write_text(json.dumps(config, indent=2) + "\n")
        os.replace(tmp_out, out)
        os.replace(tmp_config, config_out)
    finally:
        tmp_out.unlink(missing_ok=True)
        tmp_config.unlink(missing_ok=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="diffusers SD2 folder (unet/, vae/, text_encoder/, scheduler/)")
    parser.add_argument("out", type=Path, help="output .safetensors")
    parser.add_argument("--config-out", type=Path, help="output config JSON (default: OUT with .json suffix)")
    args = parser.parse_args(argv)
    config_out = args.config_out or args.out.with_suffix(".json")
    try:
        state_dict, config = convert_folder(args.folder)
        write_outputs(state_dict, config, args.out, config_out)
    except (ConvertError, OSError) as err:
        sys.exit(f"convert_diffusers: error: {err}")
    print(f"wrote {args.out} ({len(state_dict)} tensors) and {config_out}")


if __name__ == "__main__":
    main()
