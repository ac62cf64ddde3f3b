"""Plotly figure builders for the notebooks: pure functions from records and results to figures.

Inputs are the plain data the rest of lorekit writes: metrics records (`trainer.read_metrics`),
sweep rows (`sweep.SweepResult.rows()`), dicts of accuracies, arrays of coordinates. Nothing
here trains or evaluates. `use_notebook_renderer` picks a renderer pair that shows in
JupyterLab (the plotly mimetype, rendered offline by the jupyterlab-plotly extension) and in
nbconvert HTML (an HTML div that loads plotly.js from the CDN), and keeps notebooks small
(no inlined plotly.js).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from .methods import METHODS, knob, label as method_name
from .toy import CosineBoundCheck, ToyProblem, Trajectory

Record = Mapping[str, Any]

RENDERER = "plotly_mimetype+notebook_connected"
TEMPLATE = "plotly_white"
ORIGINAL = "original"  # rows and curves of the encoder before fine-tuning: not a method, the reference point
METHOD_COLORS = {ORIGINAL: "#555555", **{name: m.color for name, m in METHODS.items()}}
CLASS_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                "#bcbd22", "#17becf")

# Shown next to the cursor in HTML exports (nbconvert): layout.meta.images[customdata[0]] (see umap_grid).
HOVER_IMAGE_JS = """
var gd = document.getElementById('{plot_id}');
var uris = (gd.layout.meta || {}).images || [];
var tip = document.createElement('img');
tip.style.cssText = 'position:fixed;display:none;pointer-events:none;z-index:1000;width:72px;height:72px;' +
                    'image-rendering:pixelated;border:1px solid #888;background:#000';
document.body.appendChild(tip);
gd.on('plotly_hover', function (ev) {
  var p = ev.points[0], uri = p.customdata && uris[p.customdata[0]];
  if (!uri) { return; }
  tip.src = uri;
  tip.style.left = (ev.event.clientX - 90) + 'px';  // left of the cursor: plotly's label sits at its right
  tip.style.top = (ev.event.clientY - 36) + 'px';
  tip.style.display = 'block';
});
gd.on('plotly_unhover', function () { tip.style.display = 'none'; });
"""


def use_notebook_renderer() -> None:
    """Set the renderer (JupyterLab mimetype + CDN-backed HTML) and the template for this kernel."""
    pio.renderers.default = RENDERER
    pio.templates.default = TEMPLATE


def mime_bundle(fig: go.Figure) -> dict[str, Any]:
    """The default renderers' mime bundle of `fig` (for display handles: `display(bundle, raw=True)`).

    Unlike `fig._repr_mimebundle_()`, this does not re-emit the HTML renderer's one-time
    initialisation output on every call; each renderer's own output is complete without it.
    """
    fig_dict = fig.to_dict()
    bundle: dict[str, Any] = {}
    for name in pio.renderers.default.split("+"):
        renderer = pio.renderers[name]
        if hasattr(renderer, "to_mimebundle"):
            bundle.update(renderer.to_mimebundle(fig_dict))
    return bundle


def method_color(name: str) -> str | None:
    """The colour of a method (by registry name or label, any case) or of the original encoder."""
    key = name.lower()
    return next((c for n, c in METHOD_COLORS.items() if key in (n, method_name(n).lower())), None)


def _layout(fig: go.Figure, title: str, height: int, width: int | None = None, *,
            side_legend: bool = False) -> go.Figure:
    """Common layout: title, size, template; the legend above the plot, or at its right for many traces."""
    legend = (dict(orientation="v", x=1.01, xanchor="left", y=1, yanchor="top", traceorder="normal") if side_legend
              else dict(orientation="h", x=0, y=1.02, yanchor="bottom"))
    fig.update_layout(title=dict(text=title, y=0.98, yanchor="top"), height=height, width=width, legend=legend,
                      margin=dict(l=60, r=20, t=90 if not side_legend else 70, b=50), template=TEMPLATE)
    return fig


# --------------------------------------------------------------------------- the toy problem
def toy_trajectories(problem: ToyProblem, trajectories: Sequence[Trajectory], *, grid: int = 40,
                     extent: tuple[float, float, float, float] = (-0.2, 1.6, -0.5, 1.5)) -> go.Figure:
    """Contours of f, the feasible disc, the penalty minimisers x(λ), x* and each solver's path from x0."""
    x0, x1, y0, y1 = extent
    xs, ys = np.linspace(x0, x1, grid), np.linspace(y0, y1, grid)
    pts = np.stack(np.meshgrid(xs, ys), axis=-1)
    fig = go.Figure(go.Contour(x=xs, y=ys, z=problem.f(pts).round(4), showscale=False, ncontours=16,
                               colorscale=[[0, "#bbbbbb"], [1, "#bbbbbb"]], contours=dict(coloring="lines"),
                               line=dict(width=1), hoverinfo="skip", name="contours of f", showlegend=True))
    angle = np.linspace(0, 2 * np.pi, 121)
    cx, cy = problem.origin
    fig.add_scatter(x=cx + problem.radius * np.cos(angle), y=cy + problem.radius * np.sin(angle), mode="lines",
                    fill="toself", fillcolor="rgba(44,160,44,0.12)", line=dict(color="#2ca02c"),
                    name="feasible: g(x) ≤ 0")
    path = np.array([problem.penalty_minimiser(lam) for lam in np.concatenate([[0], np.geomspace(1e-2, 1e3, 120)])])
    fig.add_scatter(x=path[:, 0], y=path[:, 1], mode="lines", line=dict(color="#888888", dash="dot"),
                    name="penalty minimisers x(λ), λ ≥ 0", hoverinfo="skip")
    x_star, _ = problem.solution()
    for point, name, symbol in ((problem.origin, "x0 (original)", "circle"), (problem.target, "t (target)", "x"),
                                (x_star, "x* (solution)", "star")):
        fig.add_scatter(x=[point[0]], y=[point[1]], mode="markers", name=name,
                        marker=dict(size=12, symbol=symbol, color="black"))
    for i, traj in enumerate(trajectories):
        fig.add_scatter(x=traj.x[:, 0], y=traj.x[:, 1], mode="lines+markers", name=traj.label,
                        marker=dict(size=3), line=dict(width=2, color=CLASS_COLORS[i % len(CLASS_COLORS)]),
                        customdata=np.stack([traj.lam, traj.g], axis=-1),
                        hovertemplate="λ=%{customdata[0]:.3f}<br>g(x)=%{customdata[1]:.3f}<extra></extra>")
    fig.update_xaxes(range=[x0, x1], title="x₁", zeroline=False)
    fig.update_yaxes(range=[y0, y1], title="x₂", scaleanchor="x", scaleratio=1, zeroline=False)
    return _layout(fig, "Toy problem: min Σ cᵢ(xᵢ − tᵢ)² s.t. ‖x − x0‖² ≤ ρ‖x0‖²", 520, 820, side_legend=True)


