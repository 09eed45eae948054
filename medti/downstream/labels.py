"""The labels of each image: from class sub-folders, from a label CSV, or, for a synthetic set, from the generation
manifest (a prompt -> label map, or a variation's source among the real images).

Labels are a bool matrix [images, labels], one column per label, so one rule serves every case: class sub-folders
are one column per class (one-vs-rest; with two classes the two columns are each other's complement and give the
same AUC), a CSV's label columns are its columns (several positive in a row = multi-label). A label a probe cannot
learn is refused, never reported as a figure: a column with one class only, an image with no label.
"""
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from minisd.errors import UserError, arg, some

from ..quality.variations import PSEUDONYM, TRAINED


class LabelError(UserError):
    """Labels that cannot be used, in one line that names the file or flag."""


@dataclass
class Labels:
    names: list          # the label names, column order
    y: np.ndarray        # bool [images, labels]


def _class_of(name: str) -> str | None:
    """An image's class sub-folder: the first folder of its path inside the set (None for a file at the top)."""
    parts = PurePosixPath(name).parts
    return parts[0] if len(parts) > 1 else None


def folder_labels(names: list, flag: str, classes: list | None = None) -> Labels:
    """One column per class sub-folder (sorted by name, or `classes`: the real set's, for a synthetic or test set,
    whose folders must be among them). An image outside any class folder is refused: it has no label."""
    found = [_class_of(n) for n in names]
    loose = [n for n, c in zip(names, found, strict=True) if c is None]
    if loose:
        raise LabelError(f"{arg(flag)}: {loose[0]} sits outside any class sub-folder, so it has no label; put every "
                         "image in a folder named after its class, or give a label CSV")
    classes = classes or sorted(set(found))
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise LabelError(f"{arg(flag)}: class folder {unknown[0]!r} is not a class of the real set "
                         f"({some(classes)}); name the folders as the real set's")
    y = np.array([[c == k for k in classes] for c in found], dtype=bool).reshape(len(names), len(classes))
    return Labels(list(classes), y)


def _read_csv(path: Path, flag: str) -> tuple[list, list]:
    """(header, rows) of a UTF-8 CSV; a missing or unreadable file is one line naming it."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise LabelError(f"{arg(flag)} {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise LabelError(f"{arg(flag)} {path}: not UTF-8 text (byte {e.start}); save the CSV as UTF-8") from None
    rows = [r for r in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in r)]
    if not rows:
        raise LabelError(f"{arg(flag)} {path}: empty; give a header row (file, then one column per label)")
    return [h.strip() for h in rows[0]], rows[1:]


def _flag_value(cell: str, path: Path, flag: str, where: str) -> bool:
    value = cell.strip().lower()
    if value not in ("0", "1", "true", "false", "0.0", "1.0"):
        raise LabelError(f"{arg(flag)} {path}: {where} holds {cell!r}; a label cell is 1 (positive) or 0 (negative)")
    return value in ("1", "true", "1.0")


def read_label_csv(path, flag: str) -> tuple[list, dict]:
    """(label names, {file name: bool row}) of a CSV whose first column is `file` (the image's path inside its
    set) and whose other columns are labels (1 or 0)."""
    path = Path(path)
    header, rows = _read_csv(path, flag)
    if header[0].lower() != "file" or len(header) < 2:
        raise LabelError(f"{arg(flag)} {path}: the header must be `file` then one column per label, not "
                         f"{some(header)}")
    table = {}
    for number, row in enumerate(rows, 2):
        if len(row) != len(header):
            raise LabelError(f"{arg(flag)} {path}: line {number} has {len(row)} cells, the header {len(header)}")
        name = row[0].strip()
        if name in table:
            raise LabelError(f"{arg(flag)} {path}: {name} is listed twice (lines {table[name][1]} and {number})")
        cells = [_flag_value(c, path, flag, f"line {number}, column {h}")
                 for c, h in zip(row[1:], header[1:], strict=True)]
        table[name] = (cells, number)
    return header[1:], {name: cells for name, (cells, _) in table.items()}


def csv_labels(table: dict, names: list, flag: str, path, what: str) -> Labels:
    """The rows of `table` (read_label_csv) for the images `names` of one set (a volume's slice by its file's row).
    An image without a row is refused by name; rows naming no image are checked by unused()."""
    label_names, rows = table
    found = []
    for name in names:
        row = rows.get(name, rows.get(name.partition("#")[0]))
        if row is None:
            raise LabelError(f"{arg(flag)} {path}: no row for {name} of {what}; add a row for every image")
        found.append(row)
    return Labels(list(label_names), np.array(found, dtype=bool).reshape(len(names), len(label_names)))


def unused(table: dict, sets: list, flag: str, path):
    """Refuse a CSV row that names no image of `sets` ([names]) -- a typo would leave an image unlabelled silently
    elsewhere -- and a name found in two sets, whose one row could not tell two different images apart."""
    seen = {}
    for number, names in enumerate(sets):
        for name in {n.partition("#")[0] for n in names} | set(names):
            if name in table[1] and seen.setdefault(name, number) != number:
                raise LabelError(f"{arg(flag)} {path}: {name} is an image of two sets; one row cannot label both: "
                                 "rename one")
    unknown = sorted(set(table[1]) - set(seen))
    if unknown:
        raise LabelError(f"{arg(flag)} {path}: names {some(unknown, 3)}, which no set holds; correct or remove "
                         f"{'that row' if len(unknown) == 1 else 'those rows'}")


def check_two_classes(labels: Labels, flag: str, what: str):
    """Every label has positive and negative images in `what`: a probe learns nothing from one class, and an AUC
    needs both. A label without positives is named first (the commoner mistake: a class folder missing)."""
    if not labels.names:
        raise LabelError(f"{arg(flag)}: no labels for {what}")
    counts = labels.y.sum(0)
    for kind, lacking in (("positive", counts == 0), ("negative", counts == len(labels.y))):
        if lacking.any():
            name = labels.names[int(np.flatnonzero(lacking)[0])]
            raise LabelError(f"{arg(flag)}: label {name!r} has no {kind} case in {what}; a classifier needs both "
                             "classes (one class only)")


def read_map(path, flag: str, label_names: list) -> dict:
    """{prompt: bool row} from a JSON object (prompt -> label or [labels]) or a CSV with columns prompt,label."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        try:
            given = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise LabelError(f"{arg(flag)} {path}: not a readable JSON object ({type(e).__name__})") from None
        if not isinstance(given, dict):
            raise LabelError(f"{arg(flag)} {path}: must be a JSON object of prompt -> label")
    else:
        header, rows = _read_csv(path, flag)
        if [h.lower() for h in header[:2]] != ["prompt", "label"]:
            raise LabelError(f"{arg(flag)} {path}: the header must be `prompt,label`")
        given = {row[0]: row[1].strip() for row in rows if len(row) >= 2}
    table = {}
    for prompt, value in given.items():
        wanted = [value] if isinstance(value, str) else value if isinstance(value, list) else [None]
        bad = [v for v in wanted if v not in label_names]
        if bad:
            raise LabelError(f"{arg(flag)} {path}: prompt {prompt!r} maps to {bad[0]!r}, not a label of the real "
                             f"set ({some(label_names)})")
        table[prompt] = [name in wanted for name in label_names]
    return table


