"""Is a synthetic set any good: `python -m medti.evaluate`.

    python -m medti.evaluate --real data/cardiomegaly --fake synthetic/cardiomegaly --out eval/cardiomegaly
    python -m medti.evaluate --real data/cardiomegaly --save-stats real-stats.npz
    python -m medti.evaluate --real real-stats.npz --fake synthetic/cardiomegaly --out eval/cardiomegaly
    python -m medti.evaluate --run runs/cardiomegaly --real data/cardiomegaly --out eval/run --n 50

FID, KID (full sets, and mean +- std over subsets), precision/recall and MS-SSIM diversity, computed as
torchmetrics, torch-fidelity and pytorch-msssim compute them (the equality is tested on identical weights), on
Inception-v3 features (FID's network, from torch-fidelity's weights file) or DINOv2 features (FD-DINOv2).
Writes OUT/report.json, OUT/report.md, OUT/samples.png and OUT/nearest.png. A --real folder is read as medti.train
reads --data (DICOM series, volumes, --channels cases; the data flags under the same names), with its patients: the
real-to-real baseline of nearest.png compares images of different patients only.
"""
import argparse
import sys
from pathlib import Path

import torch

from minisd.config import resolve_device
from minisd.sampling import SAMPLERS

from .cli import ArgumentParser, add_threads, run_main
from .files.atomic import claim_folder, inside
from .files.pseudonyms import KEY, key_beside, write_key
from .quality.features import DEFAULT_DINOV2, FEATURES, EvalError, encode, encoder_weights, load_network
from .quality.folders import DATA_FLAGS, Reading, load_set, reading, set_flags
from .quality.report import write_report
from .quality.run_images import IMAGE_MODEL, cases_set
from .quality.run_scores import check_run, score_run
from .quality.scoring import check_sizes, distribution, progress, real_side, score
from .quality.stats import from_features, read_stats, save_features, save_stats
from .training.config import add_flags

EXAMPLE = """examples:
  python -m medti.evaluate --real data/cardiomegaly --fake synthetic/cardiomegaly --out eval/cardiomegaly
  python -m medti.evaluate --real data/cardiomegaly --save-stats real-stats.npz --inception FILE"""
STATS_SUFFIX = ".npz"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m medti.evaluate", description=__doc__.split("\n\n")[0],
                                epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--real", help="the real images: a folder (read like training data) or a --save-stats file (with --run of an "
        "image-conditioned run: default, the cases its variations are made of)")
    add("--fake", help="the synthetic images: a folder, a generation run's folder or its manifest.jsonl")
    add("--out", help="folder for report.json, report.md and the plots (needed with --fake)")
    add("--features", default="inception", metavar="KIND[,KIND...]", help=f"feature network: {', '.join(FEATURES)} "
        "(default: inception); several, comma-separated, are reported side by side (the first one leads)")
    add("--encoder", metavar="[KIND=]NAME_OR_FOLDER", action="append", default=[], help="where a feature "
        "network's weights are: rad-dino and dinov2 a release or folder, xrv and inception a file; KIND= says "
        "which when --features names several (default: rad-dino microsoft/rad-dino; xrv has none). With --run of "
        "an image-conditioned run, a value without KIND= is its DINO encoder folder (default: the run's)")
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
    add("--prdc-k", type=int, help="neighbourhood size of PRDC, Naeem et al. 2020 (default: 5; left out for sets "
        "of 5 images or fewer)")
    add("--ms-ssim-pairs", type=int, default=1000, help="at most this many random pairs per set (default: 1000)")
    add("--seed", type=int, default=0, help="draws KID subsets and MS-SSIM pairs (default: 0)")
    add("--batch", type=int, default=32, help="images per network call (default: 32)")
    run = p.add_argument_group("scoring a training run's saved steps (--run)")
    run.add_argument("--run", metavar="DIR", help="a medti.train --out folder: score each <name>-<step>.safetensors")
    run.add_argument("--model", help="base model: preset, file or diffusers folder (default: the one the run's "
                     "embedding names)")
    run.add_argument("--config", help="config JSON for a --model file outside the presets "
                     "(not with a diffusers folder)")
    run.add_argument("--prompt", help="prompt (default: the token alone, as the run trained)")
    run.add_argument("--n", type=int, default=50, help="images per step (default: 50)")
    run.add_argument("--steps", type=int, default=25, help="sampler steps (default: 25)")
    run.add_argument("--sampler", choices=list(SAMPLERS), default="dpmpp_2m", help="sampler (default: dpmpp_2m)")
    run.add_argument("--sources", metavar="DIR", help="image-conditioned run: make variations of these images "
                     "(default: the run's held-out images, val.txt)")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:N]")
    add_threads(p)
    # medti.train's own flags (names, helps, defaults): a --real folder is then read exactly as training read --data
    add_flags(p.add_argument_group("how a --real folder is read (as medti.train reads --data)"), DATA_FLAGS)
    return p


