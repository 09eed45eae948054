"""DINOv2 ViT image features for FD-DINOv2, loading the Hugging Face releases (facebook/dinov2-*).

Sources: names and block layout from transformers' models/dinov2/modeling_dinov2.py (what `save_pretrained` writes,
as in the hub files), the position interpolation from facebookresearch/dinov2 dinov2/models/vision_transformer.py
(the torch.hub model torch-fidelity runs), the image preparation from torch-fidelity's feature_extractor_dinov2.py.

Features are the CLS token after the final layer norm: the hub model's output and transformers' `pooler_output`.
Why the hub model's interpolation, not transformers': they differ. At 224 px, a release trained at 518 px (37x37
patches) needs a 16x16 grid: the hub model passes bicubic interpolate scale_factor (16 + 0.1) / 37, which torch also
takes as the sampling step, transformers 5.x passes size=(16, 16) (step 37 / 16; older versions had the offset).
FD-DINOv2 is defined with the hub model (torch-fidelity), so we follow it; tests/test_dinov2.py measures the gap.
"""
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .config import LoadError, check_value
from .errors import arg, spoken
from .hub import hub_reachable
from .resize import resize_like_tf1
from .tensorfile import FLOATS, TensorFile, check_finite

INPUT_SIZE = 224                                            # torch-fidelity's FeatureExtractorDinoV2.INPUT_IMAGE_SIZE
MEAN = tuple(255 * m for m in (0.485, 0.456, 0.406))       # ImageNet mean and std on the 0..255 scale, as
STD = tuple(255 * s for s in (0.229, 0.224, 0.225))        # torch-fidelity normalises (no /255 before)
INTERPOLATE_OFFSET = 0.1   # the hub model's work-around for dino issue 8, kept: it changes the result (see below)
FILES = ("config.json", "model.safetensors")

# config.json fields without effect here: metadata, training only (dropout, drop path), Dinov2Backbone's, labels.
IGNORED_FIELDS = {"architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
                  "initializer_range", "drop_path_rate", "hidden_dropout_prob", "attention_probs_dropout_prob",
                  "apply_layernorm", "reshape_hidden_states", "out_features", "out_indices", "stage_names",
                  "id2label", "label2id"}
# What every release uses and all this file implements (use_mask_token: transformers 5 writes it).
ONLY = {"hidden_act": "gelu", "num_channels": 3, "use_mask_token": True}


@dataclass(frozen=True)
class DINOv2Config:
    """transformers' Dinov2Config names; defaults are the facebook/dinov2-base release (trained at 518 px)."""
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 14
    image_size: int = 518
    layer_norm_eps: float = 1e-6
    layerscale_value: float = 1.0   # the initial layer scale only; the trained values are in the file
    use_swiglu_ffn: bool = False    # True for dinov2-giant
    qkv_bias: bool = True


def read_config(path: Path) -> DINOv2Config:
    """A release's config.json -> DINOv2Config; anything this file cannot honour is refused by name."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LoadError(f"{path}: not a readable JSON file ({type(e).__name__})") from None
    kind = data.get("model_type") if isinstance(data, dict) else None
    if kind != "dinov2":
        raise LoadError(f"{path}: model_type {json.dumps(kind)}, not \"dinov2\" -- another network's config; pass a "
                        f"facebook/dinov2-* release (a folder or hub name) to {arg('dinov2')}")
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


def interpolate_positions(table, height: int, width: int, patch: int):
    """The trained position table [1, 1 + M*M, D] -> [1, 1 + rows*cols, D] for a height x width input, as the hub
    model computes it (bicubic, no antialiasing, in float32). The CLS token's position is not interpolated."""
    rows, cols = height // patch, width // patch
    m = math.isqrt(table.shape[1] - 1)
    # Why return early: at its own grid (square input) the reference uses the table as trained; the offset would not.
    if (rows, cols) == (m, m) and height == width:
        return table
    # [1, M*M, D] -> [1, D, M, M]
    grid = table[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
    # Why scale_factor with the 0.1 offset and not size=(rows, cols): torch samples at (i + 0.5) / scale - 0.5, so
    # the offset shifts every sample (by up to 0.2 of a trained cell at 16 of 37); FD-DINOv2 was defined with it.
    # Output size floor(M * (rows + 0.1) / M) = rows: the offset keeps float error from giving rows - 1.
    scale = ((rows + INTERPOLATE_OFFSET) / m, (cols + INTERPOLATE_OFFSET) / m)
    grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False)
    # [1, D, rows, cols] -> [1, rows*cols, D]
    patches = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1).to(table.dtype)
    return torch.cat([table[:, :1], patches], dim=1)


