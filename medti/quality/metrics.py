"""The distribution metrics of `python -m medti.evaluate`, as pure functions of feature tensors [N, d]: FID, KID,
precision/recall, PRDC (precision, recall, density, coverage), and each synthetic image's distance to its nearest
real one.

Each equals the library papers cite, on the same features (tests/test_metrics.py measures it): FID and KID as
torchmetrics 1.9 computes them (`FrechetInceptionDistance`, `KernelInceptionDistance`), precision/recall as
torch-fidelity 0.4's `metric_prc`, PRDC as its authors' `prdc` package 0.2. Everything is computed in float64: the
figures are small differences of large sums (KID) or of traces (FID), and float64 costs little next to encoding
the images.
"""
import math

import torch

from minisd.errors import UserError, arg

BLOCK_ELEMENTS = 1 << 24   # distance rows are computed in blocks of at most this many entries (128 MB in float64)


class MetricError(UserError):
    """Features a metric cannot use (too few, non-finite, mismatched), in one line that names the argument."""


def _checked(features: torch.Tensor, name: str, minimum: int = 2) -> torch.Tensor:
    """The features as float64 [N, d], or a MetricError: a NaN must never turn into a NaN figure in a report."""
    if not torch.is_tensor(features) or features.dim() != 2:
        shape = tuple(features.shape) if torch.is_tensor(features) else type(features).__name__
        raise MetricError(f"{arg(name)} features must be a tensor [images, dimensions], got {shape}")
    if features.shape[0] < minimum:
        raise MetricError(f"{arg(name)} has {features.shape[0]} image(s); at least {minimum} needed")
    features = features.double()
    if not torch.isfinite(features).all():
        bad = int((~torch.isfinite(features)).any(dim=1).sum())
        raise MetricError(f"{arg(name)}: {bad} image(s) have non-finite features (NaN or inf); "
                          "check those images and the network weights")
    return features


