"""APGD / AutoAttack-custom: hand-checkable cases, the official schedule and losses, and a
cross-check against pyautoattack on the embedded tiny CLIP (original and briefly FARE-tuned)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorekit.apgd import (_compaction_points, apgd, apgd_targeted, autoattack_custom, custom_attacks, dlr_loss,
                          dlr_targeted_loss, step_size_checkpoints)

CACHE = os.environ.get("LOREKIT_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache"))


class Linear(nn.Module):
    """logits = W·flatten(x) + b: the optimal ℓ∞ attack on a margin is known in closed form."""

    def __init__(self, d: int, c: int, seed: int = 0, scale: float = 1.0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(scale * torch.randn(c, d, generator=g))
        self.b = nn.Parameter(torch.zeros(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w.T + self.b


def optimal_margin(model: Linear, x: torch.Tensor, y: torch.Tensor, j: torch.Tensor, eps: float):
    """min over {‖δ‖∞ ≤ ε, x+δ ∈ [0,1]} of z_y − z_j for a linear model, and its minimiser."""
    xf = x.flatten(1)
    v = model.w[y] - model.w[j]  # gradient of the margin
    lo, hi = (xf - eps).clamp_min(0), (xf + eps).clamp_max(1)
    x_star = torch.where(v > 0, lo, hi)
    margin = (v * x_star).sum(1) + model.b[y] - model.b[j]
    return margin, x_star.view_as(x)


def small_net(seed: int = 0, classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Flatten(), nn.Linear(8 * 8 * 8, classes)).eval()


# ------------------------------------------------------------------------- official schedule
def test_checkpoints_equal_official_schedule_for_100_iterations():
    assert step_size_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    p = [0.0, 0.22]  # the paper's p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    assert step_size_checkpoints(100) == [round(100 * q) for q in p[1:]]


@pytest.mark.parametrize("n_iter", [5, 10, 20, 37, 100, 250])
def test_checkpoints_follow_pyautoattack_counters(n_iter):
    from pyautoattack.autopgd_base import APGDAttack

    official = APGDAttack(lambda x: x, n_iter=n_iter, eps=0.1)
    k, counter, points = official.n_iter_2, 0, []  # replay its loop's counter3/k bookkeeping
    for i in range(n_iter):
        counter += 1
        if counter == k:
            points.append(i + 1)
            k, counter = max(k - official.size_decr, official.n_iter_min), 0
    assert step_size_checkpoints(n_iter) == points


def test_dlr_losses_equal_pyautoattack_formulas():
    from pyautoattack.autopgd_base import APGDAttack_targeted

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 10, generator=g) * 3
    y = torch.randint(0, 10, (64,), generator=g)
    y[:8] = logits[:8].argmax(1)  # both branches of max_{i≠y}
    target = (y + 1 + torch.randint(0, 9, (64,), generator=g)) % 10
    official = APGDAttack_targeted(lambda x: x, eps=0.1)
    official.y_target = target
    torch.testing.assert_close(dlr_loss(logits, y), official.dlr_loss(logits, y))
    torch.testing.assert_close(dlr_targeted_loss(logits, y, target), official.dlr_loss_targeted(logits, y))


def test_attack_choice_by_number_of_classes():
    assert custom_attacks(2) == ("apgd-ce",)
    assert custom_attacks(3) == ("apgd-ce", "apgd-dlr")
    assert custom_attacks(10) == ("apgd-ce", "apgd-t")


# ------------------------------------------------------------------------ hand-checkable cases
@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_stays_in_ball_and_box_and_raises_loss(norm, eps):
    model = small_net()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(48, 3, 8, 8, generator=g)
    x[:8] = (x[:8] > 0.5).float()  # pixels at 0 and 1 exercise the box
    with torch.no_grad():
        y = model(x).argmax(1)  # all clean-correct
        clean_loss = F.cross_entropy(model(x), y, reduction="none")
    res = apgd(model, x, y, eps, norm=norm, n_iter=30, generator=torch.Generator().manual_seed(0))
    delta = (res.x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert size.max() <= eps + 1e-6
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    robust = ~res.fooled
    assert (res.loss[robust] >= clean_loss[robust] - 1e-6).all()
    assert res.fooled.float().mean() > 0.5  # a random net is not robust at these radii
    with torch.no_grad():
        assert (model(res.x_adv[res.fooled]).argmax(1) != y[res.fooled]).all()


def test_two_class_linear_model_reaches_the_analytic_optimum():
    """CE of a 2-class linear model is monotone in its (linear) margin: the best ℓ∞ attack is the
    box corner x* = clip(x − ε·sign(w_y − w_j)); APGD's first 2ε sign step lands exactly there."""
    d, eps = 3 * 4 * 4, 32 / 255
    model = Linear(d, 2, seed=3, scale=0.3)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 4, 4, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
        margin, x_star = optimal_margin(model, x, y, 1 - y, eps)
    res = apgd(model, x, y, eps, loss="ce", n_iter=20, generator=torch.Generator().manual_seed(0))
    assert torch.equal(res.fooled, margin < 0)
    robust = margin > 0
    assert robust.sum() >= 10 and (~robust).sum() >= 10  # both outcomes are exercised
    torch.testing.assert_close(res.x_adv[robust], x_star[robust], atol=1e-6, rtol=0)
    with torch.no_grad():
        optimum = F.cross_entropy(model(x_star), y, reduction="none")
    torch.testing.assert_close(res.loss[robust], optimum[robust], atol=1e-5, rtol=1e-5)