OURS = ("report.json", "report.md", "samples.png", "nearest.png", "steps.json", "steps.md", "kid.png", "fid.png", KEY)


def check_out(args):
    """--out: a folder that is new, empty or an earlier evaluation's (re-running replaces it), never inside an input
    (its sheets show the images, and would be read as images by the next run)."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise EvalError(f"--out {out}: exists and is not a folder; choose a folder path")
    inputs = [("real", args.real), ("fake", args.fake), ("run", args.run), ("sources", args.sources)]
    for flag, given in inputs:
        if given and Path(given).is_dir() and inside(out, Path(given)):
            raise EvalError(f"--out {out} is inside --{flag} {given}: its sheets show the images and would be read "
                            "as images next time; choose a folder outside it")
    others = [p.name for p in out.iterdir() if p.name not in OURS and not p.name.startswith(".lock")
              and not (p.is_dir() and p.name.startswith("step-"))] if out.is_dir() else []
    if others:
        raise EvalError(f"--out {out} holds other files (e.g. {sorted(others)[0]}); give a new or empty folder, or "
                        "one an earlier evaluation wrote")


def check_features(args):
    """--features as a list of kinds, --encoder split into the feature networks' weights (args.weights, by kind)
    and an image-conditioned run's DINO encoder (args.encoder, a value without KIND=)."""
    kinds = args.features.split(",")
    for kind in kinds:
        if kind not in FEATURES or kinds.count(kind) > 1:
            what = "named twice" if kind in FEATURES else "unknown"
            raise EvalError(f"--features {args.features}: {kind!r} is {what}; give one or more of "
                            f"{', '.join(FEATURES)}, comma-separated")
    if len(kinds) > 1 and (args.run or args.save_stats or Path(args.real or "").suffix == STATS_SUFFIX):
        raise EvalError(f"--features {args.features}: several networks side by side need --fake and a --real folder "
                        "(a statistics file and --run hold one network's features); give one kind")
    args.kinds = kinds
    args.weights, args.encoder = encoder_weights(kinds, args.encoder, {"inception": args.inception,
                                                                       "dinov2": args.dinov2}, keep_bare=bool(args.run))