def toy_multipliers(problem: ToyProblem, trajectories: Sequence[Trajectory]) -> go.Figure:
    """λ and the constraint value g(x) over the iterations, with λ* and g = 0 marked."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("multiplier λ", "constraint g(x) (≤ 0 is feasible)"))
    _, lam_star = problem.solution()
    steps = max(len(t.lam) for t in trajectories)
    for i, traj in enumerate(trajectories):
        color = CLASS_COLORS[i % len(CLASS_COLORS)]
        it = np.arange(len(traj.lam))
        fig.add_scatter(x=it, y=traj.lam, name=traj.label, line=dict(color=color), legendgroup=traj.label,
                        row=1, col=1)
        fig.add_scatter(x=it, y=traj.g, name=traj.label, line=dict(color=color), legendgroup=traj.label,
                        showlegend=False, row=1, col=2)
    fig.add_scatter(x=[0, steps - 1], y=[lam_star, lam_star], mode="lines", name=f"λ* = {lam_star:.2f}",
                    line=dict(dash="dash", color="black"), row=1, col=1)
    fig.add_scatter(x=[0, steps - 1], y=[0, 0], mode="lines", name="g = 0", showlegend=False,
                    line=dict(dash="dash", color="black"), row=1, col=2)
    fig.update_xaxes(title="iteration")
    return _layout(fig, "Fixed penalties vs primal–dual: the multiplier finds λ* by itself", 380, side_legend=True)


def cosine_bound(check: CosineBoundCheck) -> go.Figure:
    """Per sample: largest cosine change vs √(relative distance), with the bounds 2√rel and 2√ρ."""
    root = np.sqrt(check.rel_dist)
    ok = check.satisfied
    fig = go.Figure()
    for mask, name, color in ((ok, f"satisfies ρ={check.rho:g}", "#2ca02c"), (~ok, "violates", "#d62728")):
        fig.add_scatter(x=root[mask], y=check.max_change[mask], mode="markers", name=name,
                        marker=dict(size=4, color=color, opacity=0.6))
    top = float(root.max(initial=np.sqrt(check.rho))) * 1.05
    fig.add_scatter(x=[0, top], y=[0, 2 * top], mode="lines", name="per-sample bound 2·√rel",
                    line=dict(color="black", dash="dot"))
    fig.add_scatter(x=[0, np.sqrt(check.rho)], y=[check.bound, check.bound], mode="lines",
                    name=f"2√ρ = {check.bound:.3f}", line=dict(color="#2ca02c", dash="dash"))
    fig.add_vline(x=float(np.sqrt(check.rho)), line=dict(color="#2ca02c", width=1))
    fig.update_xaxes(title="√(‖a − b‖² / ‖b‖²)")
    fig.update_yaxes(title="max over w of |cos(a, w) − cos(b, w)|")
    return _layout(fig, f"Cosine change vs the 2√ρ guarantee (worst satisfying sample: {check.worst:.3f})", 440)


# --------------------------------------------------------------------------- training curves
@dataclass(frozen=True)
class _Curve:
    name: str
    key: str
    kind: str  # 'train' or 'eval' records
    row: int
    col: int
    color: str
    dash: str = "solid"
    fill: bool = False  # fill down to the previous trace (a quantile band)


_CURVES = (
    _Curve("loss", "loss", "train", 1, 1, "#333333"),
    _Curve("robust term", "loss_robust", "train", 1, 1, "#1f77b4"),
    _Curve("penalty term λ·g", "loss_penalty", "train", 1, 1, "#2ca02c"),
    _Curve("clean term", "loss_clean", "train", 1, 1, "#ff7f0e"),
    _Curve("λ q10", "lambda_q10", "train", 1, 2, "rgba(44,160,44,0.4)"),
    _Curve("λ q10–q90", "lambda_q90", "train", 1, 2, "rgba(44,160,44,0.4)", fill=True),
    _Curve("λ median", "lambda_q50", "train", 1, 2, "#2ca02c"),
    _Curve("λ mean", "lambda_mean", "train", 1, 2, "#2ca02c", "dot"),
    _Curve("violating fraction", "violation", "train", 1, 3, "#d62728"),
    _Curve("clean acc", "clean_acc", "eval", 2, 1, "#1f77b4"),
    _Curve("robust acc", "robust_acc", "eval", 2, 1, "#d62728"),
    _Curve("cosine (batch)", "clean_cosine", "train", 2, 2, "#9467bd"),
    _Curve("cosine (held-out)", "cosine", "eval", 2, 2, "#9467bd", "dot"),
    _Curve("rel. distance (batch)", "rel_dist", "train", 2, 3, "#8c564b"),
    _Curve("fidelity (held-out)", "fidelity", "eval", 2, 3, "#8c564b", "dot"),
)
_PANELS = ("loss terms", "multiplier λ(x)", "constraint violation (batch)",
           "held-out accuracy", "cosine to the original", "‖φθ − φθ0‖² / ‖φθ0‖²")


def _series(records: Sequence[Record], kind: str, key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if r.get("kind") == kind and r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def training_curves(records: Sequence[Record], *, rho: float | None = None, title: str = "Training") -> go.Figure:
    """Six panels of a run's metrics: loss terms, λ quantiles, violation, accuracy, cosine, distance.

    The trace list is fixed (empty traces for metrics a method does not log), so
    `update_training_curves` can refill the same figure, e.g. a FigureWidget during training.
    """
    fig = make_subplots(rows=2, cols=3, subplot_titles=_PANELS, horizontal_spacing=0.07, vertical_spacing=0.16)
    for c in _CURVES:
        fig.add_scatter(x=[], y=[], name=c.name, mode="lines+markers" if c.kind == "eval" else "lines",
                        line=dict(color=c.color, dash=c.dash, width=0 if c.key == "lambda_q10" else 2),
                        fill="tonexty" if c.fill else None, fillcolor="rgba(44,160,44,0.15)" if c.fill else None,
                        showlegend=c.key != "lambda_q10", row=c.row, col=c.col)
    fig.add_scatter(x=[], y=[], mode="lines", name="ρ", line=dict(color="black", dash="dash"), row=2, col=3)
    fig.update_xaxes(title="step", row=2)
    update_training_curves(fig, records, rho=rho)
    return _layout(fig, title, 560, side_legend=True)


def update_training_curves(fig: go.Figure, records: Sequence[Record], *, rho: float | None = None) -> None:
    """Refill a figure made by `training_curves` (go.Figure or FigureWidget) with `records`."""
    with fig.batch_update():
        for trace, c in zip(fig.data, _CURVES, strict=False):  # the ρ line follows the curves
            trace.x, trace.y = _series(records, c.kind, c.key)
        steps = [r["step"] for r in records]
        rho_trace = fig.data[len(_CURVES)]
        if rho is not None and steps:
            rho_trace.x, rho_trace.y = [min(steps), max(steps)], [rho, rho]
        else:
            rho_trace.x, rho_trace.y = [], []


# --------------------------------------------------------------------------- sweeps
def _label(row: Mapping[str, Any]) -> str:
    """'ρ=0.05' for a point on a method's front (its knob's symbol and value); a row's own 'label' wins."""
    if row.get("label"):
        return str(row["label"])
    field = knob(row.get("method"))
    return f"{METHODS[row['method']].knob_label}={row[field]:g}" if field else ""


