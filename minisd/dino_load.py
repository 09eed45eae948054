"""Loading a DINO image encoder (minisd/dino.py, minisd/dino_vit.py) from its release: a folder, or a hub name of
the table below downloaded once into huggingface_hub's cache.

A release's own config.json says which network it is: transformers' `model_type` "dinov2_with_registers" or
"vit" (DINOv1), or timm's `architecture` vit_*_patch14_reg4_dinov2. Every field of it is read or refused by name,
and every tensor of the weights file is loaded (strict, shapes checked) or listed as ignored, so a folder of
another network fails in one line. The image preparation comes from the release too: transformers'
preprocessor_config.json, or the pretrained_cfg inside timm's config.json.
"""
import json
from dataclasses import fields, replace
from pathlib import Path

import torch

from .config import LoadError, check_value
from .dino import DINOv2Reg, DINOv2RegConfig
from .dino_prepare import from_processor, read_json
from .dino_timm import is_timm, timm_shapes, timm_state
from .dino_timm import read_config as read_timm_config
from .dino_vit import DINOv1, ViTConfig
from .errors import arg, spoken
from .hub import hub_reachable
from .tensorfile import FLOATS, TensorFile, check_finite

# The hub releases minisd knows, with the layout each is stored in. A name outside the table is refused (its
# layout would be a guess); any release loads as a folder.
RELEASES = {
    **{f"facebook/dinov2-with-registers-{size}": "transformers" for size in ("small", "base", "large", "giant")},
    **{f"timm/vit_{size}_patch14_reg4_dinov2.lvd142m": "timm" for size in ("small", "base", "large", "giant")},
    **{f"facebook/dino-vit{size}": "transformers" for size in ("s8", "s16", "b8", "b16")},
}
LAYOUT_NAMES = {"transformers": "transformers'", "timm": "timm's"}
FILES = {"transformers": ("config.json", "preprocessor_config.json"), "timm": ("config.json",)}
# Why a pickle too: the DINOv1 releases were converted in 2021, when transformers wrote pytorch_model.bin; it is
# read with torch.load(weights_only=True) only (tensors, never code).
WEIGHTS = ("model.safetensors", "pytorch_model.bin")

# config.json fields without effect on the features: metadata, training only, heads, backbone outputs.
IGNORED_FIELDS = {"architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
                  "initializer_range", "drop_path_rate", "hidden_dropout_prob", "attention_probs_dropout_prob",
                  "apply_layernorm", "reshape_hidden_states", "out_features", "out_indices", "stage_names",
                  "id2label", "label2id", "encoder_stride"}
# Values every release uses and all minisd implements. interpolate_*: the facebook/dinov2-with-registers-* files
# state how positions are resampled (antialiased, no offset: minisd/dino.py), which transformers 5 no longer reads.
ONLY = {"hidden_act": "gelu", "num_channels": 3, "pooler_act": "tanh", "interpolate_antialias": True,
        "interpolate_offset": 0.0}
NETWORKS = {"dinov2_with_registers": (DINOv2Reg, DINOv2RegConfig), "vit": (DINOv1, ViTConfig)}
# Tensors the files hold that the encoder never uses (transformers' layouts).
IGNORED_KEYS = {"embeddings.mask_token"}   # Dinov2WithRegisters: iBOT's masked-patch token, training only


def _transformers_config(path: Path, data: dict):
    """transformers' config.json -> (model class, config); anything minisd cannot honour is refused by name."""
    kind = data.get("model_type")
    if kind == "dinov2":
        raise LoadError(f"{path}: a DINOv2 without registers (facebook/dinov2-*); as an image encoder pass a "
                        "facebook/dinov2-with-registers-* release (for FD-DINOv2 features use --dinov2)")
    if kind not in NETWORKS:
        raise LoadError(f"{path}: model_type {json.dumps(kind)}: another network's config; pass a DINO release "
                        f"to {arg('encoder')} ({', '.join(sorted(RELEASES))}, or a folder of one)")
    model, cls = NETWORKS[kind]
    known = {f.name for f in fields(cls)} - {"add_pooling_layer"}
    unknown = sorted(set(data) - known - set(ONLY) - IGNORED_FIELDS - {"pooler_output_size"})
    if unknown:
        raise LoadError(f"{path}: unknown field {unknown[0]}; minisd's {kind} reads {', '.join(sorted(known))}")
    for key, want in ONLY.items():
        if data.get(key, want) != want:
            raise LoadError(f"{path}: {key} {json.dumps(data[key])} is not supported; the DINO releases (and "
                            f"minisd) use {json.dumps(want)}")
    cfg = cls(**{k: check_value(str(path), k, v, getattr(cls, k)) for k, v in data.items() if k in known})
    if data.get("pooler_output_size") not in (None, cfg.hidden_size):
        raise LoadError(f"{path}: pooler_output_size {data['pooler_output_size']} is not hidden_size "
                        f"{cfg.hidden_size}; a pooler token must be as wide as the others")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise LoadError(f"{path}: hidden_size {cfg.hidden_size} does not split into {cfg.num_attention_heads} heads")
    return model, cfg


def _hint(repo: str, files: tuple) -> str:
    from huggingface_hub import constants
    return (f"fetch {', '.join(files)} and {WEIGHTS[0]} from {constants.ENDPOINT}/{repo} into a folder and pass "
            f"{spoken('encoder', 'FOLDER', repr('FOLDER'))}")


