"""ImageNet-C corruptions: shape/range, repeatability, severity ordering, fidelity to the reference
code where this module reimplements it, and the accuracy table."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from lorekit import corruptions
from lorekit.corruptions import COMMON, EXTRA, FAMILIES, corrupt, corruption_accuracy


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Smooth random colour images (upsampled noise), 32×32: every corruption has something to do."""
    g = torch.Generator().manual_seed(0)
    return F.interpolate(torch.rand(6, 3, 8, 8, generator=g), size=(32, 32), mode="bilinear", align_corners=False)


def distortion(images: torch.Tensor, name: str, severity: int) -> float:
    return (corrupt(images, name, severity) - images).abs().mean().item()


@pytest.mark.parametrize("name", COMMON + EXTRA)
def test_shape_range_and_repeatability(images, name):
    out = corrupt(images, name, 3, seed=7)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert (out - images).abs().mean() > 1e-3  # it did something
    assert torch.equal(out, corrupt(images, name, 3, seed=7))


def test_grayscale_input_keeps_one_channel(images):
    gray = images.mean(1, keepdim=True)
    out = corrupt(gray, "gaussian_noise", 2)
    assert out.shape == gray.shape and 0 <= out.min() and out.max() <= 1


@pytest.mark.parametrize("name", COMMON)
def test_severity_increases_the_distortion(images, name):
    assert distortion(images, name, 1) < distortion(images, name, 3) <= distortion(images, name, 5) + 0.01
    assert distortion(images, name, 1) < distortion(images, name, 5)


def test_mean_distortion_is_strictly_increasing_in_severity(images):
    means = [np.mean([distortion(images, n, s) for n in COMMON]) for s in (1, 2, 3, 4, 5)]
    assert all(a < b for a, b in zip(means, means[1:]))


def test_reimplementations_equal_the_reference_code(images, monkeypatch):
    """With the two API breaks patched back in (np.float_, skimage's multichannel), the package's
    fog, gaussian_blur and glass_blur give exactly what this module's versions give."""
    from skimage.filters import gaussian

    module = corruptions._package()
    monkeypatch.setattr(np, "float_", np.float64, raising=False)
    monkeypatch.setattr(module, "gaussian",
                        lambda img, sigma, multichannel=None, **kw: gaussian(img, sigma=sigma,
                                                                             channel_axis=-1 if multichannel else None,
                                                                             **kw))
    arrays = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    for name in ("fog", "gaussian_blur", "glass_blur"):
        for severity in (1, 5):
            for array in arrays[:2]:
                np.random.seed(3)
                reference = getattr(module, name)(Image.fromarray(array), severity)
                np.random.seed(3)
                ours = getattr(corruptions, name)(Image.fromarray(array), severity)
                np.testing.assert_array_equal(np.uint8(reference), np.uint8(ours))


def test_package_corruptions_match_imagecorruptions_corrupt(images):
    """The delegated ones go through the package unchanged (same 8-bit quantisation as its corrupt())."""
    module = corruptions._package()
    array = (images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    for name in ("contrast", "jpeg_compression", "pixelate"):
        expected = np.uint8(np.asarray(getattr(module, name)(Image.fromarray(array), 4)))
        ours = (corrupt(images[:1], name, 4)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        np.testing.assert_array_equal(ours, expected)


def test_import_stand_in_does_not_leak():
    corruptions._package()
    import importlib.util

    if importlib.util.find_spec("pkg_resources") is None:
        assert "pkg_resources" not in sys.modules


def test_families_cover_the_fifteen_common_corruptions():
    assert len(COMMON) == 15 and set(FAMILIES) == {"noise", "blur", "weather", "digital"}


def test_bad_input_is_refused(images):
    with pytest.raises(ValueError, match="corruption 'rain'"):
        corrupt(images, "rain", 1)
    with pytest.raises(ValueError, match="severity=6"):
        corrupt(images, "fog", 6)
    with pytest.raises(ValueError, match="32"):
        corrupt(images[..., :16, :16], "fog", 1)


def test_corruption_accuracy_table(images):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 5, stride=4), nn.Flatten(), nn.Linear(4 * 7 * 7, 3)).eval()
    with torch.no_grad():
        y = model(images).argmax(1)  # clean accuracy 1 by construction
    res = corruption_accuracy(model, images, y, names=("gaussian_noise", "contrast"), severities=(1, 5),
                              progress=False)
    assert res["clean_acc"] == 1.0
    assert set(res["accuracy"]) == {"gaussian_noise", "contrast"} and set(res["accuracy"]["contrast"]) == {1, 5}
    assert all(0 <= a <= 1 for row in res["accuracy"].values() for a in row.values())
    assert res["per_family"].keys() == {"noise", "digital"}
    assert res["mean"] == pytest.approx(np.mean([a for row in res["accuracy"].values() for a in row.values()]))
    with pytest.raises(ValueError, match="corruption 'rain'"):
        corruption_accuracy(model, images, y, names=("rain",))
