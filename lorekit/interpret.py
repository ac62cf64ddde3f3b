"""Looking inside encoders and runs: UMAP views, text alignment, images for hover, λ(x) over time.

- `encoder_views`: clean and PGD-adversarial embeddings of a fixed image set under one encoder,
  with the zero-shot predictions (the attack is the cross-entropy PGD of `evaluate.pgd_accuracy`).
- `umap_layout`: one UMAP per encoder, fitted on its clean and adversarial embeddings together
  (L2-normalised), so both views share coordinates. `random_state` and `n_jobs=1` make it
  reproducible (umap-learn forces one job when seeded; passing it avoids the warning).
- `image_data_uris`: small grey-scale PNG data URIs, the images shown when hovering a point.
- `text_alignment`: mean cosine between image embeddings and their class's text embedding, per
  prompt template and averaged over templates, with the mean cosine to the other classes.
- `LambdaProbe`: a trainer callback recording λω(x) on a fixed probe set after every step, so a
  notebook can draw λ's whole distribution over time, not only the per-batch quantiles.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .attacks import ce_attack_loss, pgd
from .models import ZeroShotClassifier


@dataclass
class EncoderViews:
    """Embeddings [N, D] and zero-shot predictions [N] of clean and adversarial images under one encoder."""

    clean: torch.Tensor
    adversarial: torch.Tensor
    pred_clean: torch.Tensor
    pred_adversarial: torch.Tensor


def encoder_views(encoder: nn.Module, class_embeddings: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                  eps: float, *, steps: int = 10, norm: str = "linf", seed: int = 0) -> EncoderViews:
    """Attack `encoder`'s zero-shot classifier with seeded cross-entropy PGD; embed clean and adversarial images."""
    classifier = ZeroShotClassifier(encoder, class_embeddings).eval()
    gen = torch.Generator(device=images.device).manual_seed(seed)
    adv_images = pgd(ce_attack_loss(classifier, labels), images, eps, steps=steps, norm=norm, generator=gen)
    with torch.inference_mode():
        clean, adv = encoder(images).float(), encoder(adv_images).float()
        weights = classifier.weights
        pred_clean = (F.normalize(clean, dim=-1) @ weights.T).argmax(-1)
        pred_adv = (F.normalize(adv, dim=-1) @ weights.T).argmax(-1)
    return EncoderViews(clean, adv, pred_clean, pred_adv)


def umap_layout(views: EncoderViews, *, random_state: int = 0, n_neighbors: int = 15,
                min_dist: float = 0.1) -> dict[str, np.ndarray]:
    """2-D UMAP of the normalised clean + adversarial embeddings, fitted jointly.

    Returns {'clean': [N, 2], 'adversarial': [N, 2]}.
    """
    import umap  # slow import (numba): only where a UMAP is drawn

    n = len(views.clean)
    data = F.normalize(torch.cat([views.clean, views.adversarial]), dim=-1).cpu().numpy()
    reducer = umap.UMAP(n_components=2, n_neighbors=n_neighbors, min_dist=min_dist, random_state=random_state,
                        n_jobs=1)
    xy = reducer.fit_transform(data)
    return {"clean": xy[:n], "adversarial": xy[n:]}


def image_data_uri(image: torch.Tensor, size: int = 16) -> str:
    """A [C, H, W] or [H, W] image in [0,1] as a grey-scale PNG data URI, resized to size×size."""
    from PIL import Image

    img = image.detach().float().cpu()
    if img.dim() == 3:
        img = img.mean(0)
    if img.dim() != 2:
        raise ValueError(f"image of shape {tuple(image.shape)}: expected [C, H, W] or [H, W]")
    img = F.interpolate(img[None, None], size=(size, size), mode="area")[0, 0]
    pixels = (img.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_data_uris(images: torch.Tensor, size: int = 16) -> list[str]:
    """`image_data_uri` of every image of a [N, C, H, W] stack."""
    return [image_data_uri(im, size) for im in images]


def template_text_embeddings(model: nn.Module, tokenizer: Any, classnames: Sequence[str], templates: Sequence[str],
                             device: torch.device | str | None = None) -> torch.Tensor:
    """[T, C, D] L2-normalised text embeddings, one per (template, class)."""
    device = device or next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for template in templates:
            tokens = tokenizer([template.format(c=c) for c in classnames]).to(device)
            out.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    return torch.stack(out)


def text_alignment(image_embeddings: torch.Tensor, labels: torch.Tensor, text_embeddings: torch.Tensor,
                   templates: Sequence[str] | None = None) -> dict[str, Any]:
    """Mean cosine of each image embedding to its own class's text embedding, and to the other classes.

    `text_embeddings` is [T, C, D] (see `template_text_embeddings`). Returns 'own' and 'other'
    (averaged over templates and images), 'gap' = own − other, and 'per_template' own cosines
    (keyed by template text when `templates` is given, else by index).
    """
    img = F.normalize(image_embeddings.float(), dim=-1)
    cos = torch.einsum("nd,tcd->tnc", img, text_embeddings.float().to(img.device))  # [T, N, C]
    own_mask = F.one_hot(labels.to(img.device), cos.shape[-1]).bool()  # [N, C]
    own = cos[:, own_mask].view(cos.shape[0], -1)  # [T, N]
    other = cos[:, ~own_mask].view(cos.shape[0], -1)  # [T, N·(C−1)]
    names = list(templates) if templates is not None else list(range(cos.shape[0]))
    return {"own": own.mean().item(), "other": other.mean().item(), "gap": (own.mean() - other.mean()).item(),
            "per_template": {name: v for name, v in zip(names, own.mean(1).tolist(), strict=True)}}


class LambdaProbe:
    """Trainer callback: λω(x) on a fixed probe set, at step 0 and after every `every` training steps.

    Call `attach(trainer)` before `trainer.fit(callback=probe)`; `snapshots` maps step -> λ values
    [N]. Methods without a learned multiplier (no `multipliers` method) record nothing.
    """

    def __init__(self, images: torch.Tensor, every: int = 1) -> None:
        if every < 1:
            raise ValueError(f"every={every}: must be >= 1")
        self.images, self.every = images, every
        self.snapshots: dict[int, np.ndarray] = {}
        self._multipliers: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._ref: torch.Tensor | None = None

    def attach(self, trainer: Any) -> None:
        """Read the frozen reference embeddings of the probe set once, and record λ before training."""
        self._multipliers = getattr(trainer.method, "multipliers", None)
        if self._multipliers is None:
            return
        with torch.inference_mode():
            self._ref = trainer.reference(self.images.to(trainer.device)).float()
        self._snapshot(trainer.step)

    def _snapshot(self, step: int) -> None:
        with torch.no_grad():
            self.snapshots[step] = self._multipliers(self._ref).cpu().numpy()

    def __call__(self, record: Mapping[str, Any]) -> None:
        if self._multipliers is not None and record.get("kind") == "train" and record["step"] % self.every == 0:
            self._snapshot(int(record["step"]))
