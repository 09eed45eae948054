"""What a data folder turned out to hold, in words: the summary training prints, the warning that lists files left
out, and the one line that says why a folder gave no usable image. No file name in here reaches an output file:
these lines go to the terminal and the run's log only; a shared report gives a skipped file's reason_kind()."""
import re
import sys
from collections import Counter
from pathlib import Path

from .survey import EXTENSIONS, Survey, listed, walk

NAMING = ("unknown channel", "missing channel", "no case", "duplicate channel")   # --channels naming problems
PREPROCESSING = ("wrong size", "all black")                                       # --preprocess refusals
# How each reason a file is skipped for begins, up to where it could name a file: the rest of a reason can hold
# one (a case, a series' file, the `MRN4242` of `DOE_MRN4242.png` read as a channel), so shared reports keep this.
KINDS = re.compile(r"all black|flat image|wrong size|not a regular file|cannot read the file|empty file|"
                   r"\d+ frames in one file|mode \w+|not an image PIL can read|unreadable image|no case|"
                   r"unknown channel|duplicate channel|missing channel|channel sizes differ|"
                   r"listed in the manifest but missing|its data file \(ElementDataFile\)")


def _some(names: list, n: int = 5) -> str:
    """The first `n` names, then " ..." when there are more."""
    return ", ".join(names[:n]) + (" ..." if len(names) > n else "")


def reason_kind(reason: str) -> str:
    """What a shared report gives of a skip reason: its kind (KINDS), never a name that the rest may hold."""
    found = KINDS.match(reason)
    return found.group() if found else "unusable (the full reason was printed where the command ran)"


def warn_skipped(skipped: list, where: str):
    """The one warning for files left out of a set (training data, validation, evaluation, audit): a file the user
    thinks is in the set but is not changes every figure, so it is said, in one line, naming at most 5."""
    if skipped:
        names = "; ".join(f"{name} ({why})" for name, why in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        print(f"warning: skipped {len(skipped)} file(s) in {where}: {names}", file=sys.stderr)


def warn_survey(survey: Survey | None, where: str):
    """One warning line for each way a folder was read other than file by file: copies of one DICOM instance (the
    same SOP Instance UID in two folders) read once; placeholder PatientIDs keyed by study (medti.dataset.patients)."""
    if survey is not None and survey.duplicates:
        copies = _some([f"{copy} (copy of {kept})" for copy, kept in survey.duplicates], 3)
        print(f"warning: {len(survey.duplicates)} DICOM file(s) in {where} are copies of files read already (the "
              f"same SOP Instance UID), each read once, the first in path order: {copies}", file=sys.stderr)
    if survey is not None and survey.placeholders and survey.placeholders.images:
        print(f"warning: {survey.placeholders.images} image(s) in {where} have a placeholder PatientID (empty, "
              "ANONYMOUS, 0, ... or one ID on different birth dates or sexes), which would merge patients: each "
              f"study counts as one patient instead (by Study Instance UID, in memory only), "
              f"{survey.placeholders.keys} in all", file=sys.stderr)


def summary(data) -> str:
    """What a set is made of, for the run's log: `120 image(s): 112 slice(s) of 3 volume(s) or series, 8 image
    file(s); 4 patient(s); read 150 file(s): 142 DICOM, 8 .png; skipped 3 file(s) that are not images (notes.txt,
    ...)` -- patients by DICOM PatientID, else by case folder or file (see Dataset.patients); the files read by
    kind (DICOM by content, whatever its name); then what was left out and why."""
    volumes = {name.split("#")[0] for name in data.names if "#" in name}
    files = sum("#" not in name for name in data.names)
    parts = ([f"{len(data.names) - files} slice(s) of {len(volumes)} volume(s) or series"] if volumes else []) + \
        ([f"{files} image file(s)"] if files else [])
    text = f"{len(data.names)} image(s): {', '.join(parts)}; {len(set(data.patients))} patient(s)"
    return text + "".join(f"; {part}" for part in _files_part(data))


def _files_part(data) -> list[str]:
    """The summary's account of files: read by kind, and each group left out with its reason."""
    survey, parts = data.survey, []
    if survey is None:
        return parts
    read = sum(data.files.values())
    parts.append(f"read {read} file(s): {', '.join(f'{n} {k}' for k, n in data.files.items())}")
    if data.skipped:
        parts.append(f"skipped {len(data.skipped)} unusable file(s) or case(s), each with its reason above")
    if survey.duplicates:
        parts.append(f"left out {len(survey.duplicates)} copies of DICOM files read already (same SOP Instance UID)")
    if survey.others:
        parts.append(f"skipped {len(survey.others)} file(s) that are not images ({_some(survey.others)})")
    return parts


def _suffix(path: Path) -> str:
    """A file's kind for the summary: `.nii.gz` as one (not `.gz`), no suffix as "(none)"."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower() or "(no extension)"


def _fix(files: list, found: list, kind: str, channels: list | None) -> str:
    """The advice of the "no usable image" line, by what was found and the most common reason."""
    if not files:
        return "is this the right folder?"
    if not found:
        return f"images must be {' '.join(EXTENSIONS)}, DICOM, or volumes (.nii, .nii.gz, .mha, .mhd, .nrrd)"
    if channels and kind.startswith(NAMING):
        return f"with --channels {','.join(channels)}, name files CASE/{channels[0]}.png or CASE_{channels[0]}.png"
    if kind.startswith(PREPROCESSING):
        return "choose another --preprocess or re-export those files"
    if kind == "flat image":   # each reason says what to try for its kind of file
        return "each is one gray level as read; see its reason for what to try"
    return "fix or re-export those files"


def nothing_usable(folder: Path, skipped: list, channels: list | None) -> str:
    """The one-line "no usable image" message: what was found, the most common skip reason, and a fix."""
    files = walk(folder)
    found = listed(files)
    tally = ", ".join(f"{n} {ext}" for ext, n in Counter(map(_suffix, files)).most_common(5)) or "nothing"
    # "wrong size: 64x48, ..." -> "wrong size"; a series' "IM0004: 5.000 mm from ..." -> the reason, not the file
    reasons = [(part[1] if len(part) > 1 and " " not in part[0] else part[0]).split(" (")[0]
               for part in (reason.split(": ") for _, reason in skipped)]
    kind = Counter(reasons).most_common(1)[0][0] if reasons else ""
    common = f", most often '{kind}', e.g. {': '.join(skipped[reasons.index(kind)])}" if reasons else ""
    return (f"{folder}: no usable image ({len(files)} file(s): {tally}; {len(skipped)} skipped{common}); "
            f"{_fix(files, found, kind, channels)}")
