"""The set-up every experiment starts from, loaded once from a TrainConfig: the model, the data, a fixed
evaluation subset, the class embeddings and the frozen original encoder.

The trainer, the demo, the command line, the benchmarks and the notebooks all start here, so they
evaluate on the same images with the same zero-shot head. The evaluation subset does not depend on
the training seed: runs of several seeds are compared on the same images.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .config import ConfigError, TrainConfig, resolve_device
from .data import DataBundle, check_dataset, fixed_subset, load_dataset, stack
from .evaluate import evaluate_encoder
from .models import LoadedCLIP, ZeroShotClassifier, frozen_copy, load_clip, load_encoder_weights, weights_id
from .rundir import ADAPTER, ENCODER, SUMMARY, read_json, tuned_model


@dataclass
class Workbench:
    """Model, data and evaluation set-up of one config (see `setup`)."""

    cfg: TrainConfig
    device: torch.device
    clip: LoadedCLIP  # its image tower is what a Trainer built from this workbench fine-tunes
    data: DataBundle
    indices: list[int]  # the fixed evaluation subset: cfg.eval_samples indices of data.test
    images: torch.Tensor  # those test images, on device
    labels: torch.Tensor
    class_embeddings: torch.Tensor  # [C, D] zero-shot weights of data's class names and templates
    base_weights: str  # models.weights_id of the loaded weights

    @functools.cached_property
    def original(self) -> nn.Module:
        """φθ0: a frozen copy of the image tower as loaded (made on first use: a LoRA run needs none)."""
        return frozen_copy(self.clip.encoder)

    def classifier(self, encoder: nn.Module | None = None) -> ZeroShotClassifier:
        """The zero-shot head over this data set's classes, on `encoder` (default: the original)."""
        return ZeroShotClassifier(encoder if encoder is not None else self.original, self.class_embeddings)

    def encoder_of(self, run_dir: str | Path) -> nn.Module:
        """The fine-tuned image encoder of a finished run that started from this workbench's weights."""
        run = Path(run_dir)
        if not (run / SUMMARY).is_file():
            raise ConfigError(f"run={str(run)!r}: not a finished run (no {SUMMARY})")
        saved = read_json(run / SUMMARY).get("base_weights")
        if saved != self.base_weights:
            raise ConfigError(f"run={str(run)!r} was fine-tuned from {saved}, not from {self.base_weights}")
        if not (run / ADAPTER).is_file():
            return self.load_encoder(run / ENCODER)
        return frozen_copy(tuned_model(run, self.clip).encoder)

    def load_encoder(self, path: str | Path) -> nn.Module:
        """A copy of the original image encoder with the weights of `path` (a run's encoder.pt)."""
        encoder = copy.deepcopy(self.original)
        load_encoder_weights(encoder, path)
        return encoder.eval()

    def evaluate(self, encoder: nn.Module, eps: Sequence[float], *, steps: int, rho: float | None = None,
                 seed: int | None = None, progress: bool = False, desc: str = "evaluation") -> dict[str, float]:
        """Clean accuracy, PGD robust accuracy at each ε, cosine and fidelity to the original, on the subset;
        `progress` reports it under `desc`."""
        return evaluate_encoder(encoder, self.original, self.class_embeddings, self.images, self.labels, eps,
                                rho=rho, steps=steps, norm=self.cfg.norm,
                                seed=self.cfg.seed if seed is None else seed, progress=progress, desc=desc)


def setup(cfg: TrainConfig, *, subset_seed: int = 0) -> Workbench:
    """Load what `cfg` names (model, data set, evaluation subset); every error before any work.

    The evaluation subset is `cfg.eval_samples` test images drawn with `subset_seed`, not cfg.seed.
    """
    cfg.validate()
    device = resolve_device(cfg.device)
    check_dataset(cfg.dataset)
    clip = load_clip(cfg.model, cfg.pretrained, cache_dir=cfg.cache_dir, device=device)
    data = load_dataset(cfg.dataset, root=cfg.data_path, image_size=clip.encoder.image_size[0])
    indices = fixed_subset(len(data.test), cfg.eval_samples, subset_seed)
    images, labels = stack(data.test, indices)
    return Workbench(cfg, device, clip, data, indices, images.to(device), labels.to(device),
                     clip.class_embeddings(data.classnames, data.templates, device),
                     weights_id(cfg.model, cfg.pretrained, cfg.cache_dir))


def for_notebook(recipe: str, *, torch_threads: int = 1, config: dict[str, Any] | None = None,
             **fields: Any) -> Workbench:
    """A notebook's first cell: CPU threads, the plotly renderer, and the workbench of a recipe.

    `fields` are TrainConfig fields the notebook's parameters set (None keeps the recipe's value),
    `config` any others (e.g. {"model": "ViT-B-32", "pretrained": "openai", "device": "cuda"}).
    """
    from . import plots
    from .recipes import recipe as make_recipe

    torch.set_num_threads(torch_threads)
    plots.use_notebook_renderer()
    cfg = make_recipe(recipe, **{**(config or {}), **fields})
    return setup(cfg)
