"""One FARE training step the way the reference code runs it: the baseline bench_gpu.py measures lorekit against.

Source: chs20/RobustVLM, train/adversarial_training_clip.py (`train_one_epoch`, `ClipVisionModel`, `l2`,
`compute_acc`) and train/pgd_train.py (`pgd`), with the FARE settings (loss 'l2', inner loss 'l2', attack 'pgd',
clean_weight 0, output_normalize False). Written again here, not imported (that repository is not a package),
and kept close to it on purpose, its costs included, because those costs are what the comparison measures:

- fp32 with TF32 matmuls off (PyTorch's default; the reference sets nothing), no autocast;
- the towers wrapped in torch.nn.DataParallel (the reference wraps them when it sees several GPUs; on one
  device DataParallel adds only its scatter), the normalisation inside a wrapper module;
- its PGD loop: momentum 0.9 on the sign of the gradient (then the sign again), a NaN check and two range
  asserts per iteration (each a host–device sync), loss averaged over the batch;
- a clean forward with grad that only feeds the logs, accuracy logging against 1000 normalised class embeddings
  with .item(), and torch.cuda.empty_cache() after every step.

Left out, as not part of a training step's cost: wandb, the periodic APGD evaluation, checkpoints and the
learning-rate schedule (a Python assignment per step).
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms


class ClipVisionModel(nn.Module):
    """The reference's wrapper: normalise, then the image tower."""

    def __init__(self, model: nn.Module, normalize: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.normalize = normalize

    def forward(self, vision: torch.Tensor, output_normalize: bool = False) -> torch.Tensor:
        embedding = self.model(self.normalize(vision))
        return F.normalize(embedding, dim=-1) if output_normalize else embedding


def l2(out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Squared ℓ2 distance summed over the embedding, averaged over the batch (reduction 'mean')."""
    assert out.shape == targets.shape and out.shape[0] > 1
    return F.mse_loss(out, targets, reduction="none").sum(dim=1).mean()


@torch.no_grad()
def compute_acc(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return (logits.max(dim=1)[1].eq(targets).sum() / targets.shape[0]).item() * 100


def pgd(forward: nn.Module, loss_fn, data_clean: torch.Tensor, eps: float, iterations: int, stepsize: float,
        perturbation: torch.Tensor, momentum: float = 0.9) -> torch.Tensor:
    """train/pgd_train.py's `pgd` for ℓ∞, mode 'max'."""
    assert torch.max(data_clean) < 1. + 1e-6 and torch.min(data_clean) > -1e-6
    velocity = torch.zeros_like(data_clean)
    for _ in range(iterations):
        perturbation.requires_grad = True
        with torch.enable_grad():
            loss = loss_fn(forward(data_clean + perturbation, output_normalize=False))
        with torch.no_grad():
            gradient = torch.autograd.grad(loss, perturbation)[0]
            if gradient.isnan().any():
                gradient[gradient.isnan()] = 0.
            velocity = (momentum * velocity + gradient.sign()).sign()
            perturbation = (perturbation + stepsize * velocity).clamp(-eps, eps)
            perturbation = torch.clamp(data_clean + perturbation, 0, 1) - data_clean
            assert not perturbation.isnan().any()
            assert torch.max(data_clean + perturbation) < 1. + 1e-6 and torch.min(data_clean + perturbation) > -1e-6
    return data_clean + perturbation.detach()


class ReferenceFARE:
    """The reference's models, optimiser and training step for one image tower (trained in place)."""

    def __init__(self, visual: nn.Module, mean: Sequence[float], std: Sequence[float], embed_dim: int, *,
                 eps: float, iterations: int, stepsize: float, lr: float = 1e-5, wd: float = 1e-4) -> None:
        device = next(visual.parameters()).device
        one_gpu = None if device.type != "cuda" else [device.index if device.index is not None
                                                      else torch.cuda.current_device()]
        normalize = transforms.Normalize(mean=mean, std=std)
        self.model = nn.DataParallel(ClipVisionModel(visual, normalize), device_ids=one_gpu)
        self.model_orig = nn.DataParallel(ClipVisionModel(copy.deepcopy(visual), normalize), device_ids=one_gpu)
        self.optimizer = torch.optim.AdamW(visual.parameters(), lr=lr, weight_decay=wd)
        # stands in for the 1000 normalised ImageNet text embeddings [D, 1000] the reference logs accuracy against
        self.text = F.normalize(torch.randn(embed_dim, 1000, generator=torch.Generator().manual_seed(0)), dim=0
                                ).to(device)
        self.eps, self.iterations, self.stepsize = eps, iterations, stepsize

    def step(self, data: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        self.model_orig.eval()
        self.model.train()
        with torch.no_grad():
            embedding_orig = self.model_orig(vision=data, output_normalize=False)
        self.model.eval()
        data_adv = pgd(self.model, lambda out: l2(out, embedding_orig), data, self.eps, self.iterations,
                       self.stepsize, torch.zeros_like(data).uniform_(-self.eps, self.eps).requires_grad_(True))
        self.model.train()
        embedding_clean = self.model(data, output_normalize=False)
        embedding_adv = self.model(data_adv, output_normalize=False)
        loss = l2(embedding_adv, embedding_orig)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        with torch.no_grad():
            cos_sim_clean = F.cosine_similarity(embedding_clean, embedding_orig, dim=1).mean()
            cos_sim = F.cosine_similarity(embedding_adv, embedding_orig, dim=1).mean()
            racc = compute_acc(embedding_adv @ self.text, targets)
            acc = compute_acc(F.normalize(embedding_clean, dim=1) @ self.text, targets)
        log = {"loss": loss.item(), "cos_sim_clean": cos_sim_clean.item(), "cos_sim": cos_sim.item(), "acc": acc,
               "racc": racc}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return log
