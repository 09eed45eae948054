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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minisd.errors import arg

from ..files.atomic import safetensors_bytes, write_atomic
from .features import EvalError, Network
from .metrics import statistics

FORMAT = "medti-stats-1"


@dataclass
class RealSide:
    """The real set as the metrics need it, from images or from a statistics file."""
    features: torch.Tensor   # [N, d] float32
    mu: torch.Tensor         # [d] float64
    sigma: torch.Tensor      # [d, d] float64
    names: list              # relative file names, row order
    ms_ssim: dict | None     # {"mean", "pairs"} of the real set, when it was computed


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


def _read(path: Path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError) as e:   # not a zip, truncated, or an object array (pickle refused)
        raise EvalError(f"{arg('real')} {path}: not a readable statistics file ({str(e).splitlines()[0]}); "
                        "make one with --save-stats") from None


def load_stats(path, net: Network) -> RealSide:
    """A statistics file checked against the network in use: format, network, weights and every shape."""
    path = Path(path)
    data = _read(path)
    flag = f"{arg('real')} {path}"
    if str(data.get("format", "")) != FORMAT:
        raise EvalError(f"{flag}: not a medti statistics file (no format '{FORMAT}'); make one with --save-stats")
    if str(data["weights_sha256"]) == net.weights_sha256 and str(data["network"]) != net.name:
        fix = "drop --antialias" if "antialiased" in net.name else "add --antialias"
        raise EvalError(f"{flag}: made with {data['network']}, not {net.name}: the same weights, another resize; "
                        f"{fix} to match it, or re-encode the real set")
    if str(data["network"]) != net.name or str(data["weights_sha256"]) != net.weights_sha256:
        raise EvalError(f"{flag}: made with {data['network']} (weights sha256 {str(data['weights_sha256'])[:12]}), "
                        f"not {net.name} ({net.weights_sha256[:12]}); use the same weights or re-encode the real set")
    n, d = int(data["n"]), net.dim
    shapes = {"mu": (d,), "sigma": (d, d), "features": (n, d)}
    for key, shape in shapes.items():
        if data[key].shape != shape:
            raise EvalError(f"{flag}: {key} has shape {data[key].shape}, expected {shape}; the file is damaged")
    names = json.loads(str(data["files"]))
    if n < 2 or len(names) != n:
        raise EvalError(f"{flag}: holds {n} image(s) and {len(names)} name(s); the file is damaged")
    return RealSide(torch.from_numpy(data["features"]).float(), torch.from_numpy(data["mu"]).double(),
                    torch.from_numpy(data["sigma"]).double(), names, json.loads(str(data["ms_ssim"])))


def save_features(path, real: RealSide, fake: torch.Tensor, fake_names: list, net: Network):
    """Per-image features as safetensors: `real` [N, d] and `fake` [M, d]; metadata `real_files` and `fake_files`
    (JSON lists in row order, names relative to the folders given), network and weights sha256."""
    meta = {"real_files": json.dumps(real.names), "fake_files": json.dumps(fake_names), "features": net.name,
            "weights_sha256": net.weights_sha256}
    write_atomic(path, safetensors_bytes({"real": real.features.contiguous(), "fake": fake.contiguous()}, meta))
