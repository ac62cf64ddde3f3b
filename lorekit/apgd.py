"""APGD and AutoAttack's "custom" evaluation (APGD-CE then APGD-T), in [0,1] pixel space.

Follows Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks" (ICML 2020), checked line by line against the official code
(pyautoattack 0.2.0, `autopgd_base.py`):

- start x⁰ = x + ε·t/‖t‖ (ℓ∞: t ~ U[-1,1]^d scaled so its largest entry is ±ε; ℓ2: t ~ N(0, I)),
  clipped to [0,1]; first step size η = 2ε, per sample;
- z = Π(xᵏ + η·sign(∇f)) (ℓ2: η·∇f/‖∇f‖₂), xᵏ⁺¹ = Π(xᵏ + α(z − xᵏ) + (1−α)(xᵏ − xᵏ⁻¹)) with
  α = 0.75, and α = 1 on the first step; Π projects onto the ε-ball and [0,1];
- step-size checkpoints after w₁ = ⌊0.22·N⌋ iterations, then windows shrinking by ⌊0.03·N⌋ down
  to ⌊0.06·N⌋ (N = n_iter): 22, 41, 57, 70, 80, 87, 93, 99 for N = 100, i.e. the paper's
  p₀ = 0, p₁ = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06);
- at a checkpoint η halves for a sample when (1) its loss increased in at most ρ·k of the k
  steps of the window (ρ = 0.75; "at most", as the official code compares with <=), or (2) η was
  not halved at the previous checkpoint and the best loss did not improve since then; a halving
  sample restarts from its best point (and that point's gradient);
- every sample keeps its highest-loss iterate and its first misclassified iterate.

Losses: 'ce'; 'dlr' −(z_y − max_{i≠y} z_i)/(z_π1 − z_π3); 'dlr-targeted'
−(z_y − z_t)/(z_π1 − (z_π3 + z_π4)/2) (APGD-T; needs ≥ 4 classes), π sorting the logits
in decreasing order, with the official 1e-12 in the denominators.

Where this code knowingly differs from the official one:
- the success count of the first window starts at f(x¹) > f(x⁰), as in the paper's Algorithm 1;
  the official code compares f(x¹) with an unfilled row of zeros (its loss history index wraps
  around to −1), so for CE it counts a success and for the negative DLR losses a failure;
- samples that are already misclassified leave the batch at the iterations in `_compaction_points`
  (the step-size checkpoints and 1, 2, 4, 8, 16, ...), not only between restarts/targets. Flags,
  returned images and the losses of robust samples do not change (each sample's trajectory is
  independent of the others'); the work saved is large when most samples fall early. Apart from these few
  compactions the iteration loop issues no host–device synchronisation;
- the first misclassified iterate is kept, not the last (either is a valid adversarial example;
  the first one makes compaction exact);
- APGD-T computes the clean logits once, not once per target class;
- samples that resist an attack keep its highest-loss iterate in `APGDResult.x_adv`; the official
  code returns the clean image for them (AutoAttack-level results still do, see `autoattack_custom`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("linf", "l2")
LOSSES = ("ce", "dlr", "dlr-targeted")
Classifier = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------- losses
def ce_loss(logits: torch.Tensor, y: torch.Tensor, y_target: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample cross-entropy (APGD-CE maximises it)."""
    return F.cross_entropy(logits, y, reduction="none")


def dlr_loss(logits: torch.Tensor, y: torch.Tensor, y_target: torch.Tensor | None = None) -> torch.Tensor:
    """Untargeted DLR: −(z_y − max_{i≠y} z_i) / (z_π1 − z_π3); needs ≥ 3 classes."""
    if logits.shape[1] < 3:
        raise ValueError(f"the DLR loss needs at least 3 classes, the classifier has {logits.shape[1]}")
    top = logits.topk(3, dim=1)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_other = torch.where(top.indices[:, 0] == y, top.values[:, 1], top.values[:, 0])
    return -(z_y - z_other) / (top.values[:, 0] - top.values[:, 2] + 1e-12)


def dlr_targeted_loss(logits: torch.Tensor, y: torch.Tensor, y_target: torch.Tensor | None) -> torch.Tensor:
    """Targeted DLR of APGD-T: −(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2); needs ≥ 4 classes."""
    if y_target is None:
        raise ValueError("loss='dlr-targeted' needs y_target")
    if logits.shape[1] < 4:
        raise ValueError(f"the targeted DLR loss needs at least 4 classes, the classifier has {logits.shape[1]}")
    top = logits.topk(4, dim=1).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, y_target[:, None]).squeeze(1)
    return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


