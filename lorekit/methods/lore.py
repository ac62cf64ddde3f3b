"""LORE: the constrained problem solved primal–dual with a learned per-sample multiplier.

    max_ω min_θ E[ ‖φθ(x+δ) − φθ0(x)‖² + λω(x)·g(x) ],   g(x) = ‖φθ(x) − φθ0(x)‖² − ρ‖φθ0(x)‖²

Per batch: λ(x) = λω(φθ0(x)) is computed once and held fixed while K primal steps descend the
Lagrangian in θ; then one dual step ascends E[λω(x)·g(x)] in ω with g(x) detached. g(x) comes from
the last primal step's forward pass (θ before that step's update), which saves a forward pass.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import losses
from ..dual import DualNet, dual_step
from .base import Batch, Context, Method, Update


class LORE(Method):
    name, label, knob, knob_label = "lore", "LORE", "rho", "ρ"
    color = "#2ca02c"
    clean_in_update = True
    fields = ("rho", "dual", "dual_hidden", "dual_lr", "lambda_init")
    primal_steps = 5

    def __init__(self, cfg, ctx: Context) -> None:
        super().__init__(cfg, ctx)
        self.dual = DualNet(cfg.dual, ctx.embed_dim, cfg.dual_hidden, cfg.lambda_init).to(ctx.device)
        self.dual_optimizer = torch.optim.Adam(self.dual.parameters(), lr=cfg.dual_lr)

    def update(self, batch: Batch) -> Update:
        lam = self.dual(batch.ref).detach()  # λ(x), held fixed for the K primal steps
        for _ in range(self.k):
            adv, clean = self.ctx.embed(torch.cat([batch.x_adv, batch.x])).chunk(2)
            terms = losses.lagrangian(adv, clean, batch.ref, lam, self.cfg.rho)
            self.ctx.primal_step(terms["loss"])
        slack = losses.constraint_slack(clean.detach(), batch.ref, self.cfg.rho)  # g(x) of the last primal step
        objective = dual_step(self.dual, self.dual_optimizer, batch.ref, slack, self.ctx.reduce_gradients)
        return Update(terms, {"dual_objective": objective, "lambda": lam}, clean.detach())

    def multipliers(self, ref: torch.Tensor) -> torch.Tensor:
        """λω(x) for reference embeddings φθ0(x) (e.g. a fixed probe set), without gradient."""
        with torch.no_grad():
            return self.dual(ref)

    def state_dict(self) -> dict[str, Any]:
        return {"dual": self.dual.state_dict(), "dual_optimizer": self.dual_optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dual.load_state_dict(state["dual"])
        self.dual_optimizer.load_state_dict(state["dual_optimizer"])
