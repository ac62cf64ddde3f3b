"""FARE-reg, the "naive regularisation": FARE's loss + λ‖φθ(x) − φθ0(x)‖² with a constant λ."""

from __future__ import annotations

import torch

from .. import losses
from .base import Batch, Method, Update


class FAREReg(Method):
    name, label, knob, knob_label, fields = "fare-reg", "FARE-reg", "lam", "λ", ("lam",)
    color = "#ff7f0e"
    clean_in_update = True

    def update(self, batch: Batch) -> Update:
        for _ in range(self.k):
            adv, clean = self.ctx.embed(torch.cat([batch.x_adv, batch.x])).chunk(2)
            terms = losses.fare_reg_loss(adv, clean, batch.ref, self.cfg.lam)
            self.ctx.primal_step(terms["loss"])
        return Update(terms, clean=clean.detach())