def _errors(pts: Sequence[Mapping[str, Any]], key: str) -> dict[str, Any] | None:
    """Error bars from the rows' '<key>_std' (several seeds), None when no row has one."""
    std = [r.get(f"{key}_std") for r in pts]
    if not any(std):
        return None
    return dict(type="data", array=[s or 0.0 for s in std], visible=True, thickness=1.2, width=3)


def front(rows: Sequence[Mapping[str, Any]], *, eps: float | None = None) -> go.Figure:
    """Clean vs robust accuracy: each method's points (a line along its knob), and the original, on one figure.

    Rows may carry 'clean_acc_std' / 'robust_acc_std' (error bars, e.g. over seeds) and a 'label' (the point's
    text). A method without a knob whose rows differ in 'eps' (FARE at several training ε) is drawn as a line
    along ε."""
    fig = go.Figure()
    for method in dict.fromkeys([ORIGINAL, *METHODS, *(r.get("method") for r in rows)]):
        pts = [r for r in rows if r.get("method") == method]
        if not pts:
            continue
        key = knob(method)
        if key is None and len(pts) > 1 and len({r.get("eps") for r in pts}) == len(pts):
            key = "eps"
        if key:
            pts = sorted(pts, key=lambda r: r[key])
        fig.add_scatter(x=[r["clean_acc"] for r in pts], y=[r["robust_acc"] for r in pts],
                        error_x=_errors(pts, "clean_acc"), error_y=_errors(pts, "robust_acc"),
                        mode="lines+markers+text" if key else "markers+text", name=method_name(method),
                        text=[_label(r) or method_name(method) for r in pts], textposition="top center",
                        marker=dict(size=10, color=method_color(method), symbol="star" if not key else "circle"),
                        line=dict(color=method_color(method)))
    at = f" at ε={eps * 255:g}/255" if eps else ""
    fig.update_xaxes(title="clean accuracy")
    fig.update_yaxes(title=f"robust accuracy{at}")
    return _layout(fig, "Clean vs robust accuracy: each method's front along its knob", 460, 720)