_LOSS_FNS = {"ce": ce_loss, "dlr": dlr_loss, "dlr-targeted": dlr_targeted_loss}


# --------------------------------------------------------------------------------- schedule
def step_size_checkpoints(n_iter: int) -> list[int]:
    """Iteration counts after which APGD checks (and maybe halves) the step size.

    The official integer arithmetic: first window max(⌊0.22·n⌋, 1), each next window
    max(⌊0.03·n⌋, 1) shorter, but never shorter than max(⌊0.06·n⌋, 1).
    """
    window = max(int(0.22 * n_iter), 1)
    shortest, decrease = max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1)
    points, done = [], window
    while done <= n_iter:
        points.append(done)
        window = max(window - decrease, shortest)
        done += window
    return points


def _compaction_points(n_iter: int) -> set[int]:
    """Iterations after which fooled samples leave the batch: the checkpoints and powers of two.

    Powers of two catch the many samples an undefended model loses in the first iterations;
    each compaction costs one host–device synchronisation.
    """
    return set(step_size_checkpoints(n_iter)) | {2 ** j for j in range(n_iter.bit_length()) if 2 ** j <= n_iter}


# ------------------------------------------------------------------------------- projection
def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a [B] tensor to broadcast against a [B, ...] batch."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def _l2_unit(v: torch.Tensor) -> torch.Tensor:
    return v / _per_sample(v.flatten(1).norm(dim=1) + 1e-12, v)


class _Ball:
    """Projection onto {‖δ‖ ≤ ε} ∩ [0,1]^d around fixed clean images (the official order: ball, then box)."""

    def __init__(self, x: torch.Tensor, eps: float, norm: str) -> None:
        self.x, self.eps, self.norm = x, eps, norm
        if norm == "linf":  # one clamp against precomputed bounds == clamp(min(max(z, x−ε), x+ε), 0, 1)
            self.lo, self.hi = (x - eps).clamp_min(0), (x + eps).clamp_max(1)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        if self.norm == "linf":
            return torch.clamp(z, self.lo, self.hi)
        delta = z - self.x
        norm = _per_sample(delta.flatten(1).norm(dim=1), delta)
        return (self.x + delta / (norm + 1e-12) * norm.clamp_max(self.eps)).clamp(0, 1)

    def select(self, keep: torch.Tensor) -> "_Ball":
        ball = _Ball.__new__(_Ball)
        ball.x, ball.eps, ball.norm = self.x[keep], self.eps, self.norm
        if self.norm == "linf":
            ball.lo, ball.hi = self.lo[keep], self.hi[keep]
        return ball

    def random_start(self, generator: torch.Generator | None) -> torch.Tensor:
        x = self.x
        if self.norm == "linf":
            t = 2 * torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) - 1
            t = t / _per_sample(t.flatten(1).abs().amax(dim=1) + 1e-12, t)
        else:
            t = _l2_unit(torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype))
        return (x + self.eps * t).clamp(0, 1)


# ------------------------------------------------------------------------------------ core
@contextlib.contextmanager
def frozen_parameters(model: Classifier) -> Iterator[None]:
    """Turn off requires_grad of the model's parameters for the attack (autograd then skips their
    gradient work), restoring the previous flags afterwards."""
    params = [p for p in model.parameters() if p.requires_grad] if isinstance(model, nn.Module) else []
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _loss_and_grad(model: Classifier, x_adv: torch.Tensor, y: torch.Tensor, y_target: torch.Tensor | None,
                   loss_fn: Callable, need_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not need_grad:  # the last iterate is only scored: skip its backward pass
        with torch.no_grad():
            logits = model(x_adv).float()
            return logits, loss_fn(logits, y, y_target), torch.zeros_like(x_adv)
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x_adv).float()
        loss = loss_fn(logits, y, y_target)
        grad, = torch.autograd.grad(loss.sum(), x_adv)
    return logits.detach(), loss.detach(), grad.detach()


