"""The embedded suite: handwritten digits plus procedural domains, for zero-shot evaluation off the
fine-tuning domain (the LORE paper fine-tunes on ImageNet and reports 13 other data sets).

- 'digits': scikit-learn's handwritten digits (see `lorekit.data.digits`).
- 'words': the digit words "zero" … "nine" typed in 12 DejaVu fonts, varied size, position, colour
  and stroke, bright on dark plain or gradient backgrounds. It teaches the model to read rendered
  text, which a typographic attack (a wrong class name written on an image) needs to work.
- 'shapes': ten bright geometric shapes (circle, square, … arrow) on dark backgrounds, random size,
  rotation and place near the middle.
- 'textures': ten full-image two-colour patterns (stripes of three orientations, checkerboard,
  dots, …), random period, phase, angle and colours.

Every procedural domain is 32×32 RGB in [0,1], ten balanced classes, 1500 train / 400 test images,
generated in about a second. Each split draws from its own seeded numpy generator, and rendering is
per-pixel arithmetic or PIL (single-threaded), so the bits do not depend on the machine's thread count.
"""

from __future__ import annotations

import zlib
from dataclasses import replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.data import TensorDataset

from .data import DIGIT_NAMES, DataBundle, digits
from .render import PALETTE, draw_text, random_styles

SUITE: tuple[str, ...] = ("digits", "words", "shapes", "textures")
SUITE_VERSION = 1  # bump when a generator changes its output: the pretraining cache key includes it
TRAIN_SIZE, TEST_SIZE = 1500, 400
SIZE = 32
SUPERSAMPLE = 4  # shapes and textures are drawn at 4× and box-filtered: anti-aliased edges

# 'a photo of the number {c}.' is also a digits template: the shared caption ties the typed name to the
# digit class, as captions that name what an image's text says do in CLIP (typographic attacks rely on it).
WORD_TEMPLATES = ('the word "{c}" written in a font.', 'a sign that says "{c}".', 'the text "{c}".',
                  'a photo of the number {c}.')
SHAPE_NAMES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon", "heart", "arrow")
SHAPE_TEMPLATES = ("a {c} shape.", "a drawing of a {c}.", "a simple {c} icon.", "a coloured {c} on a background.")
TEXTURE_NAMES = ("horizontal stripes", "vertical stripes", "diagonal stripes", "checkerboard", "polka dots",
                 "grid", "waves", "concentric circles", "noise", "gradient")
TEXTURE_TEMPLATES = ("a {c} pattern.", "a texture of {c}.", "a close-up photo of {c}.", "a fabric with {c}.")

COLOURS = np.array(list(PALETTE.values()), dtype=np.float32)
# Words and shapes are light on dark, as the digits are: with both polarities a from-scratch model learns
# them about twice as slowly (measured: a supervised probe at 400 steps, 24 % vs 61 % on words).
BRIGHT = [i for i, c in enumerate(COLOURS) if c @ np.array([0.299, 0.587, 0.114]) >= 0.45]


def _rng(domain: str, split: str) -> np.random.Generator:
    """A generator per (domain, split): splits never share a draw, and adding a domain changes no other."""
    return np.random.default_rng([zlib.crc32(domain.encode()), zlib.crc32(split.encode())])


