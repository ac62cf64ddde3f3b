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
from .progress import Progress

BATCH_SIZE = 256  # images per evaluation batch; progress is reported per batch


def robust_key(eps: float) -> str:
    """The result key of robust accuracy at ε: 'robust_acc@4' for ε = 4/255."""
    return f"robust_acc@{round(eps * 255, 2):g}"


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


def batch_count(n: int, batch_size: int = BATCH_SIZE) -> int:
    """How many batches `n` images make: the progress units of one accuracy pass."""
    return -(-n // batch_size)


@torch.inference_mode()
def embed(encoder: nn.Module, images: torch.Tensor, batch_size: int = BATCH_SIZE) -> torch.Tensor:
    """Embeddings of a stack of [0,1] images, in float32 on the images' device."""
    encoder.eval()
    return torch.cat([encoder(images[s]).float() for s in _batches(len(images), batch_size)])


def embedding_metrics(encoder: nn.Module, reference: nn.Module, images: torch.Tensor, rho: float | None = None,
                      batch_size: int = BATCH_SIZE) -> dict[str, float]:
    """Cosine alignment, embedding fidelity (relative squared distance) and constraint satisfaction."""
    emb, ref = embed(encoder, images, batch_size), embed(reference, images, batch_size)
    rel = (emb - ref).pow(2).sum(-1) / ref.pow(2).sum(-1).clamp_min(1e-12)
    out = {"cosine": F.cosine_similarity(emb, ref, dim=-1).mean().item(), "fidelity": rel.mean().item()}
    if rho is not None:
        out["satisfied"] = (rel <= rho).float().mean().item()
    return out


@torch.inference_mode()
def clean_accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = BATCH_SIZE,
                   progress: Progress | None = None) -> float:
    classifier.eval()
    correct = 0
    for s in _batches(len(images), batch_size):
        correct += int((classifier(images[s]).argmax(-1) == labels[s]).sum())
        if progress is not None:
            progress.update()
    return correct / len(labels)


def pgd_accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, *,
                 steps: int = 10, norm: str = "linf", batch_size: int = BATCH_SIZE, seed: int = 0,
                 progress: Progress | None = None) -> float:
    """Accuracy under cross-entropy PGD (momentum-on-sign, random start, step ε/4), seeded; `progress`
    counts batches."""
    classifier.eval()
    gen = torch.Generator(device=images.device).manual_seed(seed)
    correct = 0
    for s in _batches(len(images), batch_size):
        x, y = images[s], labels[s]
        x_adv = pgd(ce_attack_loss(classifier, y), x, eps, steps=steps, norm=norm, generator=gen)
        with torch.inference_mode():
            correct += int((classifier(x_adv).argmax(-1) == y).sum())
        if progress is not None:
            progress.update()
    return correct / len(labels)


def evaluate_encoder(encoder: nn.Module, reference: nn.Module, class_embeddings: torch.Tensor,
                     images: torch.Tensor, labels: torch.Tensor, eps_list: Sequence[float], *,
                     rho: float | None = None, steps: int = 10, norm: str = "linf",
                     batch_size: int = BATCH_SIZE, seed: int = 0, progress: bool = False,
                     desc: str = "evaluation") -> dict[str, float]:
    """Clean accuracy, PGD robust accuracy at each ε, and the embedding metrics, in one dict.

    With `progress`, reports batches done under `desc` (lorekit.progress)."""
    classifier = ZeroShotClassifier(encoder, class_embeddings)
    total = batch_count(len(images), batch_size) * (1 + len(eps_list))
    with Progress(total, desc, unit="batch", enabled=progress) as bar:
        out = {"clean_acc": clean_accuracy(classifier, images, labels, batch_size, progress=bar)}
        for eps in eps_list:
            out[robust_key(eps)] = pgd_accuracy(classifier, images, labels, eps, steps=steps, norm=norm,
                                                batch_size=batch_size, seed=seed, progress=bar)
        out.update(embedding_metrics(encoder, reference, images, rho, batch_size))
    return out
