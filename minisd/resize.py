"""Bilinear resize as TensorFlow 1.x computes it, which the FID and FD-DINOv2 conventions are defined with.

Source of the facts: torch-fidelity's interpolate_compat_tensorflow.py (`interpolate_bilinear_2d_like_tensorflow1x`,
method "slow", align_corners=False), itself a port of TF 1.x's resize_bilinear_op.cc / image_resizer_state.h.
Inception-v3 for FID resizes to 299 with it; torch-fidelity's DINOv2 extractor resizes to 224 with it.

Why not `F.interpolate(mode="bilinear", align_corners=False)`: both map output pixel i to a source coordinate and
blend the two neighbouring input pixels, but they disagree on where the source coordinate is.
  - torch (and TF 2.x, "half-pixel centres"): src = (i + 0.5) * in / out - 0.5, clamped at 0.
  - TF 1.x, align_corners=False: src = i * in / out. Output pixel 0 sits exactly on input pixel 0 and the grid
    steps by in/out from there; past the last input pixel the right/bottom neighbour is clamped to the edge.
So TF1 samples shifted by (in/out - 1) / 2 input pixels towards the top-left, and the whole image drifts. The
Inception weights were trained, and FID was defined, on TF1's version, so FID needs this exact one. The difference
is not small: a bright disc on a grey gradient, 512 -> 299, differs by up to 105 grey levels at its edge (mean
0.3 over the image). Neither version low-pass filters on downscaling (no antialiasing): TF1 reads 2 of every
512/299 ~ 1.7 input pixels.

Bit-exactness: the reference computes the coordinate as arange(out) * float32(in / out) (a float32 product, not
float64), takes floor for the left/top pixel, and blends along the width first, then along the height, each as
`a + (b - a) * t`. We do the same operations in the same order, so float32 results are bit-identical to it.
"""
import torch


def _taps(in_size: int, out_size: int, dtype: torch.dtype, device) -> tuple:
    """For each output position along one axis: the lower input index, the upper one and the blend weight."""
    # Why float32 for the step: the reference rounds in/out to float32 before multiplying.
    step = torch.tensor(in_size / out_size, dtype=torch.float32)
    coord = torch.arange(out_size, dtype=dtype, device=device) * step   # TF1: src = i * in / out (no half pixel)
    lower = coord.long()                                                 # coord >= 0, so truncation is floor
    upper = (lower + 1).clamp_max(in_size - 1)                           # the last pixel's right neighbour: itself
    return lower, upper, coord - lower.to(coord.dtype)


def resize_like_tf1(x: torch.Tensor, size) -> torch.Tensor:
    """Float images [N, C, H, W] -> [N, C, h, w] with TF 1.x's bilinear resize (align_corners=False).

    `size` is (h, w) or one int for a square. Any dtype of float; float32 results equal torch-fidelity's bit for
    bit. Same size in and out returns the input values unchanged (every coordinate is an integer)."""
    out_h, out_w = (size, size) if isinstance(size, int) else size
    top, bottom, dy = _taps(x.shape[2], out_h, x.dtype, x.device)
    left, right, dx = _taps(x.shape[3], out_w, x.dtype, x.device)
    # Along the width first, on the input rows: [N, C, H, W] -> [N, C, H, w]. Blending the rows before picking
    # them is the same arithmetic per element as the reference's pick-then-blend, on fewer rows when shrinking.
    x_left, x_right = x.index_select(3, left), x.index_select(3, right)
    rows = x_left + (x_right - x_left) * dx
    # Then along the height: [N, C, H, w] -> [N, C, h, w].
    x_top, x_bottom = rows.index_select(2, top), rows.index_select(2, bottom)
    return x_top + (x_bottom - x_top) * dy[:, None]
