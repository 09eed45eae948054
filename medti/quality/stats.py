"""The files evaluation writes for later use: a real set's statistics (`--save-stats`, accepted in place of
`--real`) and per-image features (`--save-features`).

The statistics file is a NumPy `.npz` read with allow_pickle=False (plain arrays only: no code can come in with
it). Beside FID's mean and covariance it holds the per-image features, because KID and precision/recall need the
points, not only their moments; and the network and weights sha256, because a mean from another Inception file
gives a meaningless FID without any error. Those per-image features describe the real patients' images: keep
the file where the images are kept.
"""
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minisd.errors import arg

from ..files.atomic import safetensors_bytes, write_atomic
from .features import EvalError, Network, shared_name
from .metrics import statistics

FORMAT = "medti-stats-1"


@dataclass
class RealSide:
    """The real set as the metrics need it, from images or from a statistics file."""
    features: torch.Tensor   # [N, d] float32
    mu: torch.Tensor         # [d] float64
    sigma: torch.Tensor      # [d, d] float64
    names: list              # the images' pseudonyms (medti.files.pseudonyms; paths in files before them), row order
    ms_ssim: dict | None     # {"mean", "pairs"} of the real set, when it was computed
    about: str = ""          # what reports call the set: its size and fingerprint (scoring.real_side), no path


def from_features(features: torch.Tensor, names: list, ms_ssim: dict | None) -> RealSide:
    mu, sigma = statistics(features)
    return RealSide(features, mu, sigma, names, ms_ssim)


def save_stats(path, real: RealSide, net: Network):
    """Write the statistics file atomically (a crash leaves the old file or none, never half a file)."""
    arrays = {"format": np.array(FORMAT), "network": np.array(net.name), "weights_sha256": np.array(net.weights_sha256),
              "n": np.array(len(real.names)), "mu": real.mu.numpy(), "sigma": real.sigma.numpy(),
              "features": real.features.numpy(), "files": np.array(json.dumps(real.names)),
              "ms_ssim": np.array(json.dumps(real.ms_ssim))}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomic(path, buffer.getvalue())


def _damaged(path: Path, what: str) -> EvalError:
    return EvalError(f"{arg('real')} {path}: {what}; the file is damaged or not medti's -- make one with --save-stats")


def _read(path: Path) -> dict:
    """The arrays of a statistics file. numpy's own messages are not passed on: for a file that is no archive it
    suggests allow_pickle=True, which would run code from the file."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:   # not a zip, truncated, pickled data
        with open(path, "rb") as f:   # numpy calls any file it cannot place "pickled": trust it for archives only
            archive = f.read(6).startswith((b"PK\x03\x04", b"\x93NUMPY"))   # zip (.npz) or .npy magic
        pickled = archive and isinstance(e, ValueError) and "pickle" in str(e)
        raise _damaged(path, "holds pickled (object) arrays, which are never loaded" if pickled else
                       "not a readable .npz archive") from None


def _number(path: Path, data: dict, key: str) -> int:
    try:
        return int(data[key])
    except (KeyError, TypeError, ValueError):
        raise _damaged(path, f"its {key!r} is missing or not a number") from None


def _json(path: Path, data: dict, key: str, kind: type):
    try:
        value = json.loads(str(data[key]))
    except (KeyError, json.JSONDecodeError):
        raise _damaged(path, f"its {key!r} is missing or not JSON") from None
    if not isinstance(value, kind) and value is not None:
        raise _damaged(path, f"its {key!r} is not a {kind.__name__}")
    return value


def read_stats(path) -> dict:
    """The arrays of a statistics file, checked for what needs no network: an archive in medti's format. Before
    the network loads, so a damaged file is the run's one line."""
    data = _read(Path(path))
    if str(data.get("format", "")) != FORMAT:
        raise EvalError(f"{arg('real')} {path}: not a medti statistics file (no format '{FORMAT}'); make one with "
                        "--save-stats")
    return data


def _check_network(path: Path, data: dict, net: Network):
    flag = f"{arg('real')} {path}"
    if str(data.get("format", "")) != FORMAT:
        raise EvalError(f"{flag}: not a medti statistics file (no format '{FORMAT}'); make one with --save-stats")
    network, sha = shared_name(str(data.get("network", ""))), str(data.get("weights_sha256", ""))
    if sha == net.weights_sha256 and network != net.name:
        fix = "drop --antialias" if "antialiased" in net.name else "add --antialias"
        raise EvalError(f"{flag}: made with {network}, not {net.name}: the same weights, another resize; "
                        f"{fix} to match it, or re-encode the real set")
    if network != net.name or sha != net.weights_sha256:
        raise EvalError(f"{flag}: made with {network} (weights sha256 {sha[:12]}), not {net.name} "
                        f"({net.weights_sha256[:12]}); use the same weights or re-encode the real set")


def load_stats(path, net: Network, data: dict | None = None) -> RealSide:
    """A statistics file (`data`: read_stats' arrays of it, else read here) checked against the network in use:
    format, network, weights, every shape and type, and finite values (a NaN mean gives a NaN FID that names no
    file)."""
    path = Path(path)
    data = read_stats(path) if data is None else data
    _check_network(path, data, net)
    n, d = _number(path, data, "n"), net.dim
    for key, shape in {"mu": (d,), "sigma": (d, d), "features": (n, d)}.items():
        array = data.get(key)
        if array is None or array.dtype.kind != "f":
            raise _damaged(path, f"{key} is {'missing' if array is None else array.dtype}, expected float numbers")
        if array.shape != shape:
            raise _damaged(path, f"{key} has shape {array.shape}, expected {shape}")
        if not np.isfinite(array).all():
            raise _damaged(path, f"{key} holds NaN or infinite values")
    names = _json(path, data, "files", list)
    if n < 2 or len(names) != n or not all(isinstance(name, str) for name in names):
        raise _damaged(path, f"it holds {n} image(s) and {len(names)} file name(s)")
    return RealSide(torch.from_numpy(data["features"]).float(), torch.from_numpy(data["mu"]).double(),
                    torch.from_numpy(data["sigma"]).double(), names, _json(path, data, "ms_ssim", dict))


def save_features(path, real: RealSide, fake: torch.Tensor, fake_names: list, net: Network):
    """Per-image features as safetensors: `real` [N, d] and `fake` [M, d]; metadata `real_files` and `fake_files`
    (JSON lists in row order: the real images' pseudonyms, the synthetic images' names relative to their folder),
    network and weights sha256."""
    meta = {"real_files": json.dumps(real.names), "fake_files": json.dumps(fake_names), "features": net.name,
            "weights_sha256": net.weights_sha256}
    write_atomic(path, safetensors_bytes({"real": real.features.contiguous(), "fake": fake.contiguous()}, meta))
