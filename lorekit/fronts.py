"""Clean-vs-robust fronts from sweep points (notebook 3, `make sweep`): one row per setting — a method and the
value of its knob (LORE's ρ, FARE-reg's λ; the training ε for a method without a knob) — with the mean and the
sample standard deviation over seeds of every metric."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from .demo import mean_std
from .methods import knob


def setting(point: Mapping[str, Any]) -> tuple[str, float]:
    """(method, knob value), or (method, training ε in 1/255) for a method without a knob."""
    field = knob(point["method"])
    return point["method"], point[field] if field else round(point["eps"] * 255, 2)


def front_rows(points: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """One row per setting, in the points' order: method, rho, lam, eps, `label` ('ε=4' where the method has no
    knob), `seeds`, and each metric's mean as `m` and standard deviation as `m_std`."""
    rows = []
    for key in dict.fromkeys(setting(p) for p in points):
        group = [p for p in points if setting(p) == key]
        row: dict[str, Any] = {k: group[0][k] for k in ("method", "rho", "lam", "eps")}
        if knob(row["method"]) is None:
            row["label"] = f"ε={key[1]:g}"
        for m in metrics:
            row[m], row[f"{m}_std"] = mean_std([p[m] for p in group])
        row["seeds"] = len(group)
        rows.append(row)
    return rows


def tradeoff_rows(rows: Sequence[Mapping[str, Any]], eps: float) -> list[Mapping[str, Any]]:
    """The rows of the "controlling the trade-off" figure: every method with a knob, and those without one only
    at the training ε `eps` (a reference line each, not a sweep)."""
    return [r for r in rows if knob(r["method"]) or abs(r.get("eps", eps) - eps) < 1e-9]