def knob_tradeoff(rows: Sequence[Mapping[str, Any]], method: str,
                  references: Sequence[str] = (ORIGINAL,)) -> go.Figure:
    """Clean acc, robust acc, cosine alignment and fidelity against `method`'s knob (LORE: ρ, the paper's
    "controlling the trade-off"); the `references` (other methods, the original) as horizontal lines."""
    field = knob(method)
    pts = sorted((r for r in rows if r.get("method") == method and field), key=lambda r: r[field])
    if not pts:
        raise ValueError(f"knob_tradeoff needs rows of method {method!r} with its knob ({field})")
    metrics = (("clean_acc", "clean accuracy"), ("robust_acc", "robust accuracy"),
               ("cosine", "cosine alignment ↑"), ("fidelity", "embedding fidelity ‖Δφ‖²/‖φ0‖² ↓"))
    fig = make_subplots(rows=2, cols=2, subplot_titles=[m[1] for m in metrics], horizontal_spacing=0.1,
                        vertical_spacing=0.18)
    values = [r[field] for r in pts]
    span = [min(values), max(values)]
    for i, (key, _) in enumerate(metrics):
        row, col = divmod(i, 2)
        fig.add_scatter(x=values, y=[r[key] for r in pts], error_y=_errors(pts, key), mode="lines+markers",
                        name=method_name(method),
                        line=dict(color=method_color(method)), showlegend=i == 0, row=row + 1, col=col + 1)
        for other in references:
            ref = [r for r in rows if r.get("method") == other and r.get(key) is not None]
            if ref:
                fig.add_scatter(x=span, y=[ref[0][key]] * 2, mode="lines", name=method_name(other),
                                line=dict(color=method_color(other), dash="dash"), showlegend=i == 0,
                                legendgroup=other, row=row + 1, col=col + 1)
    if field == "rho":  # fidelity against the constraint level it bounds
        level = np.geomspace(span[0], span[1], 40) if span[0] > 0 else np.linspace(span[0], span[1], 40)
        fig.add_scatter(x=level, y=level, mode="lines", name="y = ρ (constraint level)",
                        line=dict(color="black", dash="dot"), row=2, col=2)
    symbol = METHODS[method].knob_label or field
    fig.update_xaxes(type="log")
    fig.update_xaxes(title=symbol, row=2)
    return _layout(fig, f"Controlling the trade-off with {symbol}", 620, side_legend=True)


