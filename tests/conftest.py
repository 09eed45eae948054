"""Shared test helpers: references are diffusers/transformers modules with random weights, converted to the
official layout by tools/convert_diffusers.py and loaded through minisd.load."""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter a random value, norm affines included (their defaults 1/0 would hide a swapped
    weight and bias), keeping the library's weight init so activations stay in a sensible range."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.2 * noise)
            else:
                p.add_(0.1 * p.std().nan_to_num(0.02) * noise)
    return module.eval()


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| relative to the reference's output scale (its max |value|)."""
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
