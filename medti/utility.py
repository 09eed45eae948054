"""Does synthetic data help a classifier? `python -m medti.utility`.

    python -m medti.utility --real data/train --synthetic synth/ --test data/test --out utility/

A linear probe (L2 logistic regression on frozen, standardised features) trained on real images only, on synthetic
images only, on both at each real:synthetic ratio, and on synthetic then real (pretrain), at nested real-data regimes,
over patient-grouped folds; the test AUC per setting, regime and label with its spread over folds, a 95 % interval
by bootstrap over test patients and DeLong's p-value against real-only. Writes OUT/report.json, OUT/report.md,
OUT/gain.png (box plot of the gain over real-only), OUT/split.json (which patients in which fold, by pseudonym) and
OUT/features/ (each image's features, reused by a re-run). `--classifier finetune` trains a DenseNet-121 per
setting, regime and fold instead of the probe (medti.downstream.finetune). docs/utility.md is the guide.
"""
import argparse
import sys
from pathlib import Path

import torch

from minisd.config import resolve_device

from .cli import ArgumentParser, add_threads, run_main
from .downstream import costs, finetune, harness, outputs, summary
from .downstream.cache import cached_features
from .downstream.inputs import UtilityError, read_inputs, split_record
from .files.atomic import claim_folder, inside, text_bytes, write_atomic
from .files.hashes import sha256_of
from .quality.features import DEFAULT_DINOV2, FEATURES, encoder_weights, load_network
from .quality.folders import DATA_FLAGS, reading
from .quality.scoring import progress
from .training.config import add_flags

EXAMPLE = """examples:
  python -m medti.utility --real data/train --synthetic synth/ --test data/test --out utility/
  python -m medti.utility --real data/train --labels labels.csv --synthetic run/ --synthetic-labels prompts.json \\
      --out utility/ --real-sizes 50,100,all --ratios 1,5 --folds 5"""
OURS = ("report.json", "report.md", "gain.png", "split.json", "features")


def _list(text: str, flag: str, words: tuple = ()) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        out = [t if t in words else int(t) for t in items]
    except ValueError:
        raise UtilityError(f"--{flag} {text}: a comma-separated list of whole numbers"
                           + (f" or {', '.join(words)}" if words else "")) from None
    if not out or any(isinstance(v, int) and v < 1 for v in out):
        raise UtilityError(f"--{flag} {text}: give one or more numbers of at least 1")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m medti.utility", description=__doc__.split("\n\n")[0], epilog=EXAMPLE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--real", required=True, help="the real images: class sub-folders, or any folder with --labels")
    add("--synthetic", help="the synthetic images: a folder (class sub-folders) or a generation run")
    add("--test", help="a held-out test set (default: the folds of --real test in turn)")
    add("--out", required=True, help="folder for the reports, split.json and the feature cache")
    add("--labels", metavar="CSV", help="labels of --real and --test: a `file` column (path inside its set) and one "
        "0/1 column per label")
    add("--synthetic-labels", metavar="FILE", help="labels of --synthetic: a CSV like --labels, or a prompt -> "
        "label map (.json object, or .csv with columns prompt,label) for a generation run")
    add("--features", default="inception", choices=FEATURES, help=f"feature network, one per run: "
        f"{', '.join(FEATURES)} (default: inception)")
    add("--encoder", metavar="[KIND=]NAME_OR_FOLDER", action="append", default=[], help="where the feature "
        "network's weights are, as in medti.evaluate: rad-dino and dinov2 a release or folder, xrv and inception a "
        "file (default: rad-dino microsoft/rad-dino; xrv has none)")
    add("--inception", metavar="FILE", help="torch-fidelity's Inception weights file (as medti.evaluate)")
    add("--dinov2", metavar="NAME_OR_FOLDER", help=f"DINOv2 release or local folder (default: {DEFAULT_DINOV2})")
    add("--classifier", default="linear", choices=("linear", "finetune"), help="linear probe on --features "
        "(default), or finetune: a DenseNet-121 trained per setting, regime and fold (--encoder xrv=FILE: from "
        "torchxrayvision's weights; else a random start); for a GPU")
    add("--epochs", type=int, default=finetune.Settings.epochs, help="finetune: at most this many epochs "
        f"(default: {finetune.Settings.epochs})")
    add("--patience", type=int, default=finetune.Settings.patience, help="finetune: stop after this many epochs "
        f"without a better validation AUC (default: {finetune.Settings.patience})")
    add("--lr", type=float, default=finetune.Settings.lr, help="finetune: AdamW's learning rate (default: "
        f"{finetune.Settings.lr}, DiNO-Diffusion's; weight decay {finetune.Settings.weight_decay})")
    add("--settings", default="real,synthetic,mixed,pretrain", help="any of real,synthetic,mixed,pretrain")
    add("--ratios", default="1,5,10", help="real:synthetic ratios of the mixed setting (default: 1,5,10)")
    add("--real-sizes", default="50,100,500,all", help="nested real-image regimes (default: 50,100,500,all)")
    add("--folds", type=int, default=5, help="patient-grouped folds (default: 5)")
    add("--c", type=float, default=1.0, help="the probe's inverse regularisation strength C (default: 1.0)")
    add("--seed", type=int, default=0, help="draws the folds, regimes and bootstrap (default: 0)")
    add("--batch", type=int, default=32, help="images per network call, and per training step of finetune "
        "(default: 32)")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:N]")
    add_threads(p)
    add_flags(p.add_argument_group("how --real and --test folders are read (as medti.train reads --data)"),
              DATA_FLAGS)
    return p


