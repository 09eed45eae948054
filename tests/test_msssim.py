"""medti.quality.msssim against pytorch_msssim 1.0 (the convention we follow) and torchmetrics 1.9 (which differs;
the differences are rebuilt here from our own pieces and matched to torchmetrics, so the list in msssim.py's
docstring is shown to be complete), on random and structured 3-channel pairs of sizes 161, 192 and 256.

Tolerances: both sides compute in float32; the Gaussian filter here is a banded matmul, pytorch_msssim's a conv,
so the local moments differ by float32 rounding of sums of 11 terms of up to 65,025 (~4e-3 absolute in E[x²]
against C2 = 58.5): measured ≤ 2.7e-6 in MS-SSIM (pytorch_msssim's own float32 error against float64 is 1.2e-6),
bound 1e-5."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from pytorch_msssim import ms_ssim as reference_ms_ssim
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as torchmetrics_ms_ssim

from medti.quality import msssim
from medti.quality.msssim import K1, K2, WEIGHTS, MsSsimError, _blur

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")   # torchmetrics' notes on float inputs


@pytest.fixture(autouse=True)
def one_thread():
    """OpenMP elementwise kernels on 2 oversubscribed cores run 5x slower than on one (measured: 0.44 vs 0.18 s per
    512² pair with other jobs running); one thread keeps this file's time stable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def phantom(height: int, width: int, seed: int) -> torch.Tensor:
    """A structured RGB image: coloured discs on a background with a smooth ripple, float [3, H, W] in [0, 255]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    image = torch.full((3, height, width), 40.0) + 20 * torch.sin(9 * xx + 4 * yy)
    for _ in range(6):
        cx, cy = (torch.rand(2, generator=g) * 1.2 - 0.6).tolist()
        radius = float(torch.rand(1, generator=g)) * 0.4 + 0.1
        image += torch.rand(3, 1, 1, generator=g) * 150 * ((xx - cx) ** 2 + (yy - cy) ** 2 < radius ** 2)
    return image


def noisy(image: torch.Tensor, seed: int) -> torch.Tensor:
    """The image with a random gain, offset and Gaussian noise, rounded to uint8 values."""
    g = torch.Generator().manual_seed(seed)
    gain = 0.8 + 0.4 * float(torch.rand(1, generator=g))
    return (image * gain + 10 + 8 * torch.randn(image.shape, generator=g)).clamp(0, 255).round()


def pairs_of(kind: str, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4 pairs [4, 3, side, side + 7] (non-square, odd widths exercise the pooling's padding): structured pairs
    range from near-copies to unrelated images; random pairs share 70 % of their values."""
    if kind == "structured":
        x = torch.stack([noisy(phantom(side, side + 7, i), 10 + i) for i in range(4)])
        y = torch.stack([noisy(phantom(side, side + 7, i if i < 2 else 50 + i), 20 + i) for i in range(4)])
        return x, y
    g = torch.Generator().manual_seed(side)
    x = torch.randint(0, 256, (4, 3, side, side + 7), generator=g).float()
    return x, (0.7 * x + 70 * torch.rand(x.shape, generator=g)).round()


@pytest.mark.parametrize("kind", ["random", "structured"])
@pytest.mark.parametrize("side", [161, 192, 256])
def test_ms_ssim_equals_pytorch_msssim(kind, side):
    x, y = pairs_of(kind, side)
    ours = msssim.ms_ssim(x.to(torch.uint8), y.to(torch.uint8))          # uint8 in, as the image sets hold
    theirs = reference_ms_ssim(x, y, data_range=255, size_average=False)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert ours.std() > 0.01 or kind == "random"                         # the structured pairs span a range
    torch.testing.assert_close(msssim.ms_ssim(x[0], x[0]), torch.ones(1), rtol=0, atol=1e-6)   # itself: 1


def torchmetrics_convention(x, y):
    """MS-SSIM with torchmetrics' conventions, built from msssim's Gaussian filter: reflect-pad by 5, clamp the
    variances at 0, crop the cs map (not the SSIM map) to the valid region, average over channels and pixels
    before the powers, and pool without padding."""
    c1, c2 = (K1 * 255) ** 2, (K2 * 255) ** 2
    terms = []
    for scale in range(len(WEIGHTS)):
        xp, yp = (F.pad(t, (5, 5, 5, 5), mode="reflect") for t in (x, y))
        mu_x, mu_y, xx, yy, xy = _blur(torch.stack([xp, yp, xp * xp, yp * yp, xp * yp]))
        var_x, var_y = (xx - mu_x ** 2).clamp(min=0), (yy - mu_y ** 2).clamp(min=0)
        cs = (2 * (xy - mu_x * mu_y) + c2) / (var_x + var_y + c2)
        ssim = (2 * mu_x * mu_y + c1) / (mu_x ** 2 + mu_y ** 2 + c1) * cs
        last = scale == len(WEIGHTS) - 1
        terms.append(torch.relu(ssim.mean(dim=(1, 2, 3)) if last else cs[..., 5:-5, 5:-5].mean(dim=(1, 2, 3))))
        x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return torch.prod(torch.stack(terms) ** torch.tensor(WEIGHTS).view(-1, 1), dim=0)