# --------------------------------------------------------------------------- dynamics
def accuracy_over_steps(runs: Mapping[str, Sequence[Record]], *,
                        initial: Mapping[str, float] | None = None) -> go.Figure:
    """Held-out clean and robust accuracy over training steps, one line per run.

    `initial` ({'clean_acc': .., 'robust_acc': ..}) is the original encoder's value, drawn at step 0.
    """
    fig = make_subplots(rows=1, cols=2, subplot_titles=("clean accuracy", "robust accuracy"))
    for name, records in runs.items():
        color = method_color(name)
        for col, key in ((1, "clean_acc"), (2, "robust_acc")):
            steps, vals = _series(records, "eval", key)
            if initial is not None:
                steps, vals = [0, *steps], [initial[key], *vals]
            fig.add_scatter(x=steps, y=vals, mode="lines+markers", name=method_name(name), legendgroup=name,
                            showlegend=col == 1, line=dict(color=color), row=1, col=col)
    fig.update_xaxes(title="step")
    return _layout(fig, "Accuracy during training (step 0 = the original encoder)", 400, side_legend=True)


def lambda_distribution(records: Sequence[Record], snapshots: Mapping[int, np.ndarray] | None = None, *,
                        bins: int = 30) -> go.Figure:
    """λ over training: the batch quantiles from the metrics, and (if given) histograms of λ(x) on a probe set."""
    cols = 2 if snapshots else 1
    titles = ["λ per batch: q10–q90, median, mean"]
    if snapshots:
        titles.append("distribution of λ(x) on a fixed probe set")
    fig = make_subplots(rows=1, cols=cols, subplot_titles=titles)
    for c in _CURVES:
        if c.row == 1 and c.col == 2:
            x, y = _series(records, "train", c.key)
            fig.add_scatter(x=x, y=y, name=c.name, mode="lines", showlegend=c.key != "lambda_q10",
                            line=dict(color=c.color, dash=c.dash, width=0 if c.key == "lambda_q10" else 2),
                            fill="tonexty" if c.fill else None, fillcolor="rgba(44,160,44,0.15)" if c.fill else None,
                            row=1, col=1)
    if snapshots:
        steps = sorted(snapshots)
        top = max(float(np.max(snapshots[s])) for s in steps) or 1.0
        edges = np.linspace(0, top * 1.0001, bins + 1)
        hist = np.stack([np.histogram(snapshots[s], bins=edges)[0] / len(snapshots[s]) for s in steps], axis=1)
        fig.add_heatmap(x=steps, y=(edges[:-1] + edges[1:]) / 2, z=hist.round(4), colorscale="Greens",
                        colorbar=dict(title="fraction", x=1.02), name="λ(x) histogram", row=1, col=2)
        fig.update_yaxes(title="λ(x)", row=1, col=2)
    fig.update_xaxes(title="step")
    fig.update_yaxes(title="λ", row=1, col=1)
    _layout(fig, "The learned multiplier over time", 420, side_legend=True)
    if snapshots:  # the colour bar takes the right side: the legend goes inside the first panel
        fig.update_layout(legend=dict(x=0.01, xanchor="left", y=0.98, yanchor="top", bgcolor="rgba(255,255,255,0.7)"))
    return fig


# --------------------------------------------------------------------------- robustness
def robust_vs_eps(curves: Mapping[str, Mapping[float, float]], *,
                  title: str = "Robust accuracy against ε") -> go.Figure:
    """Accuracy against the attack radius (ε in units of 1/255; ε = 0 is clean accuracy), one line per encoder.

    A label's first word picks the colour ('original', 'FARE', 'LORE', ...); repeated methods
    (e.g. 'FARE ε=2', 'FARE ε=8') get successive dash styles.
    """
    fig = go.Figure()
    seen: dict[str, int] = {}
    for name, acc in curves.items():
        eps = sorted(acc)
        method = name.split()[0].lower()
        dash = ("solid", "dash", "dot", "dashdot")[seen.get(method, 0) % 4]
        seen[method] = seen.get(method, 0) + 1
        fig.add_scatter(x=eps, y=[acc[e] for e in eps], mode="lines+markers", name=name,
                        line=dict(color=method_color(method), dash=dash))
    fig.update_xaxes(title="evaluation ε (×1/255), 0 = clean")
    fig.update_yaxes(title="zero-shot accuracy", range=[0, 1.02])
    return _layout(fig, title, 440, 720)


