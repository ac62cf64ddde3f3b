"""FARE (Schlarmann et al. 2024): min_θ E max_δ ‖φθ(x+δ) − φθ0(x)‖², no clean term.

With K > 1 it takes K AdamW steps on the same adversarial batch, as LORE's primal steps do: the
update-matched control for comparing the two.
"""

from __future__ import annotations

from .. import losses
from .base import Batch, Method, Update


class FARE(Method):
    name, label = "fare", "FARE"
    color = "#1f77b4"

    def update(self, batch: Batch) -> Update:
        for _ in range(self.k):
            terms = losses.fare_loss(self.ctx.embed(batch.x_adv), batch.ref)
            self.ctx.primal_step(terms["loss"])
        return Update(terms)
