"""What the audit writes about variations of a case (medti.quality.variations): each variation's score against its
own source in audit.json, a section of audit.md with the summary and the pairs, and sources.png, each source beside
its variation, closest first. Sources are named by pseudonym alone (names.private.tsv maps them), never by path."""
import statistics

from ..files.images import contact_sheet, tile
from .folders import ImageSet
from .variations import WHERE, Pair, Variations

SHEET = "sources.png"
SHEET_PAIRS = 24   # pairs on the sheet at most, as the other sheets (audit_report.SHEET_PAIRS)
LISTED = 50        # pairs in audit.md at most, most similar first: audit.json has them all


def pair_entry(v: Variations, pair: Pair) -> dict:
    """One source of one variation in audit.json."""
    found = {"source": pair.source.pseudonym}
    found.update({"mix": pair.source.mix, "share": pair.source.share} if pair.source.mix is not None else {})
    if not pair.where:
        return {**found, "found_in": None, "note": "not among the training images or --sources"}
    images = v.held if pair.where == "sources" else None
    compared = (images or v.train).pseudonyms[pair.row]
    found.update({"compared": compared} if compared != pair.source.pseudonym else {})   # a volume's slice
    return {**found, "found_in": pair.where, "similarity": round(pair.similarity, 4),
            "copy": pair.similarity >= v.threshold, "rank": pair.rank, "nearest_is_source": pair.rank == 1,
            "mirrored": pair.mirrored}


def entries(v: Variations | None, row: int) -> dict:
    """What a synthetic image's audit.json entry adds when it is a variation: its sources."""
    pairs = [p for p in v.pairs if p.source.variation == row] if v else []
    return {"sources": [pair_entry(v, p) for p in pairs]} if pairs else {}


def distinct_sources(v: Variations) -> int:
    """How many different source images the variations name (several variations of one case: one source)."""
    return len({p.source.pseudonym for p in v.pairs})


def summary(v: Variations) -> dict:
    """audit.json's summary.variations."""
    scores = [p.similarity for p in v.found]
    return {"variations": len({p.source.variation for p in v.pairs}), "sources": distinct_sources(v),
            "found": len(v.found), "not_found": v.missing,
            "median_similarity": round(statistics.median(scores), 4) if scores else None,
            "highest_similarity": round(max(scores), 4) if scores else None,
            "copies_of_own_source": len(v.copies), "nearest_is_source": sum(p.rank == 1 for p in v.found),
            "rank_among": f"the source and the audit's {v.candidates} most likely training images per variation"}


def verdict(v: Variations) -> str:
    s, n = summary(v), len(v.copies)
    if not v.found:
        return f"None of the {s['sources']} sources was found, so no variation could be compared with its own."
    top = s["highest_similarity"]
    head = (f"**{n} of {s['found']} variation-source pairs are flagged as copies of their own source**" if n
            else f"**No variation is a copy of its own source** (highest similarity {top:.3f})")
    return (f"{head} (similarity >= {v.threshold:g}, the audit's threshold). Median similarity to the own source "
            f"{s['median_similarity']:.3f}; no training image is nearer to the variation than its source for "
            f"{s['nearest_is_source']} of {s['found']}.")


def table(v: Variations, names: list) -> list:
    lines = ["| variation | source | share (--mix) | found in | similarity to its source | flagged as its copy "
             "| rank of the source |", "|---|---|---|---|---|---|---|"]
    for p in v.by_similarity()[:LISTED]:
        mix = "" if p.source.share is None else f"{p.source.share:g}"
        lines.append(f"| {names[p.source.variation]} | {p.source.pseudonym} | {mix} | {WHERE[p.where]} | "
                     f"{p.similarity:.3f} | {'yes' if p.similarity >= v.threshold else 'no'} | {p.rank} |")
    more = len(v.found) - LISTED
    return lines + (["", f"{more} more pairs in audit.json."] if more > 0 else [])


def markdown(v: Variations | None, names: list) -> list:
    """audit.md's section on variations (nothing when no image of the set is one)."""
    if v is None:
        return []
    lines = ["", "## Variations and their own sources", "", verdict(v), "",
             f"- {summary(v)['variations']} synthetic images are variations of a case (their manifest records name "
             f"{distinct_sources(v)} different source(s)); each is compared with its own source by the same score "
             "as above. Rank: "
             f"1 + the training images nearer to the variation than its source, among the source and the "
             f"{v.candidates} training images the audit scores exactly for it; 1 = the nearest image is the source."]
    if v.found:
        lines.append(f"- {SHEET}: each source beside its variation, most similar first ({SHEET_PAIRS} pairs at most).")
    if v.missing:
        lines.append(f"- **Not found** among the training images or --sources, so not compared: "
                     f"{', '.join(v.missing)} (give the folder that holds them as --sources).")
    return lines + ([""] + table(v, names) if v.found else [])


def sheet(v: Variations, synthetic: ImageSet, side: int):
    """Source | variation, pair by pair, closest first, two pairs per row; None when no source was found."""
    items = []
    for p in v.by_similarity()[:SHEET_PAIRS]:
        images = v.train if p.where == "train" else v.held
        shared = f"similarity {p.similarity:.3f}" + (", mirrored" if p.mirrored else "")
        items += [tile(images.images[p.row], f"source: {images.pseudonyms[p.row]}\n{WHERE[p.where]}", side),
                  tile(synthetic.images[p.source.variation],
                       f"{synthetic.names[p.source.variation]}\n{shared}\nrank of source {p.rank}", side)]
    return contact_sheet(items, columns=4 if len(items) > 2 else 2) if items else None
