"""The objectives on small hand-checkable cases."""

import torch

from lorekit import losses


def test_sqdist_and_slack_by_hand():
    ref = torch.tensor([[3.0, 4.0], [1.0, 0.0]])      # ‖ref‖² = 25, 1
    clean = torch.tensor([[3.0, 5.0], [1.0, 2.0]])    # ‖clean − ref‖² = 1, 4
    assert torch.equal(losses.sqdist(clean, ref), torch.tensor([1.0, 4.0]))
    # g = ‖φ − φ0‖² − ρ‖φ0‖² with ρ = 0.1: 1 − 2.5 = −1.5 (holds), 4 − 0.1 = 3.9 (violated)
    assert torch.allclose(losses.constraint_slack(clean, ref, 0.1), torch.tensor([-1.5, 3.9]))


def test_fare_and_fare_reg_by_hand():
    ref = torch.zeros(2, 2)
    adv = torch.tensor([[1.0, 1.0], [2.0, 0.0]])      # sqdist 2, 4 -> mean 3
    clean = torch.tensor([[0.0, 1.0], [0.0, 0.0]])    # sqdist 1, 0 -> mean 0.5
    assert losses.fare_loss(adv, ref)["loss"].item() == 3.0
    terms = losses.fare_reg_loss(adv, clean, ref, lam=2.0)
    assert terms["loss"].item() == 3.0 + 2.0 * 0.5 and terms["clean"].item() == 0.5


def test_lagrangian_by_hand_and_lambda_is_held_fixed():
    ref = torch.tensor([[2.0, 0.0], [0.0, 1.0]])      # ‖ref‖² = 4, 1
    adv = torch.tensor([[2.0, 1.0], [0.0, 1.0]])      # sqdist 1, 0 -> mean 0.5
    clean = torch.tensor([[2.0, 1.0], [0.0, 3.0]], requires_grad=True)  # sqdist 1, 4
    lam = torch.tensor([0.5, 2.0], requires_grad=True)
    terms = losses.lagrangian(adv, clean, ref, lam, rho=0.25)  # slack: 1 − 1 = 0, 4 − 0.25 = 3.75
    assert torch.isclose(terms["penalty"], torch.tensor((0.5 * 0.0 + 2.0 * 3.75) / 2))
    assert torch.isclose(terms["loss"], torch.tensor(0.5 + 3.75))
    terms["loss"].backward()
    assert lam.grad is None  # the primal step must not move λ
    # ∂/∂clean of mean(λ·‖clean − ref‖²) = λ·2(clean − ref)/B
    assert torch.allclose(clean.grad, torch.tensor([[0.0, 0.5], [0.0, 4.0]]))


def test_dual_objective_detaches_the_encoder_term():
    lam = torch.tensor([1.0, 3.0], requires_grad=True)
    slack = torch.tensor([2.0, -1.0], requires_grad=True)
    obj = losses.dual_objective(lam, slack)
    assert obj.item() == (2.0 - 3.0) / 2
    obj.backward()
    assert torch.equal(lam.grad, torch.tensor([1.0, -0.5])) and slack.grad is None


def test_tecoa_is_cross_entropy():
    logits = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    labels = torch.tensor([0, 0])
    expected = (torch.log(torch.tensor(2.0)) + torch.log1p(torch.exp(torch.tensor(-10.0)))) / 2
    assert torch.isclose(losses.tecoa_loss(logits, labels)["loss"], expected)
