"""A 2-D constrained problem shaped like LORE, for teaching, and the 2√ρ cosine guarantee.

The toy mirrors LORE's problem with a point x ∈ R² standing in for an embedding φθ(x):

    minimise   f(x) = Σᵢ cᵢ (xᵢ − tᵢ)²             (the "robust loss": it pulls x towards t)
    subject to g(x) = ‖x − x0‖² − ρ‖x0‖² ≤ 0        (stay close to the original point x0)

The curvatures c make f anisotropic, so the solvers' paths curve instead of running along
one line. The solution is known up to a 1-D root find (`ToyProblem.solution`), so the
notebook can show how two solvers approach it:

- `solve_penalty`: gradient descent on f(x) + λ‖x − x0‖² with a constant λ (FARE-reg). Its
  minimiser (c·t + λx0)/(c + λ) satisfies the constraint only for λ ≥ λ*, and sits on the
  constraint boundary only for λ = λ*, a value that changes with ρ and is unknown beforehand.
- `solve_primal_dual`: gradient descent–ascent on the Lagrangian f(x) + λ·g(x): K descent steps
  on x with λ fixed, then one projected ascent step λ ← max(0, λ + η_λ·g(x)) (LORE's schedule,
  with a scalar λ instead of LORE's per-sample λω(x) = softplus(Fω(φθ0(x)))). λ grows while
  the constraint is violated and settles at λ*.

`cosine_bound_check` checks the guarantee behind LORE's constraint on real embeddings: if
‖a − b‖² ≤ ρ‖b‖², then for every direction w, |cos(a, w) − cos(b, w)| ≤ 2√ρ (because
|cos(a,w) − cos(b,w)| ≤ ‖a/‖a‖ − b/‖b‖‖ ≤ 2‖a − b‖/‖b‖).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class ToyProblem:
    """min Σ cᵢ(xᵢ − targetᵢ)² s.t. ‖x − origin‖² ≤ rho·‖origin‖², in two dimensions."""

    origin: tuple[float, float] = (1.0, 0.0)
    """x0: the original point (the frozen encoder's embedding)."""

    target: tuple[float, float] = (0.2, 1.2)
    """Where the unconstrained objective would go (the robust loss's minimiser)."""

    rho: float = 0.1
    """Constraint level: the allowed squared distance relative to ‖x0‖²."""

    curvature: tuple[float, float] = (3.0, 1.0)
    """c: the objective's curvature along each axis (positive)."""

    @property
    def radius(self) -> float:
        """Radius √ρ‖x0‖ of the feasible disc around x0."""
        return float(np.sqrt(self.rho) * np.linalg.norm(self.origin))

    def f(self, x: np.ndarray) -> np.ndarray:
        """Objective Σ cᵢ(xᵢ − tᵢ)², for points stacked on the last axis."""
        return np.sum(np.asarray(self.curvature) * (np.asarray(x) - np.asarray(self.target)) ** 2, axis=-1)

    def g(self, x: np.ndarray) -> np.ndarray:
        """Constraint slack ‖x − x0‖² − ρ‖x0‖² (feasible where ≤ 0)."""
        return np.sum((np.asarray(x) - np.asarray(self.origin)) ** 2, axis=-1) - self.radius ** 2

    def grad_f(self, x: np.ndarray) -> np.ndarray:
        return 2 * np.asarray(self.curvature) * (x - np.asarray(self.target))

    def grad_g(self, x: np.ndarray) -> np.ndarray:
        return 2 * (x - np.asarray(self.origin))

    def solution(self) -> tuple[np.ndarray, float]:
        """(x*, λ*): the constrained minimiser and its KKT multiplier.

        Stationarity gives x*(λ) = `penalty_minimiser(λ)`, whose distance to x0 falls as λ grows;
        λ* is the root of g(x*(λ)) = 0, found by bisection (0 when the target is feasible).
        """
        if self.g(np.asarray(self.target, float)) <= 0:  # the target is feasible: the constraint is inactive
            return np.asarray(self.target, float), 0.0
        low, high = 0.0, 1.0
        while self.g(self.penalty_minimiser(high)) > 0:
            high *= 2
        for _ in range(200):
            mid = (low + high) / 2
            low, high = (mid, high) if self.g(self.penalty_minimiser(mid)) > 0 else (low, mid)
        return self.penalty_minimiser(high), high

    def penalty_minimiser(self, lam: float) -> np.ndarray:
        """argmin f(x) + λ‖x − x0‖² = (c·t + λ·x0)/(c + λ), per axis."""
        c = np.asarray(self.curvature, float)
        return (c * np.asarray(self.target, float) + lam * np.asarray(self.origin, float)) / (c + lam)


@dataclass
class Trajectory:
    """Iterates of one solver: x (shape [T+1, 2]) and the multiplier λ (shape [T+1])."""

    label: str
    x: np.ndarray
    lam: np.ndarray
    f: np.ndarray = field(init=False)
    g: np.ndarray = field(init=False)
    problem: ToyProblem = field(repr=False, default_factory=ToyProblem)

    def __post_init__(self) -> None:
        self.f = self.problem.f(self.x)
        self.g = self.problem.g(self.x)

    @property
    def final(self) -> np.ndarray:
        return self.x[-1]


def solve_penalty(problem: ToyProblem, lam: float, *, steps: int = 150, lr: float = 0.05) -> Trajectory:
    """Gradient descent on f(x) + λ‖x − x0‖² from x0, with a constant λ (FARE-reg's recipe).

    The step is lr·c_max/(c_max + λ): the largest curvature of the objective is 2(c_max + λ), so
    every λ is as stable as λ = 0 (which needs lr < 1/c_max).
    """
    x = np.array(problem.origin, dtype=float)
    xs = [x.copy()]
    c_max = max(problem.curvature)
    for _ in range(steps):
        x = x - lr * c_max / (c_max + lam) * (problem.grad_f(x) + lam * problem.grad_g(x))
        xs.append(x.copy())
    return Trajectory(f"penalty λ={lam:g}", np.array(xs), np.full(steps + 1, float(lam)), problem=problem)


def solve_primal_dual(problem: ToyProblem, *, steps: int = 150, lr: float = 0.05, dual_lr: float = 5.0,
                      primal_steps: int = 1, lambda_init: float = 0.0) -> Trajectory:
    """Descent–ascent on f(x) + λ·g(x) from x0: K primal steps with λ fixed, then λ ← max(0, λ + η_λ g(x)).

    One outer iteration is recorded per dual step, so `x` and `lam` have `steps + 1` rows. The
    primal steps are stable while lr < 1/(c_max + λ).
    """
    x, lam = np.array(problem.origin, dtype=float), float(lambda_init)
    xs, lams = [x.copy()], [lam]
    for _ in range(steps):
        for _ in range(primal_steps):
            x = x - lr * (problem.grad_f(x) + lam * problem.grad_g(x))
        lam = max(0.0, lam + dual_lr * float(problem.g(x)))
        xs.append(x.copy())
        lams.append(lam)
    label = "primal–dual" + (f" (K={primal_steps})" if primal_steps != 1 else "")
    return Trajectory(label, np.array(xs), np.array(lams), problem=problem)


# --------------------------------------------------------------------------- the 2√ρ guarantee
@dataclass
class CosineBoundCheck:
    """Observed cosine changes |cos(a, w) − cos(b, w)| against the 2√ρ bound, per sample."""

    rho: float
    rel_dist: np.ndarray
    """‖a − b‖²/‖b‖² of each sample."""

    max_change: np.ndarray
    """Largest |cos(a, w) − cos(b, w)| over the directions w, per sample."""

    @property
    def bound(self) -> float:
        """2√ρ: the guaranteed ceiling on the change for samples that satisfy the constraint."""
        return float(2 * np.sqrt(self.rho))

    @property
    def satisfied(self) -> np.ndarray:
        """Mask of the samples that satisfy ‖a − b‖² ≤ ρ‖b‖²."""
        return self.rel_dist <= self.rho

    @property
    def worst(self) -> float:
        """Largest observed change among the samples that satisfy the constraint (0 if none do)."""
        return float(self.max_change[self.satisfied].max(initial=0.0))

    @property
    def holds(self) -> bool:
        """The bound holds for every satisfying sample, and the per-sample bound 2√(rel) for all."""
        return self.worst <= self.bound and bool(np.all(self.max_change <= 2 * np.sqrt(self.rel_dist) + 1e-9))


def _as_array(x: ArrayLike) -> np.ndarray:
    return (x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cosine_bound_check(tuned: ArrayLike, original: ArrayLike, directions: ArrayLike, rho: float) -> CosineBoundCheck:
    """Compare cos(tuned_i, w) with cos(original_i, w) for every sample i and direction w.

    `tuned` and `original` are paired embeddings [N, D] (a = φθ(x), b = φθ0(x)); `directions`
    [C, D] are any fixed vectors, e.g. the class text embeddings of a zero-shot head.
    """
    a, b, w = _as_array(tuned), _as_array(original), _unit(_as_array(directions))
    if a.shape != b.shape or a.ndim != 2 or w.ndim != 2 or w.shape[1] != a.shape[1]:
        raise ValueError(f"shapes: tuned {a.shape} and original {b.shape} must be equal [N, D]; "
                         f"directions {w.shape} must be [C, D]")
    rel = np.sum((a - b) ** 2, axis=1) / np.maximum(np.sum(b ** 2, axis=1), 1e-24)
    change = np.abs(_unit(a) @ w.T - _unit(b) @ w.T).max(axis=1)
    return CosineBoundCheck(float(rho), rel, change)


def noisy_embedding_pairs(encoder: torch.nn.Module, images: torch.Tensor, noise_levels: list[float],
                          seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(φ(x + σ·n), φ(x)) for every image and every σ, stacked: a cheap spread of relative distances.

    Gaussian pixel noise n (clipped to [0,1] after adding) moves the embeddings by amounts that
    span the interesting range of ρ, without training anything.
    """
    gen = torch.Generator(device=images.device).manual_seed(seed)
    encoder.eval()
    with torch.inference_mode():
        clean = encoder(images).float()
        noisy = [encoder((images + s * torch.randn(images.shape, generator=gen, device=images.device)).clamp(0, 1))
                 .float() for s in noise_levels]
    return torch.cat(noisy), clean.repeat(len(noise_levels), 1)
