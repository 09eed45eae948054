"""loss.png is a chart a reader can read alone: axes with round ticks, axis labels, and the smoothing it applies,
drawn with PIL only (no matplotlib among the run-time dependencies); words set apart, a marker at each of a few
points."""
import itertools
import math

import numpy as np
import pytest
from PIL import Image, ImageDraw

from medti.files import lettering
from medti.files.plots import BOTTOM, LEFT, LINE, RIGHT, TOP, nice_ticks, plot_curve, smoothing_window


@pytest.mark.parametrize("low,high,expected", [
    (0.0, 1.0, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]),
    (1, 300, [100, 200, 300]),
    (0.0312, 0.0377, [0.032, 0.034, 0.036]),
    (-0.5, 2.5, [0.0, 1.0, 2.0]),
    (5, 5, [5]),
])
def test_ticks_are_round_and_inside_the_range(low, high, expected):
    assert nice_ticks(low, high) == pytest.approx(expected, abs=1e-12)   # abs: only float rounding of i * step


def test_plot_has_axes_ticks_labels_and_states_its_window(tmp_path):
    steps = list(range(1, 501))
    values = [1 / (1 + s / 100) for s in steps]
    values[10] = math.nan   # a skipped step: left out, not plotted as a gap or a spike
    values[11] = None
    caption = plot_curve(steps, values, tmp_path / "loss.png", "<t>: training loss over 500 steps")
    assert smoothing_window(498) == 9 and caption.endswith("(moving average over 9 steps)")
    image = Image.open(tmp_path / "loss.png")
    assert image.text["Description"] == caption and image.text["Title"].startswith("<t>: training loss")
    ink = np.asarray(image.convert("L")) < 128   # [H, W]: dark pixels
    height, width = ink.shape
    bottom = height - BOTTOM
    assert ink[TOP:bottom, LEFT].all() and ink[bottom, LEFT:width - 20].all()   # the y and x axes
    assert ink[TOP:bottom, :LEFT - 8].sum() > 100      # y tick labels and the rotated "loss" left of the axis
    assert ink[bottom + 6:bottom + 18, LEFT:].sum() > 100   # x tick labels under the axis
    assert ink[height - 16:, LEFT:].sum() > 20        # the x label "step"
    assert not list(tmp_path.glob(".*"))               # written atomically: no temporary file left


def test_plot_of_nothing_finite_still_writes_a_labelled_frame(tmp_path):
    caption = plot_curve([1, 2], [math.nan, None], tmp_path / "loss.png", "empty")
    assert caption == "empty (per step)" and Image.open(tmp_path / "loss.png").size == (640, 360)


def blank_runs(ink_columns) -> list:
    """Widths of the runs of columns without ink, between the first and the last inked column."""
    return [len(list(run)) for inked, run in itertools.groupby(ink_columns) if not inked][1:-1] if \
        ink_columns.any() else []


def test_caption_words_are_set_apart(tmp_path):
    """Drawn with the bundled font's own 2-3 px space, "loss over" read "lossover" and "KID of" "KIDof". Here the
    widest gap between two letters of any word (each word drawn alone by PIL, in the plot's font) is measured;
    the caption's blank gaps wider than that must be exactly its spaces."""
    title = "KID of 4 images per saved step: training loss over 5 steps"
    caption = plot_curve([1, 2, 3, 4, 5], [1, .8, .9, .7, .6], tmp_path / "p.png", title)
    face = lettering.font()
    widest = 0
    for word in caption.split():
        alone = Image.new("L", (int(face.getlength(word)) + 8, 40), 255)
        ImageDraw.Draw(alone).text((4, 4), word, font=face, fill=0)
        widest = max([widest, *blank_runs((np.asarray(alone) < 250).any(0))])
    row = np.asarray(Image.open(tmp_path / "p.png").convert("L"))[8:8 + lettering.height(face), LEFT - 4:]
    gaps = [g for g in blank_runs((row < 250).any(0)) if g > widest]
    assert len(gaps) == caption.count(" "), (caption, gaps, widest)


def test_a_few_points_have_markers_and_say_per_step(tmp_path):
    """kid.png of three saved steps: no "moving average over 1 step", and a dot at each point. At the middle step
    (the centre column of the frame) the line alone is ~3 px tall; a dot is 7 px."""
    caption = plot_curve([100, 200, 300], [0.02, 0.015, 0.012], tmp_path / "kid.png", "KID", y_label="KID")
    assert caption == "KID (per step)"
    image = np.asarray(Image.open(tmp_path / "kid.png").convert("RGB"))
    column = (image[:, (LEFT + image.shape[1] - RIGHT) // 2] == LINE).all(1)
    assert max(len(list(run)) for inked, run in itertools.groupby(column) if inked) >= 6
