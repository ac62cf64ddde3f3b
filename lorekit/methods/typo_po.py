"""Preference optimisation against typographic attacks (Afzali et al., ICLR 2025; seed 003's second abstract).

The policy is CLIP's image-to-class softmax π(c | x) = softmax_c(100 · cos(φθ(x), w_c)) over the zero-shot
head's fixed class embeddings w (the scale the head uses); the reference π_ref is the same head on the
loop's frozen φθ0 (Context.reference: a frozen copy, or the adapted model with its adapters off: no second
copy). On the typographic image x_t of an image x of class y_w, with the wrong class y_l written on it
(lorekit.typographic), the preferred answer is y_w and the rejected one y_l. Per sample,

    h_raw = [log π(y_w|x_t) − log π_ref(y_w|x_t)] − [log π(y_l|x_t) − log π_ref(y_l|x_t)],   h = β · h_raw
    DPO:  ℓ = −log σ(β · h_raw)                      (Rafailov et al. 2023)
    IPO:  ℓ = (h_raw − 1/(2β))²                      (Azar et al. 2024, eq. 17 with one pair per prompt)

and the clean images keep their predictions through KL(π_ref(·|x) ‖ π(·|x)) = Σ_c π_ref log(π_ref/π):

    loss = mean ℓ + po_kl · mean KL.

At θ = θ0, h_raw = 0: DPO starts at log 2 and IPO at 1/(4β²), and the KL term at 0.

Per batch: the typographic images are drawn in `adversarial` (no PGD; the loop's attack hook) together with
π_ref on them (one reference forward of B images, counted in the ledger's attack phase); π_ref on the clean
images comes from the loop's φθ0(x) (Batch.ref), which costs nothing more. Each of the K updates forwards
[x_t; x] (x_t only when po_kl = 0) through φθ. Attacks are seeded per sample by (seed, place in the stream of
global batches: Batch.step and Batch.first), so neither the number of processes nor a resume changes them.

Telemetry: loss_pref (the DPO or IPO term), loss_kl, pref_acc (fraction of samples with h_raw > 0), the
margin h_raw per sample (mean and quantiles), and on x_t the batch's accuracy and written-class rate before
the update. The held-out evaluation adds typo_acc and typo_written (lorekit.typographic).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks import LossFn
from ..config import ConfigError
from ..models import zero_shot_logits
from ..typographic import typographic_accuracy, typographic_images
from .base import Batch, Context, Method, Update

if TYPE_CHECKING:
    from ..config import TrainConfig


def preference_margin(logits: torch.Tensor, ref_logits: torch.Tensor, preferred: torch.Tensor,
                      rejected: torch.Tensor) -> torch.Tensor:
    """h_raw per sample: the log-ratio (π over π_ref) of the preferred class minus that of the rejected one."""
    ratio = F.log_softmax(logits.float(), -1) - F.log_softmax(ref_logits.float(), -1)
    return ratio.gather(1, preferred[:, None])[:, 0] - ratio.gather(1, rejected[:, None])[:, 0]


def preference_loss(margin: torch.Tensor, beta: float, kind: str) -> torch.Tensor:
    """Per-sample DPO (−log σ(β·h_raw)) or IPO ((h_raw − 1/(2β))²) loss of the margins h_raw."""
    if beta <= 0:
        raise ConfigError(f"po_beta={beta!r}: must be > 0")
    if kind == "dpo":
        return -F.logsigmoid(beta * margin)
    if kind == "ipo":
        return (margin - 1 / (2 * beta)) ** 2
    raise ConfigError(f"po_loss={kind!r}: must be one of dpo, ipo")


def kl_to_reference(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(π_ref ‖ π) per sample, π = softmax(logits)."""
    ref_logp = F.log_softmax(ref_logits.float(), -1)
    return (ref_logp.exp() * (ref_logp - F.log_softmax(logits.float(), -1))).sum(-1)


class TypoPO(Method):
    name, label, needs_head = "typo-po", "Typo-PO", True
    color = "#8c564b"
    fields = ("po_loss", "po_beta", "po_kl", "typo_style")

    @classmethod
    def passes_per_step(cls, cfg: TrainConfig) -> int:
        """Reference forwards of x and x_t, then K forward+backward passes over [x_t; x] (x_t alone without KL)."""
        b, k = cfg.batch_size, cfg.primal_steps or cls.primal_steps
        return 2 * b + 2 * k * b * (2 if cfg.po_kl > 0 else 1)

    def __init__(self, cfg: TrainConfig, ctx: Context) -> None:
        super().__init__(cfg, ctx)
        if ctx.reference is None or not ctx.classnames:
            raise ConfigError("method='typo-po' needs the frozen reference encoder and the class names: build its "
                              "trainer with lorekit.trainer.build (or pass classnames= to Trainer)")
        if len(ctx.classnames) != len(ctx.head.weights):
            raise ConfigError(f"method='typo-po': {len(ctx.classnames)} class names for a head of "
                              f"{len(ctx.head.weights)} classes")
        self._rejected: torch.Tensor | None = None
        self._ref_logits: torch.Tensor | None = None

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        head = self.ctx.head
        return zero_shot_logits(embeddings.float(), head.weights, head.scale)

    def attack_loss(self, batch: Batch) -> LossFn:
        raise NotImplementedError("typo-po's attack is a rendered image, not a loss to maximise")

    def adversarial(self, batch: Batch, pgd: Callable[[LossFn], torch.Tensor]) -> torch.Tensor:
        """The typographic images (a wrong class name on each), and π_ref's logits on them for the update."""
        x_t, self._rejected = typographic_images(batch.x, batch.y, self.ctx.classnames, self.cfg.seed,
                                                 offset=batch.step * self.cfg.batch_size + batch.first,
                                                 style=self.cfg.typo_style)
        with torch.no_grad(), self.ctx.autocast():
            self._ref_logits = self.logits(self.ctx.reference(x_t))
        return x_t

    def update(self, batch: Batch) -> Update:
        cfg, rejected, ref_t = self.cfg, self._rejected, self._ref_logits
        ref_clean = self.logits(batch.ref)
        with_kl = cfg.po_kl > 0
        n = len(batch.x)
        for i in range(self.k):
            emb = self.ctx.embed(torch.cat([batch.x_adv, batch.x]) if with_kl else batch.x_adv)
            logits = self.logits(emb)
            margin = preference_margin(logits[:n], ref_t, batch.y, rejected)
            pref = preference_loss(margin, cfg.po_beta, cfg.po_loss).mean()
            kl = kl_to_reference(logits[n:], ref_clean).mean() if with_kl else torch.zeros((), device=emb.device)
            loss = pref + cfg.po_kl * kl
            if i == 0:
                with torch.no_grad():
                    pred = logits[:n].argmax(-1)
                    stats = {"typo_batch_acc": (pred == batch.y).float().mean(),
                             "typo_batch_written": (pred == rejected).float().mean()}
            self.ctx.primal_step(loss)
        stats.update({"pref_acc": (margin > 0).float().mean().detach(), "margin": margin.detach()})
        return Update({"loss": loss, "pref": pref, "kl": kl}, stats, clean=emb[n:].detach() if with_kl else None)

    def evaluate(self, classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        out = typographic_accuracy(classifier, images, labels, self.ctx.classnames, seed=0, style=self.cfg.typo_style)
        return {"typo_acc": out["typo_acc"], "typo_written": out["typo_written"]}
