"""Zero-shot accuracy and embedding-fidelity metrics for a (fine-tuned) image encoder.

Clean accuracy; robust accuracy under one of ATTACKS on the zero-shot classifier's cross-entropy:
'pgd' (lorekit.attacks.pgd: random start, momentum on the sign, step ε/4), 'fgsm' (one step of size ε,
no random start: AdvCLIP-LoRA's second attack) or 'apgd' (APGD-CE + APGD-T, lorekit.apgd.autoattack_custom;
the resumable, sanity-checked version of it lives in `robustness`); accuracy on typographic images
('typographic': a wrong class name written on each image, lorekit.typographic; keys typo_acc and
typo_written, the fraction classified as the written class; no ε); and the embedding metrics of the
method notes: cosine alignment mean cos(φθ(x), φθ0(x)), embedding fidelity
mean ‖φθ(x) − φθ0(x)‖²/‖φθ0(x)‖², and the fraction of images satisfying the ρ-constraint.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .apgd import autoattack_custom
from .attacks import LossFn, ce_attack_loss, fgsm, pgd
from .config import ConfigError
from .models import ZeroShotClassifier
from .progress import Progress

BATCH_SIZE = 256  # images per evaluation batch; progress is reported per batch

ATTACKS = ("pgd", "fgsm", "apgd", "typographic")
EPS_ATTACKS = ("pgd", "fgsm", "apgd")  # the attacks with a radius ε; 'typographic' writes a wrong class name


def robust_key(eps: float, attack: str = "pgd") -> str:
    """The result key of robust accuracy at ε: 'robust_acc@4' for PGD at ε = 4/255, 'fgsm_acc@4', 'apgd_acc@4'."""
    return f"{'robust' if attack == 'pgd' else attack}_acc@{round(eps * 255, 2):g}"


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


def _accuracy_under(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                    attack: Callable[[LossFn, torch.Tensor], torch.Tensor], batch_size: int,
                    progress: Progress | None = None) -> float:
    """Accuracy on attack(cross-entropy of the batch, batch) images, batch by batch; `progress` counts batches."""
    classifier.eval()
    correct = 0
    for s in _batches(len(images), batch_size):
        x, y = images[s], labels[s]
        x_adv = attack(ce_attack_loss(classifier, y), x)
        with torch.inference_mode():
            correct += int((classifier(x_adv).argmax(-1) == y).sum())
        if progress is not None:
            progress.update()
    return correct / len(labels)


def pgd_accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, *,
                 steps: int = 10, norm: str = "linf", batch_size: int = BATCH_SIZE, seed: int = 0,
                 progress: Progress | None = None) -> float:
    """Accuracy under cross-entropy PGD (momentum-on-sign, random start, step ε/4), seeded."""
    gen = torch.Generator(device=images.device).manual_seed(seed)
    return _accuracy_under(classifier, images, labels,
                           lambda loss, x: pgd(loss, x, eps, steps=steps, norm=norm, generator=gen), batch_size,
                           progress)


def fgsm_accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, *,
                  norm: str = "linf", batch_size: int = BATCH_SIZE, progress: Progress | None = None) -> float:
    """Accuracy under FGSM on the cross-entropy: one step of size ε from the clean image (deterministic)."""
    return _accuracy_under(classifier, images, labels, lambda loss, x: fgsm(loss, x, eps, norm=norm), batch_size,
                           progress)


def robust_accuracy(attack: str, classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, *,
                    steps: int = 10, norm: str = "linf", batch_size: int = BATCH_SIZE, seed: int = 0,
                    progress: Progress | None = None) -> float:
    """Accuracy under `attack` (one of ATTACKS) at ε; `steps` are PGD's or APGD's iterations (FGSM has one)."""
    if attack == "pgd":
        return pgd_accuracy(classifier, images, labels, eps, steps=steps, norm=norm, batch_size=batch_size, seed=seed,
                            progress=progress)
    if attack == "fgsm":
        return fgsm_accuracy(classifier, images, labels, eps, norm=norm, batch_size=batch_size, progress=progress)
    if attack == "apgd":
        acc = autoattack_custom(classifier, images, labels, eps, n_iter=steps, norm=norm, batch_size=batch_size,
                                seed=seed).robust_accuracy
        if progress is not None:
            progress.update()
        return acc
    raise ConfigError(f"attack={attack!r}: must be one of {', '.join(ATTACKS)}")


def evaluate_encoder(encoder: nn.Module, reference: nn.Module, class_embeddings: torch.Tensor,
                     images: torch.Tensor, labels: torch.Tensor, eps_list: Sequence[float], *,
                     rho: float | None = None, steps: int = 10, norm: str = "linf",
                     batch_size: int = BATCH_SIZE, seed: int = 0, attacks: Sequence[str] = ("pgd",),
                     progress: bool = False, desc: str = "evaluation", classnames: Sequence[str] = (),
                     typo_style: str = "auto") -> dict[str, float]:
    """Clean accuracy, robust accuracy under each attack at each ε (keys: `robust_key`), and the embedding
    metrics, in one dict. With `progress`, reports batches done under `desc` (lorekit.progress); APGD counts
    as one batch per ε. 'typographic' needs the `classnames` (to write wrong ones) and adds typo_acc and
    typo_written, with the attack's `typo_style` (lorekit.typographic), seeded by `seed`."""
    bad = [a for a in attacks if a not in ATTACKS]
    if bad or not attacks:
        raise ConfigError(f"attacks={list(attacks)}: choose one or more of {', '.join(ATTACKS)}")
    if "typographic" in attacks and len(classnames) != len(class_embeddings):
        raise ConfigError(f"attack 'typographic' writes class names: pass the {len(class_embeddings)} class names "
                          f"of the head (got {len(classnames)})")
    classifier = ZeroShotClassifier(encoder, class_embeddings)
    batches = batch_count(len(images), batch_size)
    eps_attacks = [a for a in attacks if a in EPS_ATTACKS]
    total = batches + sum(1 if a == "apgd" else batches for a in eps_attacks) * len(eps_list)
    total += batches if "typographic" in attacks else 0
    with Progress(total, desc, unit="batch", enabled=progress) as bar:
        out = {"clean_acc": clean_accuracy(classifier, images, labels, batch_size, progress=bar)}
        if "typographic" in attacks:
            from .typographic import typographic_accuracy

            typo = typographic_accuracy(classifier, images, labels, classnames, seed=seed, style=typo_style,
                                        batch_size=batch_size, progress=bar)
            out.update(typo_acc=typo["typo_acc"], typo_written=typo["typo_written"])
        for attack in eps_attacks:
            for eps in eps_list:
                out[robust_key(eps, attack)] = robust_accuracy(attack, classifier, images, labels, eps, steps=steps,
                                                               norm=norm, batch_size=batch_size, seed=seed,
                                                               progress=bar)
        out.update(embedding_metrics(encoder, reference, images, rho, batch_size))
    return out
