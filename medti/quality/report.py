"""What `python -m medti.evaluate` leaves in --out: report.json (every figure, for scripts), report.md (a table a
person reads, with what each figure means and which to trust), samples.png (real and synthetic images side by
side) and nearest.png (how far each synthetic image lies from its nearest real one, against how far real images
lie from each other). Every file is written atomically."""
import io
import json

import numpy as np
import torch
from PIL import Image, ImageDraw, PngImagePlugin

from ..files.atomic import text_bytes, write_atomic
from ..files.images import contact_sheet, save_png
from ..files.plots import INK, axes, vertical_text
from .features import provenance
from .folders import ImageSet, shared_skipped
from .metrics import nearest_real

SAMPLES = 8          # images per row of samples.png
THUMB = 128          # their side in pixels: enough to judge texture, small enough for a report
BASELINE = "real to nearest, other patient"
PRDC_ROWS = (("precision", "share of synthetic images strictly inside some real image's ball"),
             ("recall", "share of real images strictly inside some synthetic image's ball"),
             ("density", "real balls around each synthetic image, over k; 1 for a set like the real one"),
             ("coverage", "share of real images whose own ball holds a synthetic image (mode coverage)"))
COLOURS = {"synthetic to nearest real": (200, 40, 40), BASELINE: (20, 40, 140)}


