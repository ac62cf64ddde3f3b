"""TeCoA (Mao et al. 2023): supervised cross-entropy of the zero-shot classifier on adversarial images,
attacked with the same cross-entropy."""

from __future__ import annotations

from .. import losses
from ..attacks import LossFn, ce_attack_loss
from .base import Batch, Method, Update


class TeCoA(Method):
    name, label, needs_head = "tecoa", "TeCoA", True
    color = "#9467bd"

    def attack_loss(self, batch: Batch) -> LossFn:
        return ce_attack_loss(self.ctx.head, batch.y)

    def update(self, batch: Batch) -> Update:
        for _ in range(self.k):
            with self.ctx.autocast():
                terms = losses.tecoa_loss(self.ctx.trained_head(batch.x_adv), batch.y)
            self.ctx.primal_step(terms["loss"])
        return Update(terms)