@pytest.mark.parametrize("kind", ["random", "structured"])
@pytest.mark.parametrize("side", [192, 256])          # torchmetrics refuses sides below 176
def test_how_torchmetrics_differs(kind, side):
    x, y = pairs_of(kind, side)
    theirs = torchmetrics_ms_ssim(x, y, data_range=255.0, reduction="none")
    # the differences listed in msssim.py reproduce torchmetrics (float32 rounding, as above: bound 1e-5) ...
    torch.testing.assert_close(torchmetrics_convention(x, y), theirs, rtol=0, atol=1e-5)
    gap = (msssim.ms_ssim(x, y) - theirs).abs().max()
    # ... and they matter: measured max |ours - torchmetrics| 8e-4 to 1.3e-3 on the random pairs, 0.018-0.022 on
    # the structured ones (0.05-0.12 on other phantoms), mostly from the channel averaging and the mirrored border
    # of the coarsest SSIM map (12 pixels wide at 192). Loose bounds around those, so a change in either library
    # shows up here.
    assert gap < (5e-3 if kind == "random" else 0.2)
    assert gap > (1e-4 if kind == "random" else 5e-3)


def test_too_small_images_are_refused_in_one_line():
    tiny = torch.zeros(3, 160, 300, dtype=torch.uint8)
    with pytest.raises(MsSsimError, match=r"x= 160x300: MS-SSIM needs at least 161 pixels on the shorter side") as e:
        msssim.ms_ssim(tiny, tiny)
    assert "\n" not in str(e.value)
    with pytest.raises(MsSsimError, match="images= 128x128: MS-SSIM needs at least 161"):
        msssim.mean_pairwise([torch.zeros(3, 128, 128, dtype=torch.uint8)] * 3, 10)
    with pytest.raises(MsSsimError, match="size= 100x400"):
        msssim.mean_pairwise([torch.zeros(3, 200, 200, dtype=torch.uint8)] * 3, 10, size=(100, 400))
    with pytest.raises(MsSsimError, match="at least 2"):
        msssim.mean_pairwise([torch.zeros(3, 200, 200, dtype=torch.uint8)], 10)
    with pytest.raises(MsSsimError, match="one shape"):
        msssim.ms_ssim(tiny, tiny[:, :100])


def test_pairs_all_when_few_else_distinct_and_reproducible():
    assert msssim.choose_pairs(5, 10, torch.Generator()) == list(itertools.combinations(range(5), 2))
    drawn = msssim.choose_pairs(30, 100, torch.Generator().manual_seed(7))
    assert len(drawn) == len(set(drawn)) == 100 and all(0 <= i < j < 30 for i, j in drawn)
    assert drawn == msssim.choose_pairs(30, 100, torch.Generator().manual_seed(7))
    assert drawn != msssim.choose_pairs(30, 100, torch.Generator().manual_seed(8))
    # 434 of the 435 pairs: the draw must still end, with distinct pairs
    assert len(set(msssim.choose_pairs(30, 434, torch.Generator().manual_seed(1)))) == 434


def test_mean_pairwise_equals_pytorch_msssim_over_the_pairs_and_resizes_to_the_common_size(monkeypatch):
    images = [noisy(phantom(170, 180, i % 3), i).to(torch.uint8) for i in range(6)]
    images[4] = noisy(phantom(340, 360, 9), 4).to(torch.uint8)        # one image at another size: resized
    mean, count = msssim.mean_pairwise(images, max_pairs=8, generator=torch.Generator().manual_seed(3))
    pairs = msssim.choose_pairs(6, 8, torch.Generator().manual_seed(3))
    resized = [F.interpolate(im[None].float(), size=(170, 180), mode="bilinear", antialias=True)[0]
               if im.shape[-2:] != (170, 180) else im.float() for im in images]
    expected = torch.stack([reference_ms_ssim(resized[i][None], resized[j][None], data_range=255) for i, j in pairs])
    assert count == 8 and msssim.common_size(images) == (170, 180) and any(4 in pair for pair in pairs)
    assert mean == pytest.approx(float(expected.mean()), abs=1e-5)    # float32 rounding, as above
    monkeypatch.setattr(msssim, "BATCH_ELEMENTS", 170 * 180 * 3)       # one pair per batch: the same values
    assert msssim.mean_pairwise(images, 8, torch.Generator().manual_seed(3))[0] == pytest.approx(mean, abs=1e-7)


def test_gray_sets_use_one_channel_with_the_same_result():
    gray = [noisy(phantom(180, 180, i), i)[:1].expand(3, -1, -1).to(torch.uint8) for i in range(4)]
    mean, count = msssim.mean_pairwise(gray, max_pairs=100)
    expected = [reference_ms_ssim(gray[i][None].float(), gray[j][None].float(), data_range=255)
                for i, j in itertools.combinations(range(4), 2)]
    assert count == 6 and mean == pytest.approx(float(torch.stack(expected).mean()), abs=1e-5)
