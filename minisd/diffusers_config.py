"""The configs of a diffusers Stable Diffusion folder restated in minisd's JSON config format (read_config):
model_index.json, unet/, vae/, text_encoder/, tokenizer/ and scheduler/. Each config field is either mapped
to our config, required to have the one value minisd computes, or named as ignored (and why), so a folder
minisd cannot run exactly is refused in one line naming the field.
"""
import json
from pathlib import Path

from . import diffusers_keys
from .config import LoadError
from .paths import weights_dir

PIPELINES = ("StableDiffusionPipeline", "StableDiffusionInpaintPipeline", "StableDiffusionImg2ImgPipeline")


COMPONENTS = {"unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
              "text_encoder": ("transformers", "CLIPTextModel"), "tokenizer": ("transformers", "CLIPTokenizer"),
              "scheduler": ("diffusers", None)}


OPTIONAL = ("safety_checker", "feature_extractor", "image_encoder")   # not part of the model: ignored


# hidden_act -> tower: OpenAI CLIP (SD1) was trained with quick_gelu, OpenCLIP ViT-H (SD2) with exact gelu.
TOWERS = {"quick_gelu": "openai", "gelu": "openclip"}


# The pad token each tower was trained with (minisd.tokenizer PAD_SD1 / PAD), as transformers' files name it.
PADS = {"openai": "<|endoftext|>", "openclip": "!"}


SPECIALS = {"<|startoftext|>": "<start_of_text>", "<|endoftext|>": "<end_of_text>"}   # transformers' -> ours


def read_json(path: Path) -> dict:
    """A config file as a dict; missing or malformed: one line naming it."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LoadError(f"{path}: missing -- not a complete diffusers folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise LoadError(f"{path}: not a JSON object")
    return data


def same(value, fixed) -> bool:
    """A value equals minisd's: diffusers accepts per-level lists for some fields; all equal is the one value."""
    values = value if isinstance(value, list) and not isinstance(fixed, list) else [value]
    return len(values) > 0 and all(type(v) is type(fixed) or {type(v), type(fixed)} <= {int, float} for v in values) \
        and all(v == fixed for v in values)


def check_fields(path: Path, data: dict, mapped: set, fixed: dict, ignored: set):
    """Every field is mapped, fixed to minisd's value, ignored by name, or `_`-prefixed metadata."""
    for key, value in data.items():
        if key.startswith("_") or key in mapped or key in ignored:
            continue
        if key not in fixed:
            raise LoadError(f"{path}: unknown field {key} ({json.dumps(value)}); minisd does not know what it "
                            "changes, so it refuses the folder")
        if not same(value, fixed[key]):
            raise LoadError(f"{path}: {key} {value!r} is not supported by minisd (it implements "
                            f"{json.dumps(fixed[key])})")


def need(path: Path, ok: bool, message: str):
    if not ok:   # one line, naming the file
        raise LoadError(f"{path}: {message}")


def level_widths(path: Path, data: dict) -> list:
    widths = data.get("block_out_channels")
    need(path, isinstance(widths, list) and widths and all(isinstance(w, int) and w % widths[0] == 0 for w in widths),
         f"block_out_channels {widths!r} must be multiples of the first width")
    return widths


