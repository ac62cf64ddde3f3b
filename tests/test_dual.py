"""The multiplier network and the dual ascent step."""

import pytest
import torch

from lorekit.dual import DualNet, dual_step


@pytest.mark.parametrize("kind", ["scalar", "linear", "mlp"])
def test_lambda_starts_at_init_and_is_nonnegative(kind):
    net = DualNet(kind, embed_dim=8, hidden=16, lambda_init=0.7)
    ref = torch.randn(5, 8)
    assert torch.allclose(net(ref), torch.full((5,), 0.7), atol=1e-6)
    with torch.no_grad():  # even for very negative pre-activations λ stays ≥ 0 (softplus)
        for p in net.parameters():
            p.fill_(-50.0)
    assert (net(ref) >= 0).all()


def test_dual_step_raises_lambda_exactly_where_violated():
    # One-hot inputs and a frozen bias give every sample its own parameter, so the effect of
    # one ascent step on each λ_i is read off directly: up iff the constraint is violated.
    net = DualNet("linear", embed_dim=4, lambda_init=1.0)
    net.net.bias.requires_grad_(False)
    opt = torch.optim.SGD([net.net.weight], lr=0.5)
    ref = torch.eye(4)
    slack = torch.tensor([0.3, -0.2, 1.5, -4.0])
    before = net(ref).detach()
    dual_step(net, opt, ref, slack)
    after = net(ref).detach()
    assert torch.equal(after > before, slack > 0)
    assert torch.equal(after < before, slack < 0)


def test_scalar_dual_follows_the_mean_violation():
    net = DualNet("scalar", embed_dim=3, lambda_init=1.0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    ref = torch.randn(3, 3)
    lam0 = net(ref)[0].item()
    dual_step(net, opt, ref, torch.tensor([1.0, 1.0, -0.5]))   # mean > 0: tighten
    lam1 = net(ref)[0].item()
    dual_step(net, opt, ref, torch.tensor([-2.0, -2.0, -2.0]))  # all satisfied: relax
    assert lam1 > lam0 and net(ref)[0].item() < lam1


def test_dual_step_gradient_is_the_slack():
    net = DualNet("scalar", embed_dim=2, lambda_init=1.0)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    b0 = net.bias.item()
    slack = torch.tensor([0.4, 0.2])
    obj = dual_step(net, opt, torch.zeros(2, 2), slack)
    # ascent: Δb = lr · mean(g) · softplus'(b) = 0.3 · sigmoid(b0)
    assert abs(net.bias.item() - (b0 + 0.3 * torch.sigmoid(torch.tensor(b0)).item())) < 1e-6
    assert abs(obj.item() - 0.3) < 1e-6  # λ=1 · mean(g)
