"""Robustness evaluation: results, resume, audit files, config errors, the CLI, and sanity checks
that fire on a gradient-masking model."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from lorekit import robustness
from lorekit.config import ConfigError
from lorekit.robustness import (RobustEvalConfig, check_monotone, check_noise, check_pgd, check_tiny_eps,
                                evaluate_robustness, main)

CACHE = os.environ.get("LOREKIT_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache"))


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()


@pytest.fixture
def data():
    model = small_net()
    x = torch.rand(20, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:2] = (y[:2] + 1) % 10  # two clean mistakes
    return model, x, y


FAST = dict(n_iter=5, n_target_classes=3, chunk_size=8, sanity_samples=10, sanity_iter=5, progress=False)


def test_results_audit_files_and_resume(data, tmp_path, monkeypatch):
    model, x, y = data
    res = evaluate_robustness(model, x, y, [8 / 255, 1 / 255], tmp_path, indices=range(100, 120), **FAST)
    assert res["clean_acc"] == pytest.approx(0.9)
    assert res["eps"] == [1 / 255, 8 / 255]
    acc = res["robust_acc"]
    assert acc["eps8"] <= acc["eps1"] <= res["clean_acc"] and acc["eps8"] < 0.9
    assert set(res["sanity"]) == set(robustness.SANITY_CHECKS) and res["sanity_passed"]
    assert res["attacks"] == ["apgd-ce", "apgd-t"]
    assert {"platform", "cpu_count", "torch"} <= set(res["machine"])

    rows = [json.loads(line) for k in range(3) for line in (tmp_path / "eps8" / f"chunk{k:04d}.jsonl").open()]
    assert [r["index"] for r in rows] == list(range(100, 120))
    assert sum(r["robust"] for r in rows) / 20 == pytest.approx(acc["eps8"])
    assert {r["fooled_by"] for r in rows[:2]} == {"clean"}
    assert all(r["delta"] <= 8 / 255 + 1e-6 for r in rows)
    assert json.loads((tmp_path / "results.json").read_text())["robust_acc"] == acc

    # resume: nothing is attacked again, the summary is the same
    monkeypatch.setattr(robustness, "autoattack_custom", lambda *a, **k: pytest.fail("recomputed a finished chunk"))
    again = evaluate_robustness(model, x, y, [1 / 255, 8 / 255], tmp_path, indices=range(100, 120), **FAST)
    assert again["robust_acc"] == acc and again["sanity"] == res["sanity"]

    # a lost chunk is recomputed, alone
    monkeypatch.undo()
    calls = []
    real = robustness.autoattack_custom
    monkeypatch.setattr(robustness, "autoattack_custom", lambda *a, **k: calls.append(1) or real(*a, **k))
    (tmp_path / "eps1" / "chunk0001.jsonl").unlink()
    evaluate_robustness(model, x, y, [1 / 255, 8 / 255], tmp_path, indices=range(100, 120), **FAST)
    assert len(calls) == 1


def test_resume_refuses_other_settings_or_model(data, tmp_path):
    model, x, y = data
    evaluate_robustness(model, x, y, [4 / 255], tmp_path, **FAST)
    with pytest.raises(ConfigError, match="n_iter"):
        evaluate_robustness(model, x, y, [4 / 255], tmp_path, **{**FAST, "n_iter": 6})
    with pytest.raises(ConfigError, match="clean predictions differ"):
        evaluate_robustness(small_net(seed=1), x, y, [4 / 255], tmp_path, **FAST)


class Quantised(nn.Module):
    """A non-robust linear classifier behind an 8-level input quantiser: zero input gradient
    everywhere, so gradient attacks see nothing while a little noise flips many predictions."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * 8 * 8, 10)
        torch.nn.init.normal_(self.linear.weight, std=2.0, generator=torch.Generator().manual_seed(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((torch.round(x * 8) / 8).flatten(1))


def test_sanity_checks_fire_on_a_gradient_masking_model(tmp_path):
    model = Quantised().eval()
    x = torch.rand(60, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    res = evaluate_robustness(model, x, y, [16 / 255], tmp_path, **{**FAST, "sanity_samples": 60})
    assert not res["sanity_passed"]
    assert not res["sanity"]["zero_gradient"]["passed"]
    assert res["sanity"]["zero_gradient"]["zero_gradient_fraction"] == 1.0
    assert not res["sanity"]["noise"]["passed"]  # the "attack" is no better than noise
    assert res["sanity"]["tiny_eps"]["passed"] and res["sanity"]["monotone"]["passed"]


def test_check_functions_on_constructed_numbers():
    assert check_monotone(0.9, {1 / 255: 0.5, 2 / 255: 0.4}, 100)["passed"]
    bad = check_monotone(0.9, {1 / 255: 0.3, 2 / 255: 0.5}, 100)
    assert not bad["passed"] and "rises" in bad["detail"]
    assert not check_monotone(0.5, {1 / 255: 0.6}, 100)["passed"]  # robust above clean
    assert check_tiny_eps(0.9, 0.9, 100)["passed"] and not check_tiny_eps(0.9, 0.7, 100)["passed"]
    assert check_noise(0.9, {4 / 255: 0.89}, {4 / 255: 0.2}, 100)["passed"]
    assert not check_noise(0.9, {4 / 255: 0.75}, {4 / 255: 0.5}, 100)["passed"]
    assert check_pgd({4 / 255: 1}, 200)["passed"] and not check_pgd({4 / 255: 9}, 200)["passed"]


@pytest.mark.parametrize("overrides,field", [({"dataset": "no-such-set"}, "dataset="), ({"eps": (0.0,)}, "eps="),
                                             ({"eps": (2.0,)}, "eps="), ({"n_samples": 0}, "n_samples=0"),
                                             ({"norm": "l1"}, "norm="), ({"n_iter": 0}, "n_iter=0")])
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        RobustEvalConfig(**overrides).validate()


@pytest.mark.parametrize("argv,field", [(["--eps", "300"], "eps="), (["--n-samples", "0"], "n_samples=0"),
                                        (["--dataset", "no-such-set"], "dataset=")])
def test_cli_reports_bad_input(argv, field, capsys):
    assert main(argv) == 2
    assert field in capsys.readouterr().err


def test_cli_end_to_end_on_the_embedded_model(tmp_path, capsys):
    argv = ["--n-samples", "12", "--eps", "8", "--n-iter", "3", "--n-target-classes", "2", "--sanity-samples", "12",
            "--sanity-iter", "3", "--out-dir", str(tmp_path), "--cache-dir", CACHE, "--device", "cpu"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.split("\nper-sample")[0])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert printed["robust_acc"] == saved["robust_acc"] and saved["settings"]["model"] == "lorekit-tiny"
    assert saved["clean_acc"] > 0.8 and saved["robust_acc"]["eps8"] < saved["clean_acc"]
    assert len((tmp_path / "clean.jsonl").read_text().splitlines()) == 12
