"""medti.quality.metrics against the libraries papers cite, on identical features: FID and KID against torchmetrics
1.9 (its metric classes, fed our features through an identity "network"), precision/recall against torch-fidelity
0.4's `metric_prc`, and each against a closed form or a brute-force reference written here.

Tolerances: everything is float64 on both sides, so agreement is limited by rounding in sums of ~1e4-1e7 terms and
by the eigensolvers; each bound below says which."""
import itertools
import math
import re

import numpy as np
import pytest
import torch
from torch_fidelity.metric_prc import calculate_precision_recall_full, calculate_precision_recall_part
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance, poly_mmd

from medti.quality import metrics
from medti.quality.metrics import MetricError

# torchmetrics' KID warns that it keeps every feature in memory; these tests hold a few hundred
pytestmark = pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save:UserWarning")


class Identity(torch.nn.Module):
    """A "network" that returns its input: torchmetrics then accumulates exactly the features we give it."""

    def __init__(self, d: int):
        super().__init__()
        self.num_features = d

    def forward(self, x):
        return x


def inception_like(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    """Non-negative, correlated features of Inception pool-feature scale (mean ~0.4, a few strong directions)."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=torch.Generator().manual_seed(99)) / math.sqrt(d)
    return torch.relu(torch.randn(n, d, generator=g, dtype=torch.float64) @ mixing.double() + 0.3 + shift)


def torchmetrics_fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    metric = FrechetInceptionDistance(feature=Identity(real.shape[1]))
    for half in real.split(real.shape[0] // 2 + 1):      # in batches, as it accumulates over update() calls
        metric.update(half, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


# ---- FID ----

@pytest.fixture
def one_thread():
    """MKL's threaded eigensolvers run 5-10x slower when the cores are oversubscribed (measured here, 2048-d case
    with other jobs running: 2 threads 40-70 s, 1 thread 6-10 s); one thread is fast either way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_statistics_match_torch_cov_and_torchmetrics_state():
    x = inception_like(50, 8, seed=1)
    mu, sigma = metrics.statistics(x.float())
    assert mu.dtype == sigma.dtype == torch.float64
    # float32 input widened to float64 before summing, as torchmetrics does: equal to 1e-12 (rounding of sums)
    torch.testing.assert_close(mu, x.float().double().mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(sigma, torch.cov(x.float().double().T), rtol=0, atol=1e-12)
    metric = FrechetInceptionDistance(feature=Identity(8))
    metric.update(x.float(), real=True)
    torch.testing.assert_close(metric.real_features_sum / 50, mu, rtol=0, atol=1e-12)


def exact_fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID without a d x d square root: with A1, A2 the centred features, the non-zero eigenvalues of Σ1 Σ2 are
    those of M Mᵀ / ((n1 - 1)(n2 - 1)) with M = A1 A2ᵀ [n1, n2] (cyclic products share them), so tr sqrt(Σ1 Σ2) is
    the sum of M's singular values over sqrt((n1 - 1)(n2 - 1)): no near-zero eigenvalue is ever rooted."""
    a1, a2 = real - real.mean(0), fake - fake.mean(0)
    trace_sqrt = torch.linalg.svdvals(a1 @ a2.T).sum() / math.sqrt((len(real) - 1) * (len(fake) - 1))
    return float((real.mean(0) - fake.mean(0)).square().sum() + torch.cov(real.T).trace()
                 + torch.cov(fake.T).trace() - 2 * trace_sqrt)


@pytest.mark.parametrize("n_real,n_fake,d", [(100, 120, 2048), (400, 300, 16)])
def test_fid_equals_torchmetrics_and_the_exact_value(n_real, n_fake, d, one_thread):
    """N < d (singular covariances: the study's 100 images in Inception's 2048 dimensions) and ordinary N > d."""
    real, fake = inception_like(n_real, d, seed=2), inception_like(n_fake, d, seed=3, shift=0.05)
    ours = metrics.frechet_distance(*metrics.statistics(real), *metrics.statistics(fake))
    # Measured at N < d: 2e-13 absolute (1.5e-16 relative) from the exact value; 1e-11 relative leaves margin for
    # other BLAS builds. At N > d: 1e-13 relative.
    assert ours == pytest.approx(exact_fid(real, fake), rel=1e-11)
    # torchmetrics roots the ~1,950 rounding-sized eigenvalues of the non-symmetric product (each adds ~1e-7):
    # measured 1.3e-4 below the exact value at N < d (9e-8 relative), 1e-14 relative at N > d. Bound: 1e-6.
    assert ours == pytest.approx(torchmetrics_fid(real, fake), rel=1e-6)
    assert ours > 0


def test_fid_closed_form_for_diagonal_covariances():
    """For diagonal covariances sqrt(Σ1 Σ2) is diagonal: FID = |Δμ|² + Σ (sqrt(a) - sqrt(b))², exactly."""
    g = torch.Generator().manual_seed(4)
    mu1, mu2 = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    a, b = torch.rand(6, generator=g, dtype=torch.float64), torch.rand(6, generator=g, dtype=torch.float64)
    a[0] = b[1] = 0.0                                     # singular on both sides
    expected = float((mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    # rounding of two 6x6 eigendecompositions: ~1e-15; 1e-12 absolute
    assert metrics.frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected, abs=1e-12)


def test_fid_of_a_set_with_itself_is_zero_and_a_shift_adds_its_square():
    x = inception_like(30, 64, seed=5)                    # N < d
    mu, sigma = metrics.statistics(x)
    # trace terms of ~10 cancelling in float64, near-zero eigenvalues set to 0: measured < 1e-12; bound 1e-9
    assert metrics.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)
    assert metrics.frechet_distance(mu, sigma, mu + 0.5, sigma) == pytest.approx(64 * 0.25, abs=1e-9)


def test_fid_refuses_mismatched_and_non_finite_statistics():
    mu, sigma = metrics.statistics(inception_like(10, 4, seed=6))
    with pytest.raises(MetricError, match="mismatched shapes"):
        metrics.frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])
    with pytest.raises(MetricError, match="NaN or inf"):
        metrics.frechet_distance(mu, sigma * math.nan, mu, sigma)


