"""Section 9 of tools/benchmark.py: the evaluation's cost against the references, same images, same threads, one
process: Inception features (ours vs torchmetrics' FrechetInceptionDistance.update, whose network is
torch-fidelity's FeatureExtractorInceptionV3 on the same weights file), the metrics on the study's set sizes
(2,000 synthetic, 1,000 real features) against torchmetrics' compute(), and MS-SSIM pairs against pytorch_msssim.

The weights are random in the release file's layout (the official file cannot be downloaded here); the cost of a
network does not depend on its weight values.
"""
import statistics
import sys
from pathlib import Path

import torch

from medti.quality import metrics, msssim
from medti.quality.features import encode, load_network

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent / "tests")]
from test_inception import calibrated_state  # noqa: E402

from bench_dataset import timed  # noqa: E402 (tools/ and tests/ are not packages)

N_REAL, N_FAKE, DIM = 1000, 2000, 2048   # the study's synthetic set against a 1,000-image real set
BATCH = 32


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random uint8 RGB images (a coarse random field enlarged), like the tests'."""
    g = torch.Generator().manual_seed(seed)
    field = torch.rand(n, 3, 8, 8, generator=g) * 255
    return torch.nn.functional.interpolate(field, size=(size, size), mode="bicubic").clamp(0, 255).to(torch.uint8)


class Passthrough(torch.nn.Module):
    """Hands torchmetrics features we already have, so its compute() is timed on the same numbers as ours."""
    num_features = DIM

    def forward(self, x):
        return x


def feature_rows(runs: int, verdict, tmp: Path, n_images: int, size: int) -> list:
    from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
    weights = tmp / "weights-inception-random.pth"
    torch.save(calibrated_state(), weights)
    net = load_network("inception", weights)
    # torchmetrics' wrapper of torch-fidelity's network; antialias=False = the TF 1.x resize, as ours by default
    theirs = FrechetInceptionDistance(feature=NoTrainInceptionV3("inception-v3-compat", ["2048"],
                                      feature_extractor_weights_path=str(weights), antialias=False))
    x = images(n_images, size)
    batches = list(x.split(BATCH))

    def ours():
        metrics.statistics(encode(net, list(x), "bench", BATCH))

    def reference():
        theirs.reset()
        for batch in batches:
            theirs.update(batch, real=True)

    t = {"ours": [], "theirs": []}
    for _ in range(runs):   # interleaved, so a change in machine load hits both sides alike
        t["ours"].append(timed(ours, 1))
        t["theirs"].append(timed(reference, 1))
    ours_s, theirs_s = (statistics.median(v) for v in t.values())
    return [[f"Inception features + statistics, {n_images} images {size}², batch {BATCH}", f"{ours_s:.2f} s",
             f"{theirs_s:.2f} s", f"{ours_s / theirs_s:.2f}×", verdict(ours_s / theirs_s, 1.0)],
            ["  per image", f"{1000 * ours_s / n_images:.0f} ms", f"{1000 * theirs_s / n_images:.0f} ms", "", ""]]


def metric_rows(runs: int) -> list:
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(N_REAL, DIM, generator=g).relu(), torch.randn(N_FAKE, DIM, generator=g).relu()
    fid, kid = FrechetInceptionDistance(feature=Passthrough()), KernelInceptionDistance(feature=Passthrough())
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)

    # torchmetrics accumulates the float64 sums in update(), so its compute() is the distance alone: time ours alike
    stats = (*metrics.statistics(real), *metrics.statistics(fake))

    def ours_fid():
        metrics.frechet_distance(*stats)

    def uncached(metric):   # torchmetrics keeps the result of compute() until the next update: time a fresh one
        def compute():
            metric._computed = None
            return metric.compute()
        return compute

    rows = []
    for what, ours, theirs in (("FID from the statistics", ours_fid, uncached(fid)),
                               ("KID, 100 subsets of 1,000", lambda: metrics.kid(real, fake), uncached(kid)),
                               ("precision/recall, k = 3", lambda: metrics.precision_recall(real, fake), None)):
        o = timed(ours, runs)
        t = timed(theirs, runs) if theirs else None
        rows.append([f"{what} ({N_FAKE} x {N_REAL} x {DIM})", f"{o:.2f} s", f"{t:.2f} s" if t else "-",
                     f"{o / t:.2f}×" if t else "-", ""])
    return rows


def msssim_rows(runs: int, pairs: int = 100, size: int = 512) -> list:
    from pytorch_msssim import ms_ssim
    x = images(2 * pairs, size, seed=1)
    g = torch.Generator().manual_seed(0)
    o = timed(lambda: msssim.mean_pairwise(list(x), pairs, g), runs)
    t = timed(lambda: ms_ssim(x[0::2].float(), x[1::2].float(), data_range=255), runs)
    return [[f"MS-SSIM, {pairs} pairs {size}²", f"{o:.2f} s", f"{t:.2f} s", f"{o / t:.2f}×", ""]]


def section9(runs: int, table, verdict, tmp: Path, n_images: int = 64, size: int = 512):
    """runs: timed runs per side (median); table, verdict: benchmark.py's printers."""
    rows = feature_rows(runs, verdict, tmp, n_images, size) + metric_rows(runs) + msssim_rows(runs)
    table(f"9. evaluation: ours vs torchmetrics / pytorch_msssim, {torch.get_num_threads()} threads, fp32, CPU",
          rows, ("", "ours", "reference", "ratio", "target"))
