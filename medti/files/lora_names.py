"""Where each LoRA adapter of ours sits in the two layouts LoRA files are written in: diffusers/PEFT module paths
(`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`, `text_model.encoder.layers.0.self_attn.q_proj`)
and kohya's names made from them (`lora_unet_down_blocks_0_..._to_q`, `lora_te_...`). The renames are
minisd.diffusers_keys', run over every layer an adapter can target. Split from lora_file.py, which reads and
writes the files."""
from minisd import lora
from minisd.diffusers_keys import QKV, openai_name, openclip_name, unet_name


def _unet_blocks(cfg) -> dict[str, str]:
    """Our SpatialTransformer paths (`input_blocks.1.1`) -> diffusers' (`down_blocks.0.attentions.0`), by running
    diffusers_keys.unet_name over every attention block diffusers could have for this layout."""
    levels = len(cfg.channel_mult)
    layout = cfg.num_res_blocks, tuple(2 ** (levels - 1 - i) in cfg.attention_resolutions for i in range(levels))
    blocks = [f"{side}_blocks.{level}.attentions.{j}" for side, per in (("down", cfg.num_res_blocks),
                                                                         ("up", cfg.num_res_blocks + 1))
              for level in range(levels) for j in range(per)] + ["mid_block.attentions.0"]
    probe = ".proj_in.weight"   # any inner name: attention blocks keep diffusers' inner names (diffusers_keys)
    return {unet_name(block + probe, *layout).removesuffix(probe): block for block in blocks}


def _unet_names(unet) -> dict[str, str]:
    """Our adapter paths in the UNet (every layer any target kind can adapt) -> diffusers module paths."""
    blocks, names = _unet_blocks(unet.cfg), {}
    for layer in lora.targets(unet, lora.UNET_TARGETS):
        parts = layer.split(".")
        head = next(k for k in (2, 3) if ".".join(parts[:k]) in blocks)   # middle_block.1 / input_blocks.4.1
        names[f"{layer}.lora"] = ".".join([blocks[".".join(parts[:head])], *parts[head:]])
    return names


def _text_names(tower) -> dict[str, str]:
    """Our adapter paths in the text tower -> transformers CLIPTextModel module paths: SD1's are the same paths;
    SD2's q/k/v are row blocks of OpenCLIP's fused in_proj (adapters lora_q/lora_k/lora_v of LoRAFusedAttention),
    its mlp.fc1/fc2 are mlp.c_fc/c_proj."""
    rename, names = (openai_name if tower.cfg.tower == "openai" else openclip_name), {}
    for i in range(len(tower.blocks)):
        for layer in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
                      "mlp.fc2"):
            path = f"text_model.encoder.layers.{i}.{layer}"
            ours = rename(path + ".weight")
            if isinstance(ours, tuple):   # (in_proj name, index among q, k, v)
                names[f"{ours[0].removesuffix('.in_proj_weight')}.lora_{QKV[ours[1]]}"] = path
            else:
                names[f"{ours.removesuffix('.weight')}.lora"] = path
    return names


def diffusers_names(unet, tower=None) -> dict[str, str]:
    """("unet." | "text.") + our adapter path -> the diffusers/transformers module path of its layer."""
    names = {f"unet.{k}": v for k, v in _unet_names(unet).items()}
    return names | ({f"text.{k}": v for k, v in _text_names(tower).items()} if tower is not None else {})


def kohya_names(unet, tower=None) -> dict[str, str]:
    """("unet." | "text.") + our adapter path -> kohya module name (`lora_unet_down_blocks_0_..._to_q`)."""
    return {k: ("lora_unet_" if k.startswith("unet.") else "lora_te_") + v.replace(".", "_")
            for k, v in diffusers_names(unet, tower).items()}
