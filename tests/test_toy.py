"""lorekit.toy: the 2-D constrained problem, its two solvers, and the 2√ρ cosine guarantee."""

import numpy as np
import pytest
import torch
from torch import nn

from lorekit.toy import (
    ToyProblem,
    cosine_bound_check,
    noisy_embedding_pairs,
    solve_penalty,
    solve_primal_dual,
)


def test_solution_satisfies_kkt_conditions():
    problem = ToyProblem()  # anisotropic: curvature (3, 1)
    x, lam = problem.solution()
    assert problem.g(x) == pytest.approx(0.0, abs=1e-12)  # active constraint
    assert lam > 0
    np.testing.assert_allclose(problem.grad_f(x) + lam * problem.grad_g(x), 0.0, atol=1e-12)  # stationarity
    # no feasible point on the boundary does better
    angles = np.linspace(0, 2 * np.pi, 2000)
    ring = np.asarray(problem.origin) + problem.radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    assert problem.f(x) <= problem.f(ring).min() + 1e-9


def test_isotropic_problem_has_the_textbook_closed_form():
    problem = ToyProblem(origin=(1.0, 0.0), target=(0.2, 1.2), rho=0.1, curvature=(1.0, 1.0))
    x, lam = problem.solution()
    t, x0, r = np.array([0.2, 1.2]), np.array([1.0, 0.0]), np.sqrt(0.1)
    assert problem.radius == pytest.approx(r)
    assert lam == pytest.approx(np.linalg.norm(t - x0) / r - 1)  # λ* = ‖t − x0‖/r − 1
    np.testing.assert_allclose(x, x0 + r * (t - x0) / np.linalg.norm(t - x0))


def test_feasible_target_needs_no_multiplier():
    problem = ToyProblem(origin=(1.0, 0.0), target=(1.1, 0.1), rho=0.1)
    x, lam = problem.solution()
    np.testing.assert_allclose(x, [1.1, 0.1])
    assert lam == 0.0 and problem.g(x) < 0


@pytest.mark.parametrize("lam", [0.5, 3.0, 50.0])
def test_penalty_descent_converges_to_its_minimiser_for_any_lambda(lam):
    problem = ToyProblem()
    traj = solve_penalty(problem, lam, steps=300)
    np.testing.assert_allclose(traj.final, problem.penalty_minimiser(lam), atol=1e-6)
    assert traj.x.shape == (301, 2) and np.all(traj.lam == lam)
    np.testing.assert_allclose(traj.x[0], problem.origin)
    # below λ* the penalty violates the constraint, above it the constraint is slack
    _, lam_star = problem.solution()
    assert (traj.g[-1] > 0) == (lam < lam_star)


@pytest.mark.parametrize("primal_steps", [1, 3])
def test_primal_dual_finds_the_solution_and_the_multiplier(primal_steps):
    problem = ToyProblem()
    x_star, lam_star = problem.solution()
    traj = solve_primal_dual(problem, steps=300, primal_steps=primal_steps)
    np.testing.assert_allclose(traj.final, x_star, atol=1e-4)
    assert traj.lam[-1] == pytest.approx(lam_star, abs=1e-3)
    assert np.all(traj.lam >= 0) and traj.lam[0] == 0.0
    assert traj.g.max() > 0.1  # it left the feasible disc on the way: λ had to be learned
    assert len(traj.lam) == len(traj.x) == 301
    assert traj.f[-1] == pytest.approx(problem.f(x_star), abs=1e-4)


def test_cosine_change_is_bounded_by_two_sqrt_rho_where_the_constraint_holds():
    gen = np.random.default_rng(0)
    b = gen.normal(size=(500, 16))
    scale = gen.uniform(0, 0.6, size=(500, 1))  # relative distances from 0 to ~0.36 (some violate ρ=0.1)
    a = b + scale * np.linalg.norm(b, axis=1, keepdims=True) * gen.normal(size=(500, 16)) / 4
    w = gen.normal(size=(10, 16))
    check = cosine_bound_check(a, b, w, rho=0.1)
    assert check.bound == pytest.approx(2 * np.sqrt(0.1))
    assert 0 < check.satisfied.sum() < 500
    assert check.worst <= check.bound and check.holds
    np.testing.assert_allclose(check.rel_dist, np.sum((a - b) ** 2, 1) / np.sum(b ** 2, 1))
    # the reported change is the largest over the directions, computed independently here
    cos = lambda u, v: (u @ v) / np.linalg.norm(u) / np.linalg.norm(v)  # noqa: E731
    i = 7
    assert check.max_change[i] == pytest.approx(max(abs(cos(a[i], wk) - cos(b[i], wk)) for wk in w))


def test_violating_samples_can_exceed_the_bound_and_are_excluded_from_worst():
    b = np.array([[1.0, 0.0], [1.0, 0.0]])
    a = np.array([[-1.0, 0.0], [1.0, 0.1]])  # the first flips direction (rel. distance 4), the second barely moves
    check = cosine_bound_check(torch.tensor(a), torch.tensor(b), torch.tensor([[1.0, 0.0]]), rho=0.1)
    assert check.max_change[0] == pytest.approx(2.0) and check.max_change[0] > check.bound
    assert check.satisfied.tolist() == [False, True]
    assert check.worst == pytest.approx(check.max_change[1]) and check.holds


def test_cosine_bound_check_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes"):
        cosine_bound_check(np.zeros((3, 4)), np.zeros((3, 5)), np.zeros((2, 4)), 0.1)
    with pytest.raises(ValueError, match="shapes"):
        cosine_bound_check(np.zeros((3, 4)), np.zeros((3, 4)), np.zeros((2, 3)), 0.1)


def test_noisy_embedding_pairs_spread_and_reproduce():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 8))
    images = torch.rand(6, 3, 4, 4)
    moved, clean = noisy_embedding_pairs(encoder, images, [0.0, 0.05, 0.5], seed=1)
    assert moved.shape == clean.shape == (18, 8)
    torch.testing.assert_close(moved[:6], clean[:6])  # σ = 0 moves nothing
    rel = ((moved - clean).pow(2).sum(1) / clean.pow(2).sum(1)).view(3, 6).mean(1)
    assert rel[0] == 0 and rel[1] < rel[2]
    again, _ = noisy_embedding_pairs(encoder, images, [0.0, 0.05, 0.5], seed=1)
    torch.testing.assert_close(moved, again)
