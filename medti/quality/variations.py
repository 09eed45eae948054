"""Variations of a case (`medti.generate --condition-image`): how alike is each to its own source image?

An image-conditioned model is given one image's global tokens and asked for another image of the same kind. The
claim to test is that those few tokens are a bottleneck that cannot carry a copy: so the audit scores each variation
against the image it was made from, with the audit's own score (medti.quality.privacy: the numbers compare with the
nearest-neighbour similarities and the same threshold flags them), and asks whether any training image is nearer.

The source is found by what the manifest records (`"condition": [{"pseudonym": "img-<sha12>", "sha256": ...}]`,
two entries for --mix): among the training images, then among --sources (held-out cases outside the training set).
A pseudonym is the first 12 hex digits of the file's sha256 (medti.files.pseudonyms); where the record has the whole
sha256, the found file's bytes are hashed again to confirm it. A source found nowhere is reported, not an error: the
user may have conditioned on a case they did not pass.
"""
import hashlib
import re
from dataclasses import dataclass, field

import torch

from minisd.errors import UserError

from . import privacy
from .folders import ImageSet

PSEUDONYM = re.compile(r"img-([0-9a-f]{12})(-[0-9]+)?")   # an image file's pseudonym (-2, -3: byte-identical twins)
SHA256 = re.compile(r"[0-9a-f]{64}")
WHERE = {"train": "training set", "sources": "held out (--sources)"}   # how audit.md and the sheet say where


class ConditionError(UserError):
    """A manifest whose "condition" entries are not as medti.generate writes them."""


@dataclass(frozen=True)
class Source:
    """One source of one variation, as its manifest record names it."""
    variation: int           # the variation's row in the synthetic set
    pseudonym: str           # `img-<sha12>`
    sha256: str | None       # the source file's whole sha256, when recorded
    mix: object = None       # its --mix fraction as recorded (None: a record of one source)


@dataclass
class Pair:
    """A variation and one of its sources: where the source was found and how alike the two are."""
    source: Source
    where: str | None = None         # "train", "sources", or None: found in neither
    row: int | None = None           # the source's row in that set
    similarity: float | None = None  # the audit's score between the variation and its source, in [0, 1]
    rank: int | None = None          # 1 + training images (other than the source) the audit scores above it
    mirrored: bool = False           # the best match was the variation's mirror


@dataclass
class Variations:
    """Every variation's sources, scored (`score`), and the held-out sources they were found among."""
    pairs: list
    held: ImageSet | None = None
    threshold: float = privacy.THRESHOLD
    candidates: int = privacy.CANDIDATES   # training images scored exactly per variation, for the rank
    found: list = field(init=False)

    def __post_init__(self):
        self.found = [p for p in self.pairs if p.where]

    @property
    def copies(self) -> list:
        """Pairs whose variation is flagged as a copy of its own source, most similar first."""
        return [p for p in self.by_similarity() if p.similarity >= self.threshold]

    def by_similarity(self) -> list:
        return sorted(self.found, key=lambda p: -p.similarity)

    @property
    def missing(self) -> list:
        """Pseudonyms of the sources found nowhere, each once, in manifest order."""
        return list(dict.fromkeys(p.source.pseudonym for p in self.pairs if not p.where))

    def key(self) -> list:
        """(pseudonym, path) of each --sources image a variation came from: the rows they add to
        names.private.tsv (the path under --sources as typed)."""
        rows = dict.fromkeys(p.row for p in self.found if p.where == "sources")
        return [(self.held.pseudonyms[r], str(self.held.root / self.held.names[r])) for r in rows]


def _entry(value, mix) -> tuple | None:
    """(pseudonym, sha256 or None, mix) of one "condition" entry; None when it is not as medti.generate writes it
    (a pseudonym, and a sha256 that begins with the pseudonym's digits when given)."""
    if not isinstance(value, dict) or not isinstance(value.get("pseudonym"), str):
        return None
    named, sha = PSEUDONYM.fullmatch(value["pseudonym"]), value.get("sha256")
    if not named or not (sha is None or isinstance(sha, str) and SHA256.fullmatch(sha) and sha[:12] == named[1]):
        return None
    return value["pseudonym"], sha, value.get("mix", mix)