@dataclass
class APGDResult:
    """Per-sample outcome of an APGD attack.

    x_adv: the first misclassified iterate where one was found, else the highest-loss iterate;
    fooled: whether a misclassified iterate was found; loss: the highest loss reached.
    """

    x_adv: torch.Tensor
    fooled: torch.Tensor
    loss: torch.Tensor

    @classmethod
    def start(cls, x: torch.Tensor) -> "APGDResult":
        """Nothing fooled yet: clean images, loss −∞."""
        return cls(x.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device),
                   torch.full((len(x),), float("-inf"), device=x.device))

    def merge(self, todo: torch.Tensor, run: "APGDResult") -> torch.Tensor:
        """Fold in a run on the samples `todo` (restart or target class); returns those it left unfooled."""
        improved = run.fooled | (run.loss > self.loss[todo])
        self.x_adv[todo[improved]] = run.x_adv[improved]
        self.loss[todo] = torch.maximum(self.loss[todo], run.loss)
        self.fooled[todo] = run.fooled
        return todo[~run.fooled]  # compaction between runs (one sync)


def _apgd_run(model: Classifier, x: torch.Tensor, y: torch.Tensor, y_target: torch.Tensor | None, eps: float,
              loss_fn: Callable, norm: str, n_iter: int, rho: float, generator: torch.Generator | None,
              compact: bool) -> APGDResult:
    """One APGD run from a random start, on the whole batch (see the module docstring)."""
    n = x.shape[0]
    out = APGDResult.start(x)
    checkpoints = step_size_checkpoints(n_iter)
    windows = dict(zip(checkpoints, [checkpoints[0]] + [b - a for a, b in zip(checkpoints, checkpoints[1:])]))
    compaction = _compaction_points(n_iter) if compact else set()

    ball = _Ball(x, eps, norm)
    idx = torch.arange(n, device=x.device)
    x_adv = ball.random_start(generator)
    logits, loss, grad = _loss_and_grad(model, x_adv, y, y_target, loss_fn)
    fooled = logits.argmax(1) != y
    x_fooled = x_adv.clone()  # meaningful only where `fooled`
    x_best, grad_best, loss_best = x_adv.clone(), grad.clone(), loss.clone()
    x_old, loss_prev = x_adv.clone(), loss.clone()
    loss_best_at_check, halved_at_check = loss_best.clone(), torch.ones_like(fooled)
    successes = torch.zeros(n, device=x.device)
    step = torch.full((n,), 2.0 * eps, device=x.device, dtype=x.dtype)

    for i in range(1, n_iter + 1):
        with torch.no_grad():
            alpha = 1.0 if i == 1 else 0.75
            direction = grad.sign() if norm == "linf" else _l2_unit(grad)
            z = ball(x_adv + _per_sample(step, x) * direction)
            x_old, x_adv = x_adv, ball(x_adv + alpha * (z - x_adv) + (1 - alpha) * (x_adv - x_old))
        logits, loss, grad = _loss_and_grad(model, x_adv, y, y_target, loss_fn, need_grad=i < n_iter)
        with torch.no_grad():
            first = (logits.argmax(1) != y) & ~fooled
            x_fooled = torch.where(_per_sample(first, x), x_adv, x_fooled)
            fooled |= first
            successes += (loss > loss_prev).float()
            loss_prev = loss
            better = loss > loss_best
            x_best = torch.where(_per_sample(better, x), x_adv, x_best)
            grad_best = torch.where(_per_sample(better, x), grad, grad_best)
            loss_best = torch.where(better, loss, loss_best)

            if i in windows:
                halve = (successes <= rho * windows[i]) | (~halved_at_check & (loss_best_at_check >= loss_best))
                step = torch.where(halve, step / 2, step)
                x_adv = torch.where(_per_sample(halve, x), x_best, x_adv)
                grad = torch.where(_per_sample(halve, x), grad_best, grad)
                halved_at_check, loss_best_at_check = halve, loss_best.clone()
                successes.zero_()

            if i in compaction and i < n_iter:
                done = fooled.nonzero().squeeze(1)  # host–device syncs happen only here, at compaction points
                if done.numel():
                    out.x_adv[idx[done]] = x_fooled[done]
                    out.fooled[idx[done]] = True
                    out.loss[idx[done]] = loss_best[done]
                    keep = (~fooled).nonzero().squeeze(1)
                    if keep.numel() == 0:
                        return out
                    idx, x, y, ball = idx[keep], x[keep], y[keep], ball.select(keep)
                    y_target = y_target[keep] if y_target is not None else None
                    x_adv, x_old, grad, x_fooled = x_adv[keep], x_old[keep], grad[keep], x_fooled[keep]
                    x_best, grad_best, loss_best = x_best[keep], grad_best[keep], loss_best[keep]
                    loss_prev, loss_best_at_check = loss_prev[keep], loss_best_at_check[keep]
                    halved_at_check, successes, step = halved_at_check[keep], successes[keep], step[keep]
                    fooled = fooled[keep]

    out.x_adv[idx] = torch.where(_per_sample(fooled, x), x_fooled, x_best)
    out.fooled[idx] = fooled
    out.loss[idx] = loss_best
    return out


