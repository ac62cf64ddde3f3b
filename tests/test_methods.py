"""The method interface: hand-checkable LORE and FARE steps, K for every method, the compute ledger, and a
loop that never names a method."""

import ast
import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from lorekit import losses, methods
from lorekit.config import TrainConfig
from lorekit.dual import inverse_softplus
from lorekit.trainer import Trainer, warmup_cosine

ROOT = Path(__file__).resolve().parents[1]


def _toy_trainer(tmp_path, method, **cfg):
    """A linear encoder on 2×3×3 images: every quantity below can be recomputed by hand."""
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(18, 5))
    data = TensorDataset(torch.rand(16, 2, 3, 3), torch.randint(0, 3, (16,)))
    settings = dict(method=method, steps=4, batch_size=8, attack_steps=2, eval_every=0, lr=0.05, warmup=0.0,
                    weight_decay=1e-2, run_dir=str(tmp_path / method), dual="scalar", dual_lr=0.1, rho=0.05)
    head = torch.randn(3, 5) if methods.get(method).needs_head else None  # class embeddings of 3 classes
    return Trainer(TrainConfig(**{**settings, **cfg}), encoder, data, class_embeddings=head)


def _spy(monkeypatch, module, name, calls):
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)


def _by_hand_adamw(encoder, cfg, k, loss_of):
    """K AdamW updates of `encoder` on loss_of(encoder), with the run's schedule (steps·K updates)."""
    opt = torch.optim.AdamW(encoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    factor = warmup_cosine(cfg.steps * k, int(cfg.warmup * cfg.steps * k))
    history = []
    for update in range(k):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * factor(update)
        loss, extra = loss_of(encoder)
        history.append(extra)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return history


def test_a_lore_step_is_k_primal_steps_at_fixed_lambda_then_one_dual_ascent(tmp_path, monkeypatch):
    trainer = _toy_trainer(tmp_path, "lore", primal_steps=3)
    cfg, lore = trainer.cfg, trainer.method
    assert lore.k == 3
    x, y = trainer.train_set.tensors[0][:8], trainer.train_set.tensors[1][:8]
    before = copy.deepcopy(trainer.encoder)
    lam0 = F.softplus(lore.dual.bias).item()
    assert lam0 == pytest.approx(cfg.lambda_init)
    made, lagrangians, duals = [], [], []
    real_adversarial = lore.adversarial
    monkeypatch.setattr(lore, "adversarial", lambda b, pgd: made.append(real_adversarial(b, pgd)) or made[-1])
    _spy(monkeypatch, losses, "lagrangian", lagrangians)
    from lorekit.methods import lore as lore_module
    _spy(monkeypatch, lore_module, "dual_step", duals)

    log = trainer.train_step(x, y)

    # λ(x) is held fixed across the K primal steps: every Lagrangian saw the same multipliers
    lams = [args[3] for args, _ in lagrangians]
    assert len(lams) == 3 and all(torch.equal(lam, lams[0]) for lam in lams)
    assert torch.allclose(lams[0], torch.full((8,), lam0))
    # the primal steps are AdamW steps on the Lagrangian with those multipliers, recomputed by hand
    ref = trainer.reference(x).detach()
    x_adv = made[0]

    def lagrangian(enc):
        adv, clean = enc(torch.cat([x_adv, x])).chunk(2)
        penalty = (lams[0] * (losses.sqdist(clean, ref) - cfg.rho * ref.pow(2).sum(-1))).mean()
        return losses.sqdist(adv, ref).mean() + penalty, clean.detach()

    cleans = _by_hand_adamw(before, cfg, 3, lagrangian)
    for p, q in zip(trainer.encoder.parameters(), before.parameters()):
        torch.testing.assert_close(p, q)
    # the dual step uses the LAST primal step's slack g(x) (θ before that step's update) ...
    slack = duals[0][0][3]
    expected = losses.constraint_slack(cleans[-1], ref, cfg.rho)
    torch.testing.assert_close(slack, expected)
    assert not torch.allclose(slack, losses.constraint_slack(cleans[0], ref, cfg.rho))
    # ... and is one Adam ASCENT step on E[λ g]: the scalar's first step moves by dual_lr along sign(mean g)
    b1 = inverse_softplus(lam0) + cfg.dual_lr * math.copysign(1.0, slack.mean().item())
    assert lore.dual.bias.item() == pytest.approx(b1, abs=1e-6)
    assert log["lambda_mean"].item() == pytest.approx(lam0)
    assert trainer.ledger.updates == 3


def test_fare_with_k_updates_takes_k_adamw_steps_on_one_adversarial_batch(tmp_path, monkeypatch):
    trainer = _toy_trainer(tmp_path, "fare", primal_steps=4)
    cfg = trainer.cfg
    x, y = trainer.train_set.tensors[0][:8], trainer.train_set.tensors[1][:8]
    before = copy.deepcopy(trainer.encoder)
    made = []
    real_adversarial = trainer.method.adversarial
    monkeypatch.setattr(trainer.method, "adversarial", lambda b, pgd: made.append(real_adversarial(b, pgd)) or made[-1])
    trainer.train_step(x, y)
    ref = trainer.reference(x).detach()
    _by_hand_adamw(before, cfg, 4, lambda enc: (losses.sqdist(enc(made[0]), ref).mean(), None))
    for p, q in zip(trainer.encoder.parameters(), before.parameters()):
        torch.testing.assert_close(p, q)
    assert len(made) == 1 and trainer.ledger.updates == 4  # one attack, four updates


@pytest.mark.parametrize("method,k", [("fare", 3), ("lore", 2), ("fare-reg", 1)])
def test_the_schedule_spans_steps_times_k_updates(tmp_path, method, k):
    trainer = _toy_trainer(tmp_path, method, primal_steps=k, warmup=0.25)
    trainer.fit(progress=False)
    total = trainer.cfg.steps * k
    assert trainer.ledger.updates == total and trainer.scheduler.last_epoch == total
    factor = warmup_cosine(total, int(0.25 * total))
    lrs = [r["lr"] for r in map(json.loads, (trainer.cfg.run_path / "metrics.jsonl").read_text().splitlines())
           if r["kind"] == "train"]
    assert lrs == pytest.approx([trainer.cfg.lr * factor(k * (s + 1)) for s in range(trainer.cfg.steps)])
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)  # the cosine ends exactly at the last update


