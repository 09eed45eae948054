"""A line plot with PIL alone (the run-time dependencies stay six: no matplotlib): the training loss curve, and
the validation loss at each save as a second series.

The plot is meant to be read without the log beside it, so it has what a reader expects of a chart: a title,
both axes with round-numbered ticks, axis labels, and the smoothing it applies stated in the title (or that there
is none), and a marker at every point where there are few enough to tell apart. The same caption is stored in the
PNG's "Description" text chunk, so a script can read what was plotted. Text is drawn by medti.files.lettering.
"""
import io
import math

import numpy as np
from PIL import Image, ImageDraw, PngImagePlugin

from . import lettering
from .atomic import write_atomic

INK, GRID, LINE, VALIDATION = (0, 0, 0), (225, 225, 225), (20, 40, 140), (200, 60, 20)
# Margins in pixels: tick labels and the rotated y label on the left, tick labels and the x label below.
LEFT, RIGHT, TOP, BOTTOM = 76, 16, 32, 48
KEY = 20   # the colour key's line, between the caption and the frame, when there is a second series
ROW = 15   # the height of a row of tick labels (13-px text and a gap)
MARKERS_MAX = 50   # a series of at most this many points gets a dot at each: 10+ px apart on a 640-px plot


def smoothing_window(n: int) -> int:
    """Points per moving-average window: ~2 % of the series, so that 50,000 steps of a noisy diffusion loss
    (each step sees one random timestep) become a readable trend while a 100-step demo stays unsmoothed."""
    return max(1, n // 50)


def nice_ticks(low: float, high: float, most: int = 6) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) inside [low, high], at most `most` of them."""
    if not high > low:
        return [low]
    raw = (high - low) / max(1, most - 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step) * step
    return [round(first + i * step, 12) for i in range(int((high - first) / step + 1e-9) + 1)]


def smoothing(window: int) -> str:
    """What the plotted line is, in words: "moving average over 20 steps", or "per step" where nothing is averaged."""
    return f"moving average over {window} steps" if window > 1 else "per step"


def text(draw: ImageDraw.ImageDraw, xy: tuple, words: str):
    lettering.draw(draw, xy, words, lettering.font(), INK)


def text_width(words: str) -> float:
    return lettering.width(words, lettering.font())


def vertical_text(image: Image.Image, words: str, x: int, y_centre: int):
    """Paste `words` rotated by 90 degrees (reading bottom to top), centred on y_centre: PIL draws only level text."""
    label = Image.new("RGB", (math.ceil(text_width(words)), lettering.height(lettering.font())), "white")
    text(ImageDraw.Draw(label), (0, 0), words)
    label = label.rotate(90, expand=True)
    image.paste(label, (x, y_centre - label.height // 2))


def label_rows(lefts: list, widths: list, space: float = 6) -> list:
    """The row (0, 1, ...) of each label under the axis: the first row where it keeps `space` pixels clear of the
    label before it in that row, so that long category names (a box plot's settings) never overprint each other."""
    ends, rows = [], [0] * len(lefts)
    for i in sorted(range(len(lefts)), key=lambda i: lefts[i]):
        row = next((r for r, end in enumerate(ends) if lefts[i] >= end + space), len(ends))
        if row == len(ends):
            ends.append(0.0)
        ends[row], rows[i] = lefts[i] + widths[i], row
    return rows


def axes(draw: ImageDraw.ImageDraw, box: tuple, xs: tuple, ys: tuple, x_labels: list | None = None):
    """Frame, grid lines, ticks and tick labels; returns the data -> pixel mapping. xs, ys: (low, high).
    `x_labels`: [(x, label)] category ticks instead of numbered ones (label_rows keeps them apart)."""
    left, top, right, bottom = box

    def to_pixel(x, y):
        return (left + (right - left) * (x - xs[0]) / (xs[1] - xs[0]),
                bottom - (bottom - top) * (y - ys[0]) / (ys[1] - ys[0]))

    for value in nice_ticks(*ys):
        _, py = to_pixel(xs[0], value)
        draw.line((left, py, right, py), fill=GRID)
        draw.line((left - 4, py, left, py), fill=INK)
        label = f"{value:.4g}"
        text(draw, (left - 6 - text_width(label), py - 8), label)
    if x_labels is None:
        x_labels = [(v, f"{v:,.0f}" if float(v).is_integer() else f"{v:g}") for v in nice_ticks(*xs)]
    starts = [to_pixel(v, ys[0])[0] - text_width(label) / 2 for v, label in x_labels]
    rows = label_rows(starts, [text_width(label) for _, label in x_labels])
    for (value, label), start, row in zip(x_labels, starts, rows, strict=True):
        px, _ = to_pixel(value, ys[0])
        draw.line((px, bottom, px, bottom + 4), fill=INK)
        text(draw, (start, bottom + 6 + ROW * row), label)
    draw.rectangle(box, outline=INK)
    return to_pixel


def _finite(steps: list, values: list) -> list:
    """(step, value) pairs with None and non-finite values (skipped steps, a NaN validation) left out."""
    return [(s, v) for s, v in zip(steps, values, strict=True) if v is not None and math.isfinite(v)]


def _key(draw: ImageDraw.ImageDraw, x: int, y: int, entries: list):
    """A colour key on one line from (x, y), above the frame where it hides no data: (label, colour, dots)."""
    for label, colour, dots in entries:
        draw.line((x, y + 8, x + 18, y + 8), fill=colour, width=2)
        if dots:
            draw.ellipse((x + 7, y + 6, x + 11, y + 10), fill=colour)
        text(draw, (x + 24, y), label)
        x += 24 + text_width(label) + 20


def _draw_series(draw: ImageDraw.ImageDraw, points: list, colour: tuple, dots: bool):
    """A polyline through the pixel points, with a dot at each one if `dots` or if there are few enough to tell
    apart (MARKERS_MAX): a line through three points hides that there are only three."""
    if len(points) > 1:
        draw.line(points, fill=colour, width=2)
    for px, py in points if dots or len(points) <= MARKERS_MAX else []:
        draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colour)


