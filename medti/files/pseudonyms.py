"""What may leave the hospital: the one rule for names in the files medti writes.

File and folder names of medical exports are often patient names or record numbers (`DOE_JOHN_MRN4242.dcm`). Files
meant to be shared -- reports, statistics, embeddings, LoRAs, models, manifests, generated images -- therefore name
an input image by a pseudonym and hashes only, and a private key file beside them (`names.private.tsv`; every file
whose name contains `.private.` holds paths and names and is never to be shared) maps each pseudonym back to its
path, for the person who must look a flagged case up. docs/privacy-audit.md states the rule for users.

Why a pseudonym from the image's content and not from its path: a hash of `DOE_JOHN_MRN4242.dcm` is found again by
hashing guessed names and record numbers, which are few; a hash of the file's bytes tells nothing to someone who
does not hold the file, and the same image gets the same pseudonym in every command (a preview's data.jsonl names
the training image the audit finds nearest by the same pseudonym).
"""
import hashlib
import re
from collections import Counter
from pathlib import Path

from minisd.config import presets

from .atomic import write_atomic

KEY = "names.private.tsv"   # the key file's name in an output folder
DIGITS = 12                 # hex digits of sha256 kept: 48 bits, so two different images of a set of millions
#                             share a pseudonym with a chance under 1 in 10^4 (and then numbering keeps them apart)


def content_sha256(files: dict[str, bytes]) -> str:
    """The sha256 (64 hex digits) an image's pseudonym starts from: of the file itself when it is one (`sha256sum
    FILE`), else of the files' sha256 hex digests, sorted, one per line (a DICOM series, a case of --channels, a
    .mhd with its .raw). The paths take no part in it."""
    digests = sorted(hashlib.sha256(data).hexdigest() for data in files.values())
    if len(digests) != 1:
        digests = [hashlib.sha256("".join(f"{d}\n" for d in digests).encode()).hexdigest()]
    return digests[0]


def content_id(files: dict[str, bytes]) -> str:
    """`img-` and the first DIGITS hex digits of content_sha256: of the file's own sha256 when it is one file."""
    return f"img-{content_sha256(files)[:DIGITS]}"


class Numbering:
    """Pseudonyms of the items of one set, in the order they are read (path order): byte-identical items (one
    export saved twice) get `-2`, `-3`, ... so that every pseudonym names one item."""

    def __init__(self):
        self.seen = Counter()

    def item(self, files: dict[str, bytes]) -> str:
        base = content_id(files)
        self.seen[base] += 1
        return base if self.seen[base] == 1 else f"{base}-{self.seen[base]}"


def image_name(item: str, name: str) -> str:
    """An image's pseudonym: its item's, with the slice a volume's image has in its name (`#axial042`): which plane
    and index identify nobody, and the reader needs them to find the slice."""
    _, mark, piece = name.partition("#")
    return f"{item}{mark}{piece}"


def skipped_names(skipped: list) -> list:
    """`skipped-001`, ... for the (name, reason) entries of files left out of a set, in their order."""
    return [f"skipped-{i + 1:03d}" for i in range(len(skipped))]


def key_rows(pseudonyms: list, names: list, skipped: list) -> list:
    """The rows of a set's key file: (pseudonym, path) of each image, then of each file left out ((name, reason)
    entries, skipped_names)."""
    return list(zip(pseudonyms, names, strict=True)) + list(zip(skipped_names(skipped),
                                                               [name for name, _ in skipped], strict=True))


def model_name(model: str) -> str:
    """How a shared file names a base model: a preset by its name, a local file or folder by its last component
    (`roentgen`, `model.safetensors`): where it lies is the user's file system, and base_sha256 beside it
    identifies the file."""
    text = str(model)
    return text if text in presets() else Path(text).name


def _field(text: str) -> str:
    """A TSV field: backslash, tab and line breaks escaped as \\\\, \\t, \\n and \\r (a file name may hold any
    of them), so each row is one line of two fields; a name's byte that is not UTF-8 (a Latin-1 export's `café`,
    which Python holds as a lone surrogate) as \\xNN, so the file is valid UTF-8 and still names the file exactly."""
    text = text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return re.sub("[\udc80-\udcff]", lambda m: f"\\x{ord(m.group()) - 0xdc00:02x}", text)


def key_bytes(rows: list) -> bytes:
    """The key file's text: a header `pseudonym<TAB>path`, then one row per (pseudonym, path)."""
    lines = ["pseudonym\tpath"] + [f"{_field(p)}\t{_field(path)}" for p, path in rows]
    return "".join(f"{line}\n" for line in lines).encode("utf-8")


def _unfield(text: str) -> str:
    """A TSV field back to the text _field escaped."""
    plain = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}
    return re.sub(r"\\(x[0-9a-f]{2}|.)", lambda m: plain.get(m[1]) or chr(0xdc00 + int(m[1][1:], 16)), text)


def read_key(path) -> dict:
    """{pseudonym: path} from a key file (key_bytes); rows that are not two fields are left out."""
    rows = [line.split("\t") for line in Path(path).read_text(encoding="utf-8").splitlines()[1:]]
    return {_unfield(row[0]): _unfield(row[1]) for row in rows if len(row) == 2}


def write_key(path, rows: list):
    """Write a key file atomically."""
    write_atomic(path, key_bytes(rows))


def key_beside(path) -> Path:
    """The key of a file written at a path the user chose (a statistics or features file): `<stem>.names.private.tsv`
    beside it (`real-stats.npz` -> `real-stats.names.private.tsv`)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.{KEY}")

