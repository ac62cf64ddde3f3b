"""LORE's dual variable: λω(x) = softplus(Fω(φθ0(x))) ≥ 0, and its gradient-ascent step.

Fω sees the frozen clean embedding (no extra forward pass), L2-normalised so the same dual
learning rate works for encoders whose embedding norms differ by orders of magnitude (our
choice; the paper does not say). The MLP's hidden activation is unspecified in the paper;
we use GELU. The output bias is initialised so λ starts at `lambda_init` everywhere, and the
last layer starts at zero so no sample starts privileged.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .losses import dual_objective


def inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class DualNet(nn.Module):
    """Multiplier network: 'scalar' (one λ), 'linear' or 'mlp' (per-sample λ(x))."""

    def __init__(self, kind: str, embed_dim: int, hidden: int = 512, lambda_init: float = 1.0) -> None:
        super().__init__()
        self.kind = kind
        if kind == "scalar":
            self.net = None
            self.bias = nn.Parameter(torch.tensor(inverse_softplus(lambda_init)))
            return
        if kind == "linear":
            self.net = nn.Linear(embed_dim, 1)
        elif kind == "mlp":
            self.net = nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, 1))
        else:
            raise ValueError(f"dual={kind!r}: must be 'mlp', 'linear' or 'scalar'")
        last = self.net if kind == "linear" else self.net[-1]
        nn.init.zeros_(last.weight)
        nn.init.constant_(last.bias, inverse_softplus(lambda_init))

    def forward(self, ref: torch.Tensor) -> torch.Tensor:
        """λ for each sample of the batch, shape [B]."""
        if self.net is None:
            return F.softplus(self.bias).expand(ref.shape[0])
        return F.softplus(self.net(F.normalize(ref.float(), dim=-1)).squeeze(-1))


def dual_step(dual: DualNet, optimizer: torch.optim.Optimizer, ref: torch.Tensor, slack: torch.Tensor,
              reduce_gradients: Callable[[nn.Module], None] | None = None) -> torch.Tensor:
    """One ascent step on E[λω(x)·g(x)]: λ rises where g > 0 (violated), falls where g < 0.

    `reduce_gradients(dual)` averages the gradients over data-parallel ranks, so λω stays identical
    on every rank. Returns the dual objective before the step (detached).
    """
    objective = dual_objective(dual(ref.detach()), slack)
    optimizer.zero_grad(set_to_none=True)
    (-objective).backward()  # optimisers minimise; ascent = descent on the negation
    if reduce_gradients is not None:
        reduce_gradients(dual)
    optimizer.step()
    return objective.detach()