def test_multiclass_linear_model_robust_flags_match_analytic_ones():
    """With APGD-CE then APGD-T against every other class, exactly the samples whose optimal
    worst-class margin is negative are fooled (samples within 2% of the boundary excluded)."""
    c, eps = 5, 10 / 255
    model = Linear(3 * 4 * 4, c, seed=5, scale=0.3)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(160, 3, 4, 4, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
        margins = torch.stack([optimal_margin(model, x, y, torch.full_like(y, j), eps)[0] for j in range(c)], 1)
        margins[torch.arange(len(y)), y] = float("inf")
        worst = margins.min(1).values
        scale = (model(x).topk(2).values @ torch.tensor([1.0, -1.0])).abs().median()
    res = autoattack_custom(model, x, y, eps, n_iter=30, n_target_classes=c - 1)
    clear = worst.abs() > 0.02 * scale
    assert clear.float().mean() > 0.8 and 0.2 < (worst > 0).float().mean() < 0.8
    assert torch.equal(res.robust[clear], (worst > 0)[clear])
    assert set(res.fooled_by) <= {"", "apgd-ce", "apgd-t"}


def test_compaction_does_not_change_results():
    model = small_net(seed=2)
    x = torch.rand(40, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = model(x).argmax(1)
    runs = [apgd(model, x, y, 2 / 255, n_iter=25, generator=torch.Generator().manual_seed(0), compact=c)
            for c in (True, False)]
    assert 0 < runs[0].fooled.sum() < len(x)  # some leave the batch early, some stay
    assert torch.equal(runs[0].fooled, runs[1].fooled)
    torch.testing.assert_close(runs[0].x_adv, runs[1].x_adv)
    robust = ~runs[0].fooled  # fooled samples stop improving their loss once they leave the batch
    torch.testing.assert_close(runs[0].loss[robust], runs[1].loss[robust])


def test_no_host_device_sync_inside_the_iteration_loop(monkeypatch):
    """Count every tensor→Python conversion during a 100-iteration run: only the compactions sync."""
    model = Linear(3 * 4 * 4, 10, seed=0, scale=0.01)
    model.b.data[0] = 100.0  # nothing can be fooled: the run goes the full 100 iterations
    x = torch.rand(16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(16, dtype=torch.long)
    calls = {"n": 0}
    for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "any", "all"):
        original = getattr(torch.Tensor, name)

        def counted(*args, _original=original, **kwargs):
            calls["n"] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    res = apgd(model, x, y, 4 / 255, n_iter=100, generator=torch.Generator().manual_seed(0))
    monkeypatch.undo()
    assert not res.fooled.any()
    # one nonzero() per compaction point (the count proves the instrumentation works), no more
    assert len(_compaction_points(100)) - 1 <= calls["n"] <= len(_compaction_points(100)) + 2


def test_targeted_attack_needs_four_classes_and_loops_over_targets():
    model = small_net(classes=3)
    x = torch.rand(4, 3, 8, 8)
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="at least 4 classes"):
        apgd_targeted(model, x, y, 0.1, n_iter=2)
    with pytest.raises(RuntimeError, match="inference_mode"), torch.inference_mode():
        apgd(model, x, y, 0.1, n_iter=2)


# ------------------------------------------------------------------- cross-check: pyautoattack
def _fare_finetune(encoder: nn.Module, images: torch.Tensor, steps: int, eps: float, seed: int = 0) -> nn.Module:
    """A few FARE steps: PGD on ‖φ(x+δ) − φ0(x)‖², then AdamW on the whole image tower."""
    from lorekit.attacks import embedding_attack_loss, pgd
    from lorekit.models import frozen_copy

    tuned, ref = copy.deepcopy(encoder), frozen_copy(encoder)
    opt = torch.optim.AdamW(tuned.parameters(), lr=3e-4, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        xb = images[torch.randint(0, len(images), (32,), generator=g)]
        with torch.no_grad():
            target = ref(xb)
        tuned.eval()
        x_adv = pgd(embedding_attack_loss(tuned, target), xb, eps, steps=3, generator=g)
        tuned.train()
        loss = (tuned(x_adv) - target).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return tuned.eval()


@pytest.fixture(scope="module")
def one_thread():
    """The batches here are small (≤ 100 tiny images): one thread is about as fast as two, and on a
    loaded 2-core machine it avoids OpenMP barrier stalls that make two threads many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clip_pair(one_thread):
    from lorekit.data import digits, fixed_subset, stack
    from lorekit.models import ZeroShotClassifier, load_clip

    clip = load_clip("lorekit-tiny", "digits", cache_dir=CACHE)
    bundle = digits()
    weights = clip.class_embeddings(bundle.classnames, bundle.templates)
    x, y = stack(bundle.test, fixed_subset(len(bundle.test), 100, seed=0))
    tuned = _fare_finetune(clip.encoder, bundle.train.tensors[0], steps=10, eps=8 / 255)
    return {"original": ZeroShotClassifier(clip.encoder, weights).eval(),
            "fare": ZeroShotClassifier(tuned, weights).eval(), "x": x, "y": y}


@pytest.mark.parametrize("which", ["original", "fare"])
def test_robust_accuracy_matches_pyautoattack(clip_pair, which):
    """Same 100 samples, ε = 4/255, APGD-CE (1 restart) + APGD-T (9 targets), 10 iterations each
    (100 in bench/crosscheck_autoattack.py; 10 keeps this test under a minute on 2 cores).
    Random starts differ between the two implementations, hence a tolerance of 5 samples."""
    from pyautoattack import AutoAttack

    clf, x, y, eps, n_iter = clip_pair[which], clip_pair["x"], clip_pair["y"], 4 / 255, 10
    ours = autoattack_custom(clf, x, y, eps, n_iter=n_iter, n_target_classes=9, seed=0)
    aa = AutoAttack(clf, attacks=["apgd-ce", "apgd-t"], eps=eps, norm="Linf", version="custom", seed=0)
    aa.apgd.n_restarts = 1
    aa.apgd_targeted.n_target_classes = 9
    for attack in (aa.apgd, aa.apgd_targeted):  # its schedule is fixed at construction: rebuild it
        attack.n_iter, attack.n_iter_2 = n_iter, max(int(0.22 * n_iter), 1)
        attack.n_iter_min, attack.size_decr = max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1)
    x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=100)
    with torch.inference_mode():
        theirs = clf(x_adv).argmax(1) == y
    assert 0.05 < ours.clean_accuracy and ours.robust_accuracy < ours.clean_accuracy
    assert abs(ours.robust_accuracy - theirs.float().mean().item()) <= 0.05
    assert (ours.robust == theirs).float().mean() >= 0.9
    with torch.inference_mode():  # flags are exact: robust ⇔ the returned image is classified correctly
        assert torch.equal(clf(ours.x_adv).argmax(1) == y, ours.robust)