def sources(records: dict, names: list, manifest: str) -> list:
    """Every Source the manifest records name, variation by variation (rows of `names`); a record without
    "condition" (or with null) is not a variation. manifest: how to name the manifest in an error."""
    found = []
    for row, name in enumerate(names):
        record = records.get(name)
        entries = record.get("condition") if isinstance(record, dict) else None
        if entries is None:
            continue
        read = [_entry(e, record.get("mix")) for e in entries] if isinstance(entries, list) else []
        if not 1 <= len(read) <= 2 or None in read:
            raise ConditionError(
                f"{manifest}: the record of {name} has a \"condition\" that is not one or two entries "
                "{\"pseudonym\": \"img-<12 hex digits>\", \"sha256\": \"<64 hex digits>\"} as medti.generate "
                "writes them; give the run's own manifest.jsonl")
        found += [Source(row, *entry) for entry in read]
    return found


def _same_bytes(images: ImageSet, row: int, sha256: str | None) -> bool:
    """Is image `row` the recorded file? Its pseudonym already matched; with the whole sha256 recorded, its file is
    hashed again (an image read from several files, or a volume's slice, has no one file: not a match)."""
    if sha256 is None:
        return True
    path = images.root / images.names[row]
    return path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha256


def _rows(images: ImageSet | None) -> dict:
    """{12 hex digits: rows} of the images whose pseudonym is one file's (not a volume's slice or a case's)."""
    rows = {}
    for row, pseudonym in enumerate(images.pseudonyms if images else []):
        if named := PSEUDONYM.fullmatch(pseudonym):
            rows.setdefault(named[1], []).append(row)
    return rows


def locate(wanted: list, train: ImageSet, held: ImageSet | None) -> list:
    """A Pair for every Source: found among the training images first, then among the held-out ones."""
    sets = [("train", train, _rows(train)), ("sources", held, _rows(held))]
    pairs = []
    for source in wanted:
        pair, digits = Pair(source), PSEUDONYM.fullmatch(source.pseudonym)[1]
        for where, images, index in sets:
            rows = [r for r in index.get(digits, []) if _same_bytes(images, r, source.sha256)]
            if rows and pair.where is None:
                pair.where, pair.row = where, rows[0]   # byte-identical twins are the same pixels: the first
        pairs.append(pair)
    return pairs


def score(found: list, ref: privacy.Reference, syn_desc: torch.Tensor, train_desc: torch.Tensor,
          held_desc: torch.Tensor | None) -> list:
    """Fill in similarity, mirrored and rank of each found Pair: the descriptors of the synthetic, training and
    held-out images (privacy.descriptors). The variation is compared with its source exactly as the audit compares it
    with a training image (whitened by the training set's filter, the training template removed, every shift and
    the mirror). The rank counts the training images of the audit's prefilter (its CANDIDATES most likely for that
    variation, the ones it scores exactly) that score higher than the source: rank 1 = no training image is nearer
    to the variation than its own source. Returns the Pairs."""
    if not found:
        return found
    desc = syn_desc[[p.source.variation for p in found]]
    src = torch.stack([(train_desc if p.where == "train" else held_desc)[p.row] for p in found])
    syn = privacy.variants(privacy.whiten(desc, ref.gain), privacy.PHASES)
    own = privacy.exact(syn, privacy.Reference(ref.gain, privacy.whiten(src, ref.gain), ref.template),
                        torch.arange(len(found))[:, None])
    coarse = privacy.variants(privacy.whiten(privacy.halve(desc), ref.coarse.gain), privacy.COARSE_PHASES)
    rows = privacy.candidates(coarse, ref.coarse, min(privacy.CANDIDATES, len(ref.images)), None)   # [P, k]
    above = torch.zeros(len(found), dtype=torch.long)
    for column in rows.T:   # one exact score per candidate: exact() keeps only the best of the rows it is given
        other = torch.tensor([p.where != "train" or p.row != r for p, r in zip(found, column.tolist(), strict=True)])
        above += (privacy.exact(syn, ref, column[:, None]).similarity > own.similarity) & other
    for i, pair in enumerate(found):
        pair.similarity, pair.mirrored, pair.rank = own.similarity[i].item(), bool(own.mirrored[i]), 1 + int(above[i])
    return found
