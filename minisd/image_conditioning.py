"""Image conditioning: images -> the context [B, T, context_dim] the UNet cross-attends to, in place of a prompt.

The method is DiNO-Diffusion's (Jimenez-Perez et al. 2024): a frozen DINO encoder (minisd/dino.py, dino_vit.py)
describes each image by its global tokens -- the class token, the register tokens, and a trained pooler's output
where the file stores one -- and those T = 1 + R (+ 1) tokens are the UNet's context. One object owns all of it,
beside `sd.text`: the encoder, which tokens are taken, and, only where the encoder's width differs from the UNet's
context width (ViT-B's 768 into SD2's 1024), a learned linear projection stored with the fine-tuned weights under
the keys `image_proj.weight` and `image_proj.bias`.

What the model is conditioned on is stated in the weights file itself: its safetensors metadata holds the entry
`image_condition`, a JSON object of ImageConfig's fields. Why there and not in a JSON file beside the weights: the
statement and the projection it describes travel as one file and cannot be separated or mismatched. A file without
the entry is a text model; nothing is inferred from tensor shapes.

The "no condition" of classifier-free guidance is zeros of the context's shape (`null`), after the projection, as
diffusers' StableDiffusionImageVariationPipeline builds its negative embeddings (torch.zeros_like of the image
embeddings). Why zeros: no image gives them (DINO's tokens leave a final layer norm, so they are never all zero), they
depend on no weight, so they stay the same point while the projection trains, and training teaches them by replacing a
fraction of the conditions with them (`drop`, the trainer's --condition-dropout).
"""
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from .config import LoadError
from .dino import encode
from .dino_load import RELEASES, load_encoder
from .errors import arg

METADATA_KEY = "image_condition"   # the safetensors metadata entry that states the conditioning
PROJECTION = "image_proj."         # the projection's key prefix in the weights file: .weight [C, W], .bias [C]
TOKEN_RULES = ("global",)          # which tokens: "global" = CLS + registers (+ a stored pooler); no patch tokens


@dataclass(frozen=True)
class ImageConfig:
    """What an image-conditioned model reads. encoder: the DINO release it was trained with (a hub name of
    minisd.dino_load.RELEASES, or the last component of the folder it was given: no path goes into a shared
    file); width: that encoder's token width (hidden_size);
    count: its tokens per image (1 + R for DINOv2 with registers, 1 for DINOv1, +1 for a stored pooler); tokens:
    the rule that picks them; projection: whether `image_proj` maps width to the UNet's context width -- true exactly
    when the two differ."""
    encoder: str
    width: int
    count: int
    tokens: str = "global"
    projection: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def for_encoder(name: str, encoder: nn.Module, context_dim: int) -> ImageConfig:
    """The config of a new image-conditioned model: `encoder` (loaded from `name`) into a UNet of `context_dim`."""
    width = encoder.config.hidden_size
    # a local folder is named by its last component: the model file is shared, and a path can name a person or a
    # machine (docs/privacy-audit.md, "What may leave the hospital"); the loader is given the encoder anyway
    named = str(name) if str(name) in RELEASES else Path(name).name
    return ImageConfig(named, width, encoder.num_global_tokens, "global", width != context_dim)


def check_config(cfg: ImageConfig, context_dim: int, source: str):
    """The fields against each other and the UNet: a projection exactly when the widths differ."""
    if cfg.tokens not in TOKEN_RULES:
        raise LoadError(f"{source}: {METADATA_KEY}.tokens {json.dumps(cfg.tokens)} is not a rule minisd has "
                        f"({', '.join(TOKEN_RULES)})")
    if cfg.projection != (cfg.width != context_dim):
        need = "needs" if cfg.width != context_dim else "has no use for"
        raise LoadError(f"{source}: {METADATA_KEY} says projection {json.dumps(cfg.projection)}, but encoder width "
                        f"{cfg.width} into unet.context_dim {context_dim} {need} one; a projection exists exactly "
                        "when the widths differ")


def read_config(metadata: dict, context_dim: int, source: str) -> ImageConfig | None:
    """The `image_condition` entry of a file's metadata as an ImageConfig, or None (a text model). Every field is
    checked by name and type; anything else is one LoadError naming the file."""
    if METADATA_KEY not in metadata:
        return None
    known = {f.name: f.type for f in fields(ImageConfig)}   # name -> str, int or bool
    try:
        data = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise LoadError(f"{source}: metadata {METADATA_KEY} is not a JSON object of {', '.join(known)}")
    unknown, missing = sorted(set(data) - set(known)), sorted({"encoder", "width", "count"} - set(data))
    if unknown or missing:
        raise LoadError(f"{source}: metadata {METADATA_KEY} has " + (f"unknown field {unknown[0]}" if unknown else
                        f"no field {missing[0]}") + f"; it holds {', '.join(known)}")
    for key, value in data.items():
        want = known[key]
        # bool is an int to Python, not here; widths and counts are positive
        if not isinstance(value, want) or (want is int and (isinstance(value, bool) or value <= 0)):
            raise LoadError(f"{source}: metadata {METADATA_KEY}.{key} must be a {'positive ' * (want is int)}"
                            f"{want.__name__}, not {json.dumps(value)}")
    cfg = ImageConfig(**data)
    check_config(cfg, context_dim, source)
    return cfg


