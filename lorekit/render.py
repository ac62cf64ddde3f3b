"""Deterministic text rendering onto batches of [0,1] image tensors (synthetic domains, typographic attacks).

Glyphs are rasterised by PIL/FreeType from the TrueType fonts matplotlib ships (DejaVu Sans, Serif
and Mono, each regular, bold, oblique and bold-oblique), so text is hinted and anti-aliased as real
text is; hand-written rasterisation would need its own font outlines and coverage computation.
PIL draws only coverage masks (the fill, and fill plus stroke); they are composited onto the float
image in torch, so the image is never quantised to 8 bits and pixels outside the text keep their bits.

Same bits for a seed on every machine with the same Pillow wheel (it bundles FreeType): styles come
from a seeded numpy generator, and the basic layout engine is forced because whether raqm (complex
layout) is installed differs between machines.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

RGB = tuple[float, float, float]

FONTS: tuple[str, ...] = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
)
PALETTE: dict[str, RGB] = {
    "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "red": (0.9, 0.1, 0.1), "green": (0.1, 0.7, 0.2),
    "blue": (0.1, 0.3, 0.9), "yellow": (1.0, 0.9, 0.1), "cyan": (0.1, 0.8, 0.9), "magenta": (0.9, 0.2, 0.8),
    "orange": (1.0, 0.55, 0.0), "grey": (0.5, 0.5, 0.5),
}


@dataclass(frozen=True)
class TextStyle:
    """How one string is drawn: `xy` is the top-left corner of its ink box (stroke included), in pixels."""

    font: str
    size: int
    fill: RGB
    stroke: RGB
    stroke_width: int
    xy: tuple[int, int]


def font_path(name: str) -> Path:
    """Path of one of matplotlib's bundled TrueType fonts, e.g. 'DejaVuSerif-Bold.ttf'."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name
    if not path.is_file():
        raise ValueError(f"font {name!r}: not among matplotlib's bundled fonts ({path.parent})")
    return path


@cache
def load_font(name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_path(name)), size, layout_engine=ImageFont.Layout.BASIC)


@lru_cache(maxsize=8192)
def text_masks(text: str, font: str, size: int, stroke_width: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ink, fill) coverage in [0,1] of `text`, cropped to its ink box; ink is the fill plus the stroke.

    Read-only (the arrays are cached): copy before changing them.
    """
    face = load_font(font, size)
    left, top, right, bottom = face.getbbox(text, stroke_width=stroke_width)
    pad = stroke_width + 2  # oblique glyphs may overhang the box that getbbox reports
    canvas = (right - left + 2 * pad, bottom - top + 2 * pad)
    origin = (pad - left, pad - top)
    ink, fill = Image.new("L", canvas), Image.new("L", canvas)
    ImageDraw.Draw(ink).text(origin, text, font=face, fill=255, stroke_width=stroke_width, stroke_fill=255)
    ImageDraw.Draw(fill).text(origin, text, font=face, fill=255)
    box = ink.getbbox()
    if box is None:
        raise ValueError(f"text {text!r} draws no pixels")
    masks = tuple(np.asarray(m.crop(box), dtype=np.float32) / 255 for m in (ink, fill))
    for m in masks:
        m.flags.writeable = False
    return masks


def fit_size(text: str, font: str, size: int, stroke_width: int, height: int, width: int) -> int:
    """The largest font size <= `size` whose ink box fits in height × width."""
    for s in range(size, 0, -1):
        h, w = text_masks(text, font, s, stroke_width)[0].shape
        if h <= height and w <= width:
            return s
    raise ValueError(f"text {text!r} does not fit in {height}×{width} pixels at any font size")


def default_sizes(height: int) -> tuple[int, int]:
    """Font sizes 9–18 % of the image height (20–40 at 224 px, the typographic-attack papers' range), >= 8."""
    return max(8, round(0.09 * height)), max(12, round(0.18 * height))


def random_styles(texts: Sequence[str], height: int, width: int, seed: int, *,
                  sizes: tuple[int, int] | None = None, fonts: Sequence[str] = FONTS,
                  colours: Sequence[str] = tuple(PALETTE), stroke_widths: Sequence[int] | None = None,
                  positions: Sequence[tuple[int, int]] | None = None) -> list[TextStyle]:
    """One seeded random style per text: font, size in `sizes` (inclusive, shrunk to fit), fill and a
    different stroke colour from `colours`, stroke width (default 0 to size/10), uniform position
    with the ink box inside the image (or the given top-left corners, moved inside if needed)."""
    rng = np.random.default_rng(seed)
    lo, hi = sizes or default_sizes(height)
    styles = []
    for i, text in enumerate(texts):
        font = fonts[rng.integers(len(fonts))]
        size = int(rng.integers(lo, hi + 1))
        stroke_width = int(rng.choice(stroke_widths) if stroke_widths is not None
                           else rng.integers(0, max(1, size // 10) + 1))
        fill, stroke = rng.choice(len(colours), size=2, replace=False)
        size = fit_size(text, font, size, stroke_width, height, width)
        h, w = text_masks(text, font, size, stroke_width)[0].shape
        if positions is None:
            xy = (int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)))
        else:
            xy = (min(max(0, positions[i][0]), width - w), min(max(0, positions[i][1]), height - h))
        styles.append(TextStyle(font, size, PALETTE[colours[fill]], PALETTE[colours[stroke]], stroke_width, xy))
    return styles


def draw_text(images: torch.Tensor, texts: str | Sequence[str], styles: Sequence[TextStyle] | None = None, *,
              seed: int = 0, **style_options) -> torch.Tensor:
    """Draw texts[i] onto images[i] ([B, 3, H, W] in [0,1]); returns a new tensor.

    Without `styles`, they come from `random_styles(texts, H, W, seed, **style_options)`. A style whose
    ink box does not fit (a hand-made one) is an error: nothing is ever drawn partly outside the image.
    """
    texts = [texts] * len(images) if isinstance(texts, str) else list(texts)
    if len(texts) != len(images):
        raise ValueError(f"{len(texts)} texts for {len(images)} images")
    height, width = images.shape[-2:]
    if styles is None:
        styles = random_styles(texts, height, width, seed, **style_options)
    out = images.clone()
    for img, text, st in zip(out, texts, styles):
        ink, fill = (torch.from_numpy(m.copy()).to(images) for m in text_masks(text, st.font, st.size, st.stroke_width))
        (h, w), (x, y) = ink.shape, st.xy
        if not (0 <= x <= width - w and 0 <= y <= height - h):
            raise ValueError(f"text {text!r} ({h}×{w} px at {st.xy}) does not fit in {height}×{width}")
        region = img[:, y:y + h, x:x + w]
        if st.stroke_width:
            region.mul_(1 - ink).add_(ink * torch.tensor(st.stroke).to(images).view(3, 1, 1))
        region.mul_(1 - fill).add_(fill * torch.tensor(st.fill).to(images).view(3, 1, 1))
    return out