class Embeddings(nn.Module):
    """Patches -> tokens, a CLS token in front, position embeddings added (transformers' Dinov2Embeddings)."""

    def __init__(self, cfg: DINOv2Config):
        super().__init__()
        self.patch_size = cfg.patch_size
        grid = cfg.image_size // cfg.patch_size   # the trained grid: 518 // 14 = 37 for the releases
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        # Why, though inference never masks: iBOT training swapped masked patches for it; the release stores it.
        self.mask_token = nn.Parameter(torch.zeros(1, cfg.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, grid * grid + 1, cfg.hidden_size))
        self.patch_embeddings = nn.Module()
        self.patch_embeddings.projection = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, cfg.patch_size)

    def forward(self, pixels):
        # [N, 3, H, W] -> [N, D, H/p, W/p] -> [N, HW/p^2, D]
        patches = self.patch_embeddings.projection(pixels).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(pixels), -1, -1), patches], dim=1)
        return tokens + interpolate_positions(self.position_embeddings, *pixels.shape[2:], self.patch_size)


class Attention(nn.Module):
    """Self-attention. Why attention.attention.query and attention.output.dense: transformers' first Dinov2Attention
    held a self-attention and an output module; the releases keep those names (the hub model's one `qkv` split)."""

    def __init__(self, cfg: DINOv2Config):
        super().__init__()
        width, self.heads = cfg.hidden_size, cfg.num_attention_heads
        self.attention = nn.Module()
        self.attention.query = nn.Linear(width, width, bias=cfg.qkv_bias)
        self.attention.key = nn.Linear(width, width, bias=cfg.qkv_bias)
        self.attention.value = nn.Linear(width, width, bias=cfg.qkv_bias)
        self.output = nn.Module()
        self.output.dense = nn.Linear(width, width)

    def forward(self, x):
        a = self.attention
        return self.output.dense(attention(a.query(x), a.key(x), a.value(x), self.heads))


class MLP(nn.Module):
    def __init__(self, cfg: DINOv2Config):
        super().__init__()
        hidden = int(cfg.hidden_size * cfg.mlp_ratio)
        self.fc1, self.fc2 = nn.Linear(cfg.hidden_size, hidden), nn.Linear(hidden, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))   # exact (erf) GELU: hidden_act "gelu", the hub model's nn.GELU


class SwiGLU(nn.Module):
    """dinov2-giant's feed-forward (the hub's SwiGLUFFNFused): one projection gives gate and value, silu(gate) *
    value. Why 2/3 of the MLP width: three matrices then hold what a plain MLP's two do (rounded up to 8s)."""

    def __init__(self, cfg: DINOv2Config):
        super().__init__()
        hidden = (int(int(cfg.hidden_size * cfg.mlp_ratio) * 2 / 3) + 7) // 8 * 8
        self.weights_in = nn.Linear(cfg.hidden_size, 2 * hidden)   # [gate; value], gate first
        self.weights_out = nn.Linear(hidden, cfg.hidden_size)

    def forward(self, x):
        gate, value = self.weights_in(x).chunk(2, dim=-1)
        return self.weights_out(F.silu(gate) * value)


class LayerScale(nn.Module):
    """A learned per-channel gain on each residual branch (LayerScale, Touvron et al. 2021, as DINOv2 trains it)."""

    def __init__(self, cfg: DINOv2Config):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.full((cfg.hidden_size,), cfg.layerscale_value))

    def forward(self, x):
        return x * self.lambda1


class Layer(nn.Module):
    """Pre-norm ViT block, each branch scaled before the residual add (transformers' Dinov2Layer, hub `Block`)."""

    def __init__(self, cfg: DINOv2Config):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attention = Attention(cfg)
        self.layer_scale1 = LayerScale(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SwiGLU(cfg) if cfg.use_swiglu_ffn else MLP(cfg)
        self.layer_scale2 = LayerScale(cfg)

    def forward(self, x):
        x = x + self.layer_scale1(self.attention(self.norm1(x)))
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


class DINOv2(nn.Module):
    """Normalised images [N, 3, H, W] -> CLS features [N, hidden_size] (transformers' Dinov2Model.pooler_output)."""

    def __init__(self, cfg: DINOv2Config = DINOv2Config()):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels):
        x = self.embeddings(pixels)
        for layer in self.encoder.layer:
            x = layer(x)
        # Layer norm works per token, so normalising the CLS token alone equals normalising all, then taking it.
        return self.layernorm(x[:, 0])


