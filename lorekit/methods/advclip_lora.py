"""AdvCLIP-LoRA (Ghiasvand et al. 2025, seed 004): few-shot adversarial fine-tuning of CLIP's LoRA adapters,
posed as a minimax problem over the adapters θ of both towers and a perturbation per image:

    min_θ E max_{‖δ‖∞ ≤ ε} CE(100 · cos(φθ(x + δ), w(θ)), y),   w(θ) = class embeddings through the adapted text tower

Per batch: M ascent steps on δ (the loop's PGD on that cross-entropy; M = attack_steps), then K descent
steps on θ (AdamW; K = 1 by default, as in the paper). Each descent step recomputes the class embeddings
through the text tower WITH gradient, so the text adapters train together with the image adapters; the
attack sees them as they stand, without gradient and with adapter dropout off (eval mode, as the loop
attacks the image tower). Training and evaluation classify with the same head: the data set's prompt
templates, averaged (lorekit.models.differentiable_class_embeddings), logits 100·cos.

It needs adapters on the text tower: adapter='lora' with lora_towers='both' (the paper) or 'text'. With
full fine-tuning lorekit trains the image tower only, and this objective over the base model's fixed class
embeddings is TeCoA ('tecoa', which also runs on image-tower adapters); the config is refused before any
work rather than silently turned into TeCoA.

Where this differs from the reference code (sajjad-ucsb/AdvCLIP-LoRA, lora.py), on purpose:
- δ is per sample and lives in [0,1] pixel space: ‖δ_i‖∞ ≤ ε grey levels and x_i + δ_i ∈ [0,1]. The reference
  shares ONE δ across the batch (a universal perturbation, kept from batch to batch within an epoch) and adds it
  to the mean/std-normalised tensor, so its ε is in normalised units (≈ 0.27·ε in pixels for CLIP's std), and
  its [0,1] clip is applied to normalised values;
- the ascent is the loop's PGD (random start, momentum on the sign, step attack_step_size); the reference takes
  unsigned gradient steps of 0.05 × a step size that normalises by ‖δ‖ over its first 300 iterations, and drops
  the image-feature normalisation after its first ascent step;
- the reference builds the class embeddings from the first template only, once per batch in train mode, and
  shares them between ascent and descent; here they use every template and are recomputed per descent step;
- the reference trains on RandomResizedCrop + flip augmentations of the few shots; lorekit trains on the images.

The compute ledger counts image-tower passes only: the text tower's (C classes × T templates prompts, one
forward for the attack's head and a forward and backward per descent step) are not in it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .. import losses
from ..attacks import LossFn, ce_attack_loss
from ..config import ConfigError
from ..models import ZeroShotClassifier, differentiable_class_embeddings, eval_mode, zero_shot_logits
from .base import Batch, Context, Method, Update

if TYPE_CHECKING:
    from ..config import TrainConfig


class AdvCLIPLoRA(Method):
    name, label, needs_head = "advclip-lora", "AdvCLIP-LoRA", True
    color = "#d62728"

    @classmethod
    def check_config(cls, cfg: TrainConfig) -> None:
        if not cfg.trains_text_tower:
            raise ConfigError(
                f"method='advclip-lora' trains LoRA adapters on the text tower (the paper: on both towers): set "
                f"adapter='lora' and lora_towers='both' (or 'text'), not adapter={cfg.adapter!r}, "
                f"lora_towers={cfg.lora_towers!r}. Its loss over the base model's class embeddings is TeCoA: "
                "method='tecoa' fine-tunes the whole image tower (or its adapters, with adapter='lora')")

    def __init__(self, cfg: TrainConfig, ctx: Context) -> None:
        super().__init__(cfg, ctx)
        if ctx.clip is None or not ctx.classnames or not ctx.templates:
            raise ConfigError("method='advclip-lora' needs the CLIP model's text tower, class names and prompt "
                              "templates: build its trainer with lorekit.trainer.build (or pass clip=, classnames= "
                              "and templates= to Trainer)")

    def class_embeddings(self) -> torch.Tensor:
        """[C, D] class embeddings through the text tower as it stands, with gradient to its adapters."""
        clip, ctx = self.ctx.clip, self.ctx
        with ctx.autocast():
            return differentiable_class_embeddings(clip.model, clip.tokenizer, ctx.classnames, ctx.templates,
                                                   ctx.device)

    def attack_loss(self, batch: Batch) -> LossFn:
        with torch.no_grad(), eval_mode(self.ctx.clip.model):
            head = ZeroShotClassifier(self.ctx.encoder, self.class_embeddings())
        return ce_attack_loss(head, batch.y)

    def update(self, batch: Batch) -> Update:
        for _ in range(self.k):
            weights = F.normalize(self.class_embeddings(), dim=-1)  # as ZeroShotClassifier normalises them
            terms = losses.tecoa_loss(zero_shot_logits(self.ctx.embed(batch.x_adv), weights), batch.y)
            self.ctx.primal_step(terms["loss"])
        return Update(terms)