def _check_args(eps: float, norm: str, n_iter: int, n_restarts: int, rho: float) -> None:
    if not eps > 0:
        raise ValueError(f"eps={eps!r}: must be > 0 (pixel units)")
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r}: must be one of {', '.join(NORMS)}")
    if n_iter < 1 or n_restarts < 1:
        raise ValueError(f"n_iter={n_iter}, n_restarts={n_restarts}: both must be >= 1")
    if not 0 < rho <= 1:
        raise ValueError(f"rho={rho!r}: must lie in (0, 1]")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("APGD needs input gradients: do not call it under torch.inference_mode()")


def apgd(model: Classifier, x: torch.Tensor, y: torch.Tensor, eps: float, *, loss: str = "ce",
         norm: str = "linf", n_iter: int = 100, n_restarts: int = 1, rho: float = 0.75,
         y_target: torch.Tensor | None = None, generator: torch.Generator | None = None,
         compact: bool = True) -> APGDResult:
    """APGD on `loss` ('ce', 'dlr', 'dlr-targeted') against a classifier of [0,1] images.

    Every given sample is attacked (filter out misclassified ones first if that matters).
    Each restart attacks only the samples no earlier restart fooled, from a fresh random start;
    robust samples keep the highest-loss iterate over restarts. `compact=False` keeps fooled
    samples in the batch until the end of a run (the official behaviour; same results, slower).
    """
    _check_args(eps, norm, n_iter, n_restarts, rho)
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r}: must be one of {', '.join(LOSSES)}")
    x, y = x.detach(), y.detach()
    result = APGDResult.start(x)
    todo = torch.arange(len(x), device=x.device)
    with frozen_parameters(model):
        for _ in range(n_restarts):
            run = _apgd_run(model, x[todo], y[todo], None if y_target is None else y_target[todo], eps,
                            _LOSS_FNS[loss], norm, n_iter, rho, generator, compact)
            todo = result.merge(todo, run)
            if todo.numel() == 0:
                break
    return result


def apgd_targeted(model: Classifier, x: torch.Tensor, y: torch.Tensor, eps: float, *, n_target_classes: int = 9,
                  norm: str = "linf", n_iter: int = 100, n_restarts: int = 1, rho: float = 0.75,
                  clean_logits: torch.Tensor | None = None, generator: torch.Generator | None = None,
                  compact: bool = True) -> APGDResult:
    """APGD-T: targeted-DLR APGD against the 2nd, 3rd, ... highest clean logits in turn.

    Each target class is a full run of n_iter iterations (times n_restarts) on the samples that no
    earlier target fooled. `clean_logits` (the classifier's logits on x) saves one forward pass.
    """
    _check_args(eps, norm, n_iter, n_restarts, rho)
    x, y = x.detach(), y.detach()
    if clean_logits is None:
        with torch.no_grad():
            clean_logits = model(x).float()
    n_classes = clean_logits.shape[1]
    n_targets = min(n_target_classes, n_classes - 1)
    ranked = clean_logits.argsort(dim=1, descending=True)
    result = APGDResult.start(x)
    todo = torch.arange(len(x), device=x.device)
    for rank in range(1, n_targets + 1):
        sub = apgd(model, x[todo], y[todo], eps, loss="dlr-targeted", norm=norm, n_iter=n_iter,
                   n_restarts=n_restarts, rho=rho, y_target=ranked[todo, rank], generator=generator,
                   compact=compact)
        todo = result.merge(todo, sub)
        if todo.numel() == 0:
            break
    return result


# ------------------------------------------------------------------------------ AutoAttack
@dataclass
class AutoAttackResult:
    """Per-sample outcome of `autoattack_custom`.

    x_adv: the adversarial image for non-robust samples, the clean image otherwise (so
    `classifier(x_adv).argmax(1) == y` exactly where `robust`); fooled_by: '' for robust samples,
    'clean' for samples misclassified without attack, else the attack that fooled them.
    """

    x_adv: torch.Tensor
    robust: torch.Tensor
    clean_correct: torch.Tensor
    fooled_by: list[str]
    attacks: tuple[str, ...]
    adv_pred: torch.Tensor = field(repr=False)

    @property
    def clean_accuracy(self) -> float:
        return self.clean_correct.float().mean().item()

    @property
    def robust_accuracy(self) -> float:
        return self.robust.float().mean().item()


