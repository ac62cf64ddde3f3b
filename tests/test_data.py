"""Data sets: the embedded digits, torchvision sets and image folders from files the tests write."""

import numpy as np
import pytest
import torch
from PIL import Image

from lorekit.config import ConfigError
from lorekit.data import DIGITS_TEST_SIZE, load_dataset, stack


def test_digits_split_is_fixed_and_in_pixel_range(digits_bundle):
    x, y = digits_bundle.train.tensors
    xt, yt = digits_bundle.test.tensors
    assert x.shape == (1797 - DIGITS_TEST_SIZE, 3, 32, 32) and xt.shape[0] == DIGITS_TEST_SIZE
    assert x.min() >= 0 and x.max() <= 1
    assert torch.equal(load_dataset("digits").test.tensors[1], yt)  # same split every time
    assert sorted(set(yt.tolist())) == list(range(10))


def _write_folder(root, classes, n=3, size=20):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_image_folder_with_and_without_split(tmp_path):
    _write_folder(tmp_path / "flat", ["golden_retriever", "cat"], n=5)
    b = load_dataset(str(tmp_path / "flat"), image_size=16)
    assert b.classnames == ["cat", "golden retriever"]
    assert len(b.train) + len(b.test) == 10
    x, y = stack(b.test)
    assert x.shape[1:] == (3, 16, 16) and x.min() >= 0 and x.max() <= 1
    _write_folder(tmp_path / "split" / "train", ["a", "b"])
    _write_folder(tmp_path / "split" / "val", ["a", "b"], n=2)
    b = load_dataset(str(tmp_path / "split"), image_size=16)
    assert len(b.train) == 6 and len(b.test) == 4


def test_empty_image_folder_and_unknown_name_are_clear_errors(tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "cls" / "notes.txt").write_text("no images here")
    with pytest.raises(ConfigError, match="holds no images"):
        load_dataset(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="not a known data set name"):
        load_dataset("imagenet-xyz")


def _idx(path, array):
    magic = {1: 0x0801, 3: 0x0803}[array.ndim]
    with open(path, "wb") as f:
        f.write(np.array([magic, *array.shape], dtype=">i4").tobytes())
        f.write(array.astype(np.uint8).tobytes())


def test_torchvision_mnist_from_local_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("t10k", 5)):
        _idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)))
        _idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    b = load_dataset("mnist", root=tmp_path, image_size=32)
    assert len(b.train) == 12 and len(b.test) == 5
    assert b.classnames == [str(i) for i in range(10)]  # clip_benchmark's names
    assert "{c}" in b.templates[0]
    x, y = stack(b.test)
    assert x.shape == (5, 3, 32, 32) and y.tolist() == [0, 1, 2, 3, 4]


def test_missing_torchvision_data_names_the_root(tmp_path):
    with pytest.raises(ConfigError, match="dataset='cifar10': not found under data_root"):
        load_dataset("cifar10", root=tmp_path)


def test_a_broken_image_is_named_when_the_folder_loads(tmp_path):
    _write_folder(tmp_path / "photos", ["cat", "dog"])
    (tmp_path / "photos" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(ConfigError, match=r"dog/broken\.png is not a readable image"):
        load_dataset(str(tmp_path / "photos"), image_size=16)


def test_a_single_class_folder_is_refused(tmp_path):
    _write_folder(tmp_path / "one", ["cat"], n=8)
    with pytest.raises(ConfigError, match="single class, 'cat'; zero-shot classification needs at least 2"):
        load_dataset(str(tmp_path / "one"), image_size=16)


def test_train_and_test_folders_must_have_the_same_classes(tmp_path):
    _write_folder(tmp_path / "split" / "train", ["a", "b"])
    _write_folder(tmp_path / "split" / "test", ["a", "c"])
    with pytest.raises(ConfigError, match=r"test/ has classes \['a', 'c'\], train/ has \['a', 'b'\]"):
        load_dataset(str(tmp_path / "split"), image_size=16)


def test_an_empty_dataset_name_is_not_the_current_folder(tmp_path, monkeypatch):
    _write_folder(tmp_path, ["a", "b"])  # the current folder would load as an image folder
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="dataset='': not a known data set name"):
        load_dataset("")
