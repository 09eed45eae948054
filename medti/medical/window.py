"""Gray-level windowing: modality values (CT in HU) -> 8-bit display values, by the DICOM VOI LUT functions
(PS3.3 C.11.2.1.2.1 LINEAR, the default and the one --window uses; C.11.2.1.3 VOI LUT Function (0028,1056): SIGMOID,
C.11.2.1.3.1, and LINEAR_EXACT, C.11.2.1.3.2, when a file names them), and the project's min-max rule when no window
is known. numpy only (and medti.files' rule for NaN): this module works without the medical extra."""
from dataclasses import dataclass

import numpy as np

from ..files.images import ImageError, finite
from . import MedicalError

FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")   # PS3.3 C.11.2.1.3: VOI LUT Function's defined terms


@dataclass(frozen=True)
class Window:
    center: float   # Window Center (0028,1050), in modality units (HU for CT)
    width: float    # Window Width (0028,1051); LINEAR requires >= 1 (PS3.3 C.11.2.1.2.1), the others > 0
    function: str = "LINEAR"   # VOI LUT Function (0028,1056); absent means LINEAR

    @property
    def valid(self) -> bool:
        """The width the function requires: >= 1 for LINEAR, > 0 for LINEAR_EXACT and SIGMOID (C.11.2.1.3)."""
        return self.width >= 1 if self.function == "LINEAR" else self.width > 0


@dataclass(frozen=True)
class PerFrame:
    """Each frame of an enhanced multi-frame file windowed by its own Frame VOI LUT (PS3.3 C.7.6.16.2.10: the window
    applies to its frame): the values carrying this are already on the 0..255 display scale, MONOCHROME1 inverted."""
    windows: tuple   # the distinct windows, in frame order


@dataclass(frozen=True)
class SeriesWindow(Window):
    """The one window of a series of single-frame files whose own windows differ (series_window): the median of
    theirs. An MR scanner sets each image's window from that image's content, so the first slice's (an edge slice,
    mostly noise) would clip the middle of the volume; the median follows the bulk of the slices and does not depend
    on which end the series starts from."""
    windows: int = 0   # how many distinct windows the slices carried


def series_window(windows) -> Window | None:
    """One scale for the slices of a series (a volume keeps one scale over all its slices): the window every slice
    that carries one agrees on; where they differ, a SeriesWindow of the median Window Center and the median Window
    Width over those slices, with the VOI LUT Function they share (LINEAR where they mix functions); None when no
    slice carries a window, or the median width is one its function forbids (then min-max over the series)."""
    found = [w for w in windows if w is not None]
    distinct = list(dict.fromkeys(found))
    if len(distinct) < 2:
        return distinct[0] if distinct else None
    functions = {w.function for w in found}
    median = SeriesWindow(float(np.median([w.center for w in found])), float(np.median([w.width for w in found])),
                          functions.pop() if len(functions) == 1 else "LINEAR", len(distinct))
    return median if median.valid else None


# Conventional CT windows in HU (center, width), the values radiology teaching uses (e.g. Radiopaedia, "Windowing
# (CT)"); sites and vendors vary by some tens of HU. They are a starting point to name, not a standard: the DICOM
# standard defines how a window maps values, never which window suits an organ.
PRESETS = {
    "lung": Window(-600, 1500),
    "mediastinum": Window(50, 350),
    "bone": Window(400, 1800),
    "brain": Window(40, 80),
    "abdomen": Window(50, 400),
    "liver": Window(30, 150),
    "soft_tissue": Window(50, 350),
}


