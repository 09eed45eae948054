"""What a utility run writes: report.md (the papers' table: settings x regimes), the box plot of AUC gain over
real-only, and the JSON files. Every file is written atomically (medti.files.atomic)."""
import io
import json

import numpy as np
from PIL import Image, ImageDraw, PngImagePlugin

from ..files import plots
from ..files.atomic import text_bytes, write_atomic
from .summary import ALPHA

BOX = (20, 90, 160)


def _figure(c: dict) -> str:
    m = c["macro"]
    p = f", p {m['p_vs_real']:.3g}" if "p_vs_real" in m else ""
    return f"{m['auc_mean']:.3f} ± {m['auc_sd']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]{p}"


def _table(names: list, regimes: list, cells: dict, pick, best=None) -> list:
    lines = ["| setting | " + " | ".join(f"{r} real" for r in regimes) + " |",
             "|---|" + "---|" * len(regimes)]
    for s in names:
        row = [pick(cells[s][r]) + (" **(best)**" if best == (s, r) else "") for r in regimes]
        lines.append(f"| {s} | " + " | ".join(row) + " |")
    return lines


def report_md(report: dict) -> str:
    """The table of macro AUC, then one per label, with how to read them."""
    t, names, regimes = report["table"], report["settings"], report["regimes"]
    best = t["best_significant_gain"]
    best = (best["setting"], best["regime"]) if best else None
    how = "linear probe" if report["classifier"] == "linear" else "each network fine-tuned"
    lines = [f"# Does synthetic data help? ({report['features']}, {how}, {report['folds']} folds)", "",
             "Each cell: test AUC mean ± SD over folds [95 % interval by bootstrap over test patients], p against "
             f"real-only in the same column (p < {ALPHA} is significant). **(best)**: the largest significant gain "
             "over real-only." + ("" if best else " No setting gains significantly over real-only."), "",
             "## Macro over labels", ""]
    lines += _table(names, regimes, t["cells"], _figure, best)
    for label in report["labels"]:
        lines += ["", f"## {label}", ""]
        lines += _table(names, regimes, t["cells"], lambda c, lab=label: _figure({"macro": c["labels"][lab]}))
    lines += ["", f"Images: {report['counts']}. Split: split.json. Figure: gain.png.", ""]
    return "\n".join(lines)


def _boxes(draw, to_pixel, x: float, values: list, half: float):
    """One box: quartiles (numpy's linear interpolation), median line, whiskers to the extremes, a dot per fold."""
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    (left, top), (right, bottom) = to_pixel(x - half, q3), to_pixel(x + half, q1)
    draw.rectangle((left, top, right, bottom), outline=BOX, width=2)
    (_, mid), (centre, low), (_, high) = to_pixel(x, median), to_pixel(x, min(values)), to_pixel(x, max(values))
    draw.line((left, mid, right, mid), fill=BOX, width=2)
    draw.line((centre, low, centre, bottom), fill=BOX)
    draw.line((centre, top, centre, high), fill=BOX)
    for v in values:
        px, py = to_pixel(x, v)
        draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=plots.INK)


def gain_plot(report: dict, path) -> str:
    """Box plot of each fold's macro AUC gain over real-only: one group per regime, one box per other setting."""
    names, regimes, cells = report["settings"][1:], report["regimes"], report["table"]["cells"]
    size = (max(640, 90 * len(regimes) * max(1, len(names))), 400)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    title = "AUC gain over real-only per fold (macro), by real images and setting"
    plots.text(draw, (plots.LEFT, 8), title)
    values = [v for s in names for r in regimes for v in cells[s][r]["fold_gain"]] or [0.0]
    low, high = min(values + [0.0]), max(values + [0.0])
    pad = (high - low) * 0.08 or 0.01
    width = max(1, len(names))
    box = (plots.LEFT, plots.TOP, size[0] - plots.RIGHT, size[1] - plots.BOTTOM - 40)
    ticks = [(g * (width + 1) + i, s) for g in range(len(regimes)) for i, s in enumerate(names)]
    to_pixel = plots.axes(draw, box, (-0.5, len(regimes) * (width + 1) - 1.5), (low - pad, high + pad), ticks)
    draw.line((*to_pixel(-0.5, 0.0), *to_pixel(len(regimes) * (width + 1) - 1.5, 0.0)), fill=plots.INK)
    for g, r in enumerate(regimes):
        for i, s in enumerate(names):
            _boxes(draw, to_pixel, g * (width + 1) + i, cells[s][r]["fold_gain"], 0.35)
        px, _ = to_pixel(g * (width + 1) + (width - 1) / 2, 0)
        plots.text(draw, (px - plots.text_width(f"{r} real") / 2, size[1] - 20), f"{r} real")
    plots.vertical_text(image, "AUC gain", 4, (box[1] + box[3]) // 2)
    info = PngImagePlugin.PngInfo()
    info.add_text("Title", title)
    info.add_text("Description", f"{title}; box: quartiles, whiskers: extremes, dots: folds")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    write_atomic(path, buffer.getvalue())
    return title


def write_json(path, data: dict):
    write_atomic(path, text_bytes(json.dumps(data, indent=1, sort_keys=True) + "\n"))
