"""The image preparation a DINO release states in its own files, applied to uint8 image tensors.

Two sources, one recipe (resize, optional centre crop, mean/std): transformers' `preprocessor_config.json`
(facebook/dinov2-with-registers-*: BitImageProcessor, shortest edge 256 then a 224 crop; facebook/dino-*:
ViTImageProcessor, 224 x 224 without keeping the aspect ratio) and the `pretrained_cfg` of timm's `config.json`
(timm/vit_*_reg4_dinov2: input_size 518, crop_pct 1.0, bicubic). A field left out takes the processor class's
default, as transformers and timm fill it. Sources: transformers 5.23 image_processing_backends.py
(TorchvisionBackend) and models/{bit,vit}/image_processing_*.py; timm 1.0 data/config.py and transforms_factory.py.

Why one resize kernel for both: torch's native uint8 antialiased resize (F.interpolate on uint8, CPU) is what
transformers' processors run, bit for bit; timm resizes PIL images, and PIL's fixed-point kernel differs from it by
1-2 grey levels on under 1 % of the pixels (tests/test_dino.py measures what that does to the tokens).
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import LoadError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RESAMPLE = {2: "bilinear", 3: "bicubic"}   # PIL's numbering, as preprocessor_config.json stores `resample`


@dataclass(frozen=True)
class Preparation:
    """How a release's images are made model inputs. size: (height, width), or (shortest edge,) with the aspect
    ratio kept. crop: (height, width) of the centre crop, or None. round_crop: where a crop starts when the margin is
    odd -- int(margin / 2) in transformers, Python's round() (half to even) in torchvision's CenterCrop, which timm
    uses. mean/std on the 0..1 scale."""
    size: tuple = (256,)
    resample: str = "bicubic"
    crop: tuple | None = (224, 224)
    round_crop: bool = False
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD


def resized_size(prep: Preparation, height: int, width: int) -> tuple:
    """The size after resizing; a shortest edge keeps the aspect ratio, the long side truncated as torchvision's
    _compute_resized_output_size and transformers' get_resize_output_image_size both do."""
    if len(prep.size) == 2:
        return prep.size
    short, long = sorted((height, width))
    new_long = int(prep.size[0] * long / short)
    return (prep.size[0], new_long) if height <= width else (new_long, prep.size[0])


def prepare(prep: Preparation, images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB images [N, 3, H, W] (one size per batch) -> float32 model inputs [N, 3, h, w], on the images'
    device. The resize runs on the CPU: torch has its uint8 antialiased kernel there only (a GPU would resize in
    float and round otherwise, as torchvision does, which differs by a grey level on ~20 % of the pixels)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"DINO encoders take uint8 RGB images [N, 3, H, W], not {images.dtype} {list(images.shape)}")
    x = images.cpu().contiguous()
    size = resized_size(prep, *x.shape[2:])
    if size != tuple(x.shape[2:]):   # as torchvision: an image already at the size is not resampled
        x = F.interpolate(x, size=size, mode=prep.resample, align_corners=False, antialias=True)
    if prep.crop:
        (height, width), (crop_h, crop_w) = x.shape[2:], prep.crop
        start = round if prep.round_crop else int
        top, left = start((height - crop_h) / 2.0), start((width - crop_w) / 2.0)
        x = x[:, :, top:top + crop_h, left:left + crop_w]
    # Why mean and std times 255 rather than x / 255 first: transformers fuses rescale and normalize this way;
    # timm's ToTensor divides first (a float32 rounding apart, ~1e-7 relative).
    mean, std = (255 * torch.tensor(v, dtype=torch.float32)[:, None, None] for v in (prep.mean, prep.std))
    return ((x.float() - mean) / std).to(images.device)


# transformers' processor classes that the releases use, with the defaults of the fields a file may leave out.
# Why `square`: an old file's `"size": 224` means 224 x 224 for ViT and a shortest edge of 224 for BiT.
PROCESSORS = {
    "BitImageProcessor": dict(size=(224,), resample=3, crop=(224, 224), mean=(0.48145466, 0.4578275, 0.40821073),
                              std=(0.26862954, 0.26130258, 0.27577711), square=False),
    "ViTImageProcessor": dict(size=(224, 224), resample=2, crop=None, mean=(0.5,) * 3, std=(0.5,) * 3, square=True),
}
PROCESSORS["ViTFeatureExtractor"] = PROCESSORS["ViTImageProcessor"]   # the name files written before 2023 carry
PROCESSOR_FIELDS = {"image_processor_type", "feature_extractor_type", "processor_class", "do_resize", "size",
                    "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor", "do_normalize",
                    "image_mean", "image_std", "do_convert_rgb"}


