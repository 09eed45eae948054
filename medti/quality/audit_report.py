"""What `python -m medti.audit` writes: audit.json (one entry per synthetic image, and a summary), audit.md (what a
privacy officer reads) and the contact sheets flagged.png / closest.png, which put each synthetic image beside its
nearest training image so that a person can judge the pair.

Nothing here reads image metadata. The report is what a hospital passes on, so it names a training image by its
pseudonym alone (medti.files.pseudonyms: a hash of its bytes; names.private.tsv beside the report maps each to its
path) and the training folder by its fingerprint, never by a path; synthetic images, medti's own outputs, by their
names in their folder (and, for flagged images, the prompt and seed of the run's manifest). Training patients are
named by pseudonyms alone (medti.dataset.folder.pseudonyms): the patient itself (a DICOM PatientID) is never written.
"""
import json
from dataclasses import dataclass
from functools import cached_property

from PIL import Image

from ..files.images import contact_sheet, tile
from . import audit_variations, privacy
from .audit_patients import copied_lines, copied_patients, described, patient_rows, training_set
from .folders import ImageSet, shared_skipped
from .variations import Variations

SHEET_PAIRS = 24   # pairs per sheet at most: beyond that a sheet is too large to look at; audit.md lists them all
TILE = 256         # pixels per image on a sheet: the label stays readable and 24 pairs stay under 4 MB
CLOSEST = 10       # unflagged images listed in audit.md, most similar first


@dataclass
class Opinion:
    """The second opinion of a feature network (`--features dinov2`): nearest training image by cosine."""
    network: str
    weights_sha256: str
    index: object    # [M] long tensor
    cosine: object   # [M] float tensor


@dataclass
class Audit:
    """Everything the outputs are made from."""
    train: ImageSet
    synthetic: ImageSet
    match: privacy.Match   # nearest training image of each synthetic image
    own: privacy.Match | None   # nearest image of another patient of each training image; None: one patient
    threshold: float
    records: dict          # synthetic name -> manifest record (may be empty)
    given: dict            # "synthetic": the synthetic folder's name; "preprocess", "resolution" of --train
    opinion: Opinion | None = None
    variations: Variations | None = None   # the sources of the variations of a case, scored; None: no variation

    @property
    def flagged(self) -> list:
        """Rows of the flagged synthetic images, most similar first."""
        sim = self.match.similarity
        return sorted((i for i in range(len(sim)) if sim[i] >= self.threshold), key=lambda i: -sim[i].item())

    @cached_property
    def patient(self) -> list:
        """The pseudonym of each training row's patient."""
        return patient_rows(self.train)

    @property
    def copied(self) -> list:
        return copied_patients(self.patient, [self.match.index[i].item() for i in self.flagged])

    def closest_unflagged(self, n: int) -> list:
        sim = self.match.similarity
        return sorted((i for i in range(len(sim)) if sim[i] < self.threshold), key=lambda i: -sim[i].item())[:n]


def entry(a: Audit, i: int) -> dict:
    """One synthetic image's line in audit.json. shift_percent: [down, right] in percent of the height and width,
    of the synthetic image's content (mirrored back first when `mirrored`) relative to the training image."""
    sim = a.match.similarity[i].item()
    j = a.match.index[i].item()
    found = {"file": a.synthetic.names[i], "nearest": a.train.pseudonyms[j], "nearest_patient": a.patient[j],
             "similarity": round(sim, 4),
             "flagged": sim >= a.threshold, "mirrored": bool(a.match.mirrored[i]),
             "shift_percent": [round(100 * s / privacy.SIZE, 1) for s in a.match.shift[i].tolist()]}
    if a.opinion:
        found.update(dinov2_nearest=a.train.pseudonyms[a.opinion.index[i]],
                     dinov2_similarity=round(a.opinion.cosine[i].item(), 4))
    record = a.records.get(a.synthetic.names[i])
    if found["flagged"] and record:   # only what a person needs to find the prompt again: never init/mask paths
        found.update(prompt=record.get("prompt"), seed=record.get("seed"))
    return found | audit_variations.entries(a.variations, i)


