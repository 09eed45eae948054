"""Variations and interpolations of cases, for an image-conditioned model (minisd.image_conditioning): the context is
`sd.image(case)` in place of a prompt, and the "no condition" of guidance its null (zeros), as in DiNO-Diffusion.

A --condition-image is read as training reads its data (medti.dataset.sources: DICOM windowed, a volume sliced, then
--preprocess to the generated images' size), so the encoder sees what it saw in training. A volume gives one slice:
--slices defaults to middle:1 here, and a choice of several slices is refused (a condition is one image).

Images: without --mix, --n variations of each source, image (s, i) with seed + i (so the sources share their noise);
with --mix, row r (seed + r) has one image per fraction. A manifest line names its sources by pseudonym and sha256 of
their bytes (medti.files.pseudonyms), never by file name; names.private.tsv maps them back.
"""
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from minisd.errors import quoted

from ..dataset.preprocess import Unusable, check_not_flat, fit
from ..dataset.sources import item_images, items
from ..files.images import contact_sheet, library_warnings
from ..files.pseudonyms import Numbering, content_sha256
from ..medical import MedicalError
from ..medical.slices import check_options
from ..medical.window import parse_window
from .flags import UsageError
from .manifest import Job

READING = ("window", "plane", "slices", "preprocess")   # flags that say how a --condition-image is read


@dataclass
class Source:
    """One --condition-image as read: the 8-bit RGB image the encoder is given, its pseudonym and sha256."""
    image: Image.Image
    pseudonym: str
    sha256: str
    path: str


def check(args):
    """The flags of an image-conditioned run, before the model loads (flags.check_args has made sure --prompt,
    --sweep and --condition-image are not mixed)."""
    if not args.condition_image:
        given = [f"--{name}" for name in ("mix", *READING) if getattr(args, name) is not None]
        if given:
            raise UsageError(f"{given[0]} is for an image-conditioned model's --condition-image; leave it out or give "
                             "--condition-image FILE")
        return
    for flag, wrong in (("--negative", args.negative), ("--embeddings", args.embeddings)):
        if wrong:
            raise UsageError(f"{flag}: an image-conditioned model reads no prompt (its uncond is the null "
                             "condition); leave it out")
    for path in args.condition_image:
        if not Path(path).is_file():
            raise UsageError(f"--condition-image {path}: no such file")
    if args.mix is not None and len(args.condition_image) != 2:
        raise UsageError(f"--mix interpolates between two cases: give exactly two --condition-image, not "
                         f"{len(args.condition_image)}")
    fractions(args)
    if args.window is not None:
        parse_window(args.window)
    try:
        check_options(args.plane or "axial", args.slices or "middle:1")
    except MedicalError as e:
        raise UsageError(str(e)) from None


def fractions(args) -> list | None:
    """--mix as numbers in [0, 1], or None without --mix."""
    if args.mix is None:
        return None
    try:
        values = [float(r) for r in args.mix.split(",")]
    except ValueError:
        raise UsageError(f"--mix {quoted(args.mix)}: expected numbers separated by commas, such as 0.25,0.5,0.75") \
            from None
    for r in values:
        if not 0 <= r <= 1:   # `not`: NaN fails too
            raise UsageError(f"--mix {args.mix}: each fraction must be in [0, 1] (0: the first case, 1: the second), "
                             f"not {r:g}")
    return values


def plan(args) -> list:
    """The jobs: --n variations of each source (module docstring), or with --mix one row per seed."""
    mix = fractions(args)
    if mix is None:
        n = args.n
        return [Job(s * n + i, args.seed + i, "", [1.0], s) for s in range(len(args.condition_image)) for i in range(n)]
    return [Job(r * len(mix) + c, args.seed + r, "", [1.0], c) for r in range(args.n) for c in range(len(mix))]