def test_bad_features_are_one_line_errors_naming_the_argument():
    good = inception_like(10, 4, seed=7)
    bad = good.clone()
    bad[3, 1] = math.nan
    cases = [(lambda: metrics.kid(good, bad), "fake=: 1 image(s) have non-finite"),
             (lambda: metrics.precision_recall(bad, good), "real=: 1 image(s) have non-finite"),
             (lambda: metrics.statistics(good[:1]), "features= has 1 image"),
             (lambda: metrics.kid(good, good[:, :3]), "fake= features have 3 dimensions"),
             (lambda: metrics.statistics(good[0]), "features= features must be a tensor")]
    for call, message in cases:
        with pytest.raises(MetricError, match=re.escape(message)) as e:
            call()
        assert "\n" not in str(e.value)


# ---- KID ----

def test_kid_full_sets_equal_torchmetrics_poly_mmd():
    real, fake = inception_like(60, 32, seed=8), inception_like(60, 32, seed=9, shift=0.1)
    ours = metrics.kid(real, fake, subset_size=60, subsets=3)["kid"]
    # sums of 3,600 kernel values of ~1-10 in float64: ~1e-13 relative to the sums; KID is ~1e-2 of them: 1e-10
    assert ours == pytest.approx(float(poly_mmd(real, fake)), rel=1e-10)
    # its metric with one subset of all n images: a permutation of each full set, and MMD² ignores order
    metric = KernelInceptionDistance(feature=Identity(32), subsets=1, subset_size=60)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    assert ours == pytest.approx(float(metric.compute()[0]), rel=1e-10)


