"""Image files in and out: reading init images and masks of any size and mode, atomic PNG writing with
parameters, paste-back for inpainting, and contact sheets with labels."""
import io
import math
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageOps, PngImagePlugin

from minisd.errors import UserError

from . import lettering
from .atomic import write_atomic

WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")   # PIL modes of 16-bit, 32-bit int and float images
LABEL_MIN = 7                          # labels' smallest font size in pixels: the smallest still legible
EMPTY, EMPTY_CELL = ((40, 40, 40), (64, 64, 64)), 8   # an empty slot's checkerboard: its two grays, its square
# Modes PIL opens but cannot turn into the RGB a user means: its LAB -> RGB conversion is refused or wrong.
REFUSED_MODES = {"LAB": "CIELAB colour, which PIL cannot convert to RGB correctly; export the image as RGB or gray",
                 "CMYK": "print colours (CMYK), which PIL converts to RGB without a colour profile; export it as RGB"}


class ImageError(UserError):
    """An unreadable or unsuitable image, in one line that names the file."""


@contextmanager
def library_warnings():
    """The one rule for the warnings of the libraries that read files (PIL, pydicom, nibabel, numpy), applied
    wherever medti reads one (training and evaluation sets: medti.dataset; init images and masks: open_image): held
    back and dropped. Python would print each as two lines of stderr ("file.py:402: UserWarning: ..." and the line of
    code), before or between medti's own one-line messages. What matters is said in medti's words: a file that
    cannot be used is refused or skipped with its reason (pydicom's "End of file reached" is medti.medical.dicom's
    "truncated file"), and a file that reads is one the library coped with."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def open_image(path) -> Image.Image:
    """Open and decode one still image, or raise ImageError naming the file and what to do.

    Refused rather than guessed: a stack of frames (a multi-page TIFF: which slice did the user mean?), a mode
    in REFUSED_MODES, and an image over PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS, 89 megapixels by
    default: twice that raises, so a 40,000 x 40,000 PNG of a few kB cannot fill the memory)."""
    try:
        with library_warnings(), Image.open(path) as image:
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                raise ImageError(f"{path}: holds {frames} frames (a stack or animation); export the one slice you "
                                 "mean as its own file")
            if image.mode in REFUSED_MODES:
                raise ImageError(f"{path}: mode {image.mode}: {REFUSED_MODES[image.mode]}")
            image.load()
            return image
    except Image.DecompressionBombError as e:   # not an OSError: caught by name
        raise ImageError(f"{path}: too many pixels to open safely ({e}); resize it first") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:   # UnidentifiedImageError is an OSError
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"{path}: not a readable image ({type(e).__name__})") from None


def finite(array) -> np.ndarray:
    """The one rule for values that are not numbers, used by every reader (PNG/TIFF here, DICOM, NIfTI, MetaImage,
    NRRD in medti.medical): NaN and infinities become the minimum of the finite values (float TIFFs and NIfTI maps hold
    NaN outside the body: the background, not a value to scale by), as float64; no finite value at all is an
    ImageError ("all 4096 values are NaN or infinite"), never a black image."""
    array = np.asarray(array, dtype=np.float64)
    ok = np.isfinite(array)
    if ok.all():
        return array
    if not ok.any():
        raise ImageError(f"no finite pixel values: all {array.size} are NaN or infinite")
    return np.where(ok, array, array[ok].min())


def to_8bit(image: Image.Image) -> Image.Image:
    """8-bit L or RGB. 8-bit images are used as they are (RGBA/LA drop alpha, not composited; palette -> RGB).
    16-bit, 32-bit int and float images are rescaled linearly from the image's own [min, max] to [0, 255]: MR has
    no absolute unit and CT/X-ray exports are usually windowed already, so the image's range is the only scale we
    have (PIL's convert clips instead: most of a 16-bit image turns white).
    A constant image becomes black. PIL reads 16-bit-per-channel RGB as 8-bit RGB itself (keeping the high byte)."""
    if image.mode in WIDE_MODES:
        array = finite(np.asarray(image, dtype=np.float64))   # NaN/inf -> the minimum (the one rule)
        low, high = array.min(), array.max()
        array = array - low
        scaled = array * (255 / (high - low)) if high > low else array
        return Image.fromarray(np.floor(scaled + 0.5).astype(np.uint8))   # round half up; uint8 2-D -> mode L
    if image.mode in ("L", "RGB"):
        return image
    return image.convert("L" if image.mode in ("1", "LA", "La") else "RGB")


def check_aspect(path, image: Image.Image, width: int, height: int, what: str):
    if abs(image.width / image.height - width / height) > 0.01 * width / height:
        raise ImageError(f"{path}: {what} is {image.width}x{image.height}, a different aspect from the output "
                         f"{width}x{height}; pass --width/--height with its aspect or crop it")


def load_image(path, width: int, height: int) -> torch.Tensor:
    """An init image as [1, 3, height, width] in [-1, 1] (grayscale is replicated to RGB)."""
    image = open_image(path)
    check_aspect(path, image, width, height, "the init image")
    image = to_8bit(image).convert("RGB").resize((width, height), Image.LANCZOS)
    array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())   # [H, W, 3]
    return (array / 127.5 - 1).permute(2, 0, 1)[None]


def mask_channel(image: Image.Image) -> Image.Image:
    """The one channel that holds the mask. Painting programs store a mask drawn on a transparent layer in its
    alpha channel, so an image with an alpha channel that is not opaque everywhere is read by its alpha
    (opaque = repaint, transparent = keep): its colours are arbitrary under transparent pixels. An opaque image
    (or one without alpha) is read by its gray values (white = repaint)."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if "A" in image.getbands():
        alpha = image.getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha
    return to_8bit(image).convert("L")


def soft_mask(path, width: int, height: int, blur: float = 0) -> torch.Tensor:
    """A mask as [1, 1, height, width] in [0, 1], resized to the output and blurred (radius `blur` pixels)."""
    image = open_image(path)
    check_aspect(path, image, width, height, "the mask")
    image = mask_channel(image).resize((width, height), Image.LANCZOS)
    if blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255)[None, None]


