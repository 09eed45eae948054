"""Is any synthetic image a near-copy of a training patient? `python -m medti.audit`.

    python -m medti.audit --train data/cardiomegaly --synthetic synthetic/cardiomegaly --out audit/cardiomegaly

Every synthetic image gets its nearest training image and a similarity in [0, 1] (1: the same image up to noise,
exposure, a shift of up to 6 % or a mirror); at or above --threshold it is flagged as a near-copy. No weights are
downloaded: medti/quality/privacy.py explains the method and how the threshold was chosen. --train is read as
medti.train reads --data (DICOM series, volumes, --channels cases; the data flags under the same names, --preprocess
included: give the training run's own), and patients as training knows them: the baseline compares different
patients only, and the report names the patient each flagged image copies by a pseudonym (patient-001, ... in the
order met), never by its PatientID.

Writes into --out: audit.json (every image: file, nearest, similarity, flagged), audit.md (the report a privacy
officer reads), flagged.png (each flagged image beside its nearest training image; only when something is flagged)
and closest.png (the most similar unflagged pairs), naming training images by pseudonyms only; names.private.tsv
maps those to their paths and is not to be passed on. Running again into the same folder replaces that audit, all of
it; a folder holding anything else is refused. With --fail-on-flag the exit status is 3 when anything is flagged
(after the outputs are written), so a pipeline can refuse to publish the set; 2 is a usage error.

Variations of a case (medti.generate --condition-image; manifest records with "condition") are also scored against
their own source, found among the training images or --sources (medti/quality/variations.py): audit.json's
"sources", a section of audit.md and sources.png, the sources named by pseudonym alone.

Does the model itself remember? With --model and --embeddings (or --prompt) it also writes memorization.json and
memorization.md: Wen et al.'s signal per prompt (medti/quality/memorization.py), beside the audit above, or alone
when --train and --synthetic are left out; no training image is needed.
"""
import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from minisd.config import resolve_device
from minisd.errors import UserError, arg

from .cli import ArgumentParser, add_threads, run_main
from .dataset.preprocess import PREPROCESS
from .files.atomic import claim_folder, inside, text_bytes, write_atomic
from .files.images import save_png
from .files.pseudonyms import KEY, write_key
from .quality import audit_model, audit_variations, privacy, variations
from .quality.audit_report import Audit, Opinion, outputs
from .quality.features import DEFAULT_DINOV2, encode, load_network
from .quality.folders import DATA_FLAGS, Reading, load_set, read_manifest, reading
from .training.config import add_flags

# Images are reduced to this side as they are read: the method compares 64-px descriptors and the sheets show
# thumbnails, so a 3,000 x 3,000 chest X-ray export costs 0.8 MB in memory instead of 27 MB (3,000 of them: 2.4
# instead of 81 GB). 512 leaves the descriptor's antialiased resize 8x of headroom.
READ_SIDE = 512
OUTPUTS = ("audit.json", "audit.md", "flagged.png", "closest.png", audit_variations.SHEET, KEY, *audit_model.OUTPUTS)
FLAGGED = 3   # exit status with --fail-on-flag when anything is flagged (argparse and user errors use 2)
EXAMPLE = """example:
  python -m medti.audit --train data/cardiomegaly --synthetic synthetic/cardiomegaly --out audit/cardiomegaly \\
      --fail-on-flag"""


