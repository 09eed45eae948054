"""The feature networks of evaluation (Inception-v3 for FID as torchmetrics computes it, DINOv2 for FD-DINOv2,
RAD-DINO and torchxrayvision's DenseNet-121 for chest X-rays, as CheXGenBench reports them) and the one loop that
turns an image set into a feature matrix.

A network here is its module, its feature function (minisd.inception.features, minisd.dinov2.features,
minisd.densenet.features, or RAD-DINO's own preprocessor_config.json applied by minisd.dino_prepare: uint8 images
in, the reference's own resize and normalisation inside) and where its weights came from, because a
figure is only comparable with another computed from the same weights file: reports and stats files carry the
sha256, and a stats file made with other weights is refused.
"""
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from minisd import densenet, densenet_load, dino_prepare, dinov2, dinov2_load, inception, inception_load
from minisd.config import LoadError
from minisd.errors import UserError, arg

from ..files.hashes import sha256_of

FEATURES = ("inception", "dinov2", "rad-dino", "xrv")
# Stein et al. 2023 (FD-DINOv2) use ViT-L/14; torch-fidelity's default `dinov2-vit-l-14` is the same release.
DEFAULT_DINOV2 = "facebook/dinov2-large"
# RAD-DINO (Perez-Garcia et al. 2025): a transformers Dinov2Model trained on chest X-rays, MIT licence; its
# preprocessor_config.json is read with it, and applied as transformers' image processor applies it.
RAD_DINO = dinov2_load.Wanted(flag="encoder", files=(*dinov2_load.FILES, "preprocessor_config.json"),
                              example="microsoft/rad-dino")


class EvalError(UserError):
    """An evaluation input that cannot be used, in one line that names the flag or file."""


@dataclass
class Network:
    name: str              # report.json "features": which network and release
    model: torch.nn.Module
    extract: Callable      # (model, uint8 [N, 3, H, W]) -> [N, dim] float32
    dim: int
    weights: str           # the file the weights came from
    weights_sha256: str
    official: bool | None  # Inception: the sha256 is that of torch-fidelity's file (None: nothing to compare with)


def provenance(net_or_official) -> str:
    """What a report says of the weights: whether a figure from them is comparable with published ones."""
    official = getattr(net_or_official, "official", net_or_official)
    return {True: "torch-fidelity's official file", False: "NOT the official file: figures are not comparable "
            "with published ones", None: "no official hash to compare with"}[official]


def _inception(path, antialias: bool) -> Network:
    """Resize: TF 1.x's bilinear by default, as torch-fidelity and the torchmetrics releases before 1.9 do (the
    convention of published FIDs, the reference study's included); `antialias` is torch's antialiased bilinear,
    torchmetrics 1.9's new default. The name says which, so statistics of the two are never mixed."""
    file = inception_load.inception_weights(path)
    sha = sha256_of(file)
    model = inception_load.load_inception(file)
    name = f"inception-v3-tf-2015-12-05, {'antialiased' if antialias else 'tf1'} resize"
    return Network(name, model, functools.partial(inception.features, antialias=antialias), 2048, str(file), sha,
                   sha.startswith(inception_load.OFFICIAL_SHA256_PREFIX))


def shared_name(network: str) -> str:
    """A network's name as reports and statistics files keep it: DINOv2 from a local folder by the folder's name
    alone (where it lies is the user's file system: medti.files.pseudonyms), a hub release (`facebook/dinov2-base`)
    as it is. A statistics file saved with the folder's path reads as one saved now."""
    kind, _, source = network.partition(" ")
    local = kind in FEATURES[1:] and (Path(source).is_absolute() or Path(source).exists() or source.startswith("."))
    return f"{kind} {Path(source).name}" if local else network


def _dinov2(name_or_folder) -> Network:
    name_or_folder = name_or_folder or DEFAULT_DINOV2
    model, file = dinov2_load.load_dinov2(name_or_folder, with_path=True)
    return Network(shared_name(f"dinov2 {name_or_folder}"), model, dinov2.features, model.config.hidden_size,
                   str(file), sha256_of(file), None)


def _prepared_features(model, images: torch.Tensor, prep: dino_prepare.Preparation) -> torch.Tensor:
    """RAD-DINO: uint8 images [N, 3, H, W] -> pooler_output [N, 768], prepared as its processor file says."""
    weight = model.embeddings.cls_token
    return model(dino_prepare.prepare(prep, images).to(weight.device, weight.dtype)).float()


