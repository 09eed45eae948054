"""The command's inputs read and checked before any network loads: the image sets (read as medti.evaluate reads
them), their labels (medti.downstream.labels), their patients, and the refusals that need no features: one class
only, a test set without a positive case, a patient in both the training and the test images.

Patients are the medical readers' (medti.quality.folders.load_set: the DICOM PatientID, else the case folder or file).
Outputs name a patient by `pt-` and the pseudonym digits of its first image in pseudonym order (medti.files.pseudonyms:
a hash of the content, never of the ID, which could be found again by hashing guessed IDs).
"""
from dataclasses import dataclass
from pathlib import Path

from minisd.errors import UserError

from ..generation.manifest import MERGED
from ..quality.folders import Reading, load_set, read_manifest
from . import labels as lab
from .splits import check_disjoint, synthetic_order


class UtilityError(UserError):
    """A utility-run input that cannot be used, in one line naming the flag or file."""


@dataclass
class Sets:
    items: dict          # what -> (ImageSet, Labels, patient keys)
    label_names: list


def _real_labels(args, real, test):
    """Labels of --real and --test, from --labels or from class sub-folders."""
    if args.labels:
        table = lab.read_label_csv(args.labels, "labels")
        lab.unused(table, [real.names] + ([test.names] if test else []), "labels", args.labels)
        return (lab.csv_labels(table, real.names, "labels", args.labels, "--real"),
                lab.csv_labels(table, test.names, "labels", args.labels, "--test") if test else None)
    real_labels = lab.folder_labels(real.names, "real")
    return real_labels, lab.folder_labels(test.names, "test", real_labels.names) if test else None


def _header(path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8-sig").split("\n", 1)[0].split(",")[0].strip().lower()
    except (OSError, UnicodeDecodeError):
        return ""


def run_records(synthetic, flag: str) -> dict:
    """{image name: manifest record} of a synthetic set: a generation run's own, or, for a folder of runs (one per
    prompt, as `medti.generate --out synthetic/<name>` writes them, read as one folder), each run's records under
    the name the folder gives its images (`<name>/00000.png`)."""
    if synthetic.records:
        return synthetic.records
    records = {}
    for manifest in sorted(Path(synthetic.root).glob(f"*/{MERGED}")):
        records.update({f"{manifest.parent.name}/{name}": rec for name, rec in read_manifest(manifest, flag).items()})
    return {name: records[name] for name in synthetic.names if name in records}


def _synthetic_labels(args, synthetic, real, real_labels):
    """Labels of --synthetic: a per-file CSV, a prompt map with the manifest, class sub-folders, or the sources of
    variations; an image none of these labels is refused."""
    names, flag = real_labels.names, "synthetic_labels"
    given = args.synthetic_labels
    if given and Path(given).suffix.lower() == ".csv" and _header(given) == "file":
        table = lab.read_label_csv(given, flag)
        if table[0] != names:
            raise UtilityError(f"--synthetic-labels {given}: its label columns must be the real set's ({names})")
        lab.unused(table, [synthetic.names], flag, given)
        return lab.csv_labels(table, synthetic.names, flag, given, "--synthetic")
    prompts = lab.read_map(given, flag, names) if given else None
    records = run_records(synthetic, "synthetic")
    if not given and not records and not args.labels:
        return lab.folder_labels(synthetic.names, "synthetic", names)
    return lab.manifest_labels(synthetic.names, records, prompts,
                               lab.rows_by_pseudonym(real.pseudonyms, real_labels), names,
                               flag if given else "synthetic")


def read_inputs(args, plan, how: Reading) -> Sets:
    real = load_set(args.real, "real", minimum=2, how=how)
    test = load_set(args.test, "test", minimum=2, how=how) if args.test else None
    synthetic = load_set(args.synthetic, "synthetic", minimum=1) if args.synthetic else None
    real_labels, test_labels = _real_labels(args, real, test)
    lab.check_two_classes(real_labels, "labels" if args.labels else "real", "--real")
    items = {"real": (real, real_labels, real.patients)}
    if test:
        lab.check_two_classes(test_labels, "test", "the test set")
        check_disjoint(identities(real), identities(test))
        items["test"] = (test, test_labels, test.patients)
    if synthetic and set(plan.settings) - {"real"}:
        syn_labels = _synthetic_labels(args, synthetic, real, real_labels)
        lab.check_two_classes(syn_labels, "synthetic", "--synthetic")
        # each synthetic image is its own patient: it never tests
        items["synthetic"] = (synthetic, syn_labels, [f"synthetic {n}" for n in synthetic.names])
    return Sets(items, real_labels.names)


def identities(images) -> list:
    """The patient keys that name a person across sets: a DICOM PatientID or study, a case folder -- not an image's
    own file, which is the key of a file without a patient (its name says nothing of who is in it: two sets may both
    hold `healthy/001.png`)."""
    own = set(images.names) | {n.partition("#")[0] for n in images.names}
    return [p for p in images.patients if p not in own]


def patient_names(images) -> dict:
    """{patient key: `pt-<digits>`}, by the smallest pseudonym among the patient's images."""
    first = {}
    for patient, pseudonym in zip(images.patients, images.pseudonyms, strict=True):
        first[patient] = min(first.get(patient, pseudonym), pseudonym)
    return {p: "pt-" + name.removeprefix("img-").split("#")[0] for p, name in first.items()}


def split_record(sets: Sets, result) -> dict:
    """split.json: the patients of each fold and the images of each regime, by pseudonym (no path, no ID)."""
    real = sets.items["real"][0]
    names = patient_names(real)
    folds = [sorted({names[p] for p, f in zip(real.patients, result.fold_of, strict=True) if f == k})
             for k in range(max(result.fold_of) + 1)]
    regimes = {r: [[real.pseudonyms[i] for i in result.subsets[(r, k)]] for k in range(len(folds))]
               for r in result.regimes}
    record = {"folds": folds, "regimes": regimes, "test": "each fold in turn" if "test" not in sets.items else
              sorted(set(patient_names(sets.items["test"][0]).values()))}
    if "synthetic" in sets.items:
        pseudonyms = sets.items["synthetic"][0].pseudonyms   # in the order the mixed setting takes them
        record["synthetic_order"] = [pseudonyms[i] for i in synthetic_order(len(pseudonyms), result.seed)]
    return record
