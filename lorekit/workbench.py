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
from .data import DataBundle, check_dataset, few_shot, fixed_subset, load_dataset, stack
from .evaluate import evaluate_encoder
from .models import LoadedCLIP, ZeroShotClassifier, frozen_copy, load_clip, load_encoder_weights, weights_id
from .rundir import ADAPTER, ENCODER, SUMMARY, read_config, read_json, tuned_model


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
        run = self._finished(run_dir)
        if not (run / ADAPTER).is_file():
            return self.load_encoder(run / ENCODER)
        return frozen_copy(tuned_model(run, self.clip).encoder)

    def head_of(self, run_dir: str | Path) -> tuple[nn.Module, torch.Tensor]:
        """(image encoder, class embeddings) a finished run classifies with: the class embeddings come from the
        run's own text tower when it trained one (AdvCLIP-LoRA), else they are this workbench's."""
        run = self._finished(run_dir)
        if not read_config(run, device=self.cfg.device).trains_text_tower:  # a GPU run read back on a CPU
            return self.encoder_of(run), self.class_embeddings
        tuned = tuned_model(run, self.clip)
        return (frozen_copy(tuned.encoder),
                tuned.class_embeddings(self.data.classnames, self.data.templates, self.device))

    def classifier_of(self, run_dir: str | Path) -> ZeroShotClassifier:
        """The zero-shot classifier of a finished run (see `head_of`)."""
        return ZeroShotClassifier(*self.head_of(run_dir)).eval()

    def _finished(self, run_dir: str | Path) -> Path:
        run = Path(run_dir)
        if not (run / SUMMARY).is_file():
            raise ConfigError(f"run={str(run)!r}: not a finished run (no {SUMMARY})")
        saved = read_json(run / SUMMARY).get("base_weights")
        if saved != self.base_weights:
            raise ConfigError(f"run={str(run)!r} was fine-tuned from {saved}, not from {self.base_weights}")
        return run

    def load_encoder(self, path: str | Path) -> nn.Module:
        """A copy of the original image encoder with the weights of `path` (a run's encoder.pt)."""
        encoder = copy.deepcopy(self.original)
        load_encoder_weights(encoder, path)
        return encoder.eval()

    def evaluate(self, encoder: nn.Module, eps: Sequence[float], *, steps: int, rho: float | None = None,
                 seed: int | None = None, attacks: Sequence[str] = ("pgd",),
                 class_embeddings: torch.Tensor | None = None, progress: bool = False,
                 desc: str = "evaluation") -> dict[str, float]:
        """Clean accuracy, robust accuracy under each attack ('pgd', 'fgsm', 'apgd'; `steps` iterations) at each
        ε, typographic accuracy ('typographic': typo_acc, typo_written), cosine and fidelity to the original, on the subset; over this workbench's class embeddings unless
        others are given; `progress` reports it under `desc`."""
        weights = self.class_embeddings if class_embeddings is None else class_embeddings
        return evaluate_encoder(encoder, self.original, weights, self.images, self.labels, eps, rho=rho, steps=steps,
                                norm=self.cfg.norm, seed=self.cfg.seed if seed is None else seed, attacks=attacks,
                                progress=progress, desc=desc, classnames=self.data.classnames,
                                typo_style=self.cfg.typo_style)

    def evaluate_run(self, run_dir: str | Path, eps: Sequence[float], *, steps: int, rho: float | None = None,
                     seed: int | None = None, attacks: Sequence[str] = ("pgd",), progress: bool = False,
                     desc: str = "evaluation") -> dict[str, float]:
        """`evaluate` of a finished run with the head it classifies with (its own text tower's, see `head_of`)."""
        encoder, weights = self.head_of(run_dir)
        return self.evaluate(encoder, eps, steps=steps, rho=rho, seed=seed, attacks=attacks, class_embeddings=weights,
                             progress=progress, desc=desc)


def setup(cfg: TrainConfig, *, subset_seed: int = 0) -> Workbench:
    """Load what `cfg` names (model, data set, evaluation subset); every error before any work.

    The evaluation subset is `cfg.eval_samples` test images drawn with `subset_seed`, not cfg.seed. With
    cfg.shots the training split is cut to that many images per class, drawn with cfg.seed (data.few_shot).
    """
    cfg.validate()
    device = resolve_device(cfg.device)
    check_dataset(cfg.dataset)
    clip = load_clip(cfg.model, cfg.pretrained, cache_dir=cfg.cache_dir, device=device)
    data = load_dataset(cfg.dataset, root=cfg.data_path, image_size=clip.encoder.image_size[0])
    if cfg.shots:
        data = few_shot(data, cfg.shots, cfg.seed)
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
