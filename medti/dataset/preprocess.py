"""The image presets of `--preprocess`: what a decoded training image becomes before it is a training tensor.

`center` (square centre crop, then Lanczos to the resolution), `cxr` (the reference study's chest X-ray recipe),
`upsample` (centre crop, bicubic: for small patches), `none` (the image must already be R x R)."""
from PIL import Image

PREPROCESS = ("center", "cxr", "upsample", "none")


class Unusable(Exception):
    """This file or case is unusable; the message is the reason (collected as a skip, or raised under strict)."""


def check_not_flat(image: Image.Image):
    """The one rule for an image that is a single gray level (or colour) as read, after its window (a DICOM file's
    own, --window, min-max over a volume): there is nothing in it to learn or to look at, so it is Unusable, with
    the level, the window that made it and what to try. Applied by medti.dataset to every image and every slice,
    whatever its format, before --preprocess (which could only stretch the one value): a CT slice whose values all
    lie outside its file's window, an empty edge slice of a volume, a blank export, a 1 x 1 PNG."""
    low, high = image.getextrema() if image.mode == "L" else tuple(zip(*image.getextrema(), strict=True))
    if low != high:
        return
    window = image.info.get("window", "as stored")
    if image.info.get("one value"):   # a reader that knows says so: the file's values themselves are one
        hint = "the file holds one value, nothing to learn from; leave it out"
    elif window.startswith("--window"):
        hint = "every value lies outside that window; try another --window"
    elif window.startswith(("the file's", "the series'", "each frame's")):
        hint = "every value lies outside the file's own window; try a --window CENTER,WIDTH that holds its values"
    elif window.endswith(("volume", "series")):
        hint = "an empty slice; choose others with --slices or --slice-mask, or leave it be"
    else:
        hint = "a blank image, nothing to learn from; leave it out"
    raise Unusable(f"flat image: every pixel is {low} ({window}): {hint}")


def _square_crop(image: Image.Image) -> Image.Image:
    """The centred square of side min(width, height); with an odd excess the extra pixel goes right/bottom."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


def _cxr(image: Image.Image, resolution: int) -> Image.Image:
    """The reference study's chest X-ray recipe: crop to the bounding box of non-zero pixels (strictly
    non-zero, any channel; JPEG noise in a black border therefore stays in), resize so the longest edge is
    `resolution` keeping the aspect, and zero-pad to a centred square (extra pixel right/bottom)."""
    box = image.getbbox()
    if box is None:
        raise Unusable("all black: cxr crops to the non-zero pixels and there are none")
    image = image.crop(box)
    scale = resolution / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    canvas = Image.new(image.mode, (resolution, resolution))   # zeros = black
    canvas.paste(image.resize(size, Image.LANCZOS), ((resolution - size[0]) // 2, (resolution - size[1]) // 2))
    return canvas


def fit(image: Image.Image, resolution: int, preprocess: str) -> Image.Image:
    """Apply a PREPROCESS preset. Downscaling (center, cxr) uses Lanczos: the least aliasing of PIL's filters,
    and the filter medti.files.images uses for init images, so training and img2img inputs are resampled alike.
    `upsample` uses bicubic, which rings less than Lanczos when enlarging small patches (96-px histology).
    PIL returns an unresampled copy when the size already matches, so an R x R square passes through exactly."""
    if preprocess == "none":
        if image.size != (resolution, resolution):
            raise Unusable(f"wrong size: {image.width}x{image.height}, preprocess 'none' needs "
                           f"{resolution}x{resolution}")
        return image
    if preprocess == "cxr":
        return _cxr(image, resolution)
    resample = Image.BICUBIC if preprocess == "upsample" else Image.LANCZOS
    return _square_crop(image).resize((resolution, resolution), resample)
