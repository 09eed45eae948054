"""The models tools/benchmark.py and tools/gpu_check.py measure: diffusers/transformers modules with random weights,
in the configuration of one of our configs, converted to the official single-file layout and loaded back by
minisd.load, so that both sides compute with the same numbers.

A model is named by our config (a preset such as "sd2-base" or "sd15", or a dict in the JSON format: the tiny
ones); `diffusers_configs` restates it in diffusers'/transformers' terms (also used by tools/memory_estimate.py).
"""
import argparse
import json
from pathlib import Path

import torch

import minisd
from minisd import clip, clip_openai
from minisd import diffusers_keys as names
from minisd.clip import LAYERS
from minisd.config import ModelConfig
from minisd.unet import head_width

# name -> (our config, image size, the larger size of section 6). Tiny: the same architectures shrunk, 16-wide
# heads (SD2) or 2 heads (SD1), a 64-wide text tower with the real vocabulary (the tokenizer's ids must fit).
TINY_VAE = {"ch": 32, "ch_mult": [1, 1, 2, 2]}
TINY_UNET = {"model_channels": 32, "channel_mult": [1, 2, 2, 2], "context_dim": 64}
MODELS = {
    "sd2": ("sd2-base", 512, 768),
    "sd1": ("sd15", 512, 768),
    "sd2-tiny": ({"unet": {**TINY_UNET, "num_head_channels": 16}, "vae": TINY_VAE,
                  "text": {"width": 64, "layers": 4, "heads": 4}}, 128, 192),
    "sd1-tiny": ({"unet": {**TINY_UNET, "num_heads": 2, "num_head_channels": -1, "use_linear_in_transformer": False},
                  "vae": TINY_VAE, "text": {"tower": "openai", "hidden_size": 64, "intermediate_size": 256,
                                            "num_hidden_layers": 3, "num_attention_heads": 4, "layer": "last"}},
                 128, 192),
}


def diffusers_configs(cfg: ModelConfig, resolution: int) -> dict:
    """Our config in diffusers'/transformers' terms: kwargs of UNet2DConditionModel, AutoencoderKL, CLIPTextConfig
    (for the SD2 and SD1 presets these are the hub folders' config.json values)."""
    u, v, t = cfg.unet, cfg.vae, cfg.text
    widths = [u.model_channels * m for m in u.channel_mult]
    attends = [2 ** i in u.attention_resolutions for i in range(len(widths))]
    unet = dict(sample_size=resolution // cfg.latent_factor, in_channels=u.in_channels, out_channels=u.out_channels,
                block_out_channels=widths, layers_per_block=u.num_res_blocks, cross_attention_dim=u.context_dim,
                # diffusers' attention_head_dim is the number of heads per level (FACTS.md): SD2 5/10/20/20, SD1 8
                attention_head_dim=[w // head_width(u, w) for w in widths],
                transformer_layers_per_block=u.transformer_depth, use_linear_projection=u.use_linear_in_transformer,
                down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends],
                up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attends[::-1]])
    vae = dict(block_out_channels=[v.ch * m for m in v.ch_mult], layers_per_block=v.num_res_blocks,
               latent_channels=v.z_channels, down_block_types=["DownEncoderBlock2D"] * len(v.ch_mult),
               up_block_types=["UpDecoderBlock2D"] * len(v.ch_mult))
    if t.tower == "openai":   # SD1: OpenAI CLIP ViT-L/14, every layer stored, quick_gelu
        text = dict(hidden_size=t.hidden_size, intermediate_size=t.intermediate_size, hidden_act="quick_gelu",
                    num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads)
    else:   # SD2: diffusers' folder stores only the layers run (23 of 24 for "penultimate"), exact GELU, MLP 4x
        text = dict(hidden_size=t.width, intermediate_size=4 * t.width, hidden_act="gelu",
                    num_hidden_layers=t.layers - LAYERS[t.layer], num_attention_heads=t.heads)
    return {"unet": unet, "vae": vae, "text": {**text, "vocab_size": t.vocab_size}}


def reference_models(kwargs: dict) -> dict:
    """diffusers' UNet and VAE, transformers' CLIPTextModel, random weights (tests/conftest.py's randomize_)."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    from conftest import randomize_  # tests/ is on sys.path (benchmark.py puts it there)
    torch.manual_seed(0)
    return {"unet": randomize_(diffusers.UNet2DConditionModel(**kwargs["unet"]), 1).requires_grad_(False),
            "vae": randomize_(diffusers.AutoencoderKL(**kwargs["vae"]), 2).requires_grad_(False),
            "text": randomize_(CLIPTextModel(CLIPTextConfig(**kwargs["text"])), 3)}


def official_state(refs: dict, tower: str) -> dict:
    """The reference modules' weights under the official single-file names (SD2's or SD1's text prefix)."""
    from convert_diffusers import PREFIXES, convert_text, convert_unet, convert_vae

    def convert_openai(state):   # SD1: the same module paths as transformers', under the file's own prefix
        plan = names.plan(state, names.openai_name)
        return {name: names.assemble(name, [state[k] for k in keys]) for name, keys in plan.items()}
    text, prefix = (convert_openai, clip_openai.PREFIX) if tower == "openai" else (convert_text, clip.PREFIX)
    state = {}
    for convert, ref, pre in ((convert_unet, "unet", PREFIXES["unet"]), (convert_vae, "vae", PREFIXES["vae"]),
                              (text, "text", prefix)):
        state |= {pre + k: v.contiguous() for k, v in convert(refs[ref].state_dict()).items()}
    return state


def euler_a():   # SD1/SD2's betas; timestep spacing "linspace", as ours
    import diffusers
    return diffusers.EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                     steps_offset=1)


def config_folder(refs: dict, folder: Path):
    """A diffusers folder with configs only, for from_single_file(config=...)."""
    refs["unet"].save_config(folder / "unet"), refs["vae"].save_config(folder / "vae")
    refs["text"].config.save_pretrained(folder / "text_encoder"), euler_a().save_config(folder / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "scheduler": ["diffusers", "EulerAncestralDiscreteScheduler"], "tokenizer": [None, None],
             "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    (folder / "model_index.json").write_text(json.dumps(index))


def setup(args, model: str, tmp: Path) -> argparse.Namespace:
    """Random reference models of MODELS[model], their official-layout file (b.file), ours loaded from it, a
    diffusers config folder, and our prompt embeddings."""
    from safetensors.torch import save_file
    ours, size, big = MODELS[model]
    cfg = minisd.load_config(ours)
    kwargs = diffusers_configs(cfg, size)
    refs = reference_models(kwargs)
    file = tmp / f"{model}.safetensors"
    save_file(official_state(refs, cfg.text.tower), str(file))
    config_folder(refs, tmp / "diffusers")
    sd = minisd.load(file, config=ours)
    with torch.no_grad():
        cond, uncond = sd.text(["chest x-ray, PA view"]), sd.text([""])
    return argparse.Namespace(cfg=kwargs, refs=refs, sd=sd, folder=tmp / "diffusers", cond=cond, uncond=uncond,
                              tmp=tmp, file=file, size=size, big=big, ours=ours, runs=args.runs, results={},
                              model=model)