def _thumbs(images: list, seed: int) -> list:
    """Up to SAMPLES images drawn from the seed (not the first files: those are often one patient's)."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:SAMPLES].tolist()
    out = []
    for i in sorted(order):
        image = Image.fromarray(images[i].permute(1, 2, 0).numpy())
        image.thumbnail((THUMB, THUMB), Image.LANCZOS)   # keeps the aspect; then centred on a black square
        square = Image.new("RGB", (THUMB, THUMB))
        square.paste(image, ((THUMB - image.width) // 2, (THUMB - image.height) // 2))
        out.append(square)
    return out


def samples_sheet(real_set: ImageSet | None, fake_set: ImageSet, seed: int) -> Image.Image:
    """Row 1: real images (when the real set was given as images), row 2: synthetic ones, each labelled."""
    rows = [("real", _thumbs(real_set.images, seed))] if real_set is not None else []
    rows.append(("synthetic", _thumbs(fake_set.images, seed)))
    columns = max(len(images) for _, images in rows)
    items, labels = [], []
    for name, images in rows:
        padding = [None] * (columns - len(images))   # an empty slot, drawn as every sheet draws one
        items += images + padding
        labels += [name] * len(images) + [""] * len(padding)
    return contact_sheet(items, columns, labels)


def histogram(series: dict, path, title: str, size=(640, 360)):
    """Outlined histograms (fraction of each series per bin, one shared set of 30 bins) of several series."""
    values = np.concatenate([v for v in series.values()])
    # from 0: a copy lies at (or near) distance 0, and the reader must see where 0 is to judge the left tail
    low, high = 0.0, float(values.max())
    high = high if high > low else 1.0
    edges = np.linspace(low, high, 31)
    fractions = {name: np.histogram(v, bins=edges)[0] / len(v) for name, v in series.items()}
    top = max(float(f.max()) for f in fractions.values()) * 1.1
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((72, 8), title, fill=INK)
    to_pixel = axes(draw, (72, 28, size[0] - 16, size[1] - 44), (low, high), (0.0, top))
    for row, (name, fraction) in enumerate(fractions.items()):
        points = []
        for left, right, f in zip(edges[:-1], edges[1:], fraction, strict=True):
            points += [to_pixel(left, f), to_pixel(right, f)]
        points = [to_pixel(low, 0.0), *points, to_pixel(high, 0.0)]
        draw.line(points, fill=COLOURS[name], width=2)
        draw.text((size[0] - 220, 36 + 14 * row), name, fill=COLOURS[name])
    draw.text((size[0] // 2 - 90, size[1] - 16), "feature distance to the nearest real image", fill=INK)
    vertical_text(image, "fraction of images", 4, size[1] // 2)
    info = PngImagePlugin.PngInfo()
    info.add_text("Title", title)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    write_atomic(path, buffer.getvalue())


def _value(x, digits: int) -> str:
    return "not computed" if x is None else f"{x:.{digits}f}"


def real_baseline(real, real_set: ImageSet | None) -> tuple[dict, str]:
    """({BASELINE: each real image's distance to its nearest real image of another patient}, what it is, for
    report.md). Why not just the nearest other image: a scan's adjacent slices (two views of a chest) are
    near-copies, and would put the baseline near zero, where copies lie. A statistics file holds no patients: each
    image is left out alone. One patient: no baseline, said instead."""
    if real_set is None:
        groups, what = torch.arange(len(real.names)), "the nearest other real image (the statistics file names " \
            "no patients, so images of one patient may be each other's nearest)"
    else:
        number = {p: i for i, p in enumerate(dict.fromkeys(real_set.patients))}
        if len(number) < 2:
            return {}, f"no real-to-real baseline: all {len(real_set.names)} real images are of one patient"
        groups = torch.tensor([number[p] for p in real_set.patients])
        what = f"the nearest real image of another patient ({len(number)} patients)"
    distances = nearest_real(real.features, real.features, groups=groups)[0].numpy()
    return {BASELINE: distances}, f"against each real image's distance to {what}"


def side_by_side(fig: dict) -> list:
    """report.md's table of every feature network (--features with several kinds): the same figures per network.
    Figures of different networks are not comparable with each other, only each with its own published ones."""
    if len(fig.get("by_features", {})) < 2:
        return []
    lines = ["| features | FID | KID | precision | recall | PRDC precision | recall | density | coverage | weights |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for f in fig["by_features"].values():
        p = {k: _value(v, 3) for k, v in f["prdc"].items() if k != "why"}
        lines.append(f"| {f['features']} | {f['fid']:.2f} | {f['kid']:.5f} | {f['precision']:.3f} | "
                     f"{f['recall']:.3f} | {p['precision']} | {p['recall']} | {p['density']} | "
                     f"{p['coverage']} | sha256 {f['weights_sha256'][:12]}…, {provenance(f['weights_official'])} |")
    return ["Side by side (each network's figures compare only with figures of the same network and weights):", "",
            *lines, ""]


def markdown(fig: dict, args, sets: tuple, with_real: bool, baseline: str = "against real-to-real distances") -> str:
    """report.md: the table, then what to trust and where the weights came from. `sets`: what the synthetic and the
    real set are called (their folder's name; size and fingerprint)."""
    fake, real = sets
    d = fig["ms_ssim_pairs"]
    rows = [
        ("FID", _value(fig["fid"], 2), "distance between Gaussians fitted to the two feature sets; lower is closer"),
        ("KID, full sets", _value(fig["kid"], 5), "unbiased kernel distance (MMD², cubic kernel); lower is closer"),
        ("KID, subsets", f"{_value(fig['kid_mean'], 5)} ± {_value(fig['kid_std'], 5)}",
         f"mean ± std over {fig['kid_subsets']} subsets of {fig['kid_subset_size']} images per set"),
        ("precision", _value(fig["precision"], 3), f"share of synthetic images inside the real set's k={fig['k']} "
         "neighbourhoods (fidelity)"),
        ("recall", _value(fig["recall"], 3), "share of real images inside the synthetic set's neighbourhoods "
         "(coverage)"),
        *[(f"PRDC {name}", _value(fig["prdc"][name], 3), f"{what} (Naeem et al. 2020, k={fig['prdc']['k']})")
          for name, what in PRDC_ROWS],
        ("MS-SSIM, synthetic", _value(fig["ms_ssim_fake"], 4), f"mean over {d['fake']} pairs within the synthetic "
         "set; higher = less diverse" if d["fake"] else "see the note below"),
        ("MS-SSIM, real", _value(fig["ms_ssim_real"], 4), f"the same within the real set ({d['real']} pairs), "
         "for comparison" if d["real"] else "see the note below"),
    ]
    official = provenance(fig["weights_official"])
    lines = [f"# Evaluation of {fake} against {real}", "",
             f"{fig['n_fake']} synthetic and {fig['n_real']} real images; features: {fig['features']} "
             f"(weights sha256 {fig['weights_sha256'][:16]}…, {official}); seed {fig['seed']}.", "",
             "| figure | value | what it measures |", "|---|---|---|",
             *[f"| {a} | {b} | {c} |" for a, b, c in rows], "", *side_by_side(fig),
             "**Which figure to trust.** "
             + ("With fewer than 1,000 real images, trust KID over FID. " if fig["n_real"] < 1000 else "")
             + "FID's covariance has 2,048 dimensions and is biased by the number of images (it falls as sets "
             "grow, even for the same model), so FID figures are only comparable at equal set sizes; KID is "
             "unbiased in the number of images and its subset spread says how far to trust it.", "",
             *[f"MS-SSIM {why}." for why in fig["ms_ssim_notes"]],
             *([f"PRDC {fig['prdc']['why']}.", ""] if "why" in fig["prdc"] else [""]),
             f"Plots: `samples.png` ({'real and synthetic' if with_real else 'synthetic'} images drawn from the "
             "seed), `nearest.png` (distance of each synthetic image to its nearest real one, "
             f"{baseline}; synthetic images far to the left of the real-to-real distances may be copies: run "
             "`python -m medti.audit`)."]
    return "\n".join(lines) + "\n"


def write_report(out, fig: dict, args, real, fake: torch.Tensor, real_set, fake_set):
    """All four outputs; report.json last, so its presence means the rest is there too."""
    save_png(out / "samples.png", samples_sheet(real_set, fake_set, args.seed))
    others, baseline = real_baseline(real, real_set)
    series = {"synthetic to nearest real": nearest_real(real.features, fake)[0].numpy(), **others}
    histogram(series, out / "nearest.png", f"Nearest-neighbour distances in {fig['features']} feature space")
    sets = (fake_set.root.name, real.about)
    write_atomic(out / "report.md", text_bytes(markdown(fig, args, sets, real_set is not None, baseline)))
    skipped = {"real": shared_skipped(real_set.skipped if real_set else []),
               "fake": [list(s) for s in fake_set.skipped]}
    patients = len(set(real_set.patients)) if real_set else None   # a count only: no patient is named
    # the sets by size and fingerprint (real) and folder name (synthetic): no path (medti.files.pseudonyms)
    report = {**fig, "real": real.about, "fake": fake_set.root.name, "n_real_patients": patients,
              "skipped": skipped}
    write_atomic(out / "report.json", (json.dumps(report, indent=2, allow_nan=False) + "\n").encode())