def near_duplicates(a: Audit) -> list:
    """Training images whose nearest image of another patient scores at or above the threshold (one patient under
    two IDs? a threshold too low for the modality?)."""
    if a.own is None:
        return []
    sim = a.own.similarity
    return [{"file": a.train.pseudonyms[i], "nearest": a.train.pseudonyms[a.own.index[i]],
             "similarity": round(sim[i].item(), 4)} for i in range(len(sim)) if sim[i] >= a.threshold]


def baseline_summary(a: Audit) -> dict:
    if a.own is None:
        return {"highest": None, "median": None, "near_duplicates": [],
                "note": "one patient: no images of different patients to compare"}
    own = a.own.similarity
    return {"highest": round(own.max().item(), 4), "median": round(own.median().item(), 4),
            "near_duplicates": near_duplicates(a)}


def report(a: Audit, sheets: dict) -> dict:
    """The content of audit.json. sheets: output name -> written or not."""
    summary = {
        "n_synthetic": len(a.synthetic.names), "n_train": len(a.train.names), "train_set": training_set(a.train),
        "train_preprocess": {"preprocess": a.given.get("preprocess"), "resolution": a.given.get("resolution")},
        "flagged": len(a.flagged), "flagged_by_patient": a.copied,
        "threshold": a.threshold, "highest_similarity": round(a.match.similarity.max().item(), 4),
        "method": "whitened normalised cross-correlation, shared template removed, over shifts up to "
                  f"{100 * privacy.MARGIN / privacy.SIZE:g} % and the mirror (medti.quality.privacy); no weights",
        "train_vs_train": baseline_summary(a),   # images of different patients only
        "calibration": privacy.MEASURED,
        "skipped": {"train": shared_skipped(a.train.skipped), "synthetic": [list(s) for s in a.synthetic.skipped]},
        "sheets": {name: name if written else None for name, written in sheets.items()},
    }
    if a.opinion:
        summary["second_opinion"] = {"features": a.opinion.network, "weights_sha256": a.opinion.weights_sha256,
                                     "highest_cosine": round(a.opinion.cosine.max().item(), 4)}
    if a.variations:
        summary["variations"] = audit_variations.summary(a.variations)
    return {"images": [entry(a, i) for i in range(len(a.synthetic.names))], "summary": summary}


def caption(a: Audit, i: int) -> str:
    """The synthetic tile's label: name and score, then seed and the prompt's start when the manifest has them."""
    lines = [a.synthetic.names[i], f"similarity {a.match.similarity[i].item():.3f}"]
    record = a.records.get(a.synthetic.names[i])
    if record:
        prompt = str(record.get("prompt", ""))
        lines += [f"seed {record.get('seed')}", prompt if len(prompt) <= 30 else prompt[:29] + "…"]
    return "\n".join(lines)


def sheet(a: Audit, rows: list) -> Image.Image:
    """Synthetic | nearest training image, pair by pair, two pairs per row."""
    items = []
    for i in rows[:SHEET_PAIRS]:
        j = a.match.index[i].item()
        how = ("mirrored, " if a.match.mirrored[i] else "") + "shift {:+.1f} %, {:+.1f} %".format(
            *(100 * s / privacy.SIZE for s in a.match.shift[i].tolist()))
        items += [tile(a.synthetic.images[i], caption(a, i), TILE),
                  tile(a.train.images[j], f"training: {a.train.pseudonyms[j]}\n{a.patient[j]}\n{how}", TILE)]
    return contact_sheet(items, columns=4 if len(items) > 2 else 2)


