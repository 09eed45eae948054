"""Loading a DINOv2 release for minisd.dinov2: a folder with transformers' config.json and model.safetensors
(facebook/dinov2-*), or a hub name downloaded once into huggingface_hub's cache; every field of the config
and every tensor of the file checked, so a file of another network is refused in one line.
"""
import json
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from .config import LoadError, check_value
from .dinov2 import DINOv2, DINOv2Config
from .errors import arg, excerpt, spoken
from .hub import hub_reachable
from .tensorfile import FLOATS, TensorFile, check_finite

FILES = ("config.json", "model.safetensors")


@dataclass(frozen=True)
class Wanted:
    """What a caller loads, for its messages: the flag that names the release, the files a folder of it holds
    (config.json and model.safetensors first), and a hub name to give as an example."""
    flag: str = "dinov2"
    files: tuple = FILES
    example: str = "facebook/dinov2-large"


DINOV2 = Wanted()
# A hub repo id as huggingface_hub's validate_repo_id takes it: owner/name of letters, digits, "-", "_" and ".", not
# starting or ending with "-" or "."; anything else ("./weights", "../dinov2") is a local path that is not there
# (huggingface_hub raised HFValidationError, a traceback).
HUB_NAME = re.compile(r"(?![.-])[\w.-]+(?<![.-])/(?![.-])[\w.-]+(?<![.-])", re.ASCII)


# config.json fields without effect here: metadata, training only (dropout, drop path), Dinov2Backbone's, labels.
IGNORED_FIELDS = {"architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
                  "initializer_range", "drop_path_rate", "hidden_dropout_prob", "attention_probs_dropout_prob",
                  "apply_layernorm", "reshape_hidden_states", "out_features", "out_indices", "stage_names",
                  "id2label", "label2id"}


# What every release uses and all this file implements (use_mask_token: transformers 5 writes it).
ONLY = {"hidden_act": "gelu", "num_channels": 3, "use_mask_token": True}


def read_config(path: Path, wanted: Wanted = DINOV2) -> DINOv2Config:
    """A release's config.json -> DINOv2Config; anything this file cannot honour is refused by name."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LoadError(f"{path}: not a readable JSON file ({type(e).__name__})") from None
    kind = data.get("model_type") if isinstance(data, dict) else None
    if kind != "dinov2":
        raise LoadError(f"{path}: model_type {json.dumps(kind)}, not \"dinov2\" -- another network's config; pass a "
                        f"{wanted.example} release (a folder or hub name) to {arg(wanted.flag)}")
    known = {f.name for f in fields(DINOv2Config)}
    unknown = sorted(set(data) - known - set(ONLY) - IGNORED_FIELDS)
    if unknown:
        raise LoadError(f"{path}: unknown field {unknown[0]}; minisd's DINOv2 reads {', '.join(sorted(known))}")
    for key, want in ONLY.items():
        if data.get(key, want) != want:
            raise LoadError(f"{path}: {key} {json.dumps(data[key])} is not supported; every DINOv2 release (and "
                            f"minisd) uses {json.dumps(want)}")
    cfg = DINOv2Config(**{k: check_value(str(path), k, v, getattr(DINOv2Config, k)) for k, v in data.items()
                          if k in known})
    if cfg.hidden_size % cfg.num_attention_heads:
        raise LoadError(f"{path}: hidden_size {cfg.hidden_size} does not split into {cfg.num_attention_heads} heads")
    return cfg


def _from_hub(repo: str, wanted: Wanted) -> tuple:
    """(config.json, model.safetensors) of a hub release, from huggingface_hub's cache or downloaded into it.
    Offline without a cached copy fails at once, as minisd.hub does (one TCP probe, not ~25 s of retries)."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    try:
        cached = all(isinstance(try_to_load_from_cache(repo, name), str) for name in wanted.files)
    except ValueError as e:   # HFValidationError: a name HUB_NAME lets through ("a--b/c") that the hub refuses
        raise LoadError(f"{arg(wanted.flag)} {repo}: not a hub name ({excerpt(e)}); e.g. {wanted.example}") from None
    offline = constants.HF_HUB_OFFLINE or not hub_reachable(constants.ENDPOINT)
    fetch_hint = (f"fetch {' and '.join(wanted.files)} from {constants.ENDPOINT}/{repo} into a folder and pass "
                  f"{spoken(wanted.flag, 'FOLDER', repr('FOLDER'))}")
    if offline and not cached:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{constants.ENDPOINT} cannot be reached"
        raise LoadError(f"{repo}: not downloaded yet and {why}; connect and retry, or {fetch_hint}")
    paths = []
    for name in wanted.files:
        try:   # Offline with a cached copy: local_files_only skips the HEAD request and its retries.
            paths.append(Path(hf_hub_download(repo, name, local_files_only=offline)))
        except Exception as e:   # no such repo, no access, hub errors, disk full: the same for the user
            raise LoadError(f"cannot download {repo}/{name} ({type(e).__name__}), and there is no folder {repo}; "
                            f"check the name (e.g. {wanted.example}), or {fetch_hint}") from None
        if name == FILES[0]:   # config.json first: a repo of another model fails before hundreds of MB arrive
            read_config(paths[0], wanted)
    return tuple(paths)