class AuditError(UserError):
    """A mistake in the audit's flags or folders, in one line."""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m medti.audit", description=__doc__.split("\n\n")[0], epilog=EXAMPLE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", help="the training images (a folder, read like training data)")
    p.add_argument("--synthetic", help="the synthetic images: a folder, a generation run's folder or its "
                                       "manifest.jsonl")
    p.add_argument("--out", required=True, help="output folder (new, empty, or holding an earlier audit)")
    p.add_argument("--manifest", help="the run's manifest.jsonl, for the prompt and seed of each flagged image "
                                      "(found by itself when --synthetic is a run)")
    p.add_argument("--sources", metavar="DIR", help="held-out images that variations of --synthetic were made from "
                                                    "(medti.generate --condition-image) and that are not in --train")
    p.add_argument("--threshold", type=float, default=privacy.THRESHOLD,
                   help=f"flag at this similarity or more (default {privacy.THRESHOLD:g}, chosen and measured in "
                        "tests/test_privacy.py)")
    p.add_argument("--fail-on-flag", action="store_true", help=f"exit with status {FLAGGED} when anything is flagged "
                                                              "(a variation that copies its own source included)")
    p.add_argument("--features", choices=("pixels", "dinov2"), default="pixels",
                   help="pixels (default): the weight-free method alone; dinov2: also a second opinion, the cosine "
                        "similarity of DINOv2 features (reported beside each image, never flagged on)")
    p.add_argument("--dinov2", metavar="NAME_OR_FOLDER", help=f"DINOv2 release or local folder for --features "
                                                               f"dinov2 (default {DEFAULT_DINOV2})")
    p.add_argument("--device", default="cpu", help="where DINOv2 runs (cpu, cuda, cuda:N)")
    add_threads(p)
    # medti.train's own flags (names, helps, defaults): --train is then read exactly as training read --data, and
    # brought to the squares training made of it (--preprocess), which are what a memorising model reproduces
    add_flags(p.add_argument_group("how --train is read (as medti.train reads --data)"), DATA_FLAGS + ("preprocess",))
    audit_model.add_flags(p.add_argument_group("does the model itself remember? (Wen et al. 2024; no images needed)"))
    return p


def check_args(args, model_side: bool = False) -> Reading | None:
    """Everything that can be checked before a folder is made or an image read; returns how --train is read (None:
    the model-side audit alone)."""
    if not (args.train or args.synthetic) and model_side:
        return None
    if not (args.train and args.synthetic):
        raise AuditError("give --train and --synthetic (near-copies of training images), --model with --embeddings "
                         "(the model's own signal), or both" + ("; --train or --synthetic alone is half of the first"
                                                                 if args.train or args.synthetic else ""))
    if not 0 < args.threshold <= 1:   # NaN fails this too
        raise AuditError(f"--threshold {args.threshold:g}: must be in (0, 1]; the default is {privacy.THRESHOLD:g}")
    out, synthetic = Path(args.out), Path(args.synthetic)
    synthetic = synthetic.parent if synthetic.is_file() else synthetic   # a manifest: its run's folder
    folders = {"train": Path(args.train), "synthetic": synthetic, "sources": Path(args.sources or out)}
    for flag, given in folders.items():
        if given != out and inside(out, given):
            raise AuditError(f"--out {out} is inside {arg(flag)} {given}: the sheets hold training images and would "
                             "be read as images next time; choose a folder outside it")
    if args.preprocess not in PREPROCESS:
        raise AuditError(f"--preprocess {args.preprocess!r}: one of {', '.join(PREPROCESS)}, as medti.train takes it; "
                         "give the training run's own")
    if args.dinov2 and args.features != "dinov2":
        raise AuditError("--dinov2 is the network of --features dinov2; add --features dinov2 or leave it out")
    for flag in ("train", "synthetic", "sources"):
        if getattr(args, flag) and not Path(getattr(args, flag)).exists():
            raise AuditError(f"{arg(flag)} {getattr(args, flag)}: no such folder or file")
    if args.manifest and not Path(args.manifest).is_file():
        raise AuditError(f"--manifest {args.manifest}: no such file; give the run's manifest.jsonl")
    if args.manifest:
        read_manifest(Path(args.manifest), "manifest")   # a damaged line now, not after both sets are read
    return reading(args)


def check_folder(out: Path):
    """Refuse a folder that holds anything but an earlier audit (hidden files, e.g. the lock, are ours or harmless)."""
    strangers = sorted(p.name for p in out.iterdir() if p.name not in OUTPUTS and not p.name.startswith("."))
    if strangers:
        raise AuditError(f"--out {out} holds files that are not an audit's (e.g. {strangers[0]}); choose a new or "
                         "empty folder")