def table(a: Audit, rows: list) -> list:
    lines = ["| synthetic | nearest training image | its patient | similarity | mirrored | prompt | seed |",
             "|---|---|---|---|---|---|---|"]
    for i in rows:
        e, record = entry(a, i), a.records.get(a.synthetic.names[i]) or {}
        prompt = str(record.get("prompt", "")).replace("|", "\\|")
        lines.append(f"| {e['file']} | {e['nearest']} | {e['nearest_patient']} | {e['similarity']:.3f} | "
                     f"{'yes' if e['mirrored'] else 'no'} "
                     f"| {prompt} | {record.get('seed', '')} |")
    return lines


def verdict(a: Audit) -> str:
    n, m, top = len(a.flagged), len(a.synthetic.names), a.match.similarity.max().item()
    if n:
        return (f"**Verdict: {n} of {m} synthetic images are flagged as near-copies of a training image** "
                f"(similarity >= {a.threshold:g}). Do not share them until a person has compared each pair in "
                "flagged.png; remove or regenerate the ones that show a training patient.")
    return (f"**Verdict: no synthetic image is a near-copy of a training image** (highest similarity {top:.3f}; "
            f"flagged from {a.threshold:g}). This rules out reproduced training images, not every privacy risk: "
            "see *What this does not check*.")


def baseline_line(a: Audit) -> str:
    if a.own is None:
        return (f"- This training set against itself: not computed, as all {len(a.train.names)} training images are "
                "of one patient (there is no other patient to compare with).")
    own = a.own.similarity
    return (f"- This training set against itself: the most similar pair of images of different training patients "
            f"scores {own.max().item():.3f} (median nearest {own.median().item():.3f}). Images of one patient are "
            "not compared with each other: adjacent slices of a scan, or two views of a chest, are near-copies.")


def calibration_lines(a: Audit) -> list:
    m = privacy.MEASURED
    lines = [f"- Threshold: **{a.threshold:g}** (`--threshold`; default {privacy.THRESHOLD:g}).",
             f"- Measured at the default on a simulated chest X-ray modality whose patients all share the look "
             f"(`python tests/test_privacy.py`): planted copies flagged **{m['copies_flagged']} of {m['copies']}** "
             "(identical, noise, brightness/contrast, gamma, a 2 %/5 % shift, mirrored, JPEG, all at once); "
             f"other patients and look-alikes flagged **{m['others_flagged']} of {m['others']}**. Lowest copy "
             f"{m['lowest_copy']}, highest non-copy {m['highest_other']}.", baseline_line(a)]
    dupes = near_duplicates(a)
    if dupes:
        lines.append(f"- **Warning: {len(dupes)} training images have a near-duplicate of another patient** (e.g. "
                     f"{dupes[0]['file']} ~ {dupes[0]['nearest']}, {dupes[0]['similarity']:.3f}; all in audit.json, "
                     "summary.train_vs_train.near_duplicates): one patient under two IDs, or a threshold too low for "
                     "this modality. A copy of such an image may name either as its nearest.")
    return lines


