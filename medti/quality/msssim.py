"""MS-SSIM (Wang, Simoncelli & Bovik 2003) as `pytorch_msssim.ms_ssim` computes it, and the diversity figure of
`python -m medti.evaluate`: the mean MS-SSIM over distinct pairs within one set (RoentGen, Chambon et al. 2022:
lower = more diverse).

pytorch_msssim's conventions, followed here: an 11-tap Gaussian window with σ 1.5 applied separably with no
padding (valid mode: each map is 10 pixels smaller than the image in height and width), K1 0.01, K2 0.03,
data_range 255 (uint8 images); per scale the contrast-structure term cs (scales 1-4) or the full SSIM (scale 5) is
averaged over each channel's map and clamped at 0 (relu); MS-SSIM per channel = Π cs_s^w_s · ssim_5^w_5 with the
weights of Wang et al. (0.0448, 0.2856, 0.3001, 0.2363, 0.1333), then the mean over channels; between scales a 2x2
average pool with padding (H % 2, W % 2), zeros counted.

How torchmetrics 1.9 (`MultiScaleStructuralSimilarityIndexMeasure`) differs (read in its functional/image/ssim.py;
size of the difference measured in tests/test_msssim.py): it reflect-pads the images by 5 before filtering and
crops the cs map back to the valid region but not the last scale's SSIM map (its border pixels see mirrored
data); it averages cs and SSIM over all channels *before* the powers and the product (pytorch_msssim: per channel,
then the mean); it pools without padding (odd sizes drop a row/column); it clamps the variances at 0; and it
refuses sides whose // 16 is ≤ 10, i.e. below 176 pixels (pytorch_msssim: below 161). The first two matter:
0.02-0.12 on structured pairs, ~1e-3 on random ones; rebuilt from this file's filter, they reproduce torchmetrics
to 2e-6.

Sizes: 5 scales of an 11-pixel window need a shorter side of at least 161 pixels ((11 - 1) · 2⁴ + 1, pytorch_msssim's
assertion); smaller images are refused with MsSsimError rather than upsampled, because MS-SSIM of upsampled
images would measure the interpolation's smoothness, not the set's diversity.
"""
import functools
import itertools
from collections import Counter

import torch
import torch.nn.functional as F

from minisd.errors import UserError, arg

WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)   # Wang et al. 2003, per scale, finest first
WINDOW, SIGMA = 11, 1.5
K1, K2 = 0.01, 0.03
MIN_SIDE = (WINDOW - 1) * 2 ** (len(WEIGHTS) - 1) + 1   # 161: the coarsest scale still holds one full window
BATCH_ELEMENTS = 1 << 22   # pairs per batch: at most this many pixel values per image stack (16 MB in float32)


class MsSsimError(UserError):
    """Images MS-SSIM cannot compare (too small, mismatched, too few), in one line."""


@functools.lru_cache(maxsize=16)
def _band(n: int) -> torch.Tensor:
    """[n, n - 10] float32 matrix whose column i holds the Gaussian window at rows i..i+10: t @ _band(W) is the
    valid-mode 1-D filter along the last axis. Measured at 512² on one core, this banded matmul (dense, but one big
    GEMM) is 4x faster than grouped conv2d or conv1d with the 11 taps; it agrees with them to float32 rounding."""
    offsets = torch.arange(WINDOW, dtype=torch.float64) - WINDOW // 2
    window = torch.exp(-offsets ** 2 / (2 * SIGMA ** 2))
    window = (window / window.sum()).float()          # pytorch_msssim's _fspecial_gauss_1d (sum 1)
    band = torch.zeros(n, n - WINDOW + 1)
    columns = torch.arange(n - WINDOW + 1)
    for tap in range(WINDOW):
        band[columns + tap, columns] = window[tap]
    return band


