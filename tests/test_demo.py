"""The demo's table builder (lorekit/demo.py): rows, per-domain columns and their average, mean ± std over seeds,
FARE-reg's best-λ rule, and the recipe it trains with; and that a killed demo stops its workers."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lorekit import demo
from lorekit.evaluate import robust_key
from lorekit.recipes import recipe
from lorekit.suite import SUITE

R2, R4 = robust_key(2 / 255), robust_key(4 / 255)


def _metrics(clean=(0.9, 0.8, 0.7, 0.6), r2=0.5, r4=0.3, fidelity=0.02, satisfied=0.5, passes=1000):
    out = {f"clean_{d}": c for d, c in zip(SUITE, clean)}
    out["clean_avg"] = sum(clean) / len(clean)
    return {**out, R2: r2, R4: r4, "fidelity": fidelity, "satisfied": satisfied, "training_passes": passes}


def test_the_demo_recipe_binds_the_constraint_it_claims():
    cfg = recipe(demo.RECIPE, "lore")
    assert cfg.eps == pytest.approx(8 / 255) and cfg.rho == 0.01 and cfg.updates_per_batch == 5
    assert recipe(demo.RECIPE, "fare").updates_per_batch == 1


def test_jobs_are_the_rows_and_the_lam_sweep_at_every_seed():
    todo = demo.jobs([0, 1], lams=(1.0, 10.0))
    assert [j.key for j in todo if j.seed == 0] == ["lore", "fare", "fare-k5", "fare-reg-lam1", "fare-reg-lam10"]
    assert len(todo) == 10 and {j.seed for j in todo} == {0, 1}
    matched = next(j for j in todo if j.key == "fare-k5")
    assert matched.method == "fare" and matched.overrides == {"primal_steps": 5}  # LORE's K, update-matched
    cfg = matched.config(demo.Path("out"))
    assert cfg.updates_per_batch == 5 and cfg.eps == recipe(demo.RECIPE, "lore").eps
    assert cfg.run_dir == str(demo.Path("out/runs/seed0/fare-k5"))


def test_mean_std_is_the_sample_std_and_zero_for_one_value():
    assert demo.mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert demo.mean_std([0.4]) == (0.4, 0.0)


def test_aggregate_and_table_per_domain_columns_average_and_mean_std():
    runs = [{"key": "fare", "metrics": _metrics(clean=(0.9, 0.8, 0.7, 0.6), r4=0.30)},
            {"key": "fare", "metrics": _metrics(clean=(1.0, 0.8, 0.7, 0.6), r4=0.40)},
            {"key": "original", "metrics": _metrics(clean=(1.0, 1.0, 1.0, 1.0), passes=0)}]
    agg = demo.aggregate(runs)
    assert agg["fare"]["clean_digits"][0] == pytest.approx(0.95)
    assert agg["fare"]["clean_avg"][0] == pytest.approx((0.95 + 0.8 + 0.7 + 0.6) / 4)
    assert agg["fare"][R4] == pytest.approx((0.35, 0.0707107), rel=1e-5)
    table = demo.format_table({"original": agg["original"], "fare": agg["fare"]}, {"fare": "FARE"}, seeds=2)
    head, rule, original, fare = table.splitlines()
    assert head.split(" | ")[1:6] == ["clean digits", "clean words", "clean shapes", "clean textures", "clean avg"]
    assert "PGD-20 @2/255" in head and "PGD-20 @4/255" in head and "satisfied" in head and "training passes" in head
    cells = [c.strip() for c in fare.strip("| ").split(" | ")]
    assert cells[0] == "FARE"
    assert cells[1] == "95.0 ± 7.1" and cells[5] == "76.2 ± 1.8"  # digits, then the average of the four domains
    assert cells[7] == "35.0 ± 7.1"
    assert original.split(" | ")[-1].strip(" |") == "0"
    one_seed = demo.format_table({"fare": agg["fare"]}, {}, seeds=1)
    assert "±" not in one_seed


def _lam_agg(fare_r4, regs):
    agg = {"fare": {R4: (fare_r4, 0.0), "clean_avg": (0.8, 0.0)}}
    for lam, (clean, r4) in regs.items():
        agg[f"fare-reg-lam{lam:g}"] = {R4: (r4, 0.0), "clean_avg": (clean, 0.0)}
    return agg


def test_best_lam_is_the_cleanest_lam_at_least_as_robust_as_fare():
    # λ=10 is the cleanest but less robust than FARE; of the robust-enough λ, 1 is cleaner than 0.1.
    agg = _lam_agg(0.40, {0.1: (0.80, 0.45), 1.0: (0.85, 0.40), 10.0: (0.95, 0.20)})
    assert demo.best_lam(agg, [0.1, 1.0, 10.0]) == 1.0


def test_best_lam_falls_back_to_the_most_robust_when_none_matches_fare():
    agg = _lam_agg(0.50, {1.0: (0.85, 0.40), 10.0: (0.95, 0.20)})
    assert demo.best_lam(agg, [1.0, 10.0]) == 1.0


class _Fixed(nn.Module):
    """An 'encoder' that returns its input: images are embeddings, so accuracies are set by hand."""

    def forward(self, x):
        return x


def test_suite_evaluator_averages_the_domains():
    eye = torch.eye(2)
    good = (eye.repeat(2, 1), torch.tensor([0, 1, 0, 1]), eye)  # every image classified right
    half = (eye.repeat(2, 1), torch.tensor([0, 1, 1, 0]), eye)  # half of them
    ev = object.__new__(demo.SuiteEvaluator)
    ev.domains = {"digits": good, "words": half}
    ev.eps, ev.pgd_steps, ev.rho = (), 1, 0.01
    ev.bench = SimpleNamespace(class_embeddings=eye, original=_Fixed(), images=good[0])
    out = ev(_Fixed())
    assert out["clean_digits"] == 1.0 and out["clean_words"] == 0.5 and out["clean_avg"] == 0.75
    assert out["fidelity"] == 0.0 and out["satisfied"] == 1.0


def test_a_killed_demo_leaves_no_worker_training_and_checkpoints_the_run_in_progress(tmp_path):
    import psutil

    out = tmp_path / "demo"
    proc = subprocess.Popen([sys.executable, "-m", "lorekit", "demo", "--out", str(out), "--steps", "400",
                             "--workers", "1", "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.time() + 300
    while not any(p.read_text().count('"train"') >= 2 for p in out.rglob("metrics.jsonl")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    workers = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)  # the demo process alone, as `kill PID` does
    proc.wait(timeout=60)
    _, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive, f"workers still running after the demo was killed: {alive}"
    runs = [p.parent for p in out.rglob("checkpoint.pt")]
    assert runs and not any((r / "summary.json").exists() for r in runs)  # checkpointed, not finished
    assert all(torch.load(r / "checkpoint.pt", weights_only=True)["step"] < 400 for r in runs)