def _size(path, key: str, value, square: bool) -> tuple:
    """transformers' size forms: {"height", "width"}, {"shortest_edge"}, or a bare integer."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return (value, value) if square else (value,)
    if isinstance(value, dict) and set(value) == {"height", "width"}:
        return _positive(path, key, (value["height"], value["width"]))
    if isinstance(value, dict) and set(value) == {"shortest_edge"}:
        return _positive(path, key, (value["shortest_edge"],))
    raise LoadError(f"{path}: {key} {json.dumps(value)} is not supported; DINO releases give {{\"height\": H, "
                    f"\"width\": W}}, {{\"shortest_edge\": S}} or one integer")


def _positive(path, key: str, sizes: tuple) -> tuple:
    if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise LoadError(f"{path}: {key} must hold positive integers, not {json.dumps(list(sizes))}")
    return tuple(sizes)


def _triple(path, key: str, value) -> tuple:
    ok = isinstance(value, list) and len(value) == 3 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    if not ok or (key.endswith("std") and min(value) <= 0):
        raise LoadError(f"{path}: {key} must be three finite numbers (one per RGB channel), not {json.dumps(value)}")
    return tuple(float(v) for v in value)


def _resample(path, key: str, value) -> str:
    if value not in RESAMPLE and value not in RESAMPLE.values():
        raise LoadError(f"{path}: {key} {json.dumps(value)} is not supported; DINO releases resize bicubic (3) or "
                        "bilinear (2)")
    return RESAMPLE.get(value, value)


def _check_crop(path, prep: Preparation) -> Preparation:
    """A crop larger than the resized image would pad it; no release does, so it is refused rather than guessed."""
    smallest = (prep.size[0],) * 2 if len(prep.size) == 1 else prep.size
    if prep.crop and (prep.crop[0] > smallest[0] or prep.crop[1] > smallest[1]):
        raise LoadError(f"{path}: the crop {list(prep.crop)} is larger than the resized image {list(prep.size)}")
    return prep


def from_processor(path: Path) -> Preparation:
    """transformers' preprocessor_config.json -> Preparation, every field read or refused by name."""
    data = read_json(path)
    kind = data.get("image_processor_type") or data.get("feature_extractor_type")
    if kind not in PROCESSORS:
        raise LoadError(f"{path}: image processor {json.dumps(kind)} is not one DINO releases use "
                        f"({', '.join(sorted(PROCESSORS))})")
    unknown = sorted(set(data) - PROCESSOR_FIELDS)
    if unknown:
        raise LoadError(f"{path}: unknown field {unknown[0]}; minisd reads {', '.join(sorted(PROCESSOR_FIELDS))}")
    if data.get("do_rescale", True) is not True or data.get("rescale_factor", 1 / 255) != 1 / 255:
        raise LoadError(f"{path}: do_rescale true with rescale_factor 1/255 is what every DINO release uses and all "
                        "minisd implements (images are 8-bit)")
    d = PROCESSORS[kind]
    crop = None
    if data.get("do_center_crop", d["crop"] is not None):
        crop = _size(path, "crop_size", data["crop_size"], square=True) if "crop_size" in data else d["crop"]
        if crop is None or len(crop) != 2:
            raise LoadError(f"{path}: do_center_crop needs crop_size {{\"height\": H, \"width\": W}}")
    normalize = data.get("do_normalize", True)
    if not data.get("do_resize", True):
        raise LoadError(f"{path}: do_resize false is not supported: the encoder needs its trained input size")
    return _check_crop(path, Preparation(
        size=_size(path, "size", data["size"], d["square"]) if "size" in data else d["size"],
        resample=_resample(path, "resample", data.get("resample", d["resample"])),
        crop=crop, round_crop=False,
        mean=_triple(path, "image_mean", data.get("image_mean", list(d["mean"]))) if normalize else (0.0,) * 3,
        std=_triple(path, "image_std", data.get("image_std", list(d["std"]))) if normalize else (1.0,) * 3))


def from_timm(path: Path, cfg: dict) -> Preparation:
    """The `pretrained_cfg` of timm's config.json -> Preparation, as timm's resolve_data_config and
    transforms_imagenet_eval build it: shortest edge floor(size / crop_pct), centre crop to `input_size`."""
    size = cfg.get("input_size", [3, 224, 224])
    if not (isinstance(size, list) and len(size) == 3 and size[0] == 3 and size[1] == size[2]):
        raise LoadError(f"{path}: pretrained_cfg.input_size {json.dumps(size)} is not supported; DINOv2 releases "
                        "give [3, S, S]")
    side = _positive(path, "pretrained_cfg.input_size", (size[1],))[0]
    crop_pct = cfg.get("crop_pct") or 0.875   # timm's DEFAULT_CROP_PCT, taken for a missing or null value
    if cfg.get("crop_mode", "center") != "center" or not isinstance(crop_pct, (int, float)) or not 0 < crop_pct <= 1:
        raise LoadError(f"{path}: pretrained_cfg crop_mode {json.dumps(cfg.get('crop_mode'))} / crop_pct "
                        f"{json.dumps(crop_pct)} is not supported; DINOv2 releases use \"center\" and 1.0")
    return Preparation(size=(math.floor(side / crop_pct),), crop=(side, side), round_crop=True,
                       resample=_resample(path, "pretrained_cfg.interpolation", cfg.get("interpolation") or "bicubic"),
                       mean=_triple(path, "pretrained_cfg.mean", list(cfg.get("mean", IMAGENET_MEAN))),
                       std=_triple(path, "pretrained_cfg.std", list(cfg.get("std", IMAGENET_STD))))


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise LoadError(f"{path}: not a readable JSON file ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise LoadError(f"{path}: a JSON object was expected, not {type(data).__name__}")
    return data