@pytest.mark.parametrize("method,k,fwd_update,telemetry", [
    ("fare", 1, 1, 1), ("fare", 3, 3, 1), ("fare-reg", 2, 4, 0), ("lore", 5, 10, 0), ("tecoa", 1, 1, 1)])
def test_the_ledger_counts_passes_per_phase(tmp_path, method, k, fwd_update, telemetry):
    # per batch of B: reference B; attack T·B forward and backward; update as the method makes it;
    # telemetry B forward for methods whose update never sees clean images
    trainer = _toy_trainer(tmp_path, method, primal_steps=k, steps=2, attack_steps=3)
    summary = trainer.fit(progress=False)
    B, S, T = 8, 2, 3
    ledger = summary["ledger"]
    assert ledger["passes_fwd_reference"] == S * B and ledger["passes_bwd_reference"] == 0
    assert ledger["passes_fwd_attack"] == ledger["passes_bwd_attack"] == S * T * B
    assert ledger["passes_fwd_update"] == ledger["passes_bwd_update"] == S * fwd_update * B
    assert ledger["passes_fwd_telemetry"] == S * telemetry * B and ledger["passes_bwd_telemetry"] == 0
    assert ledger["training_passes"] == S * B * (1 + 2 * T + 2 * fwd_update)
    assert ledger["passes"] == ledger["training_passes"] + S * telemetry * B
    assert ledger["updates"] == S * k and ledger["wall_time_s"] > 0
    assert ledger["training_passes"] == S * methods.get(method).passes_per_step(trainer.cfg)  # the formula budgets use


def test_a_budget_sets_the_steps_that_fit():
    lore = TrainConfig(method="lore", batch_size=10, attack_steps=2, budget=10_000).validate()
    fare = TrainConfig(method="fare", batch_size=10, attack_steps=2, budget=10_000).validate()
    assert lore.steps == 10_000 // (10 + 40 + 2 * 5 * 20) and fare.steps == 10_000 // (10 + 40 + 20)
    with pytest.raises(Exception, match="budget=100: less than one step of lore"):
        TrainConfig(method="lore", batch_size=10, budget=100).validate()


def test_every_method_is_one_registered_class_with_what_the_loop_needs():
    for name, method in methods.METHODS.items():
        assert method.name == name and method.label and method.primal_steps >= 1
        assert method.knob is None or method.knob in TrainConfig.__dataclass_fields__
        assert all(f in TrainConfig.__dataclass_fields__ for f in method.fields)
    assert TrainConfig(method="lore").updates_per_batch == 5
    assert TrainConfig(method="fare").updates_per_batch == 1
    assert TrainConfig(method="fare", primal_steps=5).updates_per_batch == 5


def _method_branches(tree: ast.AST, names: set[str]) -> list[int]:
    """Lines that compare with, or key a dict by, a method's name: the loop deciding per method."""
    bad = []
    for node in ast.walk(tree):
        consts = []
        if isinstance(node, ast.Compare):
            consts = [node.left, *node.comparators]
        elif isinstance(node, ast.Dict):
            consts = [k for k in node.keys if k is not None]
        if any(isinstance(c, ast.Constant) and c.value in names for c in consts):
            bad.append(node.lineno)
    return bad


def test_no_code_outside_the_methods_branches_on_a_method_name():
    import nbformat

    names = set(methods.METHODS)
    offenders = {}
    # demo.py is exempt: its rows ARE named methods (FARE, FARE K=5, FARE-reg, LORE), as a recipe names its
    # method; it keys its table, labels and colours by them and drives the same generic `train`
    for path in (ROOT / "lorekit").rglob("*.py"):
        if "methods" not in path.relative_to(ROOT / "lorekit").parts and path.name != "demo.py":
            if bad := _method_branches(ast.parse(path.read_text()), names):
                offenders[str(path.relative_to(ROOT))] = bad
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for i, cell in enumerate(nbformat.read(path, as_version=4).cells):
            if cell.cell_type == "code" and (bad := _method_branches(ast.parse(cell.source), names)):
                offenders[f"{path.name} cell {i}"] = bad
    assert not offenders