def custom_attacks(n_classes: int) -> tuple[str, ...]:
    """The attacks `autoattack_custom` runs for a problem with n_classes classes.

    APGD-CE then APGD-T; APGD-T's targeted DLR needs 4 classes, so 3-class problems get the
    untargeted DLR (APGD-DLR) instead and 2-class problems APGD-CE alone (DLR is undefined there).
    """
    if n_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, this one has {n_classes}")
    return ("apgd-ce",) if n_classes == 2 else ("apgd-ce", "apgd-dlr") if n_classes == 3 else ("apgd-ce", "apgd-t")


def autoattack_custom(classifier: Classifier, x: torch.Tensor, y: torch.Tensor, eps: float, n_iter: int = 100,
                      n_target_classes: int = 9, *, norm: str = "linf", n_restarts: int = 1, rho: float = 0.75,
                      batch_size: int = 500, seed: int = 0, compact: bool = True) -> AutoAttackResult:
    """AutoAttack version='custom' with attacks ['apgd-ce', 'apgd-t'] (see `custom_attacks`).

    Only clean-correct samples are attacked, and every attack only sees the samples that the
    earlier ones left robust. APGD-CE uses `n_restarts` restarts (AutoAttack's 'custom' keeps 5
    unless told otherwise; the CLIP robustness papers and this default use 1), APGD-T one run per
    target class. Final flags come from re-classifying the returned images, as AutoAttack does.
    Random starts are drawn from one generator seeded with `seed`, batch by batch.
    """
    _check_args(eps, norm, n_iter, n_restarts, rho)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    if isinstance(classifier, nn.Module):
        classifier.eval()
    x, y = x.detach(), y.detach()
    generator = torch.Generator(device=x.device).manual_seed(seed)
    x_adv = x.clone()
    stage = torch.zeros(len(x), dtype=torch.long, device=x.device)  # 0 robust, 1 clean, 2.. attack index + 2
    adv_pred = torch.empty_like(y)
    attacks: tuple[str, ...] = ()
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        with torch.inference_mode():
            logits = classifier(xb).float()
        attacks = custom_attacks(logits.shape[1])
        pred = logits.argmax(1)
        todo = (pred == yb).nonzero().squeeze(1)
        stage[start + (pred != yb).nonzero().squeeze(1)] = 1
        adv_pred[start:start + len(xb)] = pred
        for k, attack in enumerate(attacks):
            if todo.numel() == 0:
                break
            if attack == "apgd-t":
                res = apgd_targeted(classifier, xb[todo], yb[todo], eps, n_target_classes=n_target_classes, norm=norm,
                                    n_iter=n_iter, rho=rho, clean_logits=logits[todo], generator=generator,
                                    compact=compact)
            else:
                res = apgd(classifier, xb[todo], yb[todo], eps, loss="ce" if attack == "apgd-ce" else "dlr",
                           norm=norm, n_iter=n_iter, n_restarts=n_restarts if attack == "apgd-ce" else 1, rho=rho,
                           generator=generator, compact=compact)
            hit = todo[res.fooled]
            if hit.numel():
                with torch.inference_mode():  # AutoAttack's re-check: the flag comes from the returned image
                    p = classifier(res.x_adv[res.fooled]).float().argmax(1)
                ok = p != yb[hit]
                x_adv[start + hit[ok]] = res.x_adv[res.fooled][ok]
                adv_pred[start + hit[ok]] = p[ok]
                stage[start + hit[ok]] = 2 + k
                todo = torch.cat([todo[~res.fooled], hit[~ok]]).sort().values
    _check_perturbation(x_adv, x, eps, norm)
    names = ("", "clean") + attacks
    return AutoAttackResult(x_adv, stage == 0, stage != 1, [names[s] for s in stage.tolist()], attacks, adv_pred)


def _check_perturbation(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> None:
    """Guard against a bug handing out images outside the threat model."""
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    if len(x) and (size.max() > eps * (1 + 1e-5) + 1e-7 or x_adv.min() < 0 or x_adv.max() > 1):
        raise RuntimeError(f"adversarial images leave the threat model: max ‖δ‖={size.max().item():.3g} "
                           f"(ε={eps:.3g}), range [{x_adv.min().item():.3g}, {x_adv.max().item():.3g}]")
