"""Data sets as [0,1] image tensors with class names and zero-shot templates.

- 'digits': scikit-learn's 1797 handwritten digits (ships inside the package, no network),
  upsampled from 8×8 to 32×32 RGB, with a fixed stratified train/test split.
- the other domains of the embedded suite ('words', 'shapes', 'textures'; see `lorekit.suite`).
- torchvision data sets by name, read from a local root with download=False.
- image folders (one sub-folder per class, at least two; train/ and test/ sub-folders are used when
  present). Every image is checked once when the folder is loaded, so a broken file is named before
  training starts rather than crashing a run halfway.

Class names and templates come from clip_benchmark's tables where it has the data set. `few_shot` cuts
any of them to N training images per class (AdvCLIP-LoRA's CoOp-style few-shot splits).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

from .config import ConfigError

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = (
    "a photo of the number {c}.",
    "a handwritten digit {c}.",
    "a blurry picture of the digit {c}.",
    "the number {c}, written by hand.",
)
# open_clip's short ImageNet template set: a sensible default for a folder of photos.
FOLDER_TEMPLATES = ("a photo of a {c}.", "a bad photo of a {c}.", "a photo of the {c}.", "itap of a {c}.")
DIGITS_TEST_SIZE = 397
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")

# lorekit name -> (torchvision class, kwargs for train, kwargs for test, clip_benchmark key)
TORCHVISION_SETS = {
    "cifar10": ("CIFAR10", {"train": True}, {"train": False}, "cifar10"),
    "cifar100": ("CIFAR100", {"train": True}, {"train": False}, "cifar100"),
    "mnist": ("MNIST", {"train": True}, {"train": False}, "mnist"),
    "stl10": ("STL10", {"split": "train"}, {"split": "test"}, "stl10"),
    "svhn": ("SVHN", {"split": "train"}, {"split": "test"}, "svhn"),
    "dtd": ("DTD", {"split": "train"}, {"split": "test"}, "dtd"),
    "flowers": ("Flowers102", {"split": "train"}, {"split": "test"}, "flowers"),
    "pets": ("OxfordIIITPet", {"split": "trainval"}, {"split": "test"}, "pets"),
    "food101": ("Food101", {"split": "train"}, {"split": "test"}, "food101"),
    "gtsrb": ("GTSRB", {"split": "train"}, {"split": "test"}, "gtsrb"),
    "pcam": ("PCAM", {"split": "train"}, {"split": "test"}, "pcam"),
    "fgvc_aircraft": ("FGVCAircraft", {"split": "trainval"}, {"split": "test"}, "fgvc_aircraft"),
    "cars": ("StanfordCars", {"split": "train"}, {"split": "test"}, "cars"),
    "eurosat": ("EuroSAT", {}, None, "eurosat"),
    "caltech101": ("Caltech101", {}, None, "caltech101"),
    "imagenet": ("ImageNet", {"split": "train"}, {"split": "val"}, "imagenet1k"),
}


@dataclass
class DataBundle:
    """A labelled train/test pair of [0,1] image data sets plus what zero-shot needs."""

    name: str
    train: Dataset
    test: Dataset
    classnames: list[str]
    templates: list[str]


@cache
def _clip_benchmark_table(kind: str) -> dict:
    path = resources.files("clip_benchmark") / "datasets" / f"en_{kind}.json"
    return json.loads(path.read_text())


def clip_benchmark_names(key: str, fallback: Sequence[str]) -> tuple[list[str], list[str]]:
    """(classnames, templates) from clip_benchmark, falling back to the given class names."""
    names = _clip_benchmark_table("classnames").get(key, list(fallback))
    templates = _clip_benchmark_table("zeroshot_classification_templates").get(key, list(FOLDER_TEMPLATES))
    return list(names), list(templates)


def digits(image_size: int = 32) -> DataBundle:
    """The embedded default: sklearn's digits as white-on-black 32×32 RGB in [0,1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    raw = load_digits()
    x = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False).clamp(0, 1)
    x = x.expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(raw.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(torch.arange(len(y)).numpy(), test_size=DIGITS_TEST_SIZE,
                                           random_state=0, stratify=raw.target)
    return DataBundle("digits", TensorDataset(x[idx_train], y[idx_train]),
                      TensorDataset(x[idx_test], y[idx_test]), list(DIGIT_NAMES), list(DIGIT_TEMPLATES))


def _pixel_transform(image_size: int):
    from torchvision import transforms as T

    # Resize + crop to the model's size, no normalisation: that lives in the model wrapper.
    return T.Compose([T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(image_size), T.Lambda(lambda im: im.convert("RGB")), T.ToTensor()])


def torchvision_set(name: str, root: str | Path, image_size: int) -> DataBundle:
    import torchvision.datasets as tvd

    cls_name, train_kw, test_kw, key = TORCHVISION_SETS[name]
    cls = getattr(tvd, cls_name)
    tf = _pixel_transform(image_size)
    try:
        train = cls(str(root), download=False, transform=tf, **train_kw)
        test = cls(str(root), download=False, transform=tf, **test_kw) if test_kw is not None else None
    except (RuntimeError, FileNotFoundError) as e:
        raise ConfigError(f"dataset={name!r}: not found under data_root={str(root)!r} (nothing is downloaded; "
                          f"place the torchvision files there first): {e}") from None
    if test is None:  # data sets without an official split: a fixed seeded 80/20 split
        train, test = _seeded_split(train)
    base = train.dataset if isinstance(train, Subset) else train
    fallback = getattr(base, "classes", None) or [str(i) for i in range(1000)]
    names, templates = clip_benchmark_names(key, fallback)
    return DataBundle(name, train, test, names, templates)


def _seeded_split(ds: Dataset, test_fraction: float = 0.2) -> tuple[Subset, Subset]:
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
    n_test = max(1, int(len(ds) * test_fraction))
    return Subset(ds, perm[n_test:]), Subset(ds, perm[:n_test])


def image_folder(path: str | Path, image_size: int) -> DataBundle:
    """An ImageFolder data set; class names are the folder names with '_' read as spaces."""
    from torchvision.datasets import ImageFolder

    check_dataset(str(path))
    path = Path(path)
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*") if p.is_file()):
        raise ConfigError(f"dataset={str(path)!r}: image folder holds no images "
                          f"(expected class sub-folders with {', '.join(IMAGE_SUFFIXES)} files)")
    tf = _pixel_transform(image_size)
    split_dirs = (path / "train", next((path / d for d in ("test", "val") if (path / d).is_dir()), None))
    try:
        if split_dirs[0].is_dir() and split_dirs[1] is not None:
            folders = [ImageFolder(str(d), transform=tf) for d in split_dirs]
        else:
            folders = [ImageFolder(str(path), transform=tf)]
    except (FileNotFoundError, RuntimeError) as e:
        raise ConfigError(f"dataset={str(path)!r}: not a usable image folder ({e})") from None
    classes = folders[0].classes
    if len(classes) < 2:
        raise ConfigError(f"dataset={str(path)!r}: holds a single class, {classes[0]!r}; zero-shot classification "
                          "needs at least 2 classes (one sub-folder each)")
    if folders[-1].classes != classes:
        raise ConfigError(f"dataset={str(path)!r}: {split_dirs[1].name}/ has classes {folders[-1].classes}, "
                          f"train/ has {classes}; both need the same class sub-folders")
    for folder in folders:
        _check_images(path, folder.samples)
    train, test = folders if len(folders) == 2 else _seeded_split(folders[0])
    return DataBundle(path.name, train, test, [c.replace("_", " ") for c in classes], list(FOLDER_TEMPLATES))


def _check_images(folder: Path, samples: Sequence[tuple[str, int]]) -> None:
    """Raise ConfigError naming the first file PIL cannot read (verify() parses the file without decoding it)."""
    from PIL import Image

    for file, _ in samples:
        try:
            with Image.open(file) as im:
                im.verify()
        except Exception as e:  # PIL raises many types for truncated or garbage files
            raise ConfigError(f"dataset={str(folder)!r}: {file} is not a readable image ({type(e).__name__}: {e}); "
                              "fix or remove it") from None


def builtin_names() -> tuple[str, ...]:
    """The data set names `load_dataset` resolves without a path: the embedded suite, torchvision sets."""
    from .suite import SUITE  # imported here: the suite builds on this module

    return (*SUITE, *TORCHVISION_SETS)


def check_dataset(name: str) -> None:
    """Refuse, before anything is loaded, a name that is neither a known data set nor a folder."""
    if not name or (name not in builtin_names() and not Path(name).is_dir()):
        raise ConfigError(f"dataset={name!r}: not a known data set name ({', '.join(builtin_names())}) "
                          "and not an image folder")


def load_dataset(name: str, *, root: str | Path = "", image_size: int = 32) -> DataBundle:
    """Resolve a data set by name or path (see the module docstring)."""
    from .suite import SUITE, load_domain

    if name in SUITE:
        return load_domain(name, image_size)
    if name in TORCHVISION_SETS:
        return torchvision_set(name, root, image_size)
    return image_folder(name, image_size)


def stack(ds: Dataset, indices: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialise (images, labels) for a fixed subset; fast path for in-memory tensors."""
    if isinstance(ds, TensorDataset):
        x, y = ds.tensors
        return (x, y) if indices is None else (x[list(indices)], y[list(indices)])
    idx = range(len(ds)) if indices is None else indices
    items = [ds[i] for i in idx]
    return torch.stack([a for a, _ in items]), torch.tensor([int(b) for _, b in items])


def fixed_subset(n_total: int, n: int, seed: int = 0) -> list[int]:
    """A seeded, sorted sample of n indices (all of them when n >= n_total)."""
    if n >= n_total:
        return list(range(n_total))
    return sorted(torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n].tolist())


def labels_of(ds: Dataset) -> torch.Tensor:
    """Every label of a data set, in order: from the label list it keeps (torchvision sets, image folders,
    tensors; no image is read), else item by item."""
    if isinstance(ds, TensorDataset):
        return ds.tensors[1].long()
    if isinstance(ds, Subset):
        return labels_of(ds.dataset)[torch.as_tensor(list(ds.indices), dtype=torch.long)]
    for name in ("targets", "labels", "_labels", "y"):  # the names torchvision's data sets use
        values = getattr(ds, name, None)
        if values is not None and len(values) == len(ds):
            return torch.as_tensor([int(v) for v in values], dtype=torch.long)
    samples = getattr(ds, "_samples", None)  # GTSRB, StanfordCars: (path, label) pairs
    if samples is not None and len(samples) == len(ds):
        return torch.as_tensor([int(label) for _, label in samples], dtype=torch.long)
    return torch.as_tensor([int(ds[i][1]) for i in range(len(ds))], dtype=torch.long)


def few_shot(data: DataBundle, shots: int, seed: int) -> DataBundle:
    """`data` with its training split cut to `shots` images of every class, drawn with `seed`; the test split is
    untouched. Refuses (ConfigError) when a class has fewer than `shots` training images, naming it."""
    if shots < 1:
        raise ConfigError(f"shots={shots}: must be an integer >= 1 (0 means the whole training split)")
    labels = labels_of(data.train)
    counts = torch.bincount(labels, minlength=len(data.classnames))
    short = int(counts.argmin())
    if counts[short] < shots:
        name = data.classnames[short] if short < len(data.classnames) else str(short)
        raise ConfigError(f"shots={shots}: class {name!r} has only {int(counts[short])} training images in "
                          f"{data.name!r}; use shots <= {int(counts[short])}")
    gen = torch.Generator().manual_seed(seed)
    chosen = [torch.nonzero(labels == c).squeeze(1) for c in range(len(counts))]
    indices = torch.cat([idx[torch.randperm(len(idx), generator=gen)[:shots]] for idx in chosen]).sort().values
    if isinstance(data.train, TensorDataset):  # stays in memory: the trainer indexes it directly
        return replace(data, train=TensorDataset(*(t[indices] for t in data.train.tensors)))
    return replace(data, train=Subset(data.train, indices.tolist()))
