"""Projected gradient attacks in [0,1] pixel space, against any per-sample loss.

`pgd` maximises `loss_fn(x_adv)` (a [B] tensor) inside the ℓ∞ or ℓ2 ε-ball around x and inside
[0,1]. It is FARE's variant: uniform random start, momentum 0.9 on the (sign of the) gradient,
last iterate returned. The loop never calls .item() or branches on tensor values, so it issues
no host–device sync per iteration. `fgsm` is its one-step case.

Losses to attack with: `embedding_attack_loss` (the unsupervised ‖φθ(x+δ) − φθ0(x)‖²) and
`ce_attack_loss` (cross-entropy of a classifier).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

LossFn = Callable[[torch.Tensor], torch.Tensor]


def _l2_normalize(v: torch.Tensor) -> torch.Tensor:
    return v / v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (v.dim() - 1)))


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str = "linf") -> torch.Tensor:
    """Project onto the ε-ball around x (ℓ∞ or ℓ2), then onto the [0,1] image box."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    elif norm == "l2":
        n = delta.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))
        delta = delta * (eps / n.clamp_min(1e-12)).clamp(max=1.0)
    else:
        raise ValueError(f"norm={norm!r}: must be 'linf' or 'l2'")
    return (x + delta).clamp(0, 1)


def random_start(x: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform in the ℓ∞ box, or uniform direction with uniform radius fraction in the ℓ2 ball."""
    if norm == "linf":
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
        return project(x + eps * noise, x, eps, norm)
    direction = _l2_normalize(torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype))
    radius = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=generator, device=x.device, dtype=x.dtype)
    return project(x + eps * radius * direction, x, eps, norm)


def seeded_random_start(x: torch.Tensor, eps: float, norm: str, seeds: Sequence[int]) -> torch.Tensor:
    """`random_start` with sample i drawn from a generator seeded with seeds[i].

    A sample's start then depends on its seed alone, not on the batch around it: a batch split over N
    processes starts exactly where the same batch in one process does, and each process draws its own.
    """
    gen = torch.Generator(device=x.device)
    return torch.cat([random_start(x[i:i + 1], eps, norm, gen.manual_seed(seed)) for i, seed in enumerate(seeds)])


def pgd(loss_fn: LossFn, x: torch.Tensor, eps: float, *, steps: int = 10, step_size: float | None = None,
        norm: str = "linf", momentum: float = 0.9, random_init: bool = True,
        generator: torch.Generator | None = None, start: torch.Tensor | None = None) -> torch.Tensor:
    """Maximise loss_fn over the ε-ball around x; returns the detached last iterate.

    ℓ∞: v ← sign(momentum·v + sign(g)), x ← Π(x + α·v)   (FARE's momentum-on-sign)
    ℓ2: v ← momentum·v + g/‖g‖,          x ← Π(x + α·v/‖v‖)
    Step size α defaults to ε/4. Model parameters receive no gradient. The first iterate is `start` when
    given, else a random start (drawn from `generator`) or x itself.
    """
    step_size = eps / 4 if step_size is None else step_size
    x = x.detach()
    if start is not None:
        x_adv = start.detach()
    else:
        x_adv = random_start(x, eps, norm, generator) if random_init else x.clone()
    velocity = torch.zeros_like(x)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        grad, = torch.autograd.grad(loss_fn(x_adv).sum(), x_adv)
        with torch.no_grad():
            if norm == "linf":
                velocity = torch.sign(momentum * velocity + grad.sign())
                x_adv = x_adv + step_size * velocity
            else:
                velocity = momentum * velocity + _l2_normalize(grad)
                x_adv = x_adv + step_size * _l2_normalize(velocity)
            x_adv = project(x_adv, x, eps, norm)
    return x_adv.detach()


def fgsm(loss_fn: LossFn, x: torch.Tensor, eps: float, *, norm: str = "linf") -> torch.Tensor:
    """FGSM (Goodfellow et al. 2015): one step of size ε from x along sign(∇loss), clipped to [0,1].

    `pgd` with one step, step size ε and no random start is exactly that (ℓ∞: x + ε·sign(g); ℓ2: the
    fast gradient method x + ε·g/‖g‖).
    """
    return pgd(loss_fn, x, eps, steps=1, step_size=eps, norm=norm, random_init=False)


def embedding_attack_loss(encoder: nn.Module, ref_embedding: torch.Tensor) -> LossFn:
    """The unsupervised attack objective ‖φθ(x+δ) − φθ0(x)‖² per sample (FARE, LORE)."""
    ref = ref_embedding.detach().float()
    return lambda x_adv: (encoder(x_adv).float() - ref).pow(2).sum(-1)


def ce_attack_loss(classifier: nn.Module, labels: torch.Tensor) -> LossFn:
    """Per-sample cross-entropy of a classifier (TeCoA's attack, PGD robust accuracy)."""
    return lambda x_adv: F.cross_entropy(classifier(x_adv).float(), labels, reduction="none")
