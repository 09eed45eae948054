"""What a user sees and gets: masks drawn in an alpha channel, --paste-back, labelled grids, and the progress
lines with an ETA and a summary (with "[rank r]" only under torchrun)."""
import io

import numpy as np
import torch
from PIL import Image, ImageFilter
from test_generate import generate, model_files  # noqa: F401 (the fixture is used by name)

from medti.files.images import contact_sheet, load_mask
from medti.generation.progress import Progress


def test_mask_drawn_in_alpha_uses_alpha(tmp_path):
    """A brush stroke on a transparent layer: RGB is white everywhere (as many editors store transparent
    pixels), alpha 255 only under the stroke. The stroke is the mask, not the whole (white) image."""
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[16:32, 8:40, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    mask = load_mask(tmp_path / "alpha.png", 64, 64)
    assert torch.equal(mask[0, 0], torch.from_numpy(rgba[..., 3] == 255).float())
    opaque = rgba.copy()   # opaque everywhere: read by its gray values as before (black = keep, white = repaint)
    opaque[..., 3], opaque[..., :3] = 255, 0
    opaque[40:, :, :3] = 255
    Image.fromarray(opaque, "RGBA").save(tmp_path / "opaque.png")
    assert load_mask(tmp_path / "opaque.png", 64, 64)[0, 0, 40:].all()
    assert not load_mask(tmp_path / "opaque.png", 64, 64)[0, 0, :40].any()


def test_paste_back_keeps_the_init_pixels_outside_the_mask(model_files, tmp_path, capsys):  # noqa: F811
    """After decoding, outside the blurred mask the PNG holds the init image's pixels exactly (8-bit values go
    to [-1, 1] and back without loss: v/127.5 - 1 -> round((x/2 + 0.5) * 255) = v); without --paste-back the
    VAE round trip changes them (diffusers' behaviour, the default)."""
    init = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    Image.fromarray(init).save(tmp_path / "init.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 8:20] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    common = ["--prompt", "x", "--size", "32", "--steps", "1", "--init-image", str(tmp_path / "init.png"),
              "--mask", str(tmp_path / "mask.png"), "--mask-blur", "2"]
    assert generate(model_files, tmp_path / "pasted", *common, "--paste-back") == 0
    assert generate(model_files, tmp_path / "plain", *common) == 0
    pasted = np.asarray(Image.open(tmp_path / "pasted" / "00000.png"))
    plain = np.asarray(Image.open(tmp_path / "plain" / "00000.png"))
    blurred = np.asarray(Image.fromarray(mask).filter(ImageFilter.GaussianBlur(2)))   # what images.soft_mask makes
    outside, inside = blurred == 0, blurred == 255
    assert outside.sum() > 500 and np.array_equal(pasted[outside], init[outside])
    assert not np.array_equal(plain[outside], init[outside])
    assert inside.any() and np.array_equal(pasted[inside], plain[inside])   # soft mask 1: the decoded pixels
    assert "Paste back: True" in Image.open(tmp_path / "pasted" / "00000.png").text["parameters"]


def test_sweep_grid_labels_each_cell_and_names_a_and_b(model_files, tmp_path):  # noqa: F811
    """Each cell of grid.png carries its seed and weight in its top-left corner; the rest of it is the image.
    Above the cells a band says which prompt is A and which B: swapping them changes the band and nothing else.
    (64 px, the tiny model's native size: "seed 1, w 1" does not fit across 32 px.)"""
    grids = {}
    for a, b in (("a", "b"), ("b", "a")):
        assert generate(model_files, tmp_path / a, "--sweep", a, b, "--weights", "0,1", "--n", "2", "--steps", "1",
                        "--grid") == 0
        grids[a] = np.asarray(Image.open(tmp_path / a / "grid.png"))
    grid = grids["a"]
    plain = np.asarray(contact_sheet([tmp_path / "a" / f"{i:05d}.png" for i in range(4)], 2))
    band = grid.shape[0] - plain.shape[0]
    assert plain.shape == (128, 128, 3) and grid.shape[1:] == plain.shape[1:] and band > 0
    assert grid[:band].max() > 200 and grids["b"][:band].max() > 200     # light text on the black band
    assert not np.array_equal(grid[:band], grids["b"][:band])            # it names the prompts, in order
    cells = [(r, c) for r in range(2) for c in range(2)]
    for r, c in cells:
        cell = grid[band + r * 64:band + (r + 1) * 64, c * 64:(c + 1) * 64]
        ref = plain[r * 64:(r + 1) * 64, c * 64:(c + 1) * 64]
        assert not np.array_equal(cell[:10], ref[:10]) and np.array_equal(cell[20:], ref[20:])   # label box on top
    boxes = [grid[band + r * 64:band + r * 64 + 10, c * 64:c * 64 + 64] for r, c in cells]
    assert len({box.tobytes() for box in boxes}) == 4   # four different labels: "seed 0, w 0" ... "seed 1, w 1"


class Stream(io.StringIO):
    def isatty(self):
        return False


def test_progress_lines_eta_summary_and_rank_prefix(model_files, tmp_path, capsys, monkeypatch):  # noqa: F811
    assert generate(model_files, tmp_path / "o", "--prompt", "x", "--size", "32", "--steps", "2", "--n", "2") == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert any("image 1/2: step 2/2" in line and "ETA" in line for line in lines), lines
    assert lines[-1].startswith("made 2 image(s) in ") and "[rank" not in "".join(lines)
    for world, prefix in ((1, ""), (2, "[rank 1] ")):   # the prefix only where processes share one stderr
        stream = Stream()
        progress = Progress(4, rank=1, world=world, stream=stream)
        progress.begin(2)
        progress.step(3, 3)
        progress.end_batch()
        progress.summary("out", skipped=1)
        first, last = stream.getvalue().splitlines()
        assert first.startswith(f"{prefix}image 1-2/4: step 3/3") and "ETA" in first
        assert last.startswith(f"{prefix}made 2 image(s)") and "1 already there" in last