def init_projection(proj: nn.Linear, seed: int):
    """The projection's start, from `seed` alone: weight ~ N(0, 1 / width) and bias 0. Why this scale: each output
    coordinate then has the mean square of the input token's coordinates, so the UNet first sees tokens of the size
    DINO gives (as in SD1, where the 768-wide tokens go in unprojected), not PyTorch's default uniform init, which
    shrinks them about threefold."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight = torch.randn(proj.weight.shape, generator=gen, dtype=torch.float32) / proj.in_features ** 0.5
        proj.weight.copy_(weight)
        proj.bias.zero_()


class ImageConditioning:
    """`image(images)` -> context [B, T, context_dim]; `image.null(B)` -> the uncond; `image.drop(...)` for training.

    cfg: an ImageConfig; encoder: the loaded DINO model (frozen, float32); proj: nn.Linear(width, context_dim), or
    None when the widths are equal (the tokens go in as they are, as DiNO-Diffusion's 768 into SD1's 768)."""

    def __init__(self, cfg: ImageConfig, context_dim: int, encoder: nn.Module | None = None):
        check_config(cfg, context_dim, "image conditioning")
        self.cfg, self.context_dim, self.encoder = cfg, context_dim, encoder
        self.proj = nn.Linear(cfg.width, context_dim) if cfg.projection else None

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder's global tokens [B, count, width], float32: from uint8 RGB images [B, 3, H, W], prepared as
        the encoder's release prepares them, or from float pixels already so prepared (minisd.dino_prepare)."""
        if images.dtype == torch.uint8:
            return encode(self.encoder, images)
        weight = self.encoder.embeddings.cls_token
        with torch.no_grad():
            return self.encoder.global_tokens(images.to(weight)).float()

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """Global tokens [B, count, width] -> context [B, count, context_dim]: the projection where there is one."""
        if tokens.shape[1:] != (self.cfg.count, self.cfg.width):
            raise ValueError(f"tokens must be [B, {self.cfg.count}, {self.cfg.width}], not {list(tokens.shape)}")
        return tokens if self.proj is None else self.proj(tokens.to(self.proj.weight))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.project(self.tokens(images))

    def mix(self, first: torch.Tensor, second: torch.Tensor, fractions: list) -> torch.Tensor:
        """Interpolation (DiNO-Diffusion's): the global tokens of one image each, lerped at each fraction r
        (0: first, 1: second) -> contexts [len(fractions), count, context_dim]. The projection is affine, so
        projecting the lerp equals lerping the projections."""
        a, b = self.tokens(first), self.tokens(second)
        if len(a) != 1 or len(b) != 1:
            raise ValueError(f"mix takes one image each, not {len(a)} and {len(b)}")
        r = torch.tensor([float(f) for f in fractions], dtype=a.dtype, device=a.device)[:, None, None]
        return self.project(torch.lerp(a, b, r))

    def null(self, batch: int) -> torch.Tensor:
        """The "no condition": zeros [batch, count, context_dim] in the context's dtype and device (module docstring:
        why zeros)."""
        like = self.encoder.embeddings.cls_token if self.proj is None else self.proj.weight
        dtype = torch.float32 if self.proj is None else like.dtype
        return torch.zeros(batch, self.cfg.count, self.context_dim, dtype=dtype, device=like.device)

    def drop(self, context: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
        """Each row of `context` [B, T, C] replaced by the null with probability p, independently: one uniform draw
        per row from `generator` (a CPU generator, so a seed gives the same rows on every device)."""
        if not 0 <= p <= 1:
            raise ValueError(f"p must be a probability in [0, 1], not {p}")
        dropped = torch.rand(len(context), generator=generator) < p
        return torch.where(dropped.to(context.device)[:, None, None], torch.zeros_like(context), context)

    def metadata(self) -> dict:
        """The metadata entry a saved file carries (read back by minisd.load)."""
        return {METADATA_KEY: self.cfg.to_json()}


def open_encoder(cfg: ImageConfig, name_or_folder, device) -> nn.Module:
    """The model's encoder, from `name_or_folder` (default: cfg.encoder, as saved), checked to give the tokens the
    model was trained on: a copy of another release is refused, not used."""
    name = name_or_folder or cfg.encoder
    if cfg.encoder not in RELEASES and not name_or_folder and not Path(name).is_dir():
        raise LoadError(f"the model was trained with a local encoder folder; its file states only the folder's name "
                        f"({cfg.encoder}): pass that folder as {arg('encoder')}")
    encoder = load_encoder(name, device=device)
    found = (encoder.num_global_tokens, encoder.config.hidden_size)
    if found != (cfg.count, cfg.width):
        raise LoadError(f"{arg('encoder')} {name}: gives {found[0]} tokens of width {found[1]}; the model was trained "
                        f"on {cfg.count} of width {cfg.width} from {cfg.encoder} -- pass a copy of that release")
    return encoder


def attach(sd, name: str, encoder: nn.Module, seed: int = 0) -> ImageConditioning:
    """Make `sd` image-conditioned by `encoder` (loaded from `name`): sd.image, with the projection (if the widths
    differ) started by init_projection(seed), float32 on the UNet's device, ready to train."""
    if sd.image is not None:
        raise ValueError(f"the model is image-conditioned already (by {sd.image.cfg.encoder})")
    sd.image = ImageConditioning(for_encoder(name, encoder, sd.config.unet.context_dim), sd.config.unet.context_dim,
                                 encoder)
    if sd.image.proj is not None:
        init_projection(sd.image.proj, seed)
        sd.image.proj.to(next(sd.unet.parameters()).device)
    return sd.image
