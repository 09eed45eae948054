"""Which patient each image belongs to: the key --val-fraction splits by and the audit groups by, in memory only.

A DICOM image's key is its Patient ID (0010,0020), unless that ID is a placeholder, which would merge different
patients into one and let one person's images sit on both sides of a split that believes them apart (or, merged,
refuse to split at all). The rule, stated and simple:
- a placeholder is an ID that is empty, or, ignoring case and surrounding spaces, ANON, ANONYMOUS, ANONYMIZED, NONE,
  UNKNOWN, N/A, or only zeros (`0`, `000000`): what de-identification tools and test exports write;
- an ID is a placeholder too when the images carrying it disagree on Patient's Birth Date or Patient's Sex (each
  compared where both images have it): one ID on two people.
Such an image is keyed by its Study Instance UID instead (one study is one patient's), else, without one, by its
file or folder as files without DICOM headers are. The UID is a key in memory only: outputs name patients by
pseudonyms (medti.dataset.folder.pseudonyms), never by a key."""
import re
from dataclasses import dataclass

from ..medical.dicom import Patient

PLACEHOLDER = re.compile(r"(|anon|anonymous|anonymized|anonymised|none|unknown|n/a|0+)", re.IGNORECASE)


@dataclass(frozen=True)
class Replaced:
    """How many images had a placeholder PatientID, and how many patients (studies or files) they became."""
    images: int = 0
    keys: int = 0


def is_placeholder(patient_id: str) -> bool:
    return PLACEHOLDER.fullmatch(patient_id.strip()) is not None


def _disputed(patients: list) -> set:
    """The Patient IDs whose images disagree on birth date or sex (each field compared where it is given)."""
    seen: dict = {}
    for p in patients:
        if isinstance(p, Patient):
            births, sexes = seen.setdefault(p.id, (set(), set()))
            births.update({p.birth} - {""})
            sexes.update({p.sex.upper()} - {""})
    return {pid for pid, (births, sexes) in seen.items() if len(births) > 1 or len(sexes) > 1}


def keys(patients: list) -> tuple[list[str], Replaced]:
    """Each image's patient key (see the module's docstring): `patients` holds a medti.medical.dicom.Patient per
    DICOM image and the key itself (a case, a file) for the others. Returns the keys and what was replaced."""
    disputed, out, replaced = _disputed(patients), [], []
    for p in patients:
        if not isinstance(p, Patient):
            out.append(p)
        elif is_placeholder(p.id) or p.id in disputed:
            out.append(f"study {p.study}" if p.study else p.fallback)
            replaced.append(out[-1])
        else:
            out.append(p.id)
    return out, Replaced(len(replaced), len(set(replaced)))