def read_source(args, path: str, size: int, numbering: Numbering) -> Source:
    """One --condition-image as training reads it, or a one-line refusal naming the file and the flag."""
    file, options = Path(path), check_options(args.plane or "axial", args.slices or "middle:1",
                                             window=parse_window(args.window) if args.window else None)
    try:
        with library_warnings():
            [(name, source)] = items(file.parent, [file], None, skip=None)
            images, data = item_images(file.parent, name, source, None, options)
        if len(images) != 1:
            raise Unusable(f"--slices {args.slices} gives {len(images)} slices of this volume; a condition is one "
                           "image: choose one with --slices middle:1 or --slices K:K+1")
        image = images[0][1]
        check_not_flat(image)
        image = fit(image, size, args.preprocess or "center").convert("RGB")
    except (Unusable, MedicalError) as e:
        raise UsageError(f"--condition-image {path}: {e}") from None
    return Source(image, numbering.item(data), content_sha256(data), os.path.abspath(path))


def check_model(args, sd):
    """The model's kind against the flags: a text model reads a prompt, an image-conditioned one an image."""
    if sd.image is None and args.condition_image:
        raise UsageError(f"--condition-image: --model {args.model} is a text model (its file states no image "
                         "condition); give --prompt instead")
    if sd.image is not None and not args.condition_image:
        raise UsageError(f"--model {args.model} is image-conditioned (encoder {sd.image.cfg.encoder}): it reads no "
                         "prompt; give --condition-image FILE (a case to make variations of) instead")


def read_sources(args, size: int) -> list:
    """Every --condition-image, in the order given."""
    numbering = Numbering()
    return [read_source(args, path, size, numbering) for path in args.condition_image]


def pixels(source: Source) -> torch.Tensor:
    """[1, 3, S, S] uint8, what sd.image reads (training's cache_tokens reads the same 8-bit values)."""
    return torch.from_numpy(np.array(source.image)).permute(2, 0, 1)[None].contiguous()


@torch.no_grad()
def contexts(sd, sources: list, mix: list | None) -> list:
    """The context of each job's `condition` index: [1, count, width] per source, or per --mix fraction."""
    if mix is None:
        return [sd.image(pixels(source)) for source in sources]
    mixed = sd.image.mix(pixels(sources[0]), pixels(sources[1]), mix)
    return [mixed[c:c + 1] for c in range(len(mix))]


def record(job: Job, sources: list, mix: list | None) -> dict:
    """A manifest line's fields for the job's sources: pseudonym and sha256 only (module docstring)."""
    used = sources if mix is not None else [sources[job.condition]]
    fields = {"condition": [{"pseudonym": s.pseudonym, "sha256": s.sha256} for s in used]}
    return fields | ({"mix": mix[job.condition]} if mix is not None else {})


def key_rows(sources: list) -> list:
    return [(s.pseudonym, s.path) for s in sources]


def grid(out: Path, jobs: list, sources: list, mix: list | None, n: int) -> Image.Image:
    """Each row: the source, then its variations; with --mix: a, each fraction, b. Sources labelled by pseudonym."""
    size = Image.open(out / jobs[0].file).size
    shown = [s.image.resize(size, Image.Resampling.LANCZOS) for s in sources]
    cells, labels = [], []
    if mix is None:
        for s, source in enumerate(sources):
            row = jobs[s * n:(s + 1) * n]
            cells += [shown[s], *[out / j.file for j in row]]
            labels += [source.pseudonym, *[f"seed {j.seed}" for j in row]]
        header = ["each row: the case (by pseudonym), then its variations"]
        return contact_sheet(cells, n + 1, labels, header)
    for r in range(n):
        row = jobs[r * len(mix):(r + 1) * len(mix)]
        cells += [shown[0], *[out / j.file for j in row], shown[1]]
        labels += ["a", *[f"r={mix[j.condition]:g} seed {j.seed}" for j in row], "b"]
    header = [f"a: {sources[0].pseudonym}", f"b: {sources[1].pseudonym}",
              "each image: the lerp of a's and b's global tokens at r (0: a, 1: b)"]
    return contact_sheet(cells, len(mix) + 2, labels, header)