def plot_curve(steps: list, values: list, path, title: str, x_label: str = "step", y_label: str = "loss",
               size: tuple = (640, 360), validation: list = ()) -> str:
    """Plot the moving average of `values` against `steps` (None or non-finite values, e.g. skipped steps, are
    left out) and write it atomically as a PNG. `validation`: (step, value) pairs drawn unsmoothed, with a dot
    each, as a second series on the same axes, with a key. Returns the caption written above the plot."""
    pairs, val = _finite(steps, values), _finite([s for s, _ in validation], [v for _, v in validation])
    window = smoothing_window(len(pairs))
    caption = f"{title} ({smoothing(window)})"
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    text(draw, (LEFT, 8), caption)
    box = (LEFT, TOP + KEY * bool(validation), size[0] - RIGHT, size[1] - BOTTOM)   # a key needs a line more
    # "valid" convolution: point i averages values i .. i + window - 1 and is drawn at the window's last step
    smooth = np.convolve([v for _, v in pairs], np.ones(window) / window, mode="valid") if pairs else np.zeros(0)
    x = np.array([s for s, _ in pairs], dtype=float)[window - 1:]
    every = [*zip(x, smooth, strict=True), *val]
    if every:
        low, high = min(v for _, v in every), max(v for _, v in every)
        pad = (high - low) * 0.05 or abs(low) * 0.05 or 1.0   # a flat curve still gets a visible y range
        first, last = min(s for s, _ in every), max(s for s, _ in every)
        to_pixel = axes(draw, box, (first, last) if last > first else (first - 1, first + 1), (low - pad, high + pad))
        _draw_series(draw, [to_pixel(a, b) for a, b in zip(x, smooth, strict=True)], LINE, dots=False)
        if validation:
            _draw_series(draw, [to_pixel(a, b) for a, b in val], VALIDATION, dots=True)
            _key(draw, LEFT, TOP - 4, [(f"training loss, {smoothing(window)}", LINE, False),
                                       ("validation loss at each save", VALIDATION, True)])
    else:
        draw.rectangle(box, outline=INK)
        text(draw, (box[0] + 10, box[1] + 10), "no finite values yet")
    text(draw, ((box[0] + box[2] - text_width(x_label)) / 2, size[1] - 20), x_label)
    vertical_text(image, y_label, 4, (box[1] + box[3]) // 2)
    _write(image, path, title, caption + (f"; validation loss at {len(val)} save(s), unsmoothed" * bool(validation)))
    return caption


def _write(image: Image.Image, path, title: str, description: str):
    """Write the PNG atomically, with the title and what was plotted in its text chunks."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Title", title)
    info.add_text("Description", description)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    write_atomic(path, buffer.getvalue())