def load_mask(path, width: int, height: int, blur: float = 0) -> torch.Tensor:
    """The mask the sampler uses: [1, 1, height, width] in {0, 1}, 1 (>= 128 of 255 after resizing and blurring)
    = repaint. The threshold is diffusers' (>= 0.5 after scaling to [0, 1])."""
    return (soft_mask(path, width, height, blur) >= 0.5).float()


def paste_back(images: torch.Tensor, init: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """`--paste-back` (A1111's inpainting overlay): outside the blurred mask the output is the init image's
    pixels, inside it the decoded ones, blended by the soft mask in between. Why: the VAE round trip alters
    pixels a user asked to keep. images, init [B or 1, 3, H, W] in [-1, 1]; soft [1, 1, H, W] in [0, 1]."""
    soft = soft.to(images)
    return init.to(images) * (1 - soft) + images * soft


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] -> 8-bit RGB, rounding as diffusers' numpy_to_pil does."""
    array = ((image.float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def save_png(path: Path, image: Image.Image, parameters: str = ""):
    """Encode in memory, then medti.files.atomic.write_atomic: a half-written PNG never appears under the final name,
    and a full disk leaves no temporary file. `parameters` goes into a text chunk of that name, as A1111 stores
    generation settings."""
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    write_atomic(path, buffer.getvalue())


def label(image: Image.Image, text: str) -> Image.Image:
    """A copy of image with `text` (lines split at "\n") in its top-left corner, white on a black box. Drawn over
    the image, not in a margin, so a sheet keeps the size of its images laid side by side. The font is 1/16 of the
    image's height (readable at 64 px and at 768 px), smaller where a line would not fit across, never under
    LABEL_MIN px (a longer line is cut by the image's edge)."""
    image = image.convert("RGB")
    lines = text.split("\n")
    size = max(LABEL_MIN, image.height // 16)
    while size > LABEL_MIN and max(lettering.width(line, lettering.font(size)) for line in lines) > image.width - 4:
        size -= 1
    face = lettering.font(size)
    draw = ImageDraw.Draw(image)
    right = max(lettering.width(line, face) for line in lines)
    draw.rectangle((0, 0, right + 4, lettering.height(face) * len(lines) + 3), fill=(0, 0, 0))
    white_lines(draw, (2, 1), lines, face)
    return image


def tile(image: torch.Tensor, text: str, side: int) -> Image.Image:
    """A uint8 [3, H, W] tensor as a labelled side x side image (aspect kept, black bars): one cell of a sheet of
    pairs."""
    picture = Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy()))
    return label(ImageOps.pad(picture, (side, side)), text)


def white_lines(draw: ImageDraw.ImageDraw, xy: tuple, lines: list, face):
    """Lines of white text, one under the other from xy (on the black the caller has drawn)."""
    for i, line in enumerate(lines):
        lettering.draw(draw, (xy[0], xy[1] + i * lettering.height(face)), line, face, (255, 255, 255))


def empty_slot(width: int, height: int) -> Image.Image:
    """What a sheet shows where it has no image: a dark gray checkerboard, which no medical image (black
    background, gray anatomy) and no white page is mistaken for. One look for every sheet medti writes."""
    cells = np.add.outer(np.arange(height) // EMPTY_CELL, np.arange(width) // EMPTY_CELL) % 2
    return Image.fromarray(np.where(cells[..., None] == 1, EMPTY[1], EMPTY[0]).astype(np.uint8), "RGB")


def contact_sheet(items: list, columns: int = 0, labels: list | None = None, header: list | None = None):
    """Images (PIL images or file paths; None: an empty slot) in a grid, row by row; columns 0 = a near-square
    sheet. labels: one text per image (None: unlabelled), drawn in each image's corner. header: lines of text in a
    band above the grid (what a reader needs to read the grid, e.g. which prompt is A and which B). Empty slots,
    the last row's included, are empty_slot()."""
    images = [None if item is None else (item if isinstance(item, Image.Image) else open_image(item)).convert("RGB")
              for item in items]
    w, h = next(image for image in images if image is not None).size
    if labels is not None:
        images = [image if image is None or not text else label(image, text)
                  for image, text in zip(images, labels, strict=True)]
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    band = header_band(header, columns * w, h) if header else None
    top = band.height if band else 0
    sheet = Image.new("RGB", (columns * w, top + rows * h))
    if band:
        sheet.paste(band, (0, 0))
    for i in range(rows * columns):
        image = images[i] if i < len(images) and images[i] is not None else empty_slot(w, h)
        sheet.paste(image, ((i % columns) * w, top + (i // columns) * h))
    return sheet


def header_band(lines: list, width: int, cell: int) -> Image.Image:
    """Lines of white text on black, the width of the sheet, in the labels' font size (1/16 of a cell); a line too
    long for the sheet is cut with "…"."""
    face = lettering.font(max(LABEL_MIN, cell // 16))
    band = Image.new("RGB", (width, lettering.height(face) * len(lines) + 6))
    fitted = []
    for line in lines:
        while len(line) > 1 and lettering.width(line, face) > width - 8:
            line = line[:-2] + "…"
        fitted.append(line)
    white_lines(ImageDraw.Draw(band), (4, 3), fitted, face)
    return band