def mapped(record: dict, prompt_map: dict) -> list | None:
    """The label row --synthetic-labels gives a manifest record: its prompt's, else that of the embedding tokens it
    used (the record's "embeddings": token -> sha256), when those in the map agree on one label; None otherwise. So a
    map may name a textual-inversion token once instead of every prompt it was used in."""
    if record.get("prompt") in prompt_map:
        return prompt_map[record["prompt"]]
    tokens = record.get("embeddings") if isinstance(record.get("embeddings"), dict) else {}
    rows = [prompt_map[token] for token in sorted(tokens) if token in prompt_map]
    return rows[0] if rows and all(row == rows[0] for row in rows) else None


def manifest_labels(names: list, records: dict, prompt_map: dict | None, real_rows: dict, label_names: list,
                    flag: str) -> Labels:
    """A generated image's label: its source's, when the record's "condition" names an image of the real set
    (a variation of a case; `real_rows`: {12 hex digits: label row}), else what `prompt_map` gives it (mapped). An image
    that neither labels is refused: a synthetic image without a label would be trained on as a negative."""
    found = []
    for name in names:
        record = records.get(name) or {}
        entries = record.get("condition") if isinstance(record.get("condition"), list) else []
        digits = [PSEUDONYM.fullmatch(str(e.get("pseudonym", ""))) for e in entries if isinstance(e, dict)]
        rows = [real_rows[m[1]] for m in digits if m and m[1] in real_rows]
        if len(rows) == 1 or (rows and all(r == rows[0] for r in rows)):
            found.append(rows[0])
        elif prompt_map is not None and (row := mapped(record, prompt_map)) is not None:
            found.append(row)
        else:
            why = ("neither its prompt nor an embedding token it used is in --synthetic-labels" if prompt_map is not
                   None else "give --synthetic-labels (a prompt -> label map, or a CSV of file, labels) or class "
                   "sub-folders")
            raise LabelError(f"{arg(flag)}: synthetic image {name} has no label ({why})")
    return Labels(list(label_names), np.array(found, dtype=bool).reshape(len(names), len(label_names)))


def rows_by_pseudonym(pseudonyms: list, labels: Labels) -> dict:
    """{12 hex digits: label row} of the real images, for variations that name their source by pseudonym."""
    rows = {}
    for pseudonym, row in zip(pseudonyms, labels.y.tolist(), strict=True):
        if named := TRAINED.fullmatch(pseudonym):
            rows.setdefault(named[1], row)
    return rows