def prepare(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [N, 3, H, W] -> float32 [N, 3, 224, 224], as torch-fidelity's FeatureExtractorDinoV2 prepares
    them: TF 1.x bilinear resize on the 0..255 values, then ImageNet mean/std (scaled by 255), bit for bit."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"DINOv2 features take uint8 images [N, 3, H, W], not {images.dtype} {list(images.shape)}")
    x = resize_like_tf1(images.float(), INPUT_SIZE)
    mean, std = (torch.tensor(v, device=x.device)[:, None, None] for v in (MEAN, STD))
    return (x - mean) / std


@torch.no_grad()
def features(model: DINOv2, images: torch.Tensor) -> torch.Tensor:
    """uint8 images [N, 3, H, W] (any size) -> float32 features [N, hidden_size], on the model's device."""
    weight = model.embeddings.cls_token
    return model(prepare(images.to(weight.device)).to(weight.dtype)).float()


def _from_hub(repo: str) -> tuple:
    """(config.json, model.safetensors) of a hub release, from huggingface_hub's cache or downloaded into it.
    Offline without a cached copy fails at once, as minisd.hub does (one TCP probe, not ~25 s of retries)."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    cached = all(isinstance(try_to_load_from_cache(repo, name), str) for name in FILES)
    offline = constants.HF_HUB_OFFLINE or not hub_reachable(constants.ENDPOINT)
    fetch_hint = (f"fetch {' and '.join(FILES)} from {constants.ENDPOINT}/{repo} into a folder and pass "
                  f"{spoken('dinov2', 'FOLDER', repr('FOLDER'))}")
    if offline and not cached:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{constants.ENDPOINT} cannot be reached"
        raise LoadError(f"{repo}: not downloaded yet and {why}; connect and retry, or {fetch_hint}")
    paths = []
    for name in FILES:
        try:   # Offline with a cached copy: local_files_only skips the HEAD request and its retries.
            paths.append(Path(hf_hub_download(repo, name, local_files_only=offline)))
        except Exception as e:   # no such repo, no access, hub errors, disk full: the same for the user
            raise LoadError(f"cannot download {repo}/{name} ({type(e).__name__}), and there is no folder {repo}; "
                            f"check the name (e.g. facebook/dinov2-large), or {fetch_hint}") from None
        if name == FILES[0]:   # config.json first: a repo of another model fails before hundreds of MB arrive
            read_config(paths[0])
    return tuple(paths)


def _files(name_or_folder) -> tuple:
    """(config.json, model.safetensors) for a local folder or a hub name."""
    folder = Path(name_or_folder)
    if folder.is_dir():
        for name in FILES:
            if not (folder / name).is_file():
                raise LoadError(f"{folder}: no {name}; a DINOv2 folder holds {' and '.join(FILES)} as the "
                                "facebook/dinov2-* releases do (minisd reads no pytorch_model.bin)")
        return folder / FILES[0], folder / FILES[1]
    if folder.exists() or str(name_or_folder).count("/") != 1:
        raise LoadError(f"{arg('dinov2')} {name_or_folder}: neither a folder with {' and '.join(FILES)} nor a hub "
                        "name such as facebook/dinov2-large")
    return _from_hub(str(name_or_folder))


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


def load_dinov2(name_or_folder, device="cpu", with_path: bool = False):
    """A DINOv2 release, float32, eval mode: a folder with config.json + model.safetensors, or a hub name such as
    "facebook/dinov2-large" (downloaded once into huggingface_hub's cache). with_path: also return the weights file."""
    config_file, weights_file = _files(name_or_folder)
    cfg = read_config(config_file)
    file = TensorFile(weights_file)
    with torch.device("meta"):
        model = DINOv2(cfg)
    _check_keys(file, model.state_dict())
    state = {name: file.get(name).to(device=device, dtype=torch.float32) for name in model.state_dict()}
    check_finite(file, "", state, torch.float32)
    model.load_state_dict(state, strict=True, assign=True)
    model.eval().requires_grad_(False)
    return (model, weights_file) if with_path else model
