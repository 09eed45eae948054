"""Image files in and out: reading init images and masks of any size and mode, atomic PNG writing with
parameters, contact sheets."""
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, PngImagePlugin

WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")   # PIL modes of 16-bit, 32-bit int and float images


class ImageError(ValueError):
    """An unreadable or unsuitable image, in one line that names the file."""


def open_image(path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, ValueError) as e:   # PIL raises UnidentifiedImageError (an OSError) for non-images
        raise ImageError(f"{path}: not a readable image ({type(e).__name__})") from None


def to_8bit(image: Image.Image) -> Image.Image:
    """8-bit L or RGB. 8-bit images are used as they are (RGBA/LA drop alpha, not composited; palette -> RGB).
    16-bit, 32-bit int and float images are rescaled linearly from the image's own [min, max] to [0, 255]: MR has
    no absolute unit and CT/X-ray exports are usually windowed already, so the image's range is the only scale we
    have (PIL's convert clips instead: most of a 16-bit image turns white).
    A constant image becomes black. PIL reads 16-bit-per-channel RGB as 8-bit RGB itself (keeping the high byte)."""
    if image.mode in WIDE_MODES:
        array = np.asarray(image, dtype=np.float64)
        finite = np.isfinite(array)   # float TIFFs may hold NaN/inf outside the body; they become the minimum
        if not finite.any():
            raise ImageError("no finite pixel values")
        low, high = array[finite].min(), array[finite].max()
        array = np.where(finite, array, low) - low
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


def load_mask(path, width: int, height: int, blur: float = 0) -> torch.Tensor:
    """A mask as [1, 1, height, width] in {0, 1}: white (>= 128 after resizing and blurring) = repaint.
    The threshold is diffusers' (>= 0.5 after scaling to [0, 1])."""
    image = open_image(path)
    check_aspect(path, image, width, height, "the mask")
    image = to_8bit(image).convert("L").resize((width, height), Image.LANCZOS)
    if blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    return torch.from_numpy((np.asarray(image) >= 128).astype(np.float32))[None, None]


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] -> 8-bit RGB, rounding as diffusers' numpy_to_pil does."""
    array = ((image.float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def save_png(path: Path, image: Image.Image, parameters: str = ""):
    """Atomic write (temp file, then rename): a half-written PNG never appears under the final name.
    `parameters` goes into a text chunk of that name, as A1111 stores generation settings."""
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)


def contact_sheet(items: list, columns: int = 0) -> Image.Image:
    """Images (PIL images or file paths) in a grid, row by row; columns 0 = a near-square sheet."""
    images = [(item if isinstance(item, Image.Image) else open_image(item)).convert("RGB") for item in items]
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    sheet = Image.new("RGB", (columns * w, rows * h))
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * w, (i // columns) * h))
    return sheet