def manifest_records(args, synthetic) -> dict:
    """Synthetic name -> manifest record: --manifest's, else the run's own (load_set found it)."""
    if not args.manifest:
        return synthetic.records
    records = read_manifest(Path(args.manifest), "manifest")
    found = {name: records[name] for name in synthetic.names if name in records}
    if not found:
        raise AuditError(f"--manifest {args.manifest}: names none of the {len(synthetic.names)} images of --synthetic "
                         "(its \"file\" entries must be their paths relative to that folder)")
    return found


def say(text: str):
    """Progress, on stderr: stdout holds only the result line."""
    print(f"medti.audit: {text}", file=sys.stderr)


def baseline(ref: privacy.Reference, train_desc: torch.Tensor, patients: list) -> privacy.Match | None:
    """How alike different training patients are: each training image's nearest image of another patient (never
    of its own: a scan's adjacent slices are near-copies of each other). None when all are of one patient."""
    number = {p: i for i, p in enumerate(dict.fromkeys(patients))}
    if len(number) < 2:
        say(f"all {len(patients)} training images are of one patient: no baseline between different patients")
        return None
    return privacy.nearest(ref, train_desc, groups=torch.tensor([number[p] for p in patients]))


def resolution(synthetic) -> int:
    """The side --train is preprocessed at. Synthetic images all of one square size are the model's output at its
    training resolution, so that size; otherwise (sizes that differ, or not square: no one training square to match)
    READ_SIDE, the side both sets are reduced to anyway. Either way both sets then pass the same reduction to at
    most READ_SIDE, so a copy of a training square and that square reach the descriptors alike."""
    sides = {side for size in synthetic.sizes for side in size}   # one element: every image is that square
    return sides.pop() if len(sides) == 1 else READ_SIDE


def compare(args, how: Reading) -> Audit:
    """The audit of the two sets. The first progress line comes once both are read and the network is loaded:
    whatever refuses the run before that (a set without usable images, a manifest that names none of them, a
    missing network) is then its only line."""
    # the synthetic set first: its size is the resolution --train is preprocessed at; it is never preprocessed
    synthetic = load_set(args.synthetic, "synthetic", max_side=READ_SIDE)
    how = dataclasses.replace(how, preprocess=args.preprocess, resolution=resolution(synthetic))
    # minimum 2: the template is the training set's mean, and one image is not a set
    train = load_set(args.train, "train", minimum=2, max_side=READ_SIDE, how=how)
    records = manifest_records(args, synthetic)
    found = find_sources(args, how, synthetic, train, records)
    # the second opinion's network is loaded before the comparison: offline or a wrong folder fails in seconds
    net = load_network("dinov2", dinov2_name=args.dinov2, device=resolve_device(args.device)) \
        if args.features == "dinov2" else None
    say(f"comparing {len(synthetic.names)} synthetic images ({args.synthetic}) with {len(train.names)} training "
        f"images of {len(set(train.patients))} patient(s) ({args.train}), preprocessed as training does: "
        f"--preprocess {how.preprocess} at {how.resolution} px")
    train_desc = privacy.descriptors(train.images)
    ref = privacy.fit(train_desc)
    syn_desc = privacy.descriptors(synthetic.images)
    match = privacy.nearest(ref, syn_desc)
    if found:
        held = privacy.descriptors(found.held.images) if found.held else None
        variations.score(found.found, ref, syn_desc, train_desc, held)
    own = baseline(ref, train_desc, train.patients)
    # no path: the report is made to be passed on (medti.files.pseudonyms); the training set by its fingerprint
    given = {"synthetic": synthetic.root.name, "preprocess": how.preprocess, "resolution": how.resolution}
    opinion = second_opinion(net, train.images, synthetic.images) if net else None
    return Audit(train, synthetic, match, own, args.threshold, records, given, opinion, found)


