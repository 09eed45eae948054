"""loss.png is a chart a reader can read alone: axes with round ticks, axis labels, and the smoothing it applies,
drawn with PIL only (no matplotlib among the run-time dependencies). Issue 11, defect 10."""
import math

import numpy as np
import pytest
from PIL import Image

from medti.files.plots import BOTTOM, LEFT, TOP, nice_ticks, plot_curve, smoothing_window


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
    assert "moving average over 1 step" in caption and Image.open(tmp_path / "loss.png").size == (640, 360)
