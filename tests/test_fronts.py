"""lorekit.fronts: sweep points grouped per setting with mean ± std over seeds, on hand-checkable numbers."""

import pytest

from lorekit.fronts import front_rows, tradeoff_rows


def _point(method, seed, clean, rho=0.1, lam=1.0, eps=4 / 255):
    return {"method": method, "seed": seed, "rho": rho, "lam": lam, "eps": eps, "clean_acc": clean}


def test_points_group_by_method_and_knob_with_the_sample_std():
    points = [_point("lore", 0, 0.9, rho=0.01), _point("lore", 1, 0.7, rho=0.01), _point("lore", 0, 0.5, rho=0.1),
              _point("fare", 0, 0.8, eps=4 / 255), _point("fare", 0, 0.6, eps=8 / 255),
              _point("fare-reg", 0, 0.4, lam=10.0)]
    rows = front_rows(points, ["clean_acc"])
    assert [(r["method"], r["seeds"]) for r in rows] == [("lore", 2), ("lore", 1), ("fare", 1), ("fare", 1),
                                                         ("fare-reg", 1)]
    assert rows[0]["clean_acc"] == pytest.approx(0.8) and rows[0]["clean_acc_std"] == pytest.approx(0.1414213, 1e-6)
    assert rows[1]["clean_acc_std"] == 0.0  # one seed
    assert [r.get("label") for r in rows] == [None, None, "ε=4", "ε=8", None]  # FARE has no knob: its ε names it


def test_the_tradeoff_keeps_the_knob_sweeps_and_knobless_methods_at_the_training_eps_only():
    rows = front_rows([_point("lore", 0, 0.9), _point("fare", 0, 0.8, eps=4 / 255), _point("fare", 0, 0.6, eps=8 / 255)],
                      ["clean_acc"])
    original = {"method": "original", "clean_acc": 0.97}
    kept = tradeoff_rows(rows + [original], 4 / 255)
    assert [(r["method"], r.get("label")) for r in kept] == [("lore", None), ("fare", "ε=4"), ("original", None)]
