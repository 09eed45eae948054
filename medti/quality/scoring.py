"""The figures of one synthetic set against the real one, shared by `python -m medti.evaluate` on a folder and
on a training run's saved steps (medti.quality.run_scores). `args` is evaluate's parsed command line."""
import torch

from ..cli import status
from ..files.hashes import sha256_of
from . import metrics, msssim
from .features import EvalError, encode
from .stats import from_features, load_stats

PRDC_K = 5   # Naeem et al. 2020's choice, and CheXGenBench's


def check_sizes(args, n_real: int, n_fake: int):
    """The set sizes against --k and --kid-subset-size, before any image is encoded."""
    for flag, k in (("--k", args.k), ("--prdc-k", args.prdc_k)):
        if k is not None and k >= min(n_real, n_fake):
            raise EvalError(f"{flag} {k}: each set needs more than k images for a k-th neighbour ({n_real} real, "
                            f"{n_fake} synthetic); give a smaller {flag} or more images")
    if args.kid_subset_size is not None and args.kid_subset_size > min(n_real, n_fake):
        raise EvalError(f"--kid-subset-size {args.kid_subset_size}: larger than the smaller set ({n_real} real, "
                        f"{n_fake} synthetic images); give at most {min(n_real, n_fake)}")


def progress(what: str, done: int, total: int):
    status(f"encoding {what} images: {done}/{total}", final=done == total)


def diversity(images: list, args, what: str) -> dict:
    """Mean pairwise MS-SSIM of one set, or the reason it could not be computed (images under the 5-scale minimum
    size are reported, not upscaled: a diversity figure of upsampled images would describe the upsampling)."""
    height, width = msssim.common_size(images)
    if min(height, width) < msssim.MIN_SIDE:
        return {"mean": None, "pairs": 0, "why": f"not computed for the {what} images: they are {width}x{height}, "
                f"and MS-SSIM's 5 scales need at least {msssim.MIN_SIDE} pixels on the shorter side (not upsampled)"}
    mean, pairs = msssim.mean_pairwise(images, args.ms_ssim_pairs, torch.Generator().manual_seed(args.seed))
    return {"mean": mean, "pairs": pairs}


def kid_subset_size(args, n_real: int, n_fake: int) -> int:
    """--kid-subset-size, or 1000 (torchmetrics' default) capped at half the smaller set: a subset of all images
    of a set is the whole set every time, and the spread of 100 identical figures is 0, which says nothing."""
    return args.kid_subset_size or max(2, min(1000, min(n_real, n_fake) // 2))


def real_side(args, net, real_set, stats: dict | None = None):
    """The real set's features and statistics, from its images or its statistics file (`stats`: its arrays, when
    read already); named by pseudonyms (medti.files.pseudonyms), and described in reports by its fingerprint, never
    by its path."""
    if real_set is None:
        real = load_stats(args.real, net, stats)
        real.about = f"a statistics file of {len(real.names)} real images (sha256 {sha256_of(args.real)[:16]})"
        return real
    features = encode(net, real_set.images, "real", args.batch, progress)
    real = from_features(features, real_set.pseudonyms, diversity(real_set.images, args, "real"))
    real.about = f"{len(real.names)} real images (fingerprint {real_set.fingerprint[:16]})"
    return real


def prdc(args, real: torch.Tensor, fake: torch.Tensor) -> dict:
    """PRDC at --prdc-k, or at the paper's k = 5 where the sets allow it: a set of 5 images or fewer has no 5th
    neighbour, and a default must not refuse an evaluation that FID and KID can do (the figures say why instead)."""
    k = args.prdc_k or PRDC_K
    if k >= min(len(real), len(fake)):
        return {**dict.fromkeys(("precision", "recall", "density", "coverage")), "k": k,
                "why": f"not computed: PRDC's k={k} needs more than {k} images in each set"}
    return {**metrics.prdc(real, fake, k=k), "k": k}


def distribution(args, net, real, fake: torch.Tensor) -> dict:
    """The figures of one feature network: FID, KID, precision/recall (k = --k), PRDC (k = --prdc-k), and where the
    network's weights came from."""
    mu, sigma = metrics.statistics(fake)
    size = kid_subset_size(args, len(real.names), len(fake))
    kid = metrics.kid(real.features, fake, subset_size=size, subsets=args.kid_subsets,
                      generator=torch.Generator().manual_seed(args.seed))
    precision, recall = metrics.precision_recall(real.features, fake, k=args.k)
    return {"fid": metrics.frechet_distance(real.mu, real.sigma, mu, sigma), **kid, "kid_subsets": args.kid_subsets,
            "kid_subset_size": size, "precision": precision, "recall": recall, "k": args.k,
            "prdc": prdc(args, real.features, fake),
            "features": net.name, "weights_sha256": net.weights_sha256, "weights_official": net.official}


def score(args, net, real, fake: torch.Tensor, fake_images: list) -> dict:
    """Every figure of report.json, from the two feature sets (and the fake images for MS-SSIM)."""
    fake_diversity = diversity(fake_images, args, "synthetic")
    real_diversity = real.ms_ssim or {"mean": None, "pairs": 0, "why": "not computed for the real images: not in "
                                      "the statistics file"}
    return {**distribution(args, net, real, fake),
            "ms_ssim_fake": fake_diversity["mean"], "ms_ssim_real": real_diversity["mean"],
            "ms_ssim_pairs": {"fake": fake_diversity["pairs"], "real": real_diversity["pairs"]},
            "ms_ssim_notes": [d["why"] for d in (fake_diversity, real_diversity) if "why" in d],
            "n_real": len(real.names), "n_fake": len(fake), "seed": args.seed}