def _rad_dino(name_or_folder) -> Network:
    """Why crop size = image_size is required: at its trained grid (518 / 14 = 37 patches) the position table is
    used as trained, by transformers and minisd alike; at another size minisd interpolates as the hub model does
    (minisd.dinov2), not as transformers, and the features would not be RAD-DINO's as its users compute them."""
    name_or_folder = name_or_folder or RAD_DINO.example
    model, file = dinov2_load.load_dinov2(name_or_folder, with_path=True, wanted=RAD_DINO)
    processor = Path(file).parent / RAD_DINO.files[2]
    prep = dino_prepare.from_processor(processor)
    if prep.crop != (model.config.image_size,) * 2:
        raise LoadError(f"{processor}: crop_size {list(prep.crop or ())} is not config.json's image_size "
                        f"{model.config.image_size}: not a RAD-DINO release as microsoft/rad-dino stores it")
    return Network(shared_name(f"rad-dino {name_or_folder}"), model,
                   functools.partial(_prepared_features, prep=prep), model.config.hidden_size, str(file),
                   sha256_of(file), None)


def _xrv(file) -> Network:
    model = densenet_load.load_densenet(file)
    return Network(shared_name(f"xrv {file}"), model, densenet.features, model.feature_dim, str(file),
                   sha256_of(file), densenet_load.OFFICIAL_SHA256)


def load_network(features: str, inception_file=None, dinov2_name=None, device="cpu",
                 antialias: bool = False, encoder=None) -> Network:
    """The network `features` names, with its weights, in eval mode, float32, on `device`; `encoder`: where its
    weights are (a file for inception and xrv, a release or folder for dinov2 and rad-dino). Feature statistics
    are computed in float32 as the references do: a half-precision Inception would change FID in the 2nd digit."""
    if features not in FEATURES:
        raise EvalError(f"{arg('features')} {features!r}: use one of {', '.join(FEATURES)}")
    if antialias and features != "inception":
        raise EvalError(f"{arg('antialias')} applies to Inception features only (each other network resizes as "
                        "its own release does); leave it out")
    makers = {"inception": lambda: _inception(encoder or inception_file, antialias),
              "dinov2": lambda: _dinov2(encoder or dinov2_name), "rad-dino": lambda: _rad_dino(encoder),
              "xrv": lambda: _xrv(encoder)}
    net = makers[features]()
    net.model.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
    return net


def encoder_weights(kinds: list, values: list, given: dict, keep_bare: bool = False) -> tuple:
    """--encoder's values ([KIND=]NAME_OR_FOLDER) -> ({kind: where its weights are}, a value without KIND= kept
    apart). One meaning for every command that takes --encoder: KIND= names one of the networks --features names; a
    value without KIND= names the one network's weights, unless `keep_bare` (evaluate's --run of an image-conditioned
    run, where it is the run's DINO encoder). `given`: the older flags ({kind: --inception or --dinov2 value}), which
    an --encoder KIND= value must not repeat."""
    weights, bare = {}, []
    for value in values:
        kind, _, where = value.partition("=")
        if kind in FEATURES and where:
            weights[kind] = where
        else:
            bare.append(value)
    if len(bare) > 1:
        raise EvalError(f"--encoder {bare[1]}: given twice without KIND=; name the network, e.g. --encoder xrv=FILE")
    bare = bare[0] if bare else None
    if bare and not keep_bare:
        if len(kinds) > 1:
            raise EvalError(f"--encoder {bare}: say which of {', '.join(kinds)} it is for, e.g. --encoder "
                            f"{kinds[1]}={bare}")
        weights[kinds[0]], bare = bare, None
    for kind, flag in given.items():
        if flag and kind in weights:
            raise EvalError(f"--{kind} and --encoder {kind}=... both say where {kind}'s weights are; give one")
    for kind in weights:
        if kind not in kinds:
            raise EvalError(f"--encoder {kind}=...: --features does not name {kind}; add it or leave this out")
    return weights, bare


def _runs(images: list, batch: int) -> list:
    """(start, stop) index ranges of at most `batch` consecutive images of one size: a batch must be one tensor, and
    images keep their own size (the network resizes each, as the reference does), so a size change ends a run."""
    runs, start = [], 0
    for stop in range(1, len(images) + 1):
        if stop == len(images) or stop - start == batch or images[stop].shape != images[start].shape:
            runs.append((start, stop))
            start = stop
    return runs


def encode(net: Network, images: list, what: str, batch: int = 32, progress: Callable | None = None) -> torch.Tensor:
    """[N, dim] float32 features of uint8 images [3, H, W], in order. Non-finite features mean broken weights (a
    NaN image cannot come from uint8 input) and are an error naming the file, never a NaN figure."""
    device = next(net.model.parameters()).device
    parts = []
    for start, stop in _runs(images, batch):
        with torch.inference_mode():
            parts.append(net.extract(net.model, torch.stack(images[start:stop]).to(device)).float().cpu())
        if progress:
            progress(what, stop, len(images))
    features = torch.cat(parts)
    if not torch.isfinite(features).all():
        raise EvalError(f"{net.weights}: gives non-finite features for the {what} images; the weights file is "
                        "damaged or of another network")
    return features
