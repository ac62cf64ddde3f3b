"""ImageNet-C common corruptions (Hendrycks & Dietterich, ICLR 2019) at severities 1–5, as an
out-of-distribution evaluation of (fine-tuned) zero-shot classifiers.

The corruptions come from the maintained `imagecorruptions` package (1.1.2, the pip port of the
ImageNet-C code) wherever it runs on this stack. Measured here (NumPy 2.4, SciPy 1.17,
scikit-image 0.26, setuptools 84):

- the package cannot be imported: its corruptions module does `from pkg_resources import
  resource_filename`, and setuptools ≥ 81 no longer ships pkg_resources. `_package` imports it
  with a stand-in `pkg_resources` that exists in sys.modules only during that import;
- gaussian_blur and glass_blur call skimage.filters.gaussian(multichannel=True), an argument
  scikit-image 0.19 removed (now channel_axis=-1): reimplemented here, same constants;
- fog uses np.float_, removed in NumPy 2.0: reimplemented here (plasma fractal in float64);
- impulse_noise calls skimage.util.random_noise without a generator, which since scikit-image
  0.19 draws from a fresh, unseeded one: reimplemented here with a generator seeded from NumPy's
  global one, so results repeat;
- frost picks one of six frost photographs but the wheel ships only frost1–3.png (and finds them
  with pkg_resources): reimplemented here, drawing from the three shipped images.

Like the package, `corrupt` needs images of at least 32×32 pixels. The constants are ImageNet-C's,
tuned for 224-px images: on 32-px images (the embedded digits) blurs and weather effects are
relatively much stronger than on ImageNet. Randomness comes from NumPy's global generator, as
in the reference code; `corrupt` seeds it per image and restores its previous state afterwards.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import sys
import types
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from .progress import Progress

FAMILIES = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog", "brightness"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
}
COMMON = tuple(name for names in FAMILIES.values() for name in names)
"""The 15 ImageNet-C test corruptions, by family."""
EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
"""ImageNet-C's four held-out validation corruptions."""
SEVERITIES = (1, 2, 3, 4, 5)


# ------------------------------------------------------------------------ the package
@functools.cache
def _package() -> types.ModuleType:
    """imagecorruptions.corruptions, imported with a temporary pkg_resources stand-in if needed."""
    with warnings.catch_warnings():  # it imports scipy.ndimage.interpolation: deprecated, still works
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import imagecorruptions.corruptions as module

            return module
        except ModuleNotFoundError as e:
            if e.name != "pkg_resources":
                raise
        shim = types.ModuleType("pkg_resources")
        shim.resource_filename = lambda package, name: str(Path(sys.modules[package].__file__).parent / name)
        sys.modules["pkg_resources"] = shim
        try:
            import imagecorruptions.corruptions as module
        finally:
            del sys.modules["pkg_resources"]
    return module


def _frost_dir() -> Path:
    spec = importlib.util.find_spec("imagecorruptions")  # locates the package without importing it
    return Path(next(iter(spec.submodule_search_locations))) / "frost"


# ------------------------------------------------------------------ reimplementations
def gaussian_blur(x: Image.Image, severity: int = 1) -> np.ndarray:
    """ImageNet-C gaussian_blur; the package's call uses scikit-image's removed `multichannel`."""
    from skimage.filters import gaussian

    c = [1, 2, 3, 4, 6][severity - 1]
    return np.clip(gaussian(np.array(x) / 255.0, sigma=c, channel_axis=-1), 0, 1) * 255


