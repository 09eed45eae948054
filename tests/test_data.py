"""medti.dataset: every preset's geometry against closed-form expectations, bit depths and modes, MRI channel
stacking, skipped/strict/no-usable reporting and the fingerprint, all on synthetic images made here."""
import hashlib
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from medti.dataset.folder import DataError, find_images, load_dataset
from medti.dataset.preprocess import PREPROCESS


def save(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(image) if isinstance(image, np.ndarray) else image).save(path)
    return path


def as_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, 3, R, R] in [-1, 1] -> [N, R, R, 3] uint8 (exact inverse of v / 127.5 - 1)."""
    return ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def one(folder, resolution, **kwargs) -> np.ndarray:
    data = load_dataset(folder, resolution, **kwargs)
    assert len(data.names) == 1, data.skipped
    return as_uint8(data.images)[0]


def test_find_images_recursive_sorted_hidden(tmp_path):
    for name in ["b.png", "A.PNG", "sub/c.JPG", "sub/deeper/d.Tiff", "e.bmp", "f.jpeg", "g.tif",
                 ".hidden.png", ".cache/x.png", "sub/._c.png"]:
        save(tmp_path / name, Image.new("L", (4, 4)))
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "scan.dcm").write_bytes(b"DICM")   # a (damaged) DICOM file: found, so that reading it reports it
    (tmp_path / "IM0001").write_bytes(bytes(128) + b"DICM")   # DICOM's preamble without an extension: found
    (tmp_path / "README").write_bytes(b"no preamble")
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == ["A.PNG", "IM0001", "b.png", "e.bmp", "f.jpeg", "g.tif", "scan.dcm", "sub/c.JPG",
                     "sub/deeper/d.Tiff"]
    with pytest.raises(DataError, match="not a folder"):
        find_images(tmp_path / "missing")


def test_center_keeps_the_middle(tmp_path):
    # 2:1 image whose every column differs: the 64 x 64 centre crop is kept as it is (no resampling needed)
    image = np.tile(np.arange(128, dtype=np.uint8) * 2, (64, 1))
    save(tmp_path / "a.png", image)
    out = one(tmp_path, 64)
    assert out.dtype == np.uint8 and out.shape == (64, 64, 3)
    assert (out == image[:, 32:96, None]).all()
    # 4:1, downscaled: the outer quarters (red, blue) are cropped away, leaving the uniform grey middle
    wide = np.zeros((100, 400, 3), np.uint8)
    wide[:, :150] = (255, 0, 0)
    wide[:, 150:250] = 90
    wide[:, 250:] = (0, 0, 255)
    save(tmp_path / "a.png", wide)
    assert (one(tmp_path, 32) == 90).all()


@pytest.mark.parametrize("width,height,box", [(40, 20, (0, 16, 64, 48)), (10, 30, (21, 0, 42, 64))])
def test_cxr_crops_fits_and_pads(tmp_path, width, height, box):
    # a white rectangle anywhere on black: cropped to it, longest edge -> 64, centred on black
    image = np.zeros((90, 120), np.uint8)
    image[13:13 + height, 57:57 + width] = 255
    save(tmp_path / "a.png", image)
    out = one(tmp_path, 64, preprocess="cxr")
    expected = np.zeros((64, 64), np.uint8)
    left, top, right, bottom = box   # 40x20 -> 64x32 at top 16; 10x30 -> round(21.3)=21 x 64 at left (64-21)//2
    expected[top:bottom, left:right] = 255
    assert (out == expected[..., None]).all()


def test_upsample_is_a_symmetric_bicubic_enlargement(tmp_path):
    # 48 x 32: the centre 32 x 32 (left half black, right half white) is enlarged to 64 x 64
    image = np.zeros((32, 48), np.uint8)
    image[:, 8:24] = 0
    image[:, 24:] = 255
    image[:, :8] = 255   # cropped away
    save(tmp_path / "a.png", image)
    out = one(tmp_path, 64, preprocess="upsample")[..., 0].astype(int)
    assert (out == out[:1]).all()                        # every row alike
    assert (out[:, :28] == 0).all() and (out[:, 36:] == 255).all()   # bicubic support: 2 source px = 4 output px
    assert (np.abs(out + out[:, ::-1] - 255) <= 1).all()   # the edge is antisymmetric about the centre
    expected = Image.fromarray(image[:, 8:40]).resize((64, 64), Image.BICUBIC)
    assert (out == np.asarray(expected)).all()


def test_none_passes_exact_size_and_skips_others(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    save(tmp_path / "good.png", image)
    save(tmp_path / "odd.png", image[:48])
    data = load_dataset(tmp_path, 64, preprocess="none")
    assert data.names == ["good.png"] and (as_uint8(data.images)[0] == image).all()
    assert data.skipped == [("odd.png", "wrong size: 64x48, preprocess 'none' needs 64x64")]
    with pytest.raises(DataError, match=r"odd\.png: wrong size"):
        load_dataset(tmp_path, 64, preprocess="none", strict=True)


@pytest.mark.parametrize("dtype,suffix", [(np.uint16, ".png"), (np.uint16, ".tif"), (np.int32, ".tif"),
                                          (np.float32, ".tif")])
def test_wide_images_are_rescaled_min_max(tmp_path, dtype, suffix):
    values = np.linspace(1000, 3000, 48 * 48).round().reshape(48, 48)
    save(tmp_path / f"ramp{suffix}", values.astype(dtype))
    out = one(tmp_path, 48, preprocess="none")
    expected = np.floor((values - 1000) / 2000 * 255 + 0.5)   # linear, round half up; nothing clipped
    assert (out == expected[..., None]).all()
    assert out.min() == 0 and out.max() == 255 and len(np.unique(out)) == 256


def test_8bit_is_used_as_is_and_constant_16bit_is_flat(tmp_path):
    save(tmp_path / "a.png", np.full((16, 16), 10, np.uint8) + np.eye(16, dtype=np.uint8) * 190)
    out = one(tmp_path, 16, preprocess="none")
    assert out.min() == 10 and out.max() == 200   # not stretched to 0..255
    save(tmp_path / "a.png", np.full((16, 16), 1234, np.uint16))   # min-max of one value: black, so flat
    with pytest.raises(DataError, match=r"a.png: flat image: every pixel is 0 \(min-max of the image"):
        load_dataset(tmp_path, 16, preprocess="none", strict=True)


def test_modes_gray_rgb_rgba_palette(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    gray = rgb[..., 0]
    cases = {
        "L": (Image.fromarray(gray), np.repeat(gray[..., None], 3, -1)),
        "LA": (Image.fromarray(np.stack([gray, gray * 0], -1), "LA"), np.repeat(gray[..., None], 3, -1)),
        "1": (Image.fromarray(gray > 127), np.repeat((gray[..., None] > 127) * 255, 3, -1)),
        "RGB": (Image.fromarray(rgb), rgb),
        # alpha 0 everywhere: the colours under it are kept (alpha dropped, not composited onto a background)
        "RGBA": (Image.fromarray(np.concatenate([rgb, rgb[..., :1] * 0], -1), "RGBA"), rgb),
    }
    palette = Image.fromarray(rgb).quantize(16)
    cases["P"] = (palette, np.asarray(palette.convert("RGB")))
    for mode, (image, expected) in cases.items():
        assert image.mode == mode
        folder = tmp_path / mode
        save(folder / "a.png", image)
        assert (one(folder, 8, preprocess="none") == expected).all(), mode


@pytest.mark.parametrize("layout", ["folders", "underscore"])
def test_channels_stack_in_the_given_order(tmp_path, layout):
    rng = np.random.default_rng(2)
    images = {(case, c): rng.integers(0, 256, (32, 32), dtype=np.uint8)
              for case in ("p1", "p2") for c in ("t2w", "adc", "dwi")}
    for (case, channel), image in images.items():
        name = channel.upper() if case == "p1" else channel   # channel names match case-insensitively
        save(tmp_path / (f"{case}/{name}.png" if layout == "folders" else f"sub/{case}_{name}.png"), image)
    save(tmp_path / ("p1/flair.png" if layout == "folders" else "sub/p1_flair.png"), images["p1", "t2w"])
    order = ["ADC", "t2w", "dwi"]
    data = load_dataset(tmp_path, 32, preprocess="none", channels=order)
    prefix = "" if layout == "folders" else "sub/"
    assert data.names == [f"{prefix}p1", f"{prefix}p2"]
    out = as_uint8(data.images)
    for i, case in enumerate(("p1", "p2")):
        for k, channel in enumerate(order):
            assert (out[i, ..., k] == images[case, channel.lower()]).all()
    flair = "p1/flair.png" if layout == "folders" else "sub/p1_flair.png"
    assert data.skipped == [(flair, "unknown channel: 'flair' is not one of adc, t2w, dwi")]


def test_channels_missing_odd_and_unreadable_are_reported_by_case(tmp_path):
    gray = np.full((16, 16), 50, np.uint8)
    gray[0, 0] = 60   # not one gray level: a flat image is skipped for that alone
    for name in ["ok_t2w", "ok_adc", "ok_dwi", "noadc_t2w", "noadc_dwi", "big_t2w", "big_adc", "bad_t2w",
                 "bad_adc", "bad_dwi", "t2w"]:
        save(tmp_path / f"{name}.png", gray)
    save(tmp_path / "big_dwi.png", np.zeros((32, 32), np.uint8))
    (tmp_path / "bad_adc.png").write_bytes(b"not a png")
    data = load_dataset(tmp_path, 16, channels=["t2w", "adc", "dwi"])
    assert data.names == ["ok"]
    assert (as_uint8(data.images)[0] == gray[..., None]).all()
    reasons = dict(data.skipped)
    assert reasons["noadc"] == "missing channel adc (has dwi, t2w)"
    assert reasons["big"] == "channel sizes differ (t2w 16x16, adc 16x16, dwi 32x32); resample them to one grid " \
                             "when exporting"
    assert reasons["bad"].startswith("channel adc (bad_adc.png): not an image")
    assert reasons["t2w.png"].startswith("no case")
    with pytest.raises(DataError, match=r"noadc: missing channel adc") as error:
        (tmp_path / "t2w.png").unlink()
        shutil.rmtree(tmp_path / "sub", ignore_errors=True)
        for name in ["bad_t2w", "bad_adc", "bad_dwi", "big_t2w", "big_adc", "big_dwi"]:
            (tmp_path / f"{name}.png").unlink()
        load_dataset(tmp_path, 16, channels=["t2w", "adc", "dwi"], strict=True)
    assert "\n" not in str(error.value) and str(tmp_path) in str(error.value)


def test_one_channel_and_duplicates(tmp_path):
    t2w = np.arange(256, dtype=np.uint8).reshape(16, 16)
    save(tmp_path / "p1_t2w.png", t2w)
    save(tmp_path / "p1" / "t2w.tif", t2w)   # the same case and channel in the other layout
    save(tmp_path / "p1_adc.png", t2w)
    data = load_dataset(tmp_path, 16, preprocess="none", channels=["T2W"])
    assert data.names == ["p1"] and (as_uint8(data.images)[0] == t2w[..., None]).all()   # replicated like gray
    assert data.skipped == [("p1_adc.png", "unknown channel: 'adc' is not one of t2w"),
                            ("p1_t2w.png", "duplicate channel: p1 t2w is p1/t2w.tif")]


def test_unreadable_files_skipped_listed_and_strict(tmp_path):
    good = np.full((20, 20), 7, np.uint8)
    good[0, 0] = 8   # not one gray level: a flat image is skipped for that alone
    save(tmp_path / "b_good.png", good)
    (tmp_path / "a_text.png").write_text("hello")
    (tmp_path / "c_empty.jpg").write_bytes(b"")
    noise = Image.fromarray(np.random.default_rng(4).integers(0, 256, (20, 20), dtype=np.uint8))
    noise.save(tmp_path / "d_truncated.png")   # random pixels: half the file ends inside the pixel data
    full = (tmp_path / "d_truncated.png").read_bytes()
    (tmp_path / "d_truncated.png").write_bytes(full[: len(full) // 2])
    save(tmp_path / "e_black.png", np.zeros((20, 20), np.uint8))
    frames = [Image.new("L", (20, 20), v) for v in (1, 2)]
    frames[0].save(tmp_path / "f_stack.tif", save_all=True, append_images=frames[1:])
    data = load_dataset(tmp_path, 20, preprocess="cxr")
    assert data.names == ["b_good.png"] and (as_uint8(data.images)[0] == good[..., None]).all()
    reasons = dict(data.skipped)
    assert list(reasons) == ["a_text.png", "c_empty.jpg", "d_truncated.png", "e_black.png", "f_stack.tif"]
    assert reasons["a_text.png"].startswith("not an image PIL can read")
    assert reasons["c_empty.jpg"] == "empty file (0 bytes)"
    assert reasons["d_truncated.png"].startswith("unreadable image")
    assert reasons["e_black.png"].startswith("flat image: every pixel is 0 (as stored)")   # before cxr's own
    assert reasons["f_stack.tif"].startswith("2 frames")
    with pytest.raises(DataError, match=r"a_text\.png: not an image") as error:
        load_dataset(tmp_path, 20, preprocess="cxr", strict=True)
    assert "\n" not in str(error.value)


def test_no_usable_image_says_what_was_found_and_how_to_fix(tmp_path):
    with pytest.raises(DataError, match=r"0 file\(s\): nothing.*right folder"):
        load_dataset(tmp_path, 16)
    (tmp_path / "scan1.dcm").write_bytes(b"DICM")
    (tmp_path / "scan2.dcm").write_bytes(b"DICM")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"3 file\(s\): 2 \.dcm, 1 \.txt; 2 skipped, most often 'not a readable "
                                        r"DICOM file'.*fix or re-export those files"):
        load_dataset(tmp_path, 16)
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"junk")
    save(tmp_path / "c.png", np.ones((8, 4), np.uint8))
    most = r"most often 'not an image PIL can read', e\.g\. a\.png: not an image"
    with pytest.raises(DataError, match=r"6 file\(s\): .*5 skipped, " + most):   # 2 junk .png, c.png, 2 .dcm
        load_dataset(tmp_path, 16, preprocess="none")
    save(tmp_path / "case1" / "T2.png", np.ones((8, 8), np.uint8))
    with pytest.raises(DataError, match=r"unknown channel.*name files CASE/t2w\.png or CASE_t2w\.png") as error:
        load_dataset(tmp_path, 16, channels=["t2w", "adc", "dwi"])
    assert isinstance(error.value, ValueError) and "\n" not in str(error.value)


def test_fingerprint_stable_and_sensitive(tmp_path):
    rng = np.random.default_rng(3)
    for name in ("x.bmp", "sub/y.png"):
        save(tmp_path / "a" / name, rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    (tmp_path / "a" / "junk.png").write_bytes(b"junk")   # skipped files are not part of the fingerprint
    first = load_dataset(tmp_path / "a", 16).fingerprint
    # independent recomputation: sha256 of a `sha256sum`-style listing of the used files, sorted by path
    listing = "".join(f"{hashlib.sha256((tmp_path / 'a' / rel).read_bytes()).hexdigest()}  {rel}\n"
                      for rel in ("sub/y.png", "x.bmp"))
    assert first == hashlib.sha256(listing.encode()).hexdigest()
    shutil.copytree(tmp_path / "a", tmp_path / "b")   # same files elsewhere: same fingerprint
    assert load_dataset(tmp_path / "b", 16).fingerprint == first
    data = bytearray((tmp_path / "b" / "x.bmp").read_bytes())
    data[-1] ^= 1   # one byte of pixel data (BMP is uncompressed, so the file still reads)
    (tmp_path / "b" / "x.bmp").write_bytes(bytes(data))
    changed = load_dataset(tmp_path / "b", 16)
    assert changed.names == ["sub/y.png", "x.bmp"] and changed.fingerprint != first


def test_argument_errors(tmp_path):
    save(tmp_path / "a.png", np.ones((8, 8), np.uint8))
    assert PREPROCESS == ("center", "cxr", "upsample", "none")
    with pytest.raises(DataError, match="preprocess 'crop' is not one of center, cxr, upsample, none"):
        load_dataset(tmp_path, 8, preprocess="crop")
    with pytest.raises(DataError, match="channels must be"):
        load_dataset(tmp_path, 8, channels=["t2w", "adc"])
    with pytest.raises(DataError, match="resolution"):
        load_dataset(tmp_path, 0)


def test_only_regular_files_are_read(tmp_path):
    """Issue 11: a FIFO named x.png blocked training forever (opening it waits for a writer). It is skipped with the
    reason, without waiting; the load runs in a thread so that a regression fails this test instead of hanging it."""
    import os
    import threading
    save(tmp_path / "a.png", np.arange(64, dtype=np.uint8).reshape(8, 8))
    os.mkfifo(tmp_path / "x.png")
    result = {}
    worker = threading.Thread(target=lambda: result.update(data=load_dataset(tmp_path, 8)), daemon=True)
    worker.start()
    worker.join(timeout=30)   # generous: the load of two 8x8 files takes milliseconds
    if worker.is_alive():     # release the reader stuck in open(): a writer that opens and closes at once
        os.close(os.open(tmp_path / "x.png", os.O_WRONLY | os.O_NONBLOCK))
    assert "data" in result, "load_dataset blocked on a FIFO"
    assert result["data"].names == ["a.png"]
    assert result["data"].skipped == [("x.png", "not a regular file (a FIFO); only regular files are read")]


def test_lab_colour_is_skipped_with_the_reason(tmp_path):
    """PIL's convert("RGB") reads LAB's L, a, b bytes as R, G, B (mid-grey becomes blue): refused, not guessed."""
    save(tmp_path / "a.png", np.arange(64, dtype=np.uint8).reshape(8, 8))
    Image.new("LAB", (8, 8), (128, 128, 128)).save(tmp_path / "lab.tif")
    data = load_dataset(tmp_path, 8)
    assert data.names == ["a.png"] and data.skipped[0][0] == "lab.tif"
    assert data.skipped[0][1].startswith("mode LAB: CIELAB colour") and "export the image as RGB" in data.skipped[0][1]
    with pytest.raises(DataError, match=r"lab\.tif: mode LAB"):
        load_dataset(tmp_path, 8, strict=True)


def test_data_error_is_a_user_error():
    """One user-error base (minisd.errors): the CLI wrapper turns it into one line."""
    from minisd.errors import UserError
    assert issubclass(DataError, UserError)