def test_kid_full_sets_of_different_sizes_equal_the_definition():
    """torchmetrics' MMD divides the cross term by m² (first set's size), right only for equal sizes; the
    unbiased estimator of Gretton et al. 2012 (eq. 3) written out pair by pair here."""
    x, y = inception_like(7, 5, seed=10), inception_like(9, 5, seed=11, shift=0.2)
    k = lambda a, b: (float(a @ b) / 5 + 1) ** 3                            # noqa: E731
    within_x = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(7), 2)) / (7 * 6)
    within_y = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(9), 2)) / (9 * 8)
    cross = sum(k(x[i], y[j]) for i in range(7) for j in range(9)) / (7 * 9)
    # a few hundred float64 terms summed in another order: 1e-12 relative
    assert metrics.kid(x, y, subset_size=7, subsets=1)["kid"] == pytest.approx(within_x + within_y - 2 * cross,
                                                                              rel=1e-12)


@pytest.mark.parametrize("subset_size,subsets", [(20, 10), (50, 1)])
def test_kid_subsets_equal_torchmetrics_with_the_same_seed(subset_size, subsets):
    """torchmetrics draws randperm(n_real) then randperm(n_fake) per subset from the global RNG; we draw the same
    sequence from a generator with the same seed, so the subsets are the same ones. (50, 1): the whole real set."""
    real, fake = inception_like(50, 24, seed=12), inception_like(70, 24, seed=13, shift=0.1)
    metric = KernelInceptionDistance(feature=Identity(24), subsets=subsets, subset_size=subset_size)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    torch.manual_seed(2024)
    their_mean, their_std = metric.compute()
    ours = metrics.kid(real, fake, subset_size, subsets, torch.Generator().manual_seed(2024))
    # float64 on both sides, same subsets; their sums run in another order: 1e-10 relative, 1e-15 absolute for std 0
    assert ours["kid_mean"] == pytest.approx(float(their_mean), rel=1e-10)
    assert ours["kid_std"] == pytest.approx(float(their_std), rel=1e-10, abs=1e-15)


def test_kid_defaults_and_std_is_population_std():
    real, fake = inception_like(30, 8, seed=14), inception_like(40, 8, seed=15)
    a = metrics.kid(real, fake)                                      # subset_size min(1000, 30, 40) = 30, seed 0
    assert a == metrics.kid(real, fake, 30, 100, torch.Generator().manual_seed(0))
    assert set(a) == {"kid", "kid_mean", "kid_std"}
    # the spread over subsets is ddof 0: recompute from the per-subset values with numpy's default np.std
    g = torch.Generator().manual_seed(3)
    scores = []
    for _ in range(5):
        r, f = torch.randperm(30, generator=g)[:10], torch.randperm(40, generator=g)[:10]
        scores.append(metrics.kid(real[r], fake[f], subset_size=10, subsets=1)["kid"])
    b = metrics.kid(real, fake, 10, 5, torch.Generator().manual_seed(3))
    # same float64 values, mean/std in another order: 1e-12 relative
    assert b["kid_mean"] == pytest.approx(np.mean(scores), rel=1e-12)
    assert b["kid_std"] == pytest.approx(np.std(scores), rel=1e-12)


def test_kid_refuses_subsets_larger_than_a_set():
    real, fake = inception_like(10, 4, seed=16), inception_like(20, 4, seed=17)
    with pytest.raises(MetricError, match=r"subset_size= 11: must be between 2 and the smaller set's size \(10 real"):
        metrics.kid(real, fake, subset_size=11)
    with pytest.raises(MetricError, match="subsets= 0"):
        metrics.kid(real, fake, subsets=0)
    with pytest.raises(MetricError, match="real= has 1 image"):
        metrics.kid(real[:1], fake)


# ---- precision / recall ----