def unet_section(path: Path, u: dict) -> dict:
    """unet/config.json -> our `unet` section (ldm YAML names). Checks the field table first."""
    check_fields(path, u, diffusers_keys.UNET_MAPPED, diffusers_keys.UNET_FIXED, diffusers_keys.UNET_IGNORED)
    widths, down, up = level_widths(path, u), u.get("down_block_types"), u.get("up_block_types")
    need(path, isinstance(down, list) and len(down) == len(widths) and set(down) <= {"CrossAttnDownBlock2D",
         "DownBlock2D"}, f"down_block_types {down!r}: minisd has CrossAttnDownBlock2D and DownBlock2D, one per width")
    mirrored = [b.replace("Down", "Up") for b in reversed(down)]   # ldm's output blocks mirror the input blocks
    need(path, up == mirrored, f"up_block_types {up!r} must mirror down_block_types: {mirrored}")
    for key in ("layers_per_block", "cross_attention_dim"):   # diffusers allows per-level lists; SD has one value
        need(path, isinstance(u.get(key), int), f"{key} {u.get(key)!r} must be one integer")
    # Why: diffusers' `attention_head_dim` is the head COUNT (SD2 5/10/20/20: ldm's width 64; SD1 8: ldm's num_heads);
    # diffusers itself reads `num_attention_heads or attention_head_dim` (unet_2d_condition.py __init__).
    heads = u.get("num_attention_heads") or u.get("attention_head_dim", 8)
    heads = heads if isinstance(heads, list) else [heads] * len(widths)
    head_channels = {w / h for w, h in zip(widths, heads, strict=True)}
    equal_width = len(head_channels) == 1 and float(next(iter(head_channels))).is_integer()
    need(path, equal_width or len(set(heads)) == 1, f"attention_head_dim {heads}: neither head widths nor counts equal")
    sd1_rule = {"num_head_channels": -1, "num_heads": heads[0]}   # a fixed head count, widths differ per level
    depth = u.get("transformer_layers_per_block", 1)
    need(path, isinstance(depth, int) or len(set(depth)) == 1, "transformer_layers_per_block must be equal")
    cross = [i for i, block in enumerate(down) if block.startswith("CrossAttn")]
    return {"model_channels": widths[0], "channel_mult": [w // widths[0] for w in widths],
            "num_res_blocks": u["layers_per_block"],
            "attention_resolutions": [2 ** i for i in reversed(cross)],   # YAML order: [4, 2, 1]
            **({"num_head_channels": int(head_channels.pop())} if equal_width else sd1_rule),
            "context_dim": u["cross_attention_dim"], "transformer_depth": depth if isinstance(depth, int) else depth[0],
            "use_linear_in_transformer": bool(u.get("use_linear_projection", False)),
            "in_channels": u.get("in_channels", 4), "out_channels": u.get("out_channels", 4),
            "upcast_attention": bool(u.get("upcast_attention", False))}


def vae_section(path: Path, v: dict) -> dict:
    """vae/config.json -> our `vae` section (ldm ddconfig names)."""
    check_fields(path, v, diffusers_keys.VAE_MAPPED, diffusers_keys.VAE_FIXED, diffusers_keys.VAE_IGNORED)
    widths = level_widths(path, v)
    for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        need(path, v.get(key) == [block] * len(widths), f"{key} {v.get(key)!r} must be {block} at every level")
    latent = v.get("latent_channels", 4)   # ldm's z_channels and embed_dim are equal in SD1/SD2
    return {"ch": widths[0], "ch_mult": [w // widths[0] for w in widths], "num_res_blocks": v.get("layers_per_block",
            1), "z_channels": latent, "embed_dim": latent, "in_channels": v.get("in_channels", 3),
            "out_ch": v.get("out_channels", 3)}


def text_section(path: Path, t: dict) -> dict:
    """text_encoder/config.json -> our `text` section. Only the architecture fields are read: the rest is generic
    transformers bookkeeping that does not change the forward pass (dtype/torch_dtype, transformers_version,
    bos/eos/pad_token_id, initializer_*, dropout, attention_dropout, projection_dim -- CLIPTextModel has no
    projection -- and whatever else PretrainedConfig serialises in a given transformers version)."""
    kind = f"{t.get('model_type')} {t.get('architectures')}"
    need(path, t.get("model_type") == "clip_text_model" and t.get("architectures", ["CLIPTextModel"]) ==
         ["CLIPTextModel"], f"the text encoder is {kind}, not CLIP; minisd runs SD1/SD2 CLIP text towers")
    tower = TOWERS.get(t.get("hidden_act"))
    need(path, tower is not None, f"hidden_act {t.get('hidden_act')!r}: minisd runs quick_gelu (SD1, OpenAI CLIP) "
         "and gelu (SD2, OpenCLIP)")
    names = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "max_position_embeddings", "vocab_size", "layer_norm_eps")
    missing = [n for n in names if n not in t]
    need(path, not missing, f"missing field {missing[0] if missing else ''}")
    need(path, t["vocab_size"] == 49408, f"vocab_size {t['vocab_size']} is not CLIP's 49408 (the tokenizer's)")
    if tower == "openai":
        return {"tower": "openai", "layer": "last", **{n: t[n] for n in names}}
    # OpenCLIP's blocks have a 4x MLP and torch's LayerNorm eps (open_clip/transformer.py), which TextConfig fixes.
    need(path, t["intermediate_size"] == 4 * t["hidden_size"], "intermediate_size must be 4 x hidden_size (OpenCLIP)")
    need(path, t["layer_norm_eps"] == 1e-5, f"layer_norm_eps {t['layer_norm_eps']} is not OpenCLIP's 1e-5")
    # diffusers' SD2 text encoder holds 23 of OpenCLIP's 24 blocks; SD2 runs the penultimate one's output.
    return {"tower": "openclip", "layer": "penultimate", "width": t["hidden_size"],
            "layers": t["num_hidden_layers"] + 1, "heads": t["num_attention_heads"],
            "context_length": t["max_position_embeddings"], "vocab_size": t["vocab_size"]}


def prediction(path: Path, s: dict) -> str:
    """scheduler_config.json: a DDPM-family scheduler on SD's schedule -> "eps" or "v"."""
    known = diffusers_keys.SCHEDULERS
    need(path, s.get("_class_name") in known, f"scheduler {s.get('_class_name')!r} is not supported; minisd reads "
         f"the DDPM-family schedulers ({', '.join(sorted(known))})")
    for key, value in diffusers_keys.SCHEDULE.items():
        need(path, s.get(key, value) == value, f"{key} {s.get(key)!r} is not SD's schedule ({json.dumps(value)}); "
             "trained with another noise schedule, which minisd does not sample (use an SD1/SD2 model)")
    found = s.get("prediction_type", "epsilon")
    need(path, found in diffusers_keys.PREDICTION, f"prediction_type {found!r}: minisd runs epsilon and v_prediction "
         "models")
    return diffusers_keys.PREDICTION[found]


