"""The training patients in `python -m medti.audit`'s report: how many were compared, and which ones the flagged
images copy, how often. A privacy officer needs "which patients were copied", so each is named, but by a pseudonym
alone (patient-001, ... in the order the training folder lists them, the numbering of `python -m medti.data
preview`): the patient as read (a DICOM PatientID) is an identifier and is never written."""
from collections import Counter

from ..dataset.folder import pseudonyms
from .folders import ImageSet


def patient_rows(train: ImageSet) -> list:
    """The pseudonym of each training row's patient."""
    names = pseudonyms(train.patients)
    return [names[p] for p in train.patients]


def training_set(train: ImageSet) -> dict:
    """What the training set is made of: volume slices are named FILE#PLANEnnn (medti.dataset), cases and files not;
    and its fingerprint (sha256 over its files, as training's data_sha256), which says which folder it was."""
    names = train.names
    return {"images": len(names), "patients": len(set(train.patients)), "slices": sum("#" in n for n in names),
            "volumes_or_series": len({n.split("#")[0] for n in names if "#" in n}),
            "single_images": sum("#" not in n for n in names), "fingerprint": train.fingerprint}


def described(counts: dict) -> str:
    """training_set() in words: `1,200 training images of 40 patients (1,100 slices of 38 volume(s) or series, 100
    single images)`."""
    text = f"{counts['images']:,} training images of {counts['patients']:,} patients"
    if not counts["slices"]:   # files or cases only: the count says it all
        return text
    parts = [f"{counts['slices']:,} slices of {counts['volumes_or_series']:,} volume(s) or series"]
    parts += [f"{counts['single_images']:,} single images"] if counts["single_images"] else []
    return f"{text} ({', '.join(parts)})"


def copied_patients(patient: list, nearest: list) -> list:
    """Each training patient that flagged images copy (`nearest`: their nearest training rows): pseudonym, how many
    flagged images, how many training images the patient has; most copied first."""
    copied, held = Counter(patient[j] for j in nearest), Counter(patient)
    return [{"patient": p, "flagged": n, "training_images": held[p]}
            for p, n in sorted(copied.items(), key=lambda item: (-item[1], item[0]))]


def copied_lines(copied: list) -> list:
    """audit.md's table of copied patients (empty when nothing is flagged)."""
    if not copied:
        return []
    return ["", f"Training patients copied: **{len(copied)}** (pseudonyms numbered in the order the training folder "
            "lists them, as `python -m medti.data preview` numbers them):", "",
            "| training patient | flagged synthetic images | its training images |", "|---|---|---|",
            *[f"| {c['patient']} | {c['flagged']} | {c['training_images']} |" for c in copied]]