def _files(name_or_folder, wanted: Wanted) -> tuple:
    """(config.json, model.safetensors) for a local folder or a hub name; the wanted files all there."""
    folder = Path(name_or_folder)
    if folder.is_dir():
        for name in wanted.files:
            if not (folder / name).is_file():
                raise LoadError(f"{folder}: no {name}; a {wanted.example} folder holds {' and '.join(wanted.files)} "
                                "as the release does (minisd reads no pytorch_model.bin)")
        return folder / FILES[0], folder / FILES[1]
    if folder.exists() or not HUB_NAME.fullmatch(str(name_or_folder)):
        what = f"neither a folder with {' and '.join(wanted.files)} nor" if folder.exists() else \
            "no such folder, and not"
        raise LoadError(f"{arg(wanted.flag)} {name_or_folder}: {what} a hub name such as {wanted.example}")
    return _from_hub(str(name_or_folder), wanted)[:2]


def _check_keys(file: TensorFile, expected: dict):
    """Names, shapes and float dtypes as the model's, every tensor of the file (Dinov2Model's save_pretrained layout:
    no key prefix, and no pooler -- its pooler_output is the normalised CLS token, not a layer)."""
    unexpected, missing = sorted(file.keys - set(expected)), sorted(set(expected) - file.keys)
    for problem, names in (("unexpected", unexpected), ("missing", missing)):
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            raise LoadError(f"{file.path}: {problem} key {names[0]}{more} -- not a DINOv2 backbone as the "
                            "facebook/dinov2-{small,base,large,giant} releases store it (transformers' Dinov2Model)")
    for name, tensor in expected.items():
        shape, stored = file.shape(name), file.dtype(name)
        if shape != tuple(tensor.shape) or stored not in FLOATS:
            raise LoadError(f"{file.path}: {name} is {stored} {list(shape)} where config.json gives float "
                            f"{list(tensor.shape)}; config.json and model.safetensors must come from one release")


def load_dinov2(name_or_folder, device="cpu", with_path: bool = False, wanted: Wanted = DINOV2):
    """A DINOv2 release, float32, eval mode: a folder with config.json + model.safetensors, or a hub name such as
    "facebook/dinov2-large" (downloaded once into huggingface_hub's cache). with_path: also return the weights file."""
    config_file, weights_file = _files(name_or_folder, wanted)
    cfg = read_config(config_file, wanted)
    file = TensorFile(weights_file)
    with torch.device("meta"):
        model = DINOv2(cfg)
    _check_keys(file, model.state_dict())
    state = {name: file.get(name).to(device=device, dtype=torch.float32) for name in model.state_dict()}
    check_finite(file, "", state, torch.float32)
    model.load_state_dict(state, strict=True, assign=True)
    model.eval().requires_grad_(False)
    return (model, weights_file) if with_path else model