def glass_blur(x: Image.Image, severity: int = 1) -> np.ndarray:
    """ImageNet-C glass_blur (blur, local pixel shuffling, blur); same reason as gaussian_blur."""
    from skimage.filters import gaussian

    sigma, max_delta, iterations = [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)][severity - 1]
    img = np.uint8(gaussian(np.array(x) / 255.0, sigma=sigma, channel_axis=-1) * 255)
    height, width = img.shape[:2]
    for _ in range(iterations):
        for h in range(height - max_delta, max_delta, -1):
            for w in range(width - max_delta, max_delta, -1):
                dx, dy = np.random.randint(-max_delta, max_delta, size=(2,))
                # The reference's "swap" `x[h, w], x[h', w'] = x[h', w'], x[h, w]` of two NumPy views
                # copies x[h', w'] onto x[h, w] and leaves x[h', w'] as it was; ImageNet-C was made so.
                img[h, w] = img[h + dy, w + dx]
    return np.clip(gaussian(img / 255.0, sigma=sigma, channel_axis=-1), 0, 1) * 255


def impulse_noise(x: Image.Image, severity: int = 1) -> np.ndarray:
    """ImageNet-C impulse (salt-and-pepper) noise, with a seeded generator (see the module docstring)."""
    from skimage.util import random_noise

    amount = [0.03, 0.06, 0.09, 0.17, 0.27][severity - 1]
    noisy = random_noise(np.array(x) / 255.0, mode="s&p", amount=amount, rng=np.random.randint(2 ** 31))
    return np.clip(noisy, 0, 1) * 255