def brute_force_prc(real: torch.Tensor, fake: torch.Tensor, k: int) -> tuple[float, float]:
    """Kynkäänniemi et al. 2019 written out: exact distances (no matmul trick), sorted per point in numpy."""
    def dist(a, b):
        return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist").numpy()

    def radii(a):   # k-th nearest other point: drop the point itself by index
        d = dist(a, a)
        return np.array([np.sort(np.delete(row, i))[k - 1] for i, row in enumerate(d)])

    precision = np.mean([(row <= radii(real)).any() for row in dist(fake, real)])
    recall = np.mean([(row <= radii(fake)).any() for row in dist(real, fake)])
    return float(precision), float(recall)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_equal_torch_fidelity_and_brute_force(k):
    real, fake = inception_like(80, 16, seed=18), inception_like(60, 16, seed=19, shift=0.3)
    ours = metrics.precision_recall(real, fake, k=k)
    # The same counts unless a distance ties a radius to 1e-16 relative (not with these draws). torch-fidelity
    # averages its 0/1 flags in float32 (0.9 -> 0.89999998): abs 1e-6, far below one image's 1/80 = 0.0125.
    assert ours == pytest.approx(calculate_precision_recall_full(fake, real, neighborhood=k), abs=1e-6)
    assert ours == pytest.approx(calculate_precision_recall_part(fake, real, neighborhood=k, batch_size=17), abs=1e-6)
    assert ours == brute_force_prc(real, fake, k)
    assert 0 < ours[0] < 1 and 0 < ours[1] < 1                                       # a test that can fail


def test_precision_recall_in_blocks_and_with_copies(monkeypatch):
    """Row blocks give the same counts; a fake that copies a real image is inside (distance 0 ≤ radius), and a
    duplicate within a set counts as a neighbour at distance 0, as in torch-fidelity's kthvalue(k + 1)."""
    real, fake = inception_like(40, 8, seed=20), inception_like(30, 8, seed=21, shift=0.5)
    fake[:5], real[1] = real[:5], real[0]
    whole = metrics.precision_recall(real, fake)
    monkeypatch.setattr(metrics, "BLOCK_ELEMENTS", 7 * 40)                           # blocks of 7 rows
    assert metrics.precision_recall(real, fake) == whole
    assert whole == brute_force_prc(real, fake, 3)
    assert whole == pytest.approx(calculate_precision_recall_full(fake, real), abs=1e-6)     # float32 mean, as above
    assert whole[0] >= 5 / 30


def test_precision_recall_needs_more_images_than_k():
    x = inception_like(3, 4, seed=22)
    with pytest.raises(MetricError, match=r"k= 3: each set needs more than k images"):
        metrics.precision_recall(x, inception_like(10, 4, seed=23))
    with pytest.raises(MetricError, match="k= 0"):
        metrics.precision_recall(x, x, k=0)


def test_nearest_real_is_the_exact_nearest_neighbour(monkeypatch):
    real, fake = inception_like(50, 8, seed=24), inception_like(20, 8, seed=25)
    fake[0] = real[7]
    exact = torch.cdist(fake, real, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1)
    monkeypatch.setattr(metrics, "BLOCK_ELEMENTS", 3 * 50)
    distance, index = metrics.nearest_real(real, fake)
    assert torch.equal(index, exact.indices) and index[0] == 7
    # |a|²+|b|²-2ab in float64 then sqrt: ~1e-8 absolute near 0 (sqrt of 1e-16-sized rounding), 1e-12 elsewhere
    torch.testing.assert_close(distance, exact.values, rtol=1e-12, atol=1e-7)


def test_nearest_leave_one_out_equals_cdist_without_the_diagonal(monkeypatch):
    """The report's real-to-real series: each image's nearest other image, also when computed in row blocks."""
    import math
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(0)).double()
    want = torch.cdist(x, x).fill_diagonal_(math.inf).min(dim=1)
    for block in (None, 8 * 300 * 5):   # one block; blocks of 40 rows
        if block:
            monkeypatch.setattr(metrics, "BLOCK_ELEMENTS", block)
        distance, index = metrics.nearest_real(x, x, leave_one_out=True)
        torch.testing.assert_close(distance, want.values, rtol=1e-12, atol=1e-12)   # float64, same formula
        assert torch.equal(index, want.indices)