def eps_grid(grids: Mapping[str, np.ndarray], train_eps: Sequence[float], eval_eps: Sequence[float]) -> go.Figure:
    """Heatmaps of robust accuracy, rows = training ε, columns = evaluation ε, one panel per method."""
    names = list(grids)
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=[method_name(n) for n in names],
                        horizontal_spacing=0.08)
    xs, ys = [f"{e:g}" for e in eval_eps], [f"{e:g}" for e in train_eps]
    for i, name in enumerate(names):
        z = np.asarray(grids[name], dtype=float).round(3)
        fig.add_heatmap(x=xs, y=ys, z=z, zmin=0, zmax=1, colorscale="Viridis", text=z, texttemplate="%{text:.2f}",
                        showscale=i == len(names) - 1, colorbar=dict(title="robust acc"), row=1, col=i + 1,
                        hovertemplate="train ε=%{y}/255<br>eval ε=%{x}/255<br>acc=%{z:.3f}<extra></extra>")
        fig.update_xaxes(title="evaluation ε (×1/255)", type="category", row=1, col=i + 1)
        fig.update_yaxes(title="training ε (×1/255)" if i == 0 else None, type="category", row=1, col=i + 1)
    return _layout(fig, "Training ε × evaluation ε: robust accuracy", 380)


# --------------------------------------------------------------------------- few-shot runs
def _dash(row: Mapping[str, Any]) -> str:
    """LoRA runs solid, full fine-tuning dashed: a method's two ways of training share its colour."""
    return "solid" if row.get("adapter") == "lora" else "dash"


def accuracy_vs_shots(rows: Sequence[Mapping[str, Any]], panels: Mapping[str, str], *,
                      original: Mapping[str, float] | None = None, title: str = "Accuracy against shots") -> go.Figure:
    """One panel per metric (`panels`: result key -> title, e.g. clean, PGD, FGSM accuracy) against the shots per
    class, one line per run label (rows: 'label', 'method', 'adapter', 'shots' and the keys); the original
    encoder's value, when given, as a dotted line."""
    keys = list(panels)
    fig = make_subplots(rows=1, cols=len(keys), subplot_titles=[panels[k] for k in keys], horizontal_spacing=0.06)
    shots = sorted({r["shots"] for r in rows})
    for name in dict.fromkeys(r["label"] for r in rows):
        pts = sorted((r for r in rows if r["label"] == name), key=lambda r: r["shots"])
        for col, key in enumerate(keys, 1):
            fig.add_scatter(x=[r["shots"] for r in pts], y=[r[key] for r in pts], mode="lines+markers", name=name,
                            legendgroup=name, showlegend=col == 1,
                            line=dict(color=method_color(pts[0]["method"]), dash=_dash(pts[0])), row=1, col=col)
    if original is not None:
        for col, key in enumerate(keys, 1):
            fig.add_scatter(x=[shots[0], shots[-1]], y=[original[key]] * 2, mode="lines", name="original",
                            legendgroup=ORIGINAL, showlegend=col == 1,
                            line=dict(color=method_color(ORIGINAL), dash="dot"), row=1, col=col)
    fig.update_xaxes(title="shots per class", type="log", tickvals=shots, ticktext=[str(n) for n in shots])
    fig.update_yaxes(range=[0, 1.02])
    fig.update_yaxes(title="zero-shot accuracy", col=1)
    return _layout(fig, title, 420, side_legend=True)