def _plasma_fractal(mapsize: int, wibbledecay: float) -> np.ndarray:
    """Diamond-square height map in [0,1] (the reference's, in float64 instead of np.float_)."""
    maparray = np.zeros((mapsize, mapsize), dtype=np.float64)
    stepsize, wibble = mapsize, 100.0

    def wibbledmean(array: np.ndarray) -> np.ndarray:
        return array / 4 + wibble * np.random.uniform(-wibble, wibble, array.shape)

    while stepsize >= 2:
        half = stepsize // 2
        corners = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        square = corners + np.roll(corners, shift=-1, axis=0)
        square += np.roll(square, shift=-1, axis=1)
        maparray[half:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(square)
        centres = maparray[half:mapsize:stepsize, half:mapsize:stepsize]
        corners = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        top = (centres + np.roll(centres, 1, axis=0)) + (corners + np.roll(corners, -1, axis=1))
        maparray[0:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(top)
        left = (centres + np.roll(centres, 1, axis=1)) + (corners + np.roll(corners, -1, axis=0))
        maparray[half:mapsize:stepsize, 0:mapsize:stepsize] = wibbledmean(left)
        stepsize //= 2
        wibble /= wibbledecay
    maparray -= maparray.min()
    return maparray / maparray.max()


def fog(x: Image.Image, severity: int = 1) -> np.ndarray:
    """ImageNet-C fog; the package's plasma fractal uses np.float_ (removed in NumPy 2)."""
    strength, decay = [(1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)][severity - 1]
    img = np.array(x) / 255.0
    mapsize = 1 << (max(img.shape[:2]) - 1).bit_length()
    max_val = img.max()
    img = img + strength * _plasma_fractal(mapsize, decay)[: img.shape[0], : img.shape[1], None]
    return np.clip(img * max_val / (max_val + strength), 0, 1) * 255


def frost(x: Image.Image, severity: int = 1) -> np.ndarray:
    """ImageNet-C frost, blending a random crop of a frost photograph; the package's version needs
    frost4–6 (not in its wheel) and pkg_resources, so this one draws from the shipped frost1–3.png."""
    import cv2

    weight, frost_weight = [(1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)][severity - 1]
    img = np.array(x)
    layer = np.array(Image.open(_frost_dir() / f"frost{np.random.randint(3) + 1}.png").convert("RGB"))
    # scale the photograph so it covers the image (with the reference's 1.1 margin), then crop
    scale = 1.1 * max(1.0, img.shape[0] / layer.shape[0], img.shape[1] / layer.shape[1])
    size = (int(math.ceil(layer.shape[1] * scale)), int(math.ceil(layer.shape[0] * scale)))
    layer = cv2.resize(layer, dsize=size, interpolation=cv2.INTER_CUBIC)
    top = np.random.randint(0, layer.shape[0] - img.shape[0])
    left = np.random.randint(0, layer.shape[1] - img.shape[1])
    layer = layer[top:top + img.shape[0], left:left + img.shape[1]]
    return np.clip(weight * img + frost_weight * layer, 0, 255)


_OWN: dict[str, Callable[[Image.Image, int], np.ndarray]] = {
    "gaussian_blur": gaussian_blur, "glass_blur": glass_blur, "impulse_noise": impulse_noise, "fog": fog,
    "frost": frost}


def corruption_function(name: str) -> Callable[[Image.Image, int], np.ndarray | Image.Image]:
    """The (PIL image, severity) -> image function of a corruption: this module's or the package's."""
    if name not in COMMON + EXTRA:
        raise ValueError(f"corruption {name!r}: must be one of {', '.join(COMMON + EXTRA)}")
    return _OWN[name] if name in _OWN else getattr(_package(), name)


# ------------------------------------------------------------------------------- API
def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """Apply one corruption at one severity to a [B, C, H, W] batch in [0,1] (C = 1 or 3).

    Images are quantised to 8 bits as in ImageNet-C; the result has the input's shape, dtype and
    device, values in [0,1]. Image i draws its randomness from seed + i, so results are repeatable.
    """
    if severity not in SEVERITIES:
        raise ValueError(f"severity={severity!r}: must be an integer in 1..5")
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images of shape {tuple(images.shape)}: expected [B, 1 or 3, H, W]")
    if min(images.shape[-2:]) < 32:
        raise ValueError(f"images of {images.shape[-2]}×{images.shape[-1]} pixels: ImageNet-C corruptions need ≥ 32×32")
    fn = corruption_function(name)
    rgb = images.detach().float().clamp(0, 1).expand(-1, 3, -1, -1)
    arrays = (rgb.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    state = np.random.get_state()
    try:
        out = []
        for i, array in enumerate(arrays):
            np.random.seed((seed + i) % 2 ** 32)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out.append(np.uint8(np.asarray(fn(Image.fromarray(array), severity))))
    finally:
        np.random.set_state(state)
    result = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255
    if images.shape[1] == 1:
        result = result.mean(1, keepdim=True)
    return result.to(device=images.device, dtype=images.dtype)


@torch.inference_mode()
def corruption_accuracy(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor, names: Sequence[str] = COMMON,
                        severities: Sequence[int] = SEVERITIES, *, batch_size: int = 250, seed: int = 0,
                        progress: bool = True) -> dict:
    """Accuracy of `classifier` on every corruption × severity of (x, y), plus summaries.

    Returns {'clean_acc', 'accuracy': {name: {severity: acc}}, 'per_corruption': {name: mean over
    severities}, 'per_family': {family: mean}, 'mean': mean over all cells}.
    """
    for name in names:
        corruption_function(name)  # fail on a bad name before any work
    classifier.eval()

    def accuracy(images: torch.Tensor) -> float:
        correct = sum(int((classifier(images[s:s + batch_size]).argmax(1) == y[s:s + batch_size]).sum())
                      for s in range(0, len(images), batch_size))
        return correct / len(images)

    table: dict[str, dict[int, float]] = {}
    with Progress(len(names) * len(severities), "corruptions", unit="cell", enabled=progress) as bar:
        for name, severity in [(n, s) for n in names for s in severities]:
            table.setdefault(name, {})[severity] = accuracy(corrupt(x, name, severity, seed))
            bar.update()
    per_corruption = {name: float(np.mean(list(row.values()))) for name, row in table.items()}
    per_family = {family: float(np.mean([per_corruption[n] for n in members if n in per_corruption]))
                  for family, members in {**FAMILIES, "extra": EXTRA}.items()
                  if any(n in per_corruption for n in members)}
    return {"clean_acc": accuracy(x), "accuracy": table, "per_corruption": per_corruption, "per_family": per_family,
            "mean": float(np.mean([a for row in table.values() for a in row.values()]))}
