"""PRDC (medti.quality.metrics.prdc) against its authors' `prdc` package 0.2 on identical features.

Tolerance: the package measures distances with scikit-learn (float64 here) and we in float64 by the matmul identity;
the four figures are counts over images divided by set sizes, so they agree exactly unless a distance sits within
rounding (~1e-12 relative) of a radius, which random continuous features make vanishingly unlikely: compared to
1e-12 absolute, i.e. equal counts."""
import numpy as np
import pytest
import torch
from prdc import compute_prdc

from medti.quality import metrics
from medti.quality.metrics import MetricError


def features(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) + shift


def reference(real: torch.Tensor, fake: torch.Tensor, k: int) -> dict:
    figures = compute_prdc(real.numpy(), fake.numpy(), nearest_k=k)
    return {name: float(value) for name, value in figures.items()}


@pytest.mark.parametrize("k, shift", [(5, 1.0), (2, 1.0), (9, 1.0), (5, 0.5)])
def test_prdc_equals_the_prdc_package(k, shift, capsys):
    # Sets of different sizes, the fake one shifted and narrower: no figure stuck at 0 or 1; at shift 0.5 density
    # exceeds 1 (fakes crowding into the real balls), the case where it differs most from precision.
    real, fake = features(90, 12, seed=1), 0.8 * features(70, 12, seed=2, shift=shift)
    ours = metrics.prdc(real, fake, k=k)
    assert ours == pytest.approx(reference(real, fake, k), abs=1e-12)
    assert 0 < min(ours.values()) and min(ours.values()) < 1 and (ours["density"] > 1) == (shift == 0.5)


def test_prdc_in_blocks_equals_one_block(monkeypatch):
    real, fake = features(60, 8, seed=3), features(50, 8, seed=4, shift=0.4)
    whole = metrics.prdc(real, fake)
    monkeypatch.setattr(metrics, "BLOCK_ELEMENTS", 7 * 60)   # 7 fake rows per block, a ragged last block
    assert metrics.prdc(real, fake) == whole
    assert whole == pytest.approx(reference(real, fake, 5), abs=1e-12)


def test_prdc_takes_float32_features_as_evaluate_gives_them():
    real, fake = features(40, 6, seed=5).float(), features(40, 6, seed=6, shift=1.0).float()
    assert metrics.prdc(real, fake) == pytest.approx(reference(real.double(), fake.double(), 5), abs=1e-12)


def test_prdc_refusals_name_the_argument():
    x = features(5, 3, seed=7)
    with pytest.raises(MetricError, match=r"k= 5: each set needs more than k images"):
        metrics.prdc(x, features(10, 3, seed=8))
    with pytest.raises(MetricError, match=r"k= 0: must be at least 1"):
        metrics.prdc(x, x, k=0)
    with pytest.raises(MetricError, match="both sets must come from the same network"):
        metrics.prdc(features(10, 3, seed=9), features(10, 4, seed=10))
    bad = features(10, 3, seed=11)
    bad[2, 1] = np.nan
    with pytest.raises(MetricError, match="non-finite"):
        metrics.prdc(bad, x)