def _pair(real: torch.Tensor, fake: torch.Tensor, minimum: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    real, fake = _checked(real, "real", minimum), _checked(fake, "fake", minimum)
    if real.shape[1] != fake.shape[1]:
        raise MetricError(f"{arg('fake')} features have {fake.shape[1]} dimensions, {arg('real')} "
                          f"{real.shape[1]}: both sets must come from the same network")
    return real, fake


def _blocks(rows: int, columns: int):
    """Row slices such that a block of distances [rows, columns] stays within BLOCK_ELEMENTS."""
    step = max(1, BLOCK_ELEMENTS // max(columns, 1))
    return (slice(start, min(start + step, rows)) for start in range(0, rows, step))


# ---- FID (Heusel et al. 2017) ----

def statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [d], covariance [d, d]) in float64, as torchmetrics' FrechetInceptionDistance accumulates them:
    sums of x and of x xᵀ in float64, then cov = (Σ x xᵀ - N μ μᵀ) / (N - 1) (the unbiased N - 1 normalisation,
    as numpy.cov and torch-fidelity use too)."""
    x = _checked(features, "features")
    n = x.shape[0]
    mu = x.sum(dim=0) / n
    sigma = (x.T @ x - n * torch.outer(mu, mu)) / (n - 1)
    return mu, sigma


def _symmetric(m: torch.Tensor) -> torch.Tensor:
    return (m + m.T) / 2   # eigh reads one triangle only; average away the rounding asymmetry first


def _psd_eigenvalues(m: torch.Tensor, vectors: bool = False):
    """The eigenvalues of a symmetric PSD matrix (and its eigenvectors, with `vectors`), with those below the
    numerical-rank tolerance set to 0. The tolerance is numpy.linalg.matrix_rank's, max|λ| · d · eps: eigh resolves
    eigenvalues only to about that (Weyl's bound), so smaller ones are rounding, of either sign; sqrt would turn
    1e-14 into 1e-7, and summed over the ~1,900 null directions of 100 images in 2048 dimensions that is a 1e-4
    error in FID."""
    m = _symmetric(m)
    values, basis = torch.linalg.eigh(m) if vectors else (torch.linalg.eigvalsh(m), None)
    floor = values.abs().max() * values.numel() * torch.finfo(values.dtype).eps
    values = torch.where(values > floor, values, 0.0)
    return (values, basis) if vectors else values


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    """The symmetric square root V diag(sqrt λ) Vᵀ of a symmetric PSD matrix."""
    values, vectors = _psd_eigenvalues(m, vectors=True)
    return (vectors * values.sqrt()) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||² + tr(sigma1) + tr(sigma2) - 2 tr(sqrt(sigma1 sigma2)) (Fréchet distance of two Gaussians,
    Dowson & Landau 1982; FID of Heusel et al. 2017), in float64.

    tr(sqrt(sigma1 sigma2)) is the sum of the square roots of the eigenvalues of sigma1 sigma2, which are those of
    the symmetric PSD matrix sqrt(sigma1) sigma2 sqrt(sigma1) (AB and BA share their eigenvalues; take
    A = sqrt(sigma1), B = sigma2 sqrt(sigma1)). Why this is stable when there are fewer images than dimensions
    (singular covariances): a symmetric eigensolver (eigh) has eigenvalue errors of the order of rounding times
    the matrix norm (Weyl), so the d - N zero eigenvalues come out as ±1e-14-sized numbers, and those below the
    numerical-rank tolerance are set to 0 before the square root (_psd_eigenvalues), so they add nothing.
    pytorch-fid/TTUR instead take scipy.linalg.sqrtm of the non-symmetric product; its Schur method divides by
    sums of root eigenvalues, which vanish for a singular product, so it returns inf/NaN and they retry with
    1e-6 added to both diagonals (a bias that grows with d). torchmetrics 1.9 (`_compute_fid`) and torch-fidelity
    0.4 take `eigvals` of the non-symmetric sigma1 @ sigma2 and sum the real parts of the complex square roots:
    finite for N < d too (a tiny negative eigenvalue's root is imaginary, real part 0), but the tiny positive
    ones each add sqrt(1e-14) = 1e-7. Measured (tests/test_metrics.py), 100 vs 120 images in 2048 dimensions:
    torchmetrics is 1.3e-4 (9e-8 relative) below the exact value computed from the N x N cross products of the
    centred features, this is 2e-13 from it; for N > d the two agree to 1e-13.
    """
    mu1, mu2 = (torch.as_tensor(m, dtype=torch.float64) for m in (mu1, mu2))
    sigma1, sigma2 = (torch.as_tensor(s, dtype=torch.float64) for s in (sigma1, sigma2))
    d = mu1.shape[-1]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise MetricError(f"statistics of mismatched shapes: means {tuple(mu1.shape)} and {tuple(mu2.shape)}, "
                          f"covariances {tuple(sigma1.shape)} and {tuple(sigma2.shape)}")
    if not all(torch.isfinite(t).all() for t in (mu1, mu2, sigma1, sigma2)):
        raise MetricError("statistics contain NaN or inf: recompute them from finite features")
    root1 = _sqrt_psd(sigma1)
    trace_sqrt = _psd_eigenvalues(root1 @ sigma2 @ root1).sqrt().sum()
    fid = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt
    # A squared distance: rounding can leave -1e-12 for two identical sets; report 0, not a negative FID.
    return max(float(fid), 0.0)


# ---- KID (Bińkowski et al. 2018) ----

def _kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The cubic polynomial kernel k(x, y) = (xᵀy / d + 1)³ of Bińkowski et al. 2018 (torchmetrics' `poly_kernel`
    with its defaults degree 3, gamma 1/d, coef 1)."""
    return (a @ b.T / a.shape[1] + 1) ** 3


def _kernel_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_ij k(a_i, b_j), in row blocks: the full sets may hold 10,000 images (an 800 MB kernel matrix)."""
    return sum(_kernel(a[rows], b).sum() for rows in _blocks(a.shape[0], b.shape[0]))


def _mmd2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD² (Gretton et al. 2012, eq. 3): the means of k over distinct pairs within each set, minus twice
    the mean over all cross pairs. For equal set sizes this is torchmetrics' `maximum_mean_discrepancy`; that
    function divides the cross term by m² with m the first set's size, so it is only right for equal sizes,
    and here m and n are kept apart (full sets of 100 real and 2,000 synthetic images)."""
    m, n, d = x.shape[0], y.shape[0], x.shape[1]
    # k(x_i, x_i) = (||x_i||² / d + 1)³: the diagonal, left out of the within-set sums
    within_x = (_kernel_sum(x, x) - ((x.square().sum(1) / d + 1) ** 3).sum()) / (m * (m - 1))
    within_y = (_kernel_sum(y, y) - ((y.square().sum(1) / d + 1) ** 3).sum()) / (n * (n - 1))
    return within_x + within_y - 2 * _kernel_sum(x, y) / (m * n)


def kid(real, fake, subset_size: int | None = None, subsets: int = 100, generator=None) -> dict:
    """{"kid": MMD² on the full sets, "kid_mean", "kid_std": over `subsets` random subsets of `subset_size`}.

    Defaults: 100 subsets (torchmetrics' and torch-fidelity's default) of min(1000, n_real, n_fake) images (their
    1000, capped to the smaller set as clean-fid does). Each subset draws `randperm(n_real)` then `randperm(n_fake)`
    from `generator` (default: seed 0) and keeps the first `subset_size` of each, exactly as torchmetrics draws
    from its global RNG, so the same seed picks the same subsets. kid_std is the population std (ddof 0), as
    torchmetrics (`std(unbiased=False)`) and torch-fidelity (`np.std`) report it.
    """
    real, fake = _pair(real, fake)
    smaller = min(real.shape[0], fake.shape[0])
    subset_size = min(1000, smaller) if subset_size is None else subset_size
    if not 2 <= subset_size <= smaller:
        raise MetricError(f"{arg('subset_size')} {subset_size}: must be between 2 and the smaller set's size "
                          f"({real.shape[0]} real, {fake.shape[0]} fake images)")
    if subsets < 1:
        raise MetricError(f"{arg('subsets')} {subsets}: must be at least 1")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    scores = []
    for _ in range(subsets):
        real_rows = torch.randperm(real.shape[0], generator=generator)[:subset_size]
        fake_rows = torch.randperm(fake.shape[0], generator=generator)[:subset_size]
        scores.append(_mmd2(real[real_rows], fake[fake_rows]))
    scores = torch.stack(scores)
    return {"kid": float(_mmd2(real, fake)), "kid_mean": float(scores.mean()),
            "kid_std": float(scores.std(correction=0))}


# ---- k-NN distances: precision/recall (Kynkäänniemi et al. 2019) and nearest neighbours ----

def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a_i - b_j||² = ||a_i||² + ||b_j||² - 2 a_iᵀb_j, clamped at 0 (rounding); float64 keeps the comparisons
    against the radii exact to ~1e-16 relative. Squared distances order as distances do, so no sqrt is needed."""
    return (a.square().sum(1, keepdim=True) + b.square().sum(1) - 2 * a @ b.T).clamp(min=0)


def _radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Squared distance of each row to its k-th nearest *other* row. torch-fidelity takes `kthvalue(k + 1)` of the
    distances including the row itself (distance 0, always among the smallest): the same value."""
    radii = []
    for rows in _blocks(x.shape[0], x.shape[0]):
        block = _squared_distances(x[rows], x)
        own = torch.arange(rows.start, rows.stop)
        block[own - rows.start, own] = math.inf
        radii.append(block.kthvalue(k, dim=1).values)
    return torch.cat(radii)


def _balls(real, fake, k: int) -> tuple:
    """(real, fake, real radii, fake radii): the two sets checked (_pair) and each image's distance to its k-th nearest
    other image of its own set, the ball radius of precision/recall and PRDC."""
    if k < 1:
        raise MetricError(f"{arg('k')} {k}: must be at least 1")
    real, fake = _pair(real, fake)
    if min(real.shape[0], fake.shape[0]) <= k:
        raise MetricError(f"{arg('k')} {k}: each set needs more than k images for a k-th neighbour "
                          f"({real.shape[0]} real, {fake.shape[0]} fake)")
    return real, fake, _radii(real, k), _radii(fake, k)


def precision_recall(real, fake, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), as torch-fidelity's `metric_prc` computes them:
    each image's ball has the Euclidean distance to its k-th nearest neighbour in its own set as radius;
    precision = the fraction of fake images inside (≤) at least one real ball, recall = the fraction of real
    images inside at least one fake ball. Computed in row blocks (one pass over the cross distances serves
    both), so 10,000 × 10,000 images need ~128 MB, not the 800 MB of a full distance matrix."""
    real, fake, real_radii, fake_radii = _balls(real, fake, k)
    fake_inside = torch.zeros(fake.shape[0], dtype=torch.bool)
    real_inside = torch.zeros(real.shape[0], dtype=torch.bool)
    for rows in _blocks(fake.shape[0], real.shape[0]):
        block = _squared_distances(fake[rows], real)                          # [fakes in block, reals]
        fake_inside[rows] = (block <= real_radii).any(dim=1)
        real_inside |= (block <= fake_radii[rows, None]).any(dim=0)
    return float(fake_inside.double().mean()), float(real_inside.double().mean())


def prdc(real, fake, k: int = 5) -> dict:
    """Precision, recall, density and coverage (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for
    Generative Models"), as the authors' `prdc` package 0.2 computes them; k = 5 is the paper's choice. The balls are
    precision_recall's (radius: the distance to the k-th nearest other image of the same set), but a point counts as
    inside only when strictly closer (prdc's `<`; torch-fidelity's precision takes `<=`: with copies they differ).
    density: how many real balls hold each fake image, on average, over k (it exceeds 1 where fakes crowd around
    real images); coverage: the fraction of real images whose own ball holds at least one fake image (not fooled
    by fakes piled into one region, as recall is). Row blocks, as precision_recall."""
    real, fake, real_radii, fake_radii = _balls(real, fake, k)
    balls_holding = torch.zeros(fake.shape[0], dtype=torch.float64)   # per fake image: real balls it lies in
    real_in_fake_ball = torch.zeros(real.shape[0], dtype=torch.bool)
    covered = torch.zeros(real.shape[0], dtype=torch.bool)
    for rows in _blocks(fake.shape[0], real.shape[0]):
        block = _squared_distances(fake[rows], real)                          # [fakes in block, reals]
        inside = block < real_radii
        balls_holding[rows] = inside.sum(dim=1).double()
        covered |= inside.any(dim=0)   # prdc: the nearest fake closer than the radius = any fake closer
        real_in_fake_ball |= (block < fake_radii[rows, None]).any(dim=0)
    return {"precision": float((balls_holding > 0).double().mean()),
            "recall": float(real_in_fake_ball.double().mean()),
            "density": float(balls_holding.mean() / k), "coverage": float(covered.double().mean())}


def nearest_real(real, fake, leave_one_out: bool = False,
                 groups: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance [M] float64, index [M]) of each fake image's nearest real image in feature space (Euclidean), for
    the report's histogram: a synthetic image much closer to a real one than real images are to each other
    deserves a look. groups [N] (fake is real): each image's patient (integer labels); every image of its own
    patient is left out, real to nearest real of another patient (adjacent slices of one scan are near-copies and
    would make real images look like copies of each other). leave_one_out: the same with every image its own
    patient. A patient holding every image has no other: its distances are inf (the caller says so instead)."""
    real, fake = _pair(real, fake, minimum=1)
    if leave_one_out and groups is None:
        groups = torch.arange(real.shape[0])
    distances, indices = [], []
    for rows in _blocks(fake.shape[0], real.shape[0]):
        squared = _squared_distances(fake[rows], real)
        if groups is not None:   # row i of this block is image rows.start + i
            squared[groups[rows, None] == groups[None]] = math.inf
        best = squared.min(dim=1)
        distances.append(best.values.sqrt())
        indices.append(best.indices)
    return torch.cat(distances), torch.cat(indices)