def markdown(a: Audit, sheets: dict) -> str:
    """audit.md: the verdict first, then what was checked, how well the check works, and the pairs."""
    skipped = len(a.synthetic.skipped) + len(a.train.skipped)
    lines = ["# Privacy audit: are synthetic images near-copies of training images?", "", verdict(a), "",
             "## What was checked", "",
             f"- Synthetic set `{a.given['synthetic']}`: {len(a.synthetic.names)} images; training set of "
             f"fingerprint `{a.train.fingerprint[:16]}`: {described(training_set(a.train))}"
             + (f" ({skipped} unreadable files skipped, listed in audit.json)." if skipped else "."),
             f"- Training images as the model saw them: --preprocess {a.given.get('preprocess')} at "
             f"{a.given.get('resolution')} px (give the training run's data flags, or copies are missed).",
             "- Every synthetic image against every training image, with no downloaded weights: both in gray, at "
             f"{privacy.SIZE} x {privacy.SIZE}, brightness and contrast normalised, what all training images share "
             "removed, each spatial frequency weighted by how much training patients differ there, then the best "
             f"correlation over shifts of up to {100 * privacy.MARGIN / privacy.SIZE:g} % of the width and the "
             "mirror image. Similarity 1 = the same image up to those changes and mild noise; on simulated chest "
             "X-rays other patients scored 0.53-0.79 (this set's own figure is below).", "",
             "## The threshold and how well it works", "", *calibration_lines(a), "", "## Flagged images", ""]
    lines += table(a, a.flagged) + copied_lines(a.copied) if a.flagged else ["None."]
    lines += ["", f"## The {CLOSEST} most similar unflagged images", ""]
    lines += table(a, a.closest_unflagged(CLOSEST)) if a.closest_unflagged(1) else ["None: every image is flagged."]
    lines += opinion_lines(a) + audit_variations.markdown(a.variations, a.synthetic.names)
    lines += ["", "## What this does not check", "",
              "- Copies rotated, rescaled, cropped or shifted by more than the range above, or re-using only part "
              "of a training image (a lesion of one patient in another body).",
              "- Identifying details without pixel agreement (an implant, burnt-in text): look at closest.png too.",
              "- Membership inference or other statistical leaks; a clean audit is not a proof of anonymity.", "",
              "## Files", "",
              "- audit.json: every synthetic image with its nearest training image and similarity.",
              "- " + ("flagged.png: each flagged image beside its nearest training image." if sheets["flagged.png"]
                      else "flagged.png: not written, as nothing is flagged."),
              "- " + ("closest.png: the most similar unflagged pairs." if sheets["closest.png"]
                      else "closest.png: not written, as every image is flagged."),
              "- The sheets show training images: keep them where the training data may be kept.", ""]
    return "\n".join(lines)


def opinion_lines(a: Audit) -> list:
    """audit.md's second-opinion section: the images DINOv2 finds most alike, with the pixel method's verdict."""
    if not a.opinion:
        return []
    rows = a.opinion.cosine.argsort(descending=True)[:CLOSEST].tolist()
    lines = ["", f"## Second opinion: {a.opinion.network} features", "",
             "Cosine similarity of DINOv2 features (the image or its mirror), reported beside the score above and "
             "never flagged on: no threshold for it has been measured here. Pairs it ranks high that the pixel "
             "method does not flag are worth a look.", "",
             "| synthetic | nearest by DINOv2 | cosine | pixel similarity to it | flagged |", "|---|---|---|---|---|"]
    for i in rows:
        j, e = a.opinion.index[i].item(), entry(a, i)
        same = f"{e['similarity']:.3f}" if a.match.index[i].item() == j else "(another image is nearer)"
        lines.append(f"| {e['file']} | {a.train.pseudonyms[j]} | {a.opinion.cosine[i].item():.3f} | {same} | "
                     f"{'yes' if e['flagged'] else 'no'} |")
    return lines


def outputs(a: Audit) -> tuple:
    """({name: text}, {name: PIL image}) of everything the audit writes, in memory: nothing is written until all
    of it is made."""
    closest = a.closest_unflagged(SHEET_PAIRS)
    images = {name: sheet(a, rows) for name, rows in (("flagged.png", a.flagged), ("closest.png", closest)) if rows}
    written = {name: name in images for name in ("flagged.png", "closest.png")}
    if a.variations:   # sources.png: each source beside its variation (none when no source was found)
        images[audit_variations.SHEET] = audit_variations.sheet(a.variations, a.synthetic, TILE)
        written[audit_variations.SHEET] = images[audit_variations.SHEET] is not None
        images = {name: image for name, image in images.items() if image is not None}
    texts = {"audit.md": markdown(a, written), "audit.json": json_text(report(a, written))}
    return texts, images


def json_text(found: dict) -> str:
    """audit.json with one synthetic image per line (grep-able, and 2,000 entries stay 2,000 lines), the summary
    indented."""
    images = ",\n".join("  " + json.dumps(e, ensure_ascii=False) for e in found["images"])
    summary = json.dumps(found["summary"], indent=1, ensure_ascii=False)
    return f'{{"images": [\n{images}\n],\n"summary": {summary}}}\n'