def cost_per_run(rows: Sequence[Mapping[str, Any]]) -> go.Figure:
    """Trainable parameters (log scale) and peak memory of each run label; memory as one bar per number of
    shots (rows: 'label', 'method', 'adapter', 'shots', 'trainable', 'peak_memory_mib')."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("trainable parameters", "peak memory during the run (MiB)"),
                        horizontal_spacing=0.12)
    labels = list(dict.fromkeys(r["label"] for r in rows))
    first = {name: next(r for r in rows if r["label"] == name) for name in labels}
    fig.add_bar(x=labels, y=[first[n]["trainable"] for n in labels], showlegend=False, row=1, col=1,
                marker=dict(color=[method_color(first[n]["method"]) for n in labels],
                            pattern=dict(shape=["" if first[n].get("adapter") == "lora" else "/" for n in labels])),
                text=[f"{first[n]['trainable']:,}" for n in labels], textposition="outside")
    for i, shots in enumerate(sorted({r["shots"] for r in rows})):
        pts = {r["label"]: r for r in rows if r["shots"] == shots}
        fig.add_bar(x=[n for n in labels if n in pts], y=[pts[n]["peak_memory_mib"] for n in labels if n in pts],
                    name=f"{shots} shot{'s' if shots > 1 else ''}", row=1, col=2,
                    marker=dict(color=CLASS_COLORS[i % len(CLASS_COLORS)]))
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_layout(barmode="group")
    return _layout(fig, "What each run trains and holds (LoRA solid, full fine-tuning hatched)", 440, side_legend=True)


# --------------------------------------------------------------------------- typographic attacks
def _png_uri(image: Any) -> str:
    """[3, H, W] in [0,1] (tensor or array) as a colour PNG data URI: a few hundred bytes for a 32-px digit, where
    go.Image's `z` would store every pixel as JSON numbers in the notebook."""
    import base64
    import io

    from PIL import Image

    arr = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image, dtype=np.float32)
    buf = io.BytesIO()
    Image.fromarray((np.clip(arr.transpose(1, 2, 0), 0, 1) * 255).round().astype(np.uint8)).save(buf, "PNG",
                                                                                                   optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def typographic_examples(clean: Any, attacked: Any, labels: Sequence[int], written: Sequence[int],
                         predictions: Mapping[str, Sequence[int]], classnames: Sequence[str], *,
                         title: str = "Typographic attacks") -> go.Figure:
    """Clean images (top row) over their attacked versions (bottom row); each column titled with the true and
    the written class, the bottom one with each encoder's prediction on the attacked image (`predictions`:
    encoder name -> predicted class per image)."""
    n = len(labels)
    guesses = ["<br>".join(f"{name}: {classnames[int(p[i])]}" for name, p in predictions.items()) for i in range(n)]
    titles = [f"{classnames[int(labels[i])]}" for i in range(n)] + [
        f"writes '{classnames[int(written[i])]}'<br>{guesses[i]}" for i in range(n)]
    fig = make_subplots(rows=2, cols=n, subplot_titles=titles, vertical_spacing=0.2, horizontal_spacing=0.01)
    for i in range(n):
        fig.add_trace(go.Image(source=_png_uri(clean[i]), hoverinfo="skip"), row=1, col=i + 1)
        fig.add_trace(go.Image(source=_png_uri(attacked[i]), hoverinfo="skip"), row=2, col=i + 1)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_annotations(font_size=10)
    fig = _layout(fig, title, 300 + 15 * len(predictions), max(500, 110 * n))
    fig.update_layout(margin=dict(l=10, r=10, t=80, b=10 + 15 * len(predictions)))
    return fig


def typographic_bars(rows: Sequence[Mapping[str, Any]], *, title: str = "Clean and typographic accuracy") -> go.Figure:
    """clean_acc, typo_acc and typo_written of each encoder (rows: 'label', 'method' and those keys), grouped."""
    metrics = {"clean_acc": "clean accuracy", "typo_acc": "typographic accuracy",
               "typo_written": "classified as the written class"}
    fig = go.Figure()
    for i, (key, name) in enumerate(metrics.items()):
        fig.add_bar(x=[r["label"] for r in rows], y=[r[key] for r in rows], name=name,
                    marker=dict(color=CLASS_COLORS[i]), text=[f"{r[key]:.2f}" for r in rows], textposition="outside")
    fig.update_layout(barmode="group")
    fig.update_yaxes(range=[0, 1.1], title="fraction of held-out images")
    return _layout(fig, title, 420)


def preference_curves(runs: Mapping[str, Sequence[Record]], *, title: str = "Preference optimisation") -> go.Figure:
    """Per run (name -> metrics records of a typo-po run): the preference term (DPO or IPO, log scale), the KL
    term on clean images, the mean margin h_raw, and the held-out typographic accuracy at each evaluation."""
    panels = (("train", "loss_pref", "preference term (DPO / IPO)"), ("train", "loss_kl", "KL(π_ref ‖ π), clean"),
              ("train", "margin_mean", "margin h_raw (batch mean)"), ("eval", "typo_acc", "held-out typographic acc"))
    fig = make_subplots(rows=2, cols=2, subplot_titles=[p[2] for p in panels], vertical_spacing=0.14)
    for i, (name, records) in enumerate(runs.items()):
        for j, (kind, key, _) in enumerate(panels):
            xs, ys = _series(records, kind, key)
            fig.add_scatter(x=xs, y=ys, mode="lines+markers" if kind == "eval" else "lines", name=name,
                            legendgroup=name, showlegend=j == 0, line=dict(color=CLASS_COLORS[i % len(CLASS_COLORS)]),
                            row=j // 2 + 1, col=j % 2 + 1)
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_xaxes(title="step", row=2)
    return _layout(fig, title, 620)


# --------------------------------------------------------------------------- embeddings
def umap_grid(coords: Mapping[str, Mapping[str, np.ndarray]], labels: Sequence[int], classnames: Sequence[str], *,
              image_uris: Sequence[str] | None = None,
              predictions: Mapping[str, Mapping[str, Sequence[int]]] | None = None) -> go.Figure:
    """UMAP scatter: columns = encoders, rows = views ('clean', 'adversarial'), coloured by true class.

    `coords[encoder][view]` is [N, 2]. Each point's customdata is [image index, predicted class
    name]; the images (data URIs) are stored once, in layout.meta['images'], where
    `HOVER_IMAGE_JS` (HTML exports) and `widgets.hover_explorer` (JupyterLab) find them.
    """
    encoders = list(coords)
    views = list(next(iter(coords.values())))
    fig = make_subplots(rows=len(views), cols=len(encoders), horizontal_spacing=0.04, vertical_spacing=0.08,
                        subplot_titles=[f"{method_name(e)}: {v}" for v in views for e in encoders])
    labels = np.asarray(labels)
    for ci, enc in enumerate(encoders):
        for ri, view in enumerate(views):
            xy = np.asarray(coords[enc][view]).round(3)
            pred = np.asarray(predictions[enc][view]) if predictions else labels
            for k, cname in enumerate(classnames):
                idx = np.flatnonzero(labels == k)
                if not len(idx):
                    continue
                fig.add_scatter(x=xy[idx, 0], y=xy[idx, 1], mode="markers", name=cname, legendgroup=cname,
                                showlegend=ci == 0 and ri == 0,
                                customdata=[[int(i), classnames[int(pred[i])]] for i in idx],
                                marker=dict(size=5, color=CLASS_COLORS[k % len(CLASS_COLORS)], opacity=0.8),
                                hovertemplate=(f"class {cname}<br>predicted %{{customdata[1]}}"
                                               "<br>image #%{customdata[0]}<extra></extra>"),
                                row=ri + 1, col=ci + 1)
            # one UMAP per encoder: the rows of a column share its axes (subplot axes are numbered row-major)
            shared = {} if ri == 0 else {"matches": f"x{ci + 1 if ci else ''}"}
            bare = dict(showticklabels=False, showgrid=False, zeroline=False, row=ri + 1, col=ci + 1)
            fig.update_xaxes(**bare, **shared)
            shared = {} if ri == 0 else {"matches": f"y{ci + 1 if ci else ''}"}
            fig.update_yaxes(**bare, **shared)
    if image_uris is not None:
        fig.update_layout(meta={"images": list(image_uris)})
    return _layout(fig, "UMAP of image embeddings (one UMAP per encoder, fitted on clean + adversarial)",
                   300 * len(views) + 80, side_legend=True)


def show(fig: go.Figure, *, hover_images: bool = False) -> None:
    """Display with the notebook renderer; `hover_images` adds HOVER_IMAGE_JS to the HTML part."""
    fig.show(post_script=HOVER_IMAGE_JS if hover_images else None)


FIGURE_FORMATS = ("html", "png", "svg", "pdf")


def check_formats(formats: Sequence[str]) -> None:
    """Raise ValueError naming the first format `save` cannot write (call it before long work)."""
    for fmt in formats:
        if fmt not in FIGURE_FORMATS:
            raise ValueError(f"cannot save a figure as {fmt!r}: valid formats are {', '.join(FIGURE_FORMATS)}")


def save(fig: go.Figure, path: str | Path) -> Path:
    """Write `fig` to `path`, the format taken from its suffix.

    ``.html`` inlines plotly.js, so the file opens offline; ``.png``/``.svg``/``.pdf`` go through
    kaleido, which drives a Chromium installed on the machine (Debian: ``apt install chromium``).
    The file is written whole or not at all.
    """
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in FIGURE_FORMATS:
        raise ValueError(f"cannot save a figure as {path.name!r}: the suffix must be one of "
                         + ", ".join(f".{f}" for f in FIGURE_FORMATS))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if fmt == "html":
            fig.write_html(tmp, include_plotlyjs=True, full_html=True)
        else:
            fig.write_image(tmp, format=fmt, scale=2)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