def _blur(t: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter over the last two axes, valid mode: [..., H, W] -> [..., H - 10, W - 10]."""
    return _band(t.shape[-2]).T @ t @ _band(t.shape[-1])


def _ssim_and_cs(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel means of the SSIM map and of the contrast-structure map, [B, C] each (Wang et al. 2004 with
    α = β = γ = 1; local moments as Gaussian-weighted means, σ² = E[x²] - μ², as pytorch_msssim's _ssim)."""
    c1, c2 = (K1 * 255) ** 2, (K2 * 255) ** 2
    mu_x, mu_y, xx, yy, xy = _blur(torch.stack([x, y, x * x, y * y, x * y]))
    var_x, var_y, cov = xx - mu_x ** 2, yy - mu_y ** 2, xy - mu_x * mu_y
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    ssim = (2 * mu_x * mu_y + c1) / (mu_x ** 2 + mu_y ** 2 + c1) * cs
    return ssim.mean(dim=(-2, -1)), cs.mean(dim=(-2, -1))


def _downsample(t: torch.Tensor) -> torch.Tensor:
    """2x2 average pool, an odd side padded by one zero on each end and the zeros counted (pytorch_msssim)."""
    return F.avg_pool2d(t, kernel_size=2, padding=[t.shape[-2] % 2, t.shape[-1] % 2])


def check_size(height: int, width: int, name: str = "images"):
    if min(height, width) < MIN_SIDE:
        raise MsSsimError(f"{arg(name)} {height}x{width}: MS-SSIM needs at least {MIN_SIDE} pixels on the shorter "
                          f"side (5 scales of the {WINDOW}-pixel window); images are not upsampled for it")


def ms_ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MS-SSIM of each pair (x[b], y[b]): [B] float32, for images [B, C, H, W] or [C, H, W], uint8 or float in
    [0, 255] (data_range 255). Equal to pytorch_msssim.ms_ssim(x, y, data_range=255, size_average=False)."""
    if x.shape != y.shape or x.dim() not in (3, 4):
        raise MsSsimError(f"MS-SSIM compares images of one shape [C, H, W] or [B, C, H, W]; got {tuple(x.shape)} "
                          f"and {tuple(y.shape)}")
    check_size(*x.shape[-2:], name="x")
    x, y = x.float().reshape(-1, *x.shape[-3:]), y.float().reshape(-1, *y.shape[-3:])
    terms = []
    for scale in range(len(WEIGHTS)):
        ssim, cs = _ssim_and_cs(x, y)
        if scale < len(WEIGHTS) - 1:
            terms.append(torch.relu(cs))
            x, y = _downsample(x), _downsample(y)
    terms.append(torch.relu(ssim))                                          # the coarsest scale: full SSIM
    weights = torch.tensor(WEIGHTS).view(-1, 1, 1)
    return torch.prod(torch.stack(terms) ** weights, dim=0).mean(dim=1)     # [scales, B, C] -> [B, C] -> [B]


def common_size(images: list) -> tuple[int, int]:
    """The set's most common (H, W); a tie goes to the larger area (less detail lost), then to the first seen."""
    counts = Counter(tuple(image.shape[-2:]) for image in images)
    return max(counts, key=lambda hw: (counts[hw], hw[0] * hw[1]))


def _at_size(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """float32 [C, H, W] at `size`: bilinear with antialiasing (a triangle filter widened by the scale when
    shrinking, as PIL's BILINEAR resize), so no overshoot beyond [0, 255] and no rounding back to uint8."""
    image = image.float()
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]


def choose_pairs(n: int, max_pairs: int, generator: torch.Generator) -> list:
    """All pairs i < j when there are at most `max_pairs` of them, else `max_pairs` distinct pairs drawn uniformly
    (ordered draws i ≠ j from `generator`, kept in the order first seen), so the same seed gives the same pairs."""
    if n * (n - 1) // 2 <= max_pairs:
        return list(itertools.combinations(range(n), 2))
    chosen = {}
    while len(chosen) < max_pairs:
        for i, j in torch.randint(n, (max_pairs, 2), generator=generator).tolist():
            if i != j and len(chosen) < max_pairs:
                chosen.setdefault((min(i, j), max(i, j)), None)
    return list(chosen)


def mean_pairwise(images: list, max_pairs: int = 1000, generator=None, size=None) -> tuple[float, int]:
    """(mean MS-SSIM over distinct pairs of `images`, number of pairs used). `images`: uint8 [3, H, W] tensors,
    possibly of different sizes, all brought to `size` (default: the set's most common size, common_size) by
    antialiased bilinear resizing. Pairs: see choose_pairs (generator default: seed 0). Sets whose images all
    have three equal channels (gray replicated) are compared on one channel: the per-channel MS-SSIMs are then
    equal, so their mean is unchanged, and it is 3x faster."""
    if len(images) < 2:
        raise MsSsimError(f"{arg('images')} {len(images)} image(s): pairwise MS-SSIM needs at least 2")
    if max_pairs < 1:
        raise MsSsimError(f"{arg('max_pairs')} {max_pairs}: must be at least 1")
    given = size is not None
    size = tuple(size) if given else common_size(images)
    check_size(*size, name="size" if given else "images")
    gray = all(bool((image == image[:1]).all()) for image in images)
    pairs = choose_pairs(len(images), max_pairs, generator or torch.Generator().manual_seed(0))
    channels = 1 if gray else images[0].shape[0]
    per_batch = max(1, BATCH_ELEMENTS // (size[0] * size[1] * channels))
    values = []
    for start in range(0, len(pairs), per_batch):
        batch = pairs[start:start + per_batch]
        # resized per batch, not cached: 2,000 RGB images at 512² would be 6 GB as float32
        x, y = (torch.stack([_at_size(images[pair[side]][:channels], size) for pair in batch]) for side in (0, 1))
        values.append(ms_ssim(x, y))
    return float(torch.cat(values).double().mean()), len(pairs)
