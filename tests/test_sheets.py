"""Sheets and tables a reader looks at: an empty slot looks the same on every sheet and like no image (not a white
page), a label fits across its image, and steps.md marks its best row as the guide says."""
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from medti.files.images import contact_sheet, label
from medti.quality.report import THUMB, samples_sheet
from medti.quality.run_images import EMBEDDING, RunPlan
from medti.quality.run_scores import markdown


def thumbs(n: int, seed: int) -> SimpleNamespace:
    """An image set as medti.quality.folders gives one: uint8 [3, H, W] tensors."""
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(images=[torch.randint(0, 256, (3, 40, 40), generator=g, dtype=torch.uint8)
                                   for _ in range(n)])


def test_empty_slots_of_samples_png_are_the_sheets_empty_slot_not_white():
    """samples.png with 8 real and 3 synthetic images: the 5 empty slots of the synthetic row were white squares.
    Now they are what any sheet shows past its last image (a 3-image sheet of 2 columns has one such slot)."""
    sheet = np.asarray(samples_sheet(thumbs(8, 0), thumbs(3, 1), seed=0))
    assert sheet.shape == (2 * THUMB, 8 * THUMB, 3)
    trailing = np.asarray(contact_sheet([Image.new("RGB", (THUMB, THUMB), "red")] * 3, 2))[THUMB:, THUMB:]
    assert trailing.max() < 128 and len(np.unique(trailing)) > 1     # neither white nor a flat black image
    for column in range(3, 8):
        assert np.array_equal(sheet[THUMB:, column * THUMB:(column + 1) * THUMB], trailing), column


@pytest.mark.parametrize("size, text", [(64, "step 100, seed 0"), (512, "step 50,000, seed 3")])
def test_a_label_fits_across_its_image(size, text):
    """A preview strip's label at the demo's 64 px and at SD's 512 px: the black box (2 px beyond the text) ends
    before the image's last column, so the text is not cut by the image's edge."""
    labelled = np.asarray(label(Image.new("RGB", (size, size), (128, 128, 128)), text))
    box = (labelled[1] == 0).all(1)              # row 1, inside the box: black up to where the box ends
    assert box[0] and not box[-1]


def test_steps_md_marks_the_lowest_kid_row():
    """docs/evaluation.md: steps.md is "the table, lowest KID marked". Exactly one row is marked, the row of the
    lowest KID in the records (here the middle one)."""
    rows = [{"step": step, "kid": kid, "kid_mean": kid, "kid_std": 0.001, "fid": 10.0, "precision": 0.5,
             "recall": 0.5, "ms_ssim_fake": None, "val_loss": None} for step, kid in ((100, 0.03), (200, 0.01),
                                                                                     (300, 0.02))]
    args = SimpleNamespace(run="runs/x", real="data/x", n=4, seed=0, sampler="dpmpp_2m", steps=25,
                           plan=RunPlan(EMBEDDING))   # what check_run sets for a textual-inversion run
    net = SimpleNamespace(name="inception", weights_sha256="0" * 64, official=True)
    table = [line for line in markdown(rows, args, net, "120 real images").splitlines() if re.match(r"\| \**\d", line)]
    marked = [line for line in table if "lowest KID" in line]
    best = min(rows, key=lambda r: r["kid"])
    assert len(table) == 3 and len(marked) == 1 and marked[0].startswith(f"| **{best['step']}**")
