"""Zero-shot accuracy and embedding-fidelity metrics for a (fine-tuned) image encoder.

Clean accuracy, PGD robust accuracy (cross-entropy PGD on the zero-shot classifier; the
AutoAttack-style APGD evaluation lives in `robustness`), and the embedding metrics of the
method notes: cosine alignment mean cos(φθ(x), φθ0(x)), embedding fidelity
mean ‖φθ(x) − φθ0(x)‖²/‖φθ0(x)‖², and the fraction of images satisfying the ρ-constraint.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .attacks import ce_attack_loss, pgd
from .models import ZeroShotClassifier


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


@torch.inference_mode()
def embed(encoder: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Embeddings of a stack of [0,1] images, in float32 on the images' device."""
    encoder.eval()
    return torch.cat([encoder(images[s]).float() for s in _batches(len(images), batch_size)])


def embedding_metrics(encoder: nn.Module, reference: nn.Module, images: torch.Tensor, rho: float | None = None,
                      batch_size: int = 256) -> dict[str, float]:
    """Cosine alignment, embedding fidelity (relative squared distance) and constraint satisfaction."""
    emb, ref = embed(encoder, images, batch_size), embed(reference, images, batch_size)
    rel = (emb - ref).pow(2).sum(-1) / ref.pow(2).sum(-1).clamp_min(1e-12)
    out = {"cosine": F.cosine_similarity(emb, ref, dim=-1).mean().item(), "fidelity": rel.mean().item()}
    if rho is not None:
        out["satisfied"] = (rel <= rho).float().mean().item()
    return out


@torch.inference_mode()
def clean_accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    classifier.eval()
    correct = sum((classifier(images[s]).argmax(-1) == labels[s]).sum() for s in _batches(len(images), batch_size))
    return float(correct) / len(labels)


def pgd_accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, *,
                 steps: int = 10, norm: str = "linf", batch_size: int = 256, seed: int = 0) -> float:
    """Accuracy under cross-entropy PGD (momentum-on-sign, random start, step ε/4), seeded."""
    classifier.eval()
    gen = torch.Generator(device=images.device).manual_seed(seed)
    correct = 0
    for s in _batches(len(images), batch_size):
        x, y = images[s], labels[s]
        x_adv = pgd(ce_attack_loss(classifier, y), x, eps, steps=steps, norm=norm, generator=gen)
        with torch.inference_mode():
            correct += int((classifier(x_adv).argmax(-1) == y).sum())
    return correct / len(labels)


def evaluate_encoder(encoder: nn.Module, reference: nn.Module, class_embeddings: torch.Tensor,
                     images: torch.Tensor, labels: torch.Tensor, eps_list: Sequence[float], *,
                     rho: float | None = None, steps: int = 10, norm: str = "linf",
                     batch_size: int = 256, seed: int = 0) -> dict[str, float]:
    """Clean accuracy, PGD robust accuracy at each ε, and the embedding metrics, in one dict."""
    classifier = ZeroShotClassifier(encoder, class_embeddings)
    out = {"clean_acc": clean_accuracy(classifier, images, labels, batch_size)}
    for eps in eps_list:
        out[f"robust_acc@{round(eps * 255, 2):g}"] = pgd_accuracy(classifier, images, labels, eps, steps=steps,
                                                                  norm=norm, batch_size=batch_size, seed=seed)
    out.update(embedding_metrics(encoder, reference, images, rho, batch_size))
    return out


def evaluate_pretrained_or_run(*, run_dir: str = "", model: str = "lorekit-tiny", pretrained: str = "digits",
                               dataset: str = "digits", eps_list: Sequence[float] = (2 / 255, 4 / 255, 8 / 255),
                               samples: int = 1000, steps: int = 20, device: str = "auto",
                               cache_dir: str | None = None) -> dict[str, float]:
    """The `lorekit eval` entry: a run directory (compared with its original encoder) or a plain model."""
    from .config import ConfigError, TrainConfig
    from .data import fixed_subset, load_dataset, stack
    from .models import frozen_copy, load_clip
    from .trainer import load_run, resolve_device

    if samples < 1:
        raise ConfigError(f"samples={samples}: must be an integer >= 1")
    if steps < 1:
        raise ConfigError(f"steps={steps}: must be an integer >= 1")
    bad = [e for e in eps_list if not 0 < e <= 1]
    if bad:
        raise ConfigError(f"eps={bad}: every ε must lie in (0, 1] in pixel units (pass --eps in units of 1/255)")
    dev = resolve_device(device)
    rho = None
    if run_dir:
        cfg, clip, reference = load_run(run_dir, dev)
        dataset, rho = cfg.dataset, cfg.rho
        root = cfg.data_path
    else:
        root = TrainConfig(cache_dir=cache_dir or TrainConfig().cache_dir).data_path
        clip = load_clip(model, pretrained, cache_dir=cache_dir, device=dev)
        reference = frozen_copy(clip.encoder)
    bundle = load_dataset(dataset, root=root, image_size=clip.encoder.image_size[0])
    images, labels = stack(bundle.test, fixed_subset(len(bundle.test), samples))
    weights = clip.class_embeddings(bundle.classnames, bundle.templates, dev)
    return evaluate_encoder(clip.encoder, reference, weights, images.to(dev), labels.to(dev), eps_list,
                            rho=rho, steps=steps)
