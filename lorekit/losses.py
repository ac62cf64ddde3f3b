"""The objectives, written as in the papers. Embeddings are raw encoder outputs.

    FARE      E ‖φθ(x+δ) − φθ0(x)‖²
    FARE-reg  E ‖φθ(x+δ) − φθ0(x)‖² + λ·‖φθ(x) − φθ0(x)‖²             (constant λ)
    LORE      E ‖φθ(x+δ) − φθ0(x)‖² + λω(x)·(‖φθ(x) − φθ0(x)‖² − ρ‖φθ0(x)‖²)
    TeCoA     E CE(zero-shot logits(x+δ), y)

All return per-term dicts so the trainer can log every term it optimises.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sqdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample squared Euclidean distance ‖a − b‖², summed over embedding dimensions."""
    return (a.float() - b.float()).pow(2).sum(-1)


def constraint_slack(clean: torch.Tensor, ref: torch.Tensor, rho: float) -> torch.Tensor:
    """g(x) = ‖φθ(x) − φθ0(x)‖² − ρ‖φθ0(x)‖²; the constraint holds where g(x) ≤ 0."""
    return sqdist(clean, ref) - rho * ref.float().pow(2).sum(-1)


def fare_loss(adv: torch.Tensor, ref: torch.Tensor) -> dict[str, torch.Tensor]:
    robust = sqdist(adv, ref).mean()
    return {"loss": robust, "robust": robust}


def fare_reg_loss(adv: torch.Tensor, clean: torch.Tensor, ref: torch.Tensor, lam: float) -> dict[str, torch.Tensor]:
    robust = sqdist(adv, ref).mean()
    clean_term = sqdist(clean, ref).mean()
    return {"loss": robust + lam * clean_term, "robust": robust, "clean": clean_term}


def lagrangian(adv: torch.Tensor, clean: torch.Tensor, ref: torch.Tensor, lam: torch.Tensor,
               rho: float) -> dict[str, torch.Tensor]:
    """LORE's primal objective with the multipliers λ(x) held fixed (detached)."""
    robust = sqdist(adv, ref).mean()
    penalty = (lam.detach() * constraint_slack(clean, ref, rho)).mean()
    return {"loss": robust + penalty, "robust": robust, "penalty": penalty}


def dual_objective(lam: torch.Tensor, slack: torch.Tensor) -> torch.Tensor:
    """E[λω(x)·g(x)] with the encoder term detached; the dual step ASCENDS it in ω."""
    return (lam * slack.detach()).mean()


def tecoa_loss(adv_logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    ce = F.cross_entropy(adv_logits.float(), labels)
    return {"loss": ce, "robust": ce}
