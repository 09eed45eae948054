"""Is a synthetic set any good: `python -m medti.evaluate`.

    python -m medti.evaluate --real data/cardiomegaly --fake synthetic/cardiomegaly --out eval/cardiomegaly
    python -m medti.evaluate --real data/cardiomegaly --save-stats real-stats.npz
    python -m medti.evaluate --real real-stats.npz --fake synthetic/cardiomegaly --out eval/cardiomegaly

FID, KID (full sets, and mean +- std over subsets), precision/recall and MS-SSIM diversity, computed as
torchmetrics, torch-fidelity and pytorch-msssim compute them (the equality is tested on identical weights), on
Inception-v3 features (FID's network, from torch-fidelity's weights file) or DINOv2 features (FD-DINOv2).
Writes OUT/report.json, OUT/report.md, OUT/samples.png and OUT/nearest.png.
"""
import argparse
import sys
from pathlib import Path

import torch

from .cli import resolve_device, run_main
from .files import claim_folder
from .quality import metrics, msssim
from .quality.features import DEFAULT_DINOV2, FEATURES, EvalError, encode, load_network
from .quality.folders import load_set
from .quality.report import write_report
from .quality.stats import from_features, load_stats, save_features, save_stats

EXAMPLE = """examples:
  python -m medti.evaluate --real data/cardiomegaly --fake synthetic/cardiomegaly --out eval/cardiomegaly
  python -m medti.evaluate --real data/cardiomegaly --save-stats real-stats.npz --inception FILE"""
STATS_SUFFIX = ".npz"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m medti.evaluate", description=__doc__.split("\n\n")[0],
                                epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--real", required=True, help="the real images: a folder (read like training data) or a --save-stats file")
    add("--fake", help="the synthetic images: a folder, a generation run's folder or its manifest.jsonl")
    add("--out", help="folder for report.json, report.md and the plots (needed with --fake)")
    add("--features", default="inception", choices=FEATURES, help="feature network (default: inception)")
    add("--inception", metavar="FILE", help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth "
        "(default: torch's hub cache, where torchmetrics and torch-fidelity keep it)")
    add("--antialias", action="store_true", help="resize for Inception as torchmetrics 1.9 does by default "
        "(antialiased bilinear) instead of TF 1.x's bilinear (torch-fidelity, published FIDs, the study)")
    add("--dinov2", metavar="NAME_OR_FOLDER", help=f"DINOv2 release or local folder (default: {DEFAULT_DINOV2})")
    add("--save-stats", metavar="FILE", help="write the real set's statistics (.npz) for later --real FILE")
    add("--save-features", metavar="FILE", help="write per-image features (.safetensors: tensors real, fake)")
    add("--kid-subsets", type=int, default=100, help="KID subsets (default: 100, as torchmetrics)")
    add("--kid-subset-size", type=int, help="images per KID subset (default: 1000, or the smaller set's size)")
    add("--k", type=int, default=3, help="neighbourhood size of precision/recall (default: 3)")
    add("--ms-ssim-pairs", type=int, default=1000, help="at most this many random pairs per set (default: 1000)")
    add("--seed", type=int, default=0, help="draws KID subsets and MS-SSIM pairs (default: 0)")
    add("--batch", type=int, default=32, help="images per network call (default: 32)")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:N]")
    return p


def check_args(args):
    """Every flag mistake before anything is loaded or encoded."""
    if not args.fake and not args.save_stats:
        raise EvalError("nothing to do: give --fake FOLDER (with --out DIR) to evaluate, or --save-stats FILE to "
                        "encode the real set once")
    if args.fake and not args.out:
        raise EvalError("--out DIR is needed with --fake: it receives report.json, report.md and the plots")
    if args.save_stats and Path(args.real).suffix == STATS_SUFFIX:
        raise EvalError(f"--real {args.real} is already a statistics file; --save-stats needs an image folder")
    if args.save_stats and Path(args.save_stats).suffix != STATS_SUFFIX:
        raise EvalError(f"--save-stats {args.save_stats}: name the file *{STATS_SUFFIX} (it is a NumPy archive)")
    if args.save_features and Path(args.save_features).suffix != ".safetensors":
        raise EvalError(f"--save-features {args.save_features}: name the file *.safetensors")
    for flag in ("kid_subsets", "k", "ms_ssim_pairs", "batch"):
        if getattr(args, flag) < 1:
            raise EvalError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    if args.kid_subset_size is not None and args.kid_subset_size < 2:
        raise EvalError(f"--kid-subset-size {args.kid_subset_size}: must be at least 2")