def find_sources(args, how: Reading, synthetic, train, records: dict) -> variations.Variations | None:
    """The sources of the variations among --synthetic (manifest records with "condition"), found among the
    training images or --sources (read as --train is); None when no image is a variation."""
    manifest = f"--manifest {args.manifest}" if args.manifest else f"the manifest of --synthetic {args.synthetic}"
    wanted = variations.sources(records, synthetic.names, manifest)
    if args.sources and not wanted:
        raise AuditError(f"--sources {args.sources}: no image of --synthetic is a variation (no manifest record has "
                         "a \"condition\"); leave --sources out, or give the run of medti.generate --condition-image")
    if not wanted:
        return None
    held = load_set(args.sources, "sources", max_side=READ_SIDE, how=how) if args.sources else None
    return variations.Variations(variations.locate(wanted, train, held), train, held, args.threshold,
                                 min(privacy.CANDIDATES, len(train.names)))


def second_opinion(net, train: list, synthetic: list) -> Opinion:
    """DINOv2 CLS features of both sets (and of the synthetic mirrors), nearest by cosine similarity."""
    say(f"second opinion: {net.name} ({net.weights_sha256[:12]})")
    feats = [encode(net, images, what) for images, what in ((train, "training"), (synthetic, "synthetic"),
                                                             ([x.flip(-1) for x in synthetic], "mirrored synthetic"))]
    index, cosine = privacy.feature_nearest(feats[1], feats[2], feats[0])
    return Opinion(net.name, net.weights_sha256, index, cosine)


def replace_outputs(out: Path, key: list, texts: dict, images: dict):
    """The earlier audit's files go first, then the new ones -- the key of the training images' pseudonyms
    (names.private.tsv, for the user alone), the sheets, audit.json last: the folder never mixes two audits, and a
    write that fails (disk full) takes the new files with it rather than leave half an audit."""
    for name in OUTPUTS:
        (out / name).unlink(missing_ok=True)
    try:
        if key:
            write_key(out / KEY, key)
        for name, image in images.items():
            save_png(out / name, image)
        for name in sorted(texts, key=lambda name: name == "audit.json"):   # audit.json last
            write_atomic(out / name, text_bytes(texts[name]))
    except BaseException:
        for name in OUTPUTS:
            (out / name).unlink(missing_ok=True)
        raise


def run(args) -> int:
    model_side = audit_model.check(args)
    how = check_args(args, model_side)
    with claim_folder(args.out) as out:
        check_folder(out)
        found = audit_model.texts(args, say) if model_side else {}   # the cheaper half first, and its failures
        if how is None:
            replace_outputs(out, [], found, {})
            print(f"{audit_model.highest(found)}; report: {out / 'memorization.md'}")
            return FLAGGED if args.fail_on_flag and audit_model.flagged(found) else 0
        audit = compare(args, how)
        key = audit.train.key + (audit.variations.key() if audit.variations else [])
        texts, images = outputs(audit)
        replace_outputs(out, key, texts | found, images)
    if found:
        print(f"{audit_model.highest(found)}; report: {out / 'memorization.md'}")
    n, m = len(audit.flagged), len(audit.synthetic.names)
    # a copy of a held-out source is no training image's near-copy, yet shows that patient: the gate counts it too
    copies = len(audit.variations.copies) if audit.variations else 0
    print(f"{n} of {m} synthetic images flagged as near-copies (similarity >= {args.threshold:g}; highest "
          f"{audit.match.similarity.max().item():.3f})" + (f"; {copies} variation(s) flagged as copies of their own "
                                                           "source" if audit.variations else "")
          + f"; report: {out / 'audit.md'}")
    if (n or copies or audit_model.flagged(found)) and args.fail_on_flag:
        print(f"flagged: {n} synthetic image(s) are near-copies of training images, {copies} variation(s) copies of "
              f"their own source; see {out / 'audit.md'}", file=sys.stderr)
        return FLAGGED
    return 0


def main(argv=None) -> int:
    status = []
    code = run_main(build_parser(), lambda args: status.append(run(args)), argv)
    return code or (status[0] if status else 0)


if __name__ == "__main__":
    raise SystemExit(main())
