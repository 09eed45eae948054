"""Loading torchxrayvision's DenseNet-121 weights (`densenet121-res224-all`) for minisd.densenet: a state dict of
tensors (.safetensors, or a torch pickle that torch.load(weights_only=True) reads), every tensor checked by name
and shape, so a file of another network is refused in one line.

Why not the release file itself: torchxrayvision publishes a pickle of the whole trained model object (its own
loader calls torch.load(weights_only=False), which runs whatever code the pickle names). minisd never unpickles
objects, so the tensors are saved once with torchxrayvision (CONVERT below), which downloads the release itself.
"""
from pathlib import Path

import torch

from .config import LoadError
from .densenet import DenseNet, DenseNetConfig
from .errors import arg
from .tensorfile import FLOATS, TensorFile, check_finite

RELEASE = "densenet121-res224-all"
URL = ("https://github.com/mlmed/torchxrayvision/releases/download/v1/"
       "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt")
CONVERTED = "xrv-densenet121-res224-all.pt"
CONVERT = (f"python -c \"import torch, torchxrayvision as xrv; torch.save(xrv.models.DenseNet(weights='{RELEASE}')"
           f".state_dict(), '{CONVERTED}')\"")
# Why no official hash: the release could not be downloaded where this was written, and the converted file's bytes
# depend on the torch that saved it. A release is recognised by the sha256 of the file the user passes, which the
# report carries; comparing two reports' hashes says whether they used the same weights.
OFFICIAL_SHA256 = None
# In the converted file, not in the network: the operating-point thresholds xrv applies to the classifier's
# outputs (never to the features), and batch norm's training counter (absent from pickles older than torch 0.4.1).
IGNORED = ("op_threshs",)
OPTIONAL_SUFFIX = ".num_batches_tracked"
RELEASE_CONFIG = DenseNetConfig()   # densenet121-res224-all: the defaults


def fetch_hint() -> str:
    return f"save its tensors once with torchxrayvision ({CONVERT}; it downloads {URL}) and pass {arg('encoder')} " \
           f"xrv={CONVERTED}"


def _open(path: Path) -> TensorFile:
    if not path.is_file():
        raise LoadError(f"{arg('encoder')} xrv={path}: no such file; {fetch_hint()}")
    try:
        return TensorFile(path)
    except LoadError:   # torchxrayvision's release pickles its model object: refused by weights_only=True
        raise LoadError(f"{path}: not a file of tensors (torchxrayvision's release pickles the whole model, which "
                        f"minisd does not unpickle); {fetch_hint()}") from None


def _check_keys(file: TensorFile, expected: dict):
    needed = {k for k in expected if not k.endswith(OPTIONAL_SUFFIX)}
    unknown = sorted(file.keys - set(expected) - set(IGNORED))
    missing = sorted(needed - file.keys)
    for problem, names in (("unknown", unknown), ("missing", missing)):
        if names:
            raise LoadError(f"{file.path}: {problem} key {names[0]}"
                            f"{f' (and {len(names) - 1} more)' if len(names) > 1 else ''} -- not torchxrayvision's "
                            f"DenseNet-121 ({RELEASE}); {fetch_hint()}")
    for name in sorted(file.keys & set(expected)):
        shape, stored = file.shape(name), file.dtype(name)
        floating = stored in FLOATS or name.endswith(OPTIONAL_SUFFIX)
        if shape != tuple(expected[name].shape) or not floating:
            raise LoadError(f"{file.path}: {name} is {stored} {list(shape)}, not {list(expected[name].shape)}: not "
                            f"torchxrayvision's DenseNet-121 ({RELEASE})")


def load_densenet(path, cfg: DenseNetConfig = RELEASE_CONFIG) -> DenseNet:
    """The network with the tensors of `path`, float32, eval mode (batch norm from its running statistics)."""
    if path is None:
        raise LoadError(f"xrv features need torchxrayvision's {RELEASE} weights as tensors: {fetch_hint()}")
    file = _open(Path(path))
    with torch.device("meta"):   # no random init to overwrite: the file's tensors are assigned in place
        model = DenseNet(cfg)
    expected = model.state_dict()
    _check_keys(file, expected)
    counters = {k: torch.zeros((), dtype=torch.long) for k in expected if k.endswith(OPTIONAL_SUFFIX)}
    state = {k: file.get(k).to(torch.float32) for k in expected if not k.endswith(OPTIONAL_SUFFIX)}
    check_finite(file, "", state, torch.float32)
    model.load_state_dict({**state, **counters}, strict=True, assign=True)
    return model.eval().requires_grad_(False)
