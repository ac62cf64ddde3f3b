"""Typographic attacks: a wrong class name written onto each image, and accuracy under them.

An attacked image carries the name of a class other than its own, drawn by lorekit.render (PIL/FreeType
glyphs composited in float) with a seeded style per sample: one of the twelve DejaVu fonts, a font size,
fill and stroke colours from render.PALETTE, and a uniform position with the whole ink box inside the
image. Every draw of sample i comes from its own seed (`sample_seeds`), so an image's attack does not
depend on the batch it sits in.

Two styles (`STYLES`), chosen by resolution unless named (`style_for`):

- 'paper' (images of 96 px and more): the text straight on the image, font size 9–18 % of the height
  (20–40 px at 224 px, the typographic-attack papers' range; method notes, "Related systems").
- 'label' (smaller images, e.g. the embedded suite's 32 px): the text at 50–69 % of the height (16–22 px at
  32 px) on a contrasting rectangular label (dark behind bright text, white behind dark text), like the
  paper note of the classic "iPod" attack. At 32 px the papers' sizes are 3–6 px, which nothing reads; and
  measured on lorekit-tiny, text straight on a handwritten digit hardly changes which class it predicts
  (bench/typographic_susceptibility.py and the README's numbers), the label makes the text legible.

`typographic_accuracy` reports clean accuracy, accuracy on the attacked images (`typo_acc`) and the fraction
of attacked images classified as the written class (`typo_written`: how much the model reads the text,
against ~0 on clean images), the numbers `python -m lorekit eval --attack typographic` prints.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .config import TYPO_STYLES, ConfigError
from .render import PALETTE, TextStyle, draw_text, random_styles, text_masks

PAPER_MIN_SIZE = 96  # images at least this tall get the 'paper' style under style='auto'


@dataclass(frozen=True)
class TypoStyle:
    """How the wrong names are drawn: font sizes as fractions of the image height (inclusive, shrunk to fit
    the width), fill/stroke colours (names in render.PALETTE), and `label`: a contrasting box behind the text."""

    sizes: tuple[float, float]
    label: bool
    colours: tuple[str, ...] = tuple(PALETTE)


STYLES: dict[str, TypoStyle] = {
    "paper": TypoStyle(sizes=(0.09, 0.18), label=False),
    "label": TypoStyle(sizes=(0.5, 0.69), label=True),
}
STYLE_NAMES = TYPO_STYLES  # 'auto' and the STYLES


def style_for(name: str, height: int) -> TypoStyle:
    """The style `name` ('auto', 'paper', 'label'); 'auto' is 'paper' at >= 96 px and 'label' below."""
    if name not in STYLE_NAMES:
        raise ConfigError(f"typo_style={name!r}: must be one of {', '.join(STYLE_NAMES)}")
    if name == "auto":
        name = "paper" if height >= PAPER_MIN_SIZE else "label"
    return STYLES[name]


def sample_seeds(seed: int, count: int, offset: int = 0) -> list[int]:
    """Seeds of samples offset … offset+count−1 of a stream seeded with `seed` (pure functions of the pair)."""
    return [((seed * 1_000_003 + offset + i) * 2_654_435_761) % 2**63 for i in range(count)]


def wrong_labels(labels: torch.Tensor, num_classes: int, seeds: Sequence[int]) -> torch.Tensor:
    """A class ≠ labels[i] for each sample, uniform over the other num_classes − 1, drawn from seeds[i]."""
    if num_classes < 2:
        raise ConfigError(f"a typographic attack needs at least 2 classes to write a wrong one, not {num_classes}")
    if len(seeds) != len(labels):
        raise ValueError(f"{len(seeds)} seeds for {len(labels)} labels")
    shift = torch.tensor([int(np.random.default_rng([s, 1]).integers(1, num_classes)) for s in seeds])
    return (labels.cpu() + shift) % num_classes


def _luminance(rgb: tuple[float, float, float]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def sample_style(text: str, height: int, width: int, seed: int, style: TypoStyle) -> TextStyle:
    """One seeded text style for `text` (render.random_styles with the style's sizes and colours)."""
    lo, hi = (max(6, round(f * height)) for f in style.sizes)
    pad = 1 if style.label else 0  # the label's margin must fit inside the image too
    st = random_styles([text], height - 2 * pad, width - 2 * pad, seed, sizes=(lo, max(lo, hi)),
                       colours=style.colours)[0]
    return replace(st, xy=(st.xy[0] + pad, st.xy[1] + pad))


def draw_attack(images: torch.Tensor, texts: Sequence[str], seeds: Sequence[int], style: TypoStyle) -> torch.Tensor:
    """texts[i] drawn onto images[i] ([B, 3, H, W] in [0,1]) in a style drawn from seeds[i]; a new tensor."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], not {list(images.shape)}")
    if not (len(texts) == len(seeds) == len(images)):
        raise ValueError(f"{len(texts)} texts and {len(seeds)} seeds for {len(images)} images")
    height, width = images.shape[-2:]
    styles = [sample_style(t, height, width, s, style) for t, s in zip(texts, seeds)]
    base = images.clone()
    if style.label:  # a contrasting box one pixel larger than the ink box on every side
        for img, text, st in zip(base, texts, styles):
            h, w = text_masks(text, st.font, st.size, st.stroke_width)[0].shape
            x, y = st.xy
            colour = (0.0, 0.0, 0.0) if _luminance(st.fill) >= 0.45 else (1.0, 1.0, 1.0)
            img[:, y - 1:y + h + 1, x - 1:x + w + 1] = torch.tensor(colour).to(img).view(3, 1, 1)
    return draw_text(base, list(texts), styles)


def typographic_images(images: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str], seed: int, *,
                       offset: int = 0, style: str | TypoStyle = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(attacked images, written class per image): sample offset+i gets a wrong class name drawn from its seed."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images for {len(labels)} labels")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(classnames)):
        raise ValueError(f"labels must lie in [0, {len(classnames)}) for {len(classnames)} class names")
    spec = style if isinstance(style, TypoStyle) else style_for(style, images.shape[-2])
    seeds = sample_seeds(seed, len(images), offset)
    written = wrong_labels(labels, len(classnames), seeds)
    x_t = draw_attack(images, [classnames[c] for c in written], seeds, spec)
    return x_t, written.to(labels.device)


@torch.inference_mode()
def typographic_accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                         classnames: Sequence[str], *, seed: int = 0, style: str | TypoStyle = "auto",
                         batch_size: int = 256, progress=None) -> dict[str, float]:
    """clean_acc, typo_acc (accuracy on the attacked images) and typo_written (fraction predicted as the
    written class) of a classifier over `classnames`; the attack of image i is seeded by (seed, i)."""
    classifier.eval()
    clean = typo = written_hits = 0
    for start in range(0, len(images), batch_size):
        x, y = images[start:start + batch_size], labels[start:start + batch_size]
        x_t, written = typographic_images(x, y, classnames, seed, offset=start, style=style)
        clean += int((classifier(x).argmax(-1) == y).sum())
        pred = classifier(x_t).argmax(-1)
        typo += int((pred == y).sum())
        written_hits += int((pred == written).sum())
        if progress is not None:
            progress.update()
    n = max(1, len(labels))
    return {"clean_acc": clean / n, "typo_acc": typo / n, "typo_written": written_hits / n}