def check_model_index(folder: Path):
    index = read_json(folder / "model_index.json")
    path, name = folder / "model_index.json", index.get("_class_name")
    # SDXL folders name an XL pipeline class or, in any case, hold its second text encoder.
    need(path, "XL" not in str(name) and "text_encoder_2" not in index, f"an SDXL folder ({name}" + (
         ", with text_encoder_2" if "text_encoder_2" in index else "") + "), which minisd does not load")
    need(path, name in PIPELINES, f"{name!r} is not a Stable Diffusion 1/2 pipeline ({', '.join(PIPELINES)})")
    for key, (library, cls) in COMPONENTS.items():
        found = index.get(key)
        need(path, isinstance(found, list) and found[0] == library and (cls is None or found[1] in (cls, cls + "Fast")),
             f"component {key} is {found}, expected [{library!r}, {cls!r}]")
        need(folder, (folder / key).is_dir(), f"has no {key}/ folder, which model_index.json names -- an incomplete "
             "download or copy; fetch the whole folder again")


def tokenizer_files(folder: Path) -> tuple[dict, list, list]:
    """(vocab, merges as "a b" strings, added tokens) from vocab.json + merges.txt (hub) or tokenizer.json
    (transformers 5 saves only that one)."""
    if (folder / "vocab.json").is_file():
        need(folder, (folder / "merges.txt").is_file(), "has vocab.json but no merges.txt")
        merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        added = list(read_json(folder / "added_tokens.json")) if (folder / "added_tokens.json").is_file() else []
        return read_json(folder / "vocab.json"), [m for m in merges if m and not m.startswith("#version")], added
    data = read_json(folder / "tokenizer.json")
    model = data.get("model", {})
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return model.get("vocab", {}), merges, [t.get("content") for t in data.get("added_tokens", [])]


def check_tokenizer(folder: Path, tower: str):
    """CLIP's standard vocabulary (minisd's files, special tokens under transformers' names), no added tokens, and
    the pad token of the tower's training."""
    vocab, merges, added = tokenizer_files(folder)
    theirs = {v: k for k, v in SPECIALS.items()}   # ours -> transformers' names
    ours = {theirs.get(k, k): v for k, v in json.loads((weights_dir() / "clip_vocab.json").read_text()).items()}
    mine = (weights_dir() / "clip_merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    config = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    added += [t.get("content") for t in config.get("added_tokens_decoder", {}).values()]
    # Why by the vocabulary: transformers lists the specials, and SD2's pad "!" (id 0), among its added tokens too.
    extra = sorted({t for t in added if t not in ours})
    need(folder, not extra, f"holds added tokens {extra} (a textual-inversion token?); load the embedding file with "
         "--embeddings instead")
    wrong = next((k for k in sorted(set(vocab) | set(ours)) if vocab.get(k) != ours.get(k)), None)
    need(folder, wrong is None, f"vocabulary differs from CLIP's at {wrong!r} (id {vocab.get(wrong)}, CLIP: "
         f"{ours.get(wrong)}); minisd runs CLIP's standard vocabulary only")
    i = next((i for i, (a, b) in enumerate(zip(merges, mine, strict=False)) if a != b), min(len(merges), len(mine)))
    need(folder, merges == mine, f"merges differ from CLIP's at entry {i} "
         f"({merges[i] if i < len(merges) else 'end'!r}, CLIP: {mine[i] if i < len(mine) else 'end'!r})")
    specials = read_json(folder / "special_tokens_map.json") if (folder / "special_tokens_map.json").is_file() else {}
    pad = specials.get("pad_token", config.get("pad_token", "<|endoftext|>"))   # CLIPTokenizer's default
    pad = pad.get("content") if isinstance(pad, dict) else pad
    need(folder, pad == PADS[tower], f"pad_token {pad!r}, but this {tower} text tower was trained with padding "
         f"{PADS[tower]!r}")


def read_config(folder) -> dict:
    """The folder's configs restated in minisd's JSON config format, every field checked."""
    folder = Path(folder)
    check_model_index(folder)
    unet_path, vae_path = folder / "unet" / "config.json", folder / "vae" / "config.json"
    unet, vae = read_json(unet_path), read_json(vae_path)
    scheduler = folder / "scheduler" / "scheduler_config.json"
    text = text_section(folder / "text_encoder" / "config.json", read_json(folder / "text_encoder" / "config.json"))
    check_tokenizer(folder / "tokenizer", text["tower"])
    scale = vae.get("scaling_factor", 0.18215)
    size = unet.get("sample_size")
    need(unet_path, isinstance(size, int), f"sample_size {size!r} must be one integer (the latent size)")
    # The native size: diffusers' pipeline defaults to unet sample_size * vae_scale_factor, with
    # vae_scale_factor = 2 ** (len(vae block_out_channels) - 1) (pipeline_stable_diffusion.py __init__, __call__).
    levels = len(vae.get("block_out_channels") or [0])
    return {"unet": unet_section(unet_path, unet), "vae": vae_section(vae_path, vae), "text": text,
            "prediction": prediction(scheduler, read_json(scheduler)), "scale_factor": scale,
            "resolution": size * 2 ** (levels - 1)}