def check_args(args) -> harness.Plan:
    """Every flag mistake before an image is read."""
    settings = tuple(t.strip() for t in args.settings.split(",") if t.strip())
    bad = [s for s in settings if s not in harness.SETTINGS]
    if bad or not settings:
        raise UtilityError(f"--settings {args.settings}: use some of {','.join(harness.SETTINGS)}")
    if set(settings) - {"real"} and not args.synthetic:
        raise UtilityError(f"--settings {args.settings} needs --synthetic FOLDER (or give --settings real)")
    if args.classifier == "finetune":
        args.weights = costs.finetune_weights(args.encoder)
        if args.epochs < 1 or args.patience < 1 or not args.lr > 0:
            raise UtilityError(f"--epochs {args.epochs} / --patience {args.patience} / --lr {args.lr}: finetune "
                               "needs at least 1 epoch, a patience of at least 1 and a learning rate above 0")
    else:
        args.weights = encoder_weights([args.features], args.encoder, {"inception": args.inception,
                                                                       "dinov2": args.dinov2})[0]
    if args.folds < 2 or args.seed < 0 or not args.c > 0 or args.batch < 1:
        raise UtilityError("--folds must be at least 2, --seed at least 0, --c above 0 and --batch at least 1")
    out = Path(args.out)
    for flag in ("real", "synthetic", "test"):
        given = getattr(args, flag)
        if given and Path(given).is_dir() and inside(out, Path(given)):
            raise UtilityError(f"--out {out} is inside --{flag} {given}; choose a folder outside it")
    others = [p.name for p in out.iterdir() if p.name not in OURS and not p.name.startswith(".")] \
        if out.is_dir() else []
    if others:
        raise UtilityError(f"--out {out} holds other files (e.g. {sorted(others)[0]}); give a new or empty folder, "
                           "or one an earlier utility run wrote")
    return harness.Plan(settings, tuple(_list(args.ratios, "ratios")),
                        tuple(_list(args.real_sizes, "real-sizes", ("all",))), args.folds, args.seed, args.c)


def _data(out, net, images, labels, patients, what, batch) -> tuple:
    x, reused = cached_features(out, net, images.images, what, batch, progress)
    return harness.Data(x.double().numpy(), labels.y, patients), reused


def _finetune_data(sets, args, plan) -> tuple:
    """(what -> harness.Data of prepared images, the Finetune classifier, its report fields)."""
    settings = finetune.Settings(args.weights.get("xrv"), args.epochs, args.patience, args.batch,
                                 str(resolve_device(args.device)), args.lr)
    classifier = finetune.Finetune(settings)   # loads and checks the weights before hours of preparation
    if settings.device == "cpu":
        print(costs.cpu_estimate(plan, {k: len(v[0].images) for k, v in sets.items.items()}, settings.epochs),
              file=sys.stderr)
    data = {what: harness.Data(finetune.prepared_images(item[0].images), item[1].y, item[2])
            for what, item in sets.items.items()}
    start = settings.weights or "random start"
    fields = {"features": f"DenseNet-121 fine-tuned ({start})", "classifier": "finetune", "epochs": settings.epochs,
              "patience": settings.patience, "lr": settings.lr, "weight_decay": settings.weight_decay,
              "batch": settings.batch, "validation": "1/5 of each training set's patients",
              "weights_sha256": sha256_of(settings.weights) if settings.weights else None}
    return data, classifier, fields


def _probe_data(sets, args, out) -> tuple:
    net = load_network(args.features, args.inception, args.dinov2, resolve_device(args.device),
                       encoder=args.weights.get(args.features))
    data, reused = {}, 0
    for what, item in sets.items.items():
        data[what], count = _data(out, net, *item, what, args.batch)
        reused += count
    return data, {"features": net.name, "weights_sha256": net.weights_sha256, "classifier": "linear",
                  "features_reused": reused}


def run(args):
    plan = check_args(args)
    sets = read_inputs(args, plan, reading(args))   # every label and split refusal before the network loads
    classifier = None
    if args.classifier == "finetune":
        data, classifier, fields = _finetune_data(sets, args, plan)
    with claim_folder(args.out) as out:
        if classifier is None:
            data, fields = _probe_data(sets, args, out)
        result = harness.run(data["real"], data.get("synthetic"), data.get("test"), plan, sets.label_names,
                             classifier=classifier)
        report = {**fields, "c": plan.c, "folds": plan.folds, "seed": plan.seed, "labels": sets.label_names,
                  "settings": result.names, "regimes": result.regimes, "test": "--test" if args.test else "folds",
                  "counts": {k: len(v[0].images) for k, v in sets.items.items()},
                  "table": summary.table(result, sets.label_names, plan.seed)}
        outputs.write_json(out / "split.json", split_record(sets, result))
        outputs.write_json(out / "report.json", report)
        outputs.gain_plot(report, out / "gain.png")
        write_atomic(out / "report.md", text_bytes(outputs.report_md(report)))
    print(f"wrote {out / 'report.md'} ({fields.get('features_reused', 0)} image features reused from the cache)",
          file=sys.stderr)


def main(argv=None) -> int:
    return run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
