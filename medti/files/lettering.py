"""Text drawn into images (the plots' captions and ticks, the labels of contact sheets), with the font Pillow
bundles (Aileron Regular, drawn by FreeType): no font file to find on the user's machine, the same pixels everywhere.

Why words are placed one by one: at the sizes a plot uses (10-13 px) Aileron's space is 2-3 px wide, as wide as the
gaps between its letters, so "loss over" read "lossover" and "KID of" read "KIDof". Each word is drawn on its own
and the next starts a fixed share of the font size (WORD_GAP) later, a typographic word space; letter spacing
within a word stays the font's own.
"""
import functools

from PIL import ImageDraw, ImageFont

WORD_GAP = 0.4    # the space between words, in ems: wider than any gap between Aileron's letters (at most ~0.2 em)
PLOT_SIZE = 13    # plots' text in pixels: the smallest size at which the bundled font's letters are evenly spaced


@functools.lru_cache(maxsize=None)
def font(size: int = PLOT_SIZE) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def gap(face: ImageFont.FreeTypeFont) -> int:
    return max(2, round(WORD_GAP * face.size))


def width(text: str, face: ImageFont.FreeTypeFont) -> float:
    """The width `draw` gives `text`, in pixels."""
    words = text.split(" ")
    return sum(face.getlength(word) for word in words) + gap(face) * (len(words) - 1)


def draw(canvas: ImageDraw.ImageDraw, xy: tuple, text: str, face: ImageFont.FreeTypeFont, fill) -> float:
    """Draw `text` with its top-left corner at xy, word by word; returns the x where it ends."""
    x, y = xy
    for i, word in enumerate(text.split(" ")):
        canvas.text((x, y), word, fill=fill, font=face)
        x += face.getlength(word) + (gap(face) if i < text.count(" ") else 0)
    return x


def height(face: ImageFont.FreeTypeFont) -> int:
    """The height of a line of text, ascender to descender, in pixels."""
    ascent, descent = face.getmetrics()
    return ascent + descent
