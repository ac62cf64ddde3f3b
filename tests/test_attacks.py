"""PGD in pixel space: stays in the ε-ball and [0,1], raises its loss, finds known optima."""

import pytest
import torch
from torch import nn

from lorekit.attacks import ce_attack_loss, embedding_attack_loss, pgd, project


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_stays_in_ball_and_box_and_raises_embedding_loss(norm):
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16))
    x = torch.rand(6, 3, 8, 8)
    ref = enc(x).detach()
    eps = 4 / 255 if norm == "linf" else 0.5
    loss_fn = embedding_attack_loss(enc, ref)
    x_adv = pgd(loss_fn, x, eps, steps=10, norm=norm, generator=torch.Generator().manual_seed(0))
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-6).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    noise = project(x + eps * torch.randn_like(x).sign(), x, eps, norm)
    assert (loss_fn(x_adv) > loss_fn(noise)).all()
    assert all(p.grad is None for p in enc.parameters())


def test_linf_pgd_finds_the_corner_of_a_linear_loss():
    # loss = w·x: the maximiser over the ℓ∞ ball ∩ [0,1] is clip(x + ε·sign(w)).
    w = torch.tensor([1.0, -2.0, 0.5, -0.1]).view(1, 4, 1, 1)
    x = torch.tensor([0.5, 0.5, 0.99, 0.01]).view(1, 4, 1, 1)
    eps = 0.1
    x_adv = pgd(lambda z: (z * w).flatten(1).sum(1), x, eps, steps=20)
    expected = (x + eps * w.sign()).clamp(0, 1)
    assert torch.allclose(x_adv, expected, atol=1e-6)


def test_l2_pgd_moves_along_the_gradient_direction():
    w = torch.tensor([3.0, 4.0]).view(1, 2, 1, 1)  # maximiser: x + ε·w/‖w‖
    x = torch.full((1, 2, 1, 1), 0.5)
    x_adv = pgd(lambda z: (z * w).flatten(1).sum(1), x, 0.1, steps=30, norm="l2", random_init=False)
    assert torch.allclose(x_adv, x + 0.1 * w / 5.0, atol=1e-4)


def test_ce_pgd_lowers_accuracy_of_a_linear_classifier():
    torch.manual_seed(1)
    clf = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    x = torch.rand(32, 3, 4, 4)
    y = clf(x).argmax(1)  # 100 % clean accuracy by construction
    x_adv = pgd(ce_attack_loss(clf, y), x, 0.1, steps=10)
    assert (clf(x_adv).argmax(1) == y).float().mean() < 0.7