def check_args(args) -> Reading:
    """Every flag mistake before anything is loaded or encoded; returns how a --real folder is read."""
    check_features(args)
    if args.fake and args.run:
        raise EvalError("--fake and --run exclude each other: score one folder of images, or a run's saved steps")
    if not args.fake and not args.run and not args.save_stats:
        raise EvalError("nothing to do: give --fake FOLDER (with --out DIR) to evaluate, --run DIR to score a "
                        "training run's saved steps, or --save-stats FILE to encode the real set once")
    if not args.real and not args.run:
        raise EvalError("--real is needed: the real images (a folder, or a --save-stats file) to compare with")
    if (args.fake or args.run) and not args.out:
        raise EvalError(f"--out DIR is needed with {'--fake' if args.fake else '--run'}: it receives the reports "
                        "and plots")
    if Path(args.real or "").suffix == STATS_SUFFIX and set_flags(args):
        raise EvalError(f"{set_flags(args)[0]} says how a --real folder is read; --real {args.real} is a statistics "
                        "file, read when it was saved: leave it out")   # a flag mistake first, as the others
    if Path(args.real or "").suffix == STATS_SUFFIX and not Path(args.real).is_file():   # before the network loads
        raise EvalError(f"--real {args.real}: no such file (a statistics file, by its {STATS_SUFFIX} name)")
    if args.save_stats and Path(args.real or "").suffix == STATS_SUFFIX:
        raise EvalError(f"--real {args.real} is already a statistics file; --save-stats needs an image folder")
    if args.save_stats and Path(args.save_stats).suffix != STATS_SUFFIX:
        raise EvalError(f"--save-stats {args.save_stats}: name the file *{STATS_SUFFIX} (it is a NumPy archive)")
    if args.save_features and Path(args.save_features).suffix != ".safetensors":
        raise EvalError(f"--save-features {args.save_features}: name the file *.safetensors")
    for flag in ("kid_subsets", "k", "prdc_k", "ms_ssim_pairs", "batch", "n", "steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise EvalError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    if not 0 <= args.seed < 2 ** 64:   # what torch.Generator.manual_seed takes; 2**70 was a traceback
        raise EvalError(f"--seed {args.seed}: torch takes seeds from 0 to 2**64 - 1")
    if args.kid_subset_size is not None and args.kid_subset_size < 2:
        raise EvalError(f"--kid-subset-size {args.kid_subset_size}: must be at least 2")
    for flag in ("save_stats", "save_features"):
        path = getattr(args, flag)
        if path and not Path(path).resolve().parent.is_dir():
            raise EvalError(f"--{flag.replace('_', '-')} {path}: the folder {Path(path).parent} does not exist; "
                            "create it first")
    if args.out:
        check_out(args)
    if args.run:
        check_run(args)   # a folder without saved steps or a model generate cannot load fails now, not after encoding
        if not args.real and args.plan.kind != IMAGE_MODEL:
            raise EvalError(f"--real is needed: {args.run} saved {args.plan.kind}s, scored against the real images "
                            "(a folder, or a --save-stats file)")
    elif args.sources:
        raise EvalError("--sources is for --run of an image-conditioned run")
    return reading(args)


def side_by_side(args, device, real_set, fake_set, names: list) -> dict:
    """The figures of each further --features network: each encodes both sets afresh."""
    figures = {}
    for kind in args.kinds[1:]:
        net = load_network(kind, args.inception, args.dinov2, device, encoder=args.weights.get(kind))
        print(f"{net.name}: {net.weights} (sha256 {net.weights_sha256[:12]})", file=sys.stderr)
        real = from_features(encode(net, real_set.images, "real", args.batch, progress), names, None)
        figures[kind] = distribution(args, net, real, encode(net, fake_set.images, "fake", args.batch, progress))
    return figures


def run(args):
    how = check_args(args)
    device = resolve_device(args.device)
    # Both sets are read before the network is loaded or anything encoded: a wrong folder fails in seconds.
    real_set = (cases_set(args.plan, how) if not args.real else None if Path(args.real).suffix == STATS_SUFFIX else
                load_set(args.real, "real", minimum=2, how=how))
    fake_set = load_set(args.fake, "fake", minimum=2) if args.fake else None
    n_fake = len(fake_set.names) if fake_set else (args.plan.n_fake or args.n) if args.run else 0   # --run: per step
    if real_set and n_fake:
        check_sizes(args, len(real_set.names), n_fake)
    stats = read_stats(args.real) if real_set is None else None   # a damaged file fails before the network loads
    net = load_network(args.kinds[0], args.inception, args.dinov2, device, args.antialias,
                       args.weights.get(args.kinds[0]))
    # a statistics file made with other weights is refused before a word is printed
    real = real_side(args, net, real_set, stats) if stats else None
    print(f"{net.name}: {net.weights} (sha256 {net.weights_sha256[:12]})", file=sys.stderr)
    if real is None:
        real = real_side(args, net, real_set)
    if n_fake and not real_set:   # a statistics file: its image count is known once it is read
        check_sizes(args, len(real.names), n_fake)
    if args.save_stats:   # the real images by pseudonym; their paths in the key beside it (medti.files.pseudonyms)
        write_key(key_beside(args.save_stats), real_set.key)
        save_stats(args.save_stats, real, net)
        print(f"wrote {args.save_stats} ({len(real.names)} images) and {key_beside(args.save_stats).name} (their "
              "paths: keep it private)", file=sys.stderr)
    if args.run:
        with claim_folder(args.out) as out:
            score_run(args, net, real, out)
        print(f"wrote {out / 'steps.md'}", file=sys.stderr)
        return
    if fake_set is None:
        return
    with claim_folder(args.out) as out:
        fake = encode(net, fake_set.images, "fake", args.batch, progress)
        figures = score(args, net, real, fake, fake_set.images)
        figures["by_features"] = {args.kinds[0]: distribution(args, net, real, fake), **side_by_side(
            args, device, real_set, fake_set, real.names)}
        write_report(out, figures, args, real, fake, real_set, fake_set)
        if real_set:   # the paths behind report.json's skipped pseudonyms, for the user alone
            write_key(out / KEY, real_set.key)
        else:          # an earlier evaluation's, of another real set
            (out / KEY).unlink(missing_ok=True)
        if args.save_features:
            if real_set:
                write_key(key_beside(args.save_features), real_set.key)
            save_features(args.save_features, real, fake, fake_set.names, net)
    print(f"wrote {out / 'report.md'}: FID {figures['fid']:.2f}, KID {figures['kid']:.4f}", file=sys.stderr)


def main(argv=None) -> int:
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