def check_sizes(args, n_real: int, n_fake: int):
    """The set sizes against --k and --kid-subset-size, before any image is encoded."""
    if args.k >= min(n_real, n_fake):
        raise EvalError(f"--k {args.k}: each set needs more than k images for a k-th neighbour ({n_real} real, "
                        f"{n_fake} synthetic); give a smaller --k or more images")
    if args.kid_subset_size is not None and args.kid_subset_size > min(n_real, n_fake):
        raise EvalError(f"--kid-subset-size {args.kid_subset_size}: larger than the smaller set ({n_real} real, "
                        f"{n_fake} synthetic images); give at most {min(n_real, n_fake)}")


def progress(what: str, done: int, total: int):
    end = "\n" if done == total or not sys.stderr.isatty() else "\r"
    print(f"encoding {what} images: {done}/{total}", end=end, file=sys.stderr, flush=True)


def diversity(images: list, args) -> dict:
    """Mean pairwise MS-SSIM of one set, or the reason it could not be computed (images under the 5-scale minimum
    size are reported, not upscaled: a diversity figure of upsampled images would describe the upsampling)."""
    try:
        mean, pairs = msssim.mean_pairwise(images, args.ms_ssim_pairs, torch.Generator().manual_seed(args.seed))
    except msssim.MsSsimError as e:
        return {"mean": None, "pairs": 0, "why": str(e)}
    return {"mean": mean, "pairs": pairs}


def real_side(args, net, real_set):
    if real_set is None:
        return load_stats(args.real, net)
    features = encode(net, real_set.images, "real", args.batch, progress)
    return from_features(features, real_set.names, diversity(real_set.images, args))


def score(args, net, real, fake: torch.Tensor, fake_images: list) -> dict:
    """Every figure of report.json, from the two feature sets (and the fake images for MS-SSIM)."""
    mu, sigma = metrics.statistics(fake)
    size = args.kid_subset_size or min(1000, len(real.names), len(fake))
    kid = metrics.kid(real.features, fake, subset_size=size, subsets=args.kid_subsets,
                      generator=torch.Generator().manual_seed(args.seed))
    precision, recall = metrics.precision_recall(real.features, fake, k=args.k)
    fake_diversity = diversity(fake_images, args)
    real_diversity = real.ms_ssim or {"mean": None, "pairs": 0, "why": "not in the statistics file"}
    return {"fid": metrics.frechet_distance(real.mu, real.sigma, mu, sigma), **kid,
            "kid_subsets": args.kid_subsets, "kid_subset_size": size, "precision": precision, "recall": recall,
            "k": args.k, "ms_ssim_fake": fake_diversity["mean"], "ms_ssim_real": real_diversity["mean"],
            "ms_ssim_pairs": {"fake": fake_diversity["pairs"], "real": real_diversity["pairs"]},
            "ms_ssim_notes": [d["why"] for d in (fake_diversity, real_diversity) if "why" in d],
            "n_real": len(real.names), "n_fake": len(fake), "seed": args.seed}


def run(args):
    check_args(args)
    device = resolve_device(args.device)
    # Both sets are read before the network is loaded or anything encoded: a wrong folder fails in seconds.
    real_set = None if Path(args.real).suffix == STATS_SUFFIX else load_set(args.real, "real", minimum=2)
    fake_set = load_set(args.fake, "fake", minimum=2) if args.fake else None
    if real_set and fake_set:
        check_sizes(args, len(real_set.names), len(fake_set.names))
    net = load_network(args.features, args.inception, args.dinov2, device, args.antialias)
    print(f"{net.name}: {net.weights} (sha256 {net.weights_sha256[:12]})", file=sys.stderr)
    real = real_side(args, net, real_set)
    if fake_set and not real_set:   # a statistics file: its image count is known once it is read
        check_sizes(args, len(real.names), len(fake_set.names))
    if args.save_stats:
        save_stats(args.save_stats, real, net)
        print(f"wrote {args.save_stats} ({len(real.names)} images)", file=sys.stderr)
    if fake_set is None:
        return
    with claim_folder(args.out) as out:
        fake = encode(net, fake_set.images, "fake", args.batch, progress)
        figures = score(args, net, real, fake, fake_set.images)
        figures.update(features=net.name, weights_sha256=net.weights_sha256, weights_official=net.official)
        write_report(out, figures, args, real, fake, real_set, fake_set)
        if args.save_features:
            save_features(args.save_features, real, fake, fake_set.names, net)
    print(f"wrote {out / 'report.md'}: FID {figures['fid']:.2f}, KID {figures['kid']:.4f}", file=sys.stderr)


def main(argv=None) -> int:
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