def parse_window(spec: str, flag: str = "--window") -> Window:
    """"CENTER,WIDTH" in modality units ("40,400", "-600,1500") or a preset name from PRESETS.
    A center below zero must be glued to the flag (`--window=-600,1500`): argparse reads "-600,..." as a flag."""
    names = ", ".join(PRESETS)
    if spec.strip().lower() in PRESETS:
        return PRESETS[spec.strip().lower()]
    parts = spec.split(",")
    try:
        center, width = (float(p) for p in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        center = width = None
    if center is None or not np.isfinite([center, width]).all():
        raise MedicalError(f"{flag} {spec!r}: expected CENTER,WIDTH in modality units (HU for CT), e.g. 40,400, "
                           f"or one of {names}")
    if width < 1:
        # PS3.3 C.11.2.1.2.1: "Window Width (0028,1051) shall always be greater than or equal to 1" for LINEAR
        raise MedicalError(f"{flag} {spec!r}: the width must be at least 1 (DICOM PS3.3 C.11.2.1.2.1); "
                           f"or use one of {names}")
    return Window(center, width)


def voi_linear(x: np.ndarray, window: Window, ymin: float = 0.0, ymax: float = 255.0) -> np.ndarray:
    """The VOI LUT function LINEAR of PS3.3 C.11.2.1.2.1, element-wise, as float64:
        x <= c - 0.5 - (w-1)/2  -> ymin
        x >  c - 0.5 + (w-1)/2  -> ymax
        else                    -> ((x - (c - 0.5)) / (w-1) + 0.5) * (ymax - ymin) + ymin
    The -0.5 and w-1 make the window cover w discrete input values centred on c (the standard's own note)."""
    c, w = float(window.center), float(window.width)
    if not w >= 1:
        raise MedicalError(f"window width {w:g}: must be at least 1 (DICOM PS3.3 C.11.2.1.2.1)")
    x = np.asarray(x, dtype=np.float64)
    low, high = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
    # w == 1 makes the middle branch empty (low == high); max() only keeps numpy from dividing by zero there
    ramp = ((x - (c - 0.5)) / max(w - 1, 1e-12) + 0.5) * (ymax - ymin) + ymin
    return np.where(x <= low, ymin, np.where(x > high, ymax, ramp))


def voi_linear_exact(x: np.ndarray, window: Window, ymin: float = 0.0, ymax: float = 255.0) -> np.ndarray:
    """LINEAR_EXACT, PS3.3 C.11.2.1.3.2, element-wise, as float64: LINEAR without the half-value shift,
        x <= c - w/2  -> ymin;  x > c + w/2  -> ymax;  else ((x - c) / w + 0.5) * (ymax - ymin) + ymin"""
    c, w = float(window.center), float(window.width)
    x = np.asarray(x, dtype=np.float64)
    ramp = ((x - c) / w + 0.5) * (ymax - ymin) + ymin
    return np.where(x <= c - w / 2, ymin, np.where(x > c + w / 2, ymax, ramp))


def voi_sigmoid(x: np.ndarray, window: Window, ymin: float = 0.0, ymax: float = 255.0) -> np.ndarray:
    """SIGMOID, PS3.3 C.11.2.1.3.1, element-wise, as float64: y = (ymax - ymin) / (1 + exp(-4 (x - c) / w)) + ymin.
    exp overflows to inf far below the window, which gives ymin exactly: the warning is silenced, not the value."""
    c, w = float(window.center), float(window.width)
    with np.errstate(over="ignore"):
        return (ymax - ymin) / (1 + np.exp(-4 * (np.asarray(x, dtype=np.float64) - c) / w)) + ymin


def voi(x: np.ndarray, window: Window) -> np.ndarray:
    """The window's own VOI LUT function on the 0..255 scale; a width the function does not allow is one line."""
    if not window.valid:
        rule = "at least 1" if window.function == "LINEAR" else "above 0"
        raise MedicalError(f"window width {window.width:g}: must be {rule} for {window.function} (DICOM PS3.3 "
                           "C.11.2.1.2.1 and C.11.2.1.3)")
    return {"LINEAR": voi_linear, "LINEAR_EXACT": voi_linear_exact, "SIGMOID": voi_sigmoid}[window.function](x, window)


def finite_values(x, path) -> np.ndarray:
    """medti.files.images.finite, the one rule every reader follows (NaN and infinities -> the minimum of the finite
    values, float64), its refusal of an array without one finite value as a MedicalError naming `path`."""
    try:
        return finite(x)
    except ImageError as e:
        raise MedicalError(f"{path}: {e}") from None


def min_max(x: np.ndarray) -> np.ndarray:
    """The project's rule when no window is known (as medti.files.images.to_8bit): the array's own [min, max] ->
    [0, 255] linearly, float64; a constant array becomes 0 (black). Over the whole array given, so a volume keeps one
    scale."""
    x = np.asarray(x, dtype=np.float64)
    low, high = float(x.min()), float(x.max())
    return (x - low) * (255 / (high - low)) if high > low else np.zeros_like(x)


def described(given: Window | None, own: Window | None = None, otherwise: str = "min-max") -> str:
    """Which window scaled an image, for data.jsonl: `--window 40,400`, `the file's 40,400`, or `otherwise`."""
    if given is not None:
        return f"--window {given.center:g},{given.width:g}"
    if own is None:
        return otherwise
    if isinstance(own, SeriesWindow):
        return (f"the series' median {own.center:g},{own.width:g}" + (f" {own.function}" if own.function != "LINEAR"
                else "") + f" (of {own.windows} windows)")
    if isinstance(own, PerFrame):
        first, last = own.windows[0], own.windows[-1]
        return (f"each frame's own window ({len(own.windows)} windows, {first.center:g},{first.width:g} ... "
                f"{last.center:g},{last.width:g})")
    return f"the file's {own.center:g},{own.width:g}" + (f" {own.function}" if own.function != "LINEAR" else "")


def display_scale(pixels: np.ndarray, window: Window | None, photometric: str = "MONOCHROME2") -> np.ndarray:
    """Modality values -> display values on the 0..255 scale, float64, not yet rounded (volumes are resampled to
    square pixels before rounding): the window by its VOI LUT function if one is given, else min-max.
    MONOCHROME1 is inverted after windowing, on the output scale: PS3.3 C.7.6.3.1.2 says its minimum sample value
    "is intended to be displayed as white after any VOI gray scale transformations have been performed", so the
    window is applied to the stored sense of the values and only the displayed result is flipped (dense is then
    bright, as in MONOCHROME2, which is what the training images and the model expect)."""
    if isinstance(window, PerFrame):   # scaled frame by frame already (medti.medical.dicom_series.by_frame)
        return np.asarray(pixels, np.float64)
    y = min_max(pixels) if window is None else voi(pixels, window)
    return 255 - y if photometric == "MONOCHROME1" else y


def to_uint8(pixels: np.ndarray, window: Window | None, photometric: str = "MONOCHROME2") -> np.ndarray:
    """display_scale, rounded half up to uint8, as medti.files.images.to_8bit."""
    return np.floor(display_scale(pixels, window, photometric) + 0.5).astype(np.uint8)