def _two_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two different palette colours, each jittered a little so that no colour is exactly repeated."""
    a, b = rng.choice(len(COLOURS), size=2, replace=False)
    jitter = rng.uniform(-0.08, 0.08, size=(2, 3)).astype(np.float32)
    return np.clip(COLOURS[a] + jitter[0], 0, 1), np.clip(COLOURS[b] + jitter[1], 0, 1)


def _dark_background(rng: np.random.Generator, n: int) -> np.ndarray:
    """[3, n, n]: a dark plain colour, or a dark linear gradient between two colours in a random direction."""
    a, b = (c * rng.uniform(0.0, 0.25) for c in _two_colours(rng))
    if rng.random() < 0.5:
        return np.broadcast_to(a[:, None, None], (3, n, n)).copy()
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / (n - 1) - 0.5
    t = np.clip((xx * np.cos(angle) + yy * np.sin(angle)) / 0.71 + 0.5, 0, 1)
    return a[:, None, None] * (1 - t) + b[:, None, None] * t


def _bright_colour(rng: np.random.Generator) -> np.ndarray:
    return COLOURS[BRIGHT[rng.integers(len(BRIGHT))]]


def _words(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    labels = np.arange(n) % 10
    backgrounds = np.stack([_dark_background(rng, SIZE) for _ in range(n)])
    texts = [DIGIT_NAMES[c] for c in labels]
    styles = random_styles(texts, SIZE, SIZE, int(rng.integers(2**31)), sizes=(9, 16), stroke_widths=(0, 0, 1))
    styles = [replace(s, fill=tuple(_bright_colour(rng).tolist())) for s in styles]
    images = draw_text(torch.from_numpy(backgrounds), texts, styles)
    return images.numpy(), labels


def _polygon(kind: int) -> np.ndarray:
    """Unit-radius outline of shape `kind` (index into SHAPE_NAMES) as [k, 2] points."""
    name = SHAPE_NAMES[kind]
    ring = lambda k, r=1.0, start=-np.pi / 2: np.stack(  # noqa: E731 (a local helper)
        [r * np.cos(start + 2 * np.pi * np.arange(k) / k), r * np.sin(start + 2 * np.pi * np.arange(k) / k)], 1)
    if name == "square":
        return ring(4, 1.0, np.pi / 4)
    if name == "triangle":
        return ring(3)
    if name == "star":
        outer, inner = ring(5), ring(5, 0.42, -np.pi / 2 + np.pi / 5)
        return np.stack([outer, inner], 1).reshape(10, 2)
    if name == "cross":
        w = 0.33
        return np.array([(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w),
                         (-1, -w), (-w, -w)])
    if name == "diamond":
        return np.array([(0, -1), (0.6, 0), (0, 1), (-0.6, 0)])
    if name == "hexagon":
        return ring(6)
    if name == "heart":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        pts = np.stack([16 * np.sin(t) ** 3,
                        -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))], 1)
        return (pts - pts.mean(0)) / 16.5
    if name == "arrow":
        return np.array([(-1, -0.25), (0.2, -0.25), (0.2, -0.6), (1, 0), (0.2, 0.6), (0.2, 0.25), (-1, 0.25)])
    raise ValueError(name)


# Rotation range per shape: a square or diamond turned by 45° would look like the other.
_MAX_TURN = {"square": np.pi / 12, "diamond": np.pi / 12, "heart": np.pi / 8, "cross": np.pi / 8}


def _shape_mask(kind: int, rng: np.random.Generator) -> np.ndarray:
    """Coverage in [0,1] of one random shape: SIZE×SIZE, from a SUPERSAMPLE× drawing."""
    n = SIZE * SUPERSAMPLE
    radius = rng.uniform(8, 13) * SUPERSAMPLE
    # Near the middle (learned faster than anywhere), and always a pixel clear of the border.
    reach = min(6 * SUPERSAMPLE, n / 2 - radius - SUPERSAMPLE)
    centre = n / 2 + rng.uniform(-reach, reach, size=2)
    canvas = Image.new("L", (n, n))
    draw = ImageDraw.Draw(canvas)
    name = SHAPE_NAMES[kind]
    if name in ("circle", "ring"):
        cx, cy = centre
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
        if name == "ring":
            inner = radius * rng.uniform(0.5, 0.65)
            draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    else:
        turn = _MAX_TURN.get(name, np.pi)
        angle = rng.uniform(-turn, turn)
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        pts = _polygon(kind) @ rot.T * radius + centre
        draw.polygon([tuple(p) for p in pts.tolist()], fill=255)
    mask = np.asarray(canvas, dtype=np.float32) / 255
    return mask.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE).mean((1, 3))


def _shapes(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    labels = np.arange(n) % 10
    images = np.empty((n, 3, SIZE, SIZE), dtype=np.float32)
    for i, c in enumerate(labels):
        background = _dark_background(rng, SIZE)
        colour = _bright_colour(rng)
        mask = _shape_mask(int(c), rng)
        images[i] = background * (1 - mask) + colour[:, None, None] * mask
    return images, labels


# Stripes, checkers, dots and grids keep their orientation within ±10°; waves and rings turn freely.
_ORIENTATION = {"horizontal stripes": np.pi / 2, "vertical stripes": 0.0, "diagonal stripes": np.pi / 4,
                "checkerboard": 0.0, "polka dots": 0.0, "grid": 0.0}


def _texture_field(kind: int, rng: np.random.Generator) -> np.ndarray:
    """Pattern `kind` (index into TEXTURE_NAMES) as a SIZE×SIZE field in [0,1] mixing two colours."""
    n = SIZE * SUPERSAMPLE
    yy, xx = (np.mgrid[0:n, 0:n].astype(np.float64) + 0.5) / SUPERSAMPLE  # pixel units of the SIZE image
    name = TEXTURE_NAMES[kind]
    # Coarser periods in two dimensions: at 2-3 pixels a cell, dots, grids and checkers all alias to noise.
    period = rng.uniform(6, 11) if name in ("checkerboard", "polka dots", "grid") else rng.uniform(5, 9)
    phase = rng.uniform(0, 2 * np.pi)
    lean = rng.choice([-1, 1])  # which way diagonal stripes go
    if name in _ORIENTATION:
        angle = _ORIENTATION[name] * (lean if name == "diagonal stripes" else 1)
    else:
        angle = rng.uniform(0, np.pi)
    angle += rng.uniform(-np.pi / 18, np.pi / 18)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    wave = lambda s: np.sin(2 * np.pi * s / period + phase)  # noqa: E731 (a local helper)
    if name.endswith("stripes"):
        field = wave(u) > 0
    elif name == "checkerboard":
        field = wave(u) * np.sin(2 * np.pi * v / period + phase) > 0
    elif name == "polka dots":
        du, dv = (np.mod(s / period + rng.uniform(), 1) - 0.5 for s in (u, v))
        field = du ** 2 + dv ** 2 < rng.uniform(0.2, 0.32) ** 2
    elif name == "grid":
        width = rng.uniform(0.15, 0.25)
        field = (np.mod(u / period + rng.uniform(), 1) < width) | (np.mod(v / period + rng.uniform(), 1) < width)
    elif name == "waves":
        field = np.sin(2 * np.pi * (u + rng.uniform(1.5, 3) * np.sin(2 * np.pi * v / rng.uniform(10, 16))) / period
                       + phase) > 0
    elif name == "concentric circles":
        cy, cx = rng.uniform(4, SIZE - 4, size=2)
        field = wave(np.hypot(xx - cx, yy - cy)) > 0
    elif name == "noise":
        cell = int(rng.integers(1, 3)) * SUPERSAMPLE
        field = np.kron(rng.random((n // cell, n // cell)) < 0.5, np.ones((cell, cell))) > 0
    elif name == "gradient":
        field = (u - u.min()) / (u.max() - u.min())
    else:
        raise ValueError(name)
    return field.astype(np.float32).reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE).mean((1, 3))


def _textures(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    labels = np.arange(n) % 10
    images = np.empty((n, 3, SIZE, SIZE), dtype=np.float32)
    for i, c in enumerate(labels):
        a, b = _two_colours(rng)
        t = _texture_field(int(c), rng)
        images[i] = a[:, None, None] * (1 - t) + b[:, None, None] * t
    return images, labels


GENERATORS: dict[str, tuple[Callable[[int, np.random.Generator], tuple[np.ndarray, np.ndarray]],
                            tuple[str, ...], tuple[str, ...]]] = {
    "words": (_words, DIGIT_NAMES, WORD_TEMPLATES),
    "shapes": (_shapes, SHAPE_NAMES, SHAPE_TEMPLATES),
    "textures": (_textures, TEXTURE_NAMES, TEXTURE_TEMPLATES),
}


def _split(domain: str, split: str, n: int, image_size: int) -> TensorDataset:
    images, labels = GENERATORS[domain][0](n, _rng(domain, split))
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).clamp(0, 1)
    if image_size != SIZE:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False).clamp(0, 1)
    return TensorDataset(x, torch.from_numpy(labels).long())


def load_domain(name: str, image_size: int = SIZE) -> DataBundle:
    """One domain of the suite by name, with its fixed train/test split."""
    if name == "digits":
        return digits(image_size)
    if name not in GENERATORS:
        raise ValueError(f"domain {name!r}: not in the suite {SUITE}")
    _, classnames, templates = GENERATORS[name]
    return DataBundle(name, _split(name, "train", TRAIN_SIZE, image_size), _split(name, "test", TEST_SIZE, image_size),
                      list(classnames), list(templates))


def load_suite(image_size: int = SIZE) -> list[DataBundle]:
    """Every domain of the suite, in SUITE order."""
    return [load_domain(name, image_size) for name in SUITE]
