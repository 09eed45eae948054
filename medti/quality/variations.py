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

PSEUDONYM = re.compile(r"img-([0-9a-f]{12})(-[0-9]+)?")   # a source's pseudonym (-2, -3: byte-identical twins)
TRAINED = re.compile(r"img-([0-9a-f]{12})(-[0-9]+)?(#.*)?")   # a read image's: a volume's slice adds `#axial042`
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
    mix: object = None       # the record's --mix fraction r (0: the first source, 1: the second), as recorded
    share: float | None = None   # this source's share of the mixed tokens: 1 - r for the first, r for the second


@dataclass
class Pair:
    """A variation and one of its sources: where the source was found and how alike the two are."""
    source: Source
    where: str | None = None         # "train", "sources", or None: found in neither
    rows: list = field(default_factory=list)   # the source's rows in that set: one, or a volume's slices
    row: int | None = None           # the row compared: the slice that scores highest for a volume
    similarity: float | None = None  # the audit's score between the variation and its source, in [0, 1]
    rank: int | None = None          # 1 + training images (other than the source) the audit scores above it
    mirrored: bool = False           # the best match was the variation's mirror


@dataclass
class Variations:
    """Every variation's sources, scored (`score`), and the held-out sources they were found among."""
    pairs: list
    train: ImageSet
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


def _entry(value) -> tuple | None:
    """(pseudonym, sha256 or None) of one "condition" entry; None when it is not as medti.generate writes it (a
    pseudonym, and a sha256 that begins with the pseudonym's digits when given)."""
    if not isinstance(value, dict) or not isinstance(value.get("pseudonym"), str):
        return None
    named, sha = PSEUDONYM.fullmatch(value["pseudonym"]), value.get("sha256")
    if not named or not (sha is None or isinstance(sha, str) and SHA256.fullmatch(sha) and sha[:12] == named[1]):
        return None
    return value["pseudonym"], sha


def sources(records: dict, names: list, manifest: str) -> list:
    """Every Source the manifest records name, variation by variation (rows of `names`); a record without
    "condition" (or with null) is not a variation. manifest: how to name the manifest in an error."""
    found = []
    for row, name in enumerate(names):
        record = records.get(name)
        entries = record.get("condition") if isinstance(record, dict) else None
        if entries is None:
            continue
        read = [_entry(e) for e in entries] if isinstance(entries, list) else []
        if not 1 <= len(read) <= 2 or None in read:
            raise ConditionError(
                f"{manifest}: the record of {name} has a \"condition\" that is not one or two entries "
                "{\"pseudonym\": \"img-<12 hex digits>\", \"sha256\": \"<64 hex digits>\"} as medti.generate "
                "writes them; give the run's own manifest.jsonl")
        mix = record.get("mix")
        shares = (1 - mix, mix) if len(read) == 2 and isinstance(mix, (int, float)) else (None,) * len(read)
        found += [Source(row, *entry, mix, share) for entry, share in zip(read, shares, strict=True)]
    return found


def _same_bytes(images: ImageSet, row: int, digits: str, sha256: str | None) -> bool:
    """Is image `row` (its pseudonym's digits matched) the recorded source? With the whole sha256 recorded and the
    image read from one file (a volume's slice: from its file) whose own sha256 begins with those digits, that
    sha256 must be the recorded one. An image of several files (a DICOM series, a --channels case) is named by a
    hash of their digests, which the set does not keep: its 48-bit pseudonym is the match."""
    path = images.root / images.names[row].partition("#")[0]
    if sha256 is None or not path.is_file():
        return True
    own = hashlib.sha256(path.read_bytes()).hexdigest()
    return own == sha256 if own[:12] == digits else True


def _rows(images: ImageSet | None) -> dict:
    """{12 hex digits: rows} of a set's images by their pseudonyms (a volume's slices all under its digits)."""
    rows = {}
    for row, pseudonym in enumerate(images.pseudonyms if images else []):
        if named := TRAINED.fullmatch(pseudonym):
            rows.setdefault(named[1], []).append(row)
    return rows


def locate(wanted: list, train: ImageSet, held: ImageSet | None) -> list:
    """A Pair for every Source: found among the training images first, then among the held-out ones. A volume's
    source is all its slices (the record does not say which one generate read): score() compares each."""
    sets = [("train", train, _rows(train)), ("sources", held, _rows(held))]
    pairs = []
    for source in wanted:
        pair, digits = Pair(source), PSEUDONYM.fullmatch(source.pseudonym)[1]
        for where, images, index in sets:
            rows = [r for r in index.get(digits, []) if _same_bytes(images, r, digits, source.sha256)]
            if rows and pair.where is None:
                pair.where, pair.rows = where, rows
        pairs.append(pair)
    return pairs


def score(found: list, ref: privacy.Reference, syn_desc: torch.Tensor, train_desc: torch.Tensor,
          held_desc: torch.Tensor | None) -> list:
    """Fill in row, similarity, mirrored and rank of each found Pair: the descriptors of the synthetic, training and
    held-out images (privacy.descriptors). The variation is compared with its source exactly as the audit compares it
    with a training image (whitened by the training set's filter, the training template removed, every shift and
    the mirror); a volume's source by its slice that scores highest. The rank counts the training images of the
    audit's prefilter (its CANDIDATES most likely for that variation, the ones it scores exactly) that score higher
    than the source, the source's own rows left out: rank 1 = no training image is nearer to the variation than its
    own source. Returns the Pairs."""
    if not found:
        return found
    tried = [(i, r) for i, p in enumerate(found) for r in p.rows]   # every (pair, source row) to score
    desc = syn_desc[[found[i].source.variation for i, _ in tried]]
    src = torch.stack([(train_desc if found[i].where == "train" else held_desc)[r] for i, r in tried])
    syn = privacy.variants(privacy.whiten(desc, ref.gain), privacy.PHASES)
    own = privacy.exact(syn, privacy.Reference(ref.gain, privacy.whiten(src, ref.gain), ref.template),
                        torch.arange(len(tried))[:, None])
    best = {}   # pair -> position in `tried` of its best source row
    for t, (i, _) in enumerate(tried):
        if i not in best or own.similarity[t] > own.similarity[best[i]]:
            best[i] = t
    keep = [best[i] for i in range(len(found))]
    syn, similarity = [v[keep] for v in syn], own.similarity[keep]
    coarse = privacy.variants(privacy.whiten(privacy.halve(desc[keep]), ref.coarse.gain), privacy.COARSE_PHASES)
    rows = privacy.candidates(coarse, ref.coarse, min(privacy.CANDIDATES, len(ref.images)), None)   # [P, k]
    above = torch.zeros(len(found), dtype=torch.long)
    for column in rows.T:   # one exact score per candidate: exact() keeps only the best of the rows it is given
        other = torch.tensor([p.where != "train" or r not in p.rows
                              for p, r in zip(found, column.tolist(), strict=True)])
        above += (privacy.exact(syn, ref, column[:, None]).similarity > similarity) & other
    for i, pair in enumerate(found):
        pair.row, pair.similarity = tried[keep[i]][1], similarity[i].item()
        pair.mirrored, pair.rank = bool(own.mirrored[keep[i]]), 1 + int(above[i])
    return found