def _from_hub(repo: str) -> Path:
    """The folder of a release in huggingface_hub's cache, downloaded into it when missing. Offline without a
    cached copy fails at once, as minisd.hub does (one TCP probe, not ~25 s of retries)."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    files = FILES[RELEASES[repo]]
    weights = [w for w in WEIGHTS if isinstance(try_to_load_from_cache(repo, w), str)]
    cached = weights and all(isinstance(try_to_load_from_cache(repo, name), str) for name in files)
    offline = constants.HF_HUB_OFFLINE or not hub_reachable(constants.ENDPOINT)
    if offline and not cached:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{constants.ENDPOINT} cannot be reached"
        raise LoadError(f"{repo}: not downloaded yet and {why}; connect and retry, or {_hint(repo, files)}")
    tried = []
    # Offline with a cached copy: local_files_only skips the HEAD request and its retries. The weights last, the
    # safetensors file first: the DINOv1 releases may hold only the pickle.
    for name in [*files, *(weights or WEIGHTS)]:
        try:
            found = Path(hf_hub_download(repo, name, local_files_only=offline))
        except Exception as e:   # no such file, no access, hub errors, disk full: the same for the user
            tried.append(f"{repo}/{name} ({type(e).__name__})")
            if name in files or name == WEIGHTS[-1]:
                raise LoadError(f"cannot download {' or '.join(tried)}; {_hint(repo, files)}") from None
            continue
        if name in WEIGHTS:
            return found.parent
    raise LoadError(f"{repo}: no weights file found ({', '.join(WEIGHTS)})")


def _folder(name_or_folder) -> Path:
    """The local folder of a release: the folder given, or a table release's folder in the hub cache."""
    folder = Path(name_or_folder)
    if folder.is_dir():
        return folder
    name = str(name_or_folder)
    if name in RELEASES:
        return _from_hub(name)
    if not folder.exists() and name.count("/") == 1:
        raise LoadError(f"{arg('encoder')} {name}: not a DINO release minisd knows ({', '.join(RELEASES)}); "
                        "a release stored elsewhere loads from a folder of its files")
    raise LoadError(f"{arg('encoder')} {name}: neither a folder with a DINO release's config.json and weights nor a "
                    "hub name such as facebook/dinov2-with-registers-base")


def _weights(folder: Path) -> Path:
    for name in WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    raise LoadError(f"{folder}: no {WEIGHTS[0]} (or {WEIGHTS[1]}); a DINO release folder holds its weights there")


def read_release(folder: Path) -> tuple:
    """(model class, config, preparation, layout) of a release folder, from its config files alone."""
    if not (folder / "config.json").is_file():
        raise LoadError(f"{folder}: no config.json; a DINO release folder holds config.json and {WEIGHTS[0]} "
                        "(transformers' releases: preprocessor_config.json too)")
    data = read_json(folder / "config.json")
    if is_timm(data):
        cfg, prep = read_timm_config(folder / "config.json", data)
        return DINOv2Reg, cfg, prep, "timm"
    model, cfg = _transformers_config(folder / "config.json", data)
    if not (folder / "preprocessor_config.json").is_file():
        raise LoadError(f"{folder}: no preprocessor_config.json; the release's image preparation is read from it "
                        "(fetch it with the release's other files)")
    return model, cfg, from_processor(folder / "preprocessor_config.json"), "transformers"


def _check_keys(file: TensorFile, expected: dict, layout: str):
    """Names, shapes and float dtypes, every tensor of the file: expected is key -> shape."""
    unexpected, missing = sorted(file.keys - set(expected)), sorted(set(expected) - file.keys)
    for problem, names in (("unexpected", unexpected), ("missing", missing)):
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            raise LoadError(f"{file.path}: {problem} key {names[0]}{more} -- not the image backbone that its "
                            f"config.json describes, in {LAYOUT_NAMES[layout]} layout (a checkpoint with a head, or "
                            "another network's file)")
    for name, shape in expected.items():
        if file.shape(name) != shape or file.dtype(name) not in FLOATS:
            raise LoadError(f"{file.path}: {name} is {file.dtype(name)} {list(file.shape(name))} where config.json "
                            f"gives float {list(shape)}; config.json and the weights must come from one release")


def load_encoder(name_or_folder, device="cpu", with_path: bool = False):
    """A DINO image encoder, float32, eval mode, with its release's image preparation: a folder, or a hub name
    of RELEASES (downloaded once into huggingface_hub's cache). with_path: also return the weights file.
    minisd.dino.encode(model, images) gives the global tokens."""
    folder = _folder(name_or_folder)
    model_class, cfg, prep, layout = read_release(folder)
    file = TensorFile(_weights(folder))
    if model_class is DINOv1:   # the file states whether this ViTModel was saved with its pooler (dino_vit.py)
        cfg = replace(cfg, add_pooling_layer="pooler.dense.weight" in file.keys)
    with torch.device("meta"):
        model = model_class(cfg, prep)
    ours = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    # Read, cast and checked for NaN under the file's own names (an error names the file's key), then renamed.
    expected = timm_shapes(ours) if layout == "timm" else {
        **ours, **{name: file.shape(name) for name in IGNORED_KEYS & file.keys}}
    _check_keys(file, expected, layout)
    state = {key: file.get(key).to(device=device, dtype=torch.float32) for key in expected if key not in IGNORED_KEYS}
    check_finite(file, "", state, torch.float32)
    if layout == "timm":
        state = timm_state(state, ours)
    model.load_state_dict(state, strict=True, assign=True)
    model.eval().requires_grad_(False)
    return (model, file.path) if with_path else model
