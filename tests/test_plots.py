"""The notebooks' support modules: lorekit.plots (figures), lorekit.interpret, lorekit.widgets."""

import base64
import io
import json
import re
import shutil
import struct
from types import SimpleNamespace

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import pytest
import torch
from PIL import Image

from lorekit import interpret, plots, widgets
from lorekit.dual import DualNet
from lorekit.toy import ToyProblem, cosine_bound_check, solve_penalty, solve_primal_dual


def _records(method="lore", steps=4, eval_every=2):
    out = []
    for s in range(1, steps + 1):
        r = {"kind": "train", "step": s, "loss": 10.0 - s, "loss_robust": 9.0 - s, "violation": 0.5 / s,
             "clean_cosine": 1 - 0.01 * s, "rel_dist": 0.01 * s}
        if method == "lore":
            r.update(loss_penalty=0.1 * s, lambda_mean=1.0 + s, lambda_q10=0.5 * s, lambda_q50=s, lambda_q90=2.0 * s)
        out.append(r)
        if s % eval_every == 0:
            out.append({"kind": "eval", "step": s, "clean_acc": 0.9, "robust_acc": 0.1 * s, "cosine": 0.99,
                        "fidelity": 0.02})
    return out


def _trace(fig, name):
    return next(t for t in fig.data if t.name == name)


# --------------------------------------------------------------------------- plots
def test_training_curves_fixed_traces_and_refill():
    empty = plots.training_curves([], rho=0.05)
    full = plots.training_curves(_records(), rho=0.05)
    assert [t.name for t in empty.data] == [t.name for t in full.data]  # same trace list, filled or not
    assert list(_trace(full, "loss").y) == [9.0, 8.0, 7.0, 6.0]
    assert list(_trace(full, "robust acc").x) == [2, 4] and list(_trace(full, "robust acc").y) == [0.2, 0.4]
    assert list(_trace(full, "λ median").y) == [1, 2, 3, 4]
    assert list(_trace(full, "ρ").y) == [0.05, 0.05] and list(_trace(full, "ρ").x) == [1, 4]
    # FARE logs no λ: those traces stay empty, no ρ line without a ρ
    fare = plots.training_curves(_records("fare"))
    assert len(_trace(fare, "λ median").x) == 0 and len(_trace(fare, "ρ").x) == 0
    # refilling a FigureWidget in place (what the panel does during training)
    widget = go.FigureWidget(plots.training_curves([], rho=0.05))
    plots.update_training_curves(widget, _records()[:3], rho=0.05)
    assert list(_trace(widget, "loss").y) == [9.0, 8.0]


def test_mime_bundle_has_both_renderers_and_no_init_script():
    old = pio.renderers.default, pio.templates.default
    try:
        plots.use_notebook_renderer()
        bundle = plots.mime_bundle(go.Figure(go.Scatter(x=[1], y=[2])))
        assert set(bundle) == {"application/vnd.plotly.v1+json", "text/html"}
        assert bundle["application/vnd.plotly.v1+json"]["data"][0]["y"] == [2]
        assert "cdn.plot.ly" in bundle["text/html"] and "window.PlotlyConfig" in bundle["text/html"]
        assert len(bundle["text/html"]) < 20_000  # plotly.js is loaded from the CDN, never inlined
    finally:
        pio.renderers.default, pio.templates.default = old


def _sweep_rows():
    rows = [{"method": "lore", "rho": r, "lam": 1.0, "clean_acc": 0.95 - r, "robust_acc": 0.4 + r, "cosine": 1 - r,
             "fidelity": r / 2} for r in (0.1, 0.01, 0.3)]
    rows += [{"method": "fare-reg", "lam": lam, "rho": 0.02, "clean_acc": 0.9, "robust_acc": 0.3 / lam, "cosine": 0.95,
              "fidelity": 0.1} for lam in (10.0, 1.0)]
    rows += [{"method": "fare", "clean_acc": 0.85, "robust_acc": 0.6, "cosine": 0.9, "fidelity": 0.2},
             {"method": "original", "clean_acc": 0.98, "robust_acc": 0.2, "cosine": 1.0, "fidelity": 0.0}]
    return rows


def test_front_orders_each_method_by_its_knob():
    fig = plots.front(_sweep_rows(), eps=4 / 255)
    assert [t.name for t in fig.data] == ["original", "FARE", "FARE-reg", "LORE"]
    lore = _trace(fig, "LORE")
    assert list(lore.text) == ["ρ=0.01", "ρ=0.1", "ρ=0.3"]
    assert list(lore.x) == pytest.approx([0.94, 0.85, 0.65])
    assert list(_trace(fig, "FARE-reg").text) == ["λ=1", "λ=10"]
    assert "4/255" in fig.layout.yaxis.title.text


def test_save_html_opens_offline_and_bad_suffix_writes_nothing(tmp_path):
    fig = plots.front(_sweep_rows(), eps=4 / 255)
    html = plots.save(fig, tmp_path / "figs" / "front.html").read_text()
    assert not re.search(r"<script[^>]*\bsrc=", html) and len(html) > 1_000_000  # plotly.js inlined, no CDN
    assert json.dumps("ρ=0.3") in html  # the LORE labels (plotly escapes non-ASCII)
    with pytest.raises(ValueError, match=r"front\.jpeg.*\.html"):
        plots.save(fig, tmp_path / "front.jpeg")
    with pytest.raises(ValueError, match="'jpeg'.*html, png"):
        plots.check_formats(["html", "jpeg"])
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["figs", "front.html"]


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="kaleido's static export needs a Chromium (Debian: chromium)")
def test_save_png_through_kaleido(tmp_path):
    png = plots.save(plots.front(_sweep_rows()), tmp_path / "front.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (2 * 720, 2 * 460)  # the layout's size at scale 2


def test_knob_tradeoff_panels_and_reference_lines():
    fig = plots.knob_tradeoff(_sweep_rows(), "lore", references=("fare", "original"))
    lore = [t for t in fig.data if t.name == "LORE"]
    assert len(lore) == 4 and list(lore[0].x) == [0.01, 0.1, 0.3]
    np.testing.assert_allclose([list(t.y) for t in lore], [[0.94, 0.85, 0.65], [0.41, 0.5, 0.7], [0.99, 0.9, 0.7],
                                                           [0.005, 0.05, 0.15]])
    fare = [t for t in fig.data if t.name == "FARE"]
    assert len(fare) == 4 and list(fare[0].y) == [0.85, 0.85] and list(fare[0].x) == [0.01, 0.3]
    assert fig.layout.xaxis.type == "log"
    with pytest.raises(ValueError, match="'lore' with its knob \\(rho\\)"):
        plots.knob_tradeoff([r for r in _sweep_rows() if r["method"] != "lore"], "lore")


def test_accuracy_over_steps_starts_at_the_original():
    fig = plots.accuracy_over_steps({"fare": _records("fare"), "lore": _records()},
                                    initial={"clean_acc": 0.98, "robust_acc": 0.05})
    assert len(fig.data) == 4
    clean = fig.data[0]
    assert list(clean.x) == [0, 2, 4] and list(clean.y) == [0.98, 0.9, 0.9]
    assert clean.line.color == plots.METHOD_COLORS["fare"]


def test_lambda_distribution_histograms_are_fractions():
    snaps = {0: np.ones(50), 2: np.linspace(0, 4, 50), 4: np.linspace(1, 8, 50)}
    fig = plots.lambda_distribution(_records(), snaps, bins=10)
    heat = next(t for t in fig.data if t.type == "heatmap")
    z = np.array(heat.z)
    assert z.shape == (10, 3) and list(heat.x) == [0, 2, 4]
    np.testing.assert_allclose(z.sum(axis=0), 1.0, atol=1e-3)
    assert max(heat.y) < 8.0 < max(heat.y) + 8 / 10  # bins span the largest λ seen
    assert len(plots.lambda_distribution(_records()).data) == 4  # without snapshots: the quantile band only


def test_robust_vs_eps_and_eps_grid():
    curves = {"original": {0: 0.98, 2: 0.3}, "FARE ε=2": {2: 0.5, 0: 0.9}, "FARE ε=8": {0: 0.85, 2: 0.6}}
    fig = plots.robust_vs_eps(curves)
    assert list(fig.data[1].x) == [0, 2] and list(fig.data[1].y) == [0.9, 0.5]
    assert fig.data[1].line.color == fig.data[2].line.color == plots.METHOD_COLORS["fare"]
    assert fig.data[1].line.dash != fig.data[2].line.dash
    grids = {"fare": np.array([[0.5, 0.2], [0.6, 0.4]]), "lore": np.array([[0.7, 0.3], [0.8, 0.5]])}
    heat = plots.eps_grid(grids, [2, 8], [1, 4])
    assert [t.type for t in heat.data] == ["heatmap", "heatmap"]
    np.testing.assert_allclose(np.array(heat.data[1].z), grids["lore"])
    assert list(heat.data[0].x) == ["1", "4"] and list(heat.data[0].y) == ["2", "8"]


def test_accuracy_vs_shots_and_cost_per_run():
    rows = [{"label": f"{m} {a}", "method": m, "adapter": a, "shots": n, "clean_acc": 0.9 - 0.01 * n,
             "fgsm_acc@4": 0.1 * n, "trainable": 100 if a == "lora" else 10_000, "peak_memory_mib": 500.0 + n}
            for n in (16, 1) for m, a in (("advclip-lora", "lora"), ("lore", "none"))]
    panels = {"clean_acc": "clean", "fgsm_acc@4": "FGSM"}
    fig = plots.accuracy_vs_shots(rows, panels, original={"clean_acc": 0.99, "fgsm_acc@4": 0.05})
    assert len(fig.data) == 2 * 2 + 2  # a line per label and panel, the original per panel
    advclip = [t for t in fig.data if t.name == "advclip-lora lora"]
    assert list(advclip[0].x) == [1, 16] and list(advclip[1].y) == [0.1, 1.6]  # sorted by shots, per panel
    assert advclip[0].line.color == plots.METHOD_COLORS["advclip-lora"] and advclip[0].line.dash == "solid"
    assert _trace(fig, "lore none").line.dash == "dash"  # full fine-tuning dashed
    assert list(_trace(fig, "original").y) == [0.99, 0.99]
    cost = plots.cost_per_run(rows)
    assert list(cost.data[0].y) == [100, 10_000]  # trainable parameters per label
    assert [t.name for t in cost.data[1:]] == ["1 shot", "16 shots"] and list(cost.data[2].y) == [516.0, 516.0]


def test_umap_grid_customdata_points_at_stored_images():
    labels = [0, 1, 0, 1]
    coords = {enc: {"clean": np.arange(8.0).reshape(4, 2), "adversarial": -np.arange(8.0).reshape(4, 2)}
              for enc in ("original", "lore")}
    preds = {enc: {"clean": labels, "adversarial": [1, 1, 1, 1]} for enc in coords}
    uris = [f"data:image/png;base64,{i}" for i in range(4)]
    fig = plots.umap_grid(coords, labels, ["zero", "one"], image_uris=uris, predictions=preds)
    assert len(fig.data) == 2 * 2 * 2  # encoders × views × classes
    assert fig.layout.meta["images"] == uris
    adv_zero = fig.data[2]  # (original, adversarial, class zero)
    assert [list(c) for c in adv_zero.customdata] == [[0, "one"], [2, "one"]]
    assert list(adv_zero.x) == [-0.0, -4.0]
    assert sum(t.showlegend is not False for t in fig.data) == 2  # one legend entry per class
    assert "{plot_id}" in plots.HOVER_IMAGE_JS and "meta" in plots.HOVER_IMAGE_JS


def test_toy_and_bound_figures_draw_their_inputs():
    problem = ToyProblem()
    runs = [solve_penalty(problem, 1.0, steps=20), solve_primal_dual(problem, steps=20)]
    fig = plots.toy_trajectories(problem, runs)
    assert [t.name for t in fig.data][-2:] == ["penalty λ=1", "primal–dual"]
    np.testing.assert_allclose(fig.data[-1].x, runs[1].x[:, 0])
    mult = plots.toy_multipliers(problem, runs)
    _, lam_star = problem.solution()
    assert any(t.name == f"λ* = {lam_star:.2f}" for t in mult.data)
    check = cosine_bound_check(np.eye(3) + 0.1, np.eye(3), np.ones((1, 3)), 0.1)
    bound = plots.cosine_bound(check)
    assert sum(len(t.x) for t in bound.data[:2]) == 3


# --------------------------------------------------------------------------- interpret
def test_image_data_uri_is_a_small_grey_png():
    image = torch.zeros(3, 32, 32)
    image[:, :16] = 1.0
    uri = interpret.image_data_uri(image, size=8)
    assert uri.startswith("data:image/png;base64,") and len(uri) < 300
    png = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert png.size == (8, 8) and png.mode == "L"
    pixels = np.array(png)
    assert pixels[:4].min() == 255 and pixels[4:].max() == 0
    assert len(interpret.image_data_uris(torch.rand(3, 1, 8, 8))) == 3
    with pytest.raises(ValueError, match="expected"):
        interpret.image_data_uri(torch.zeros(2, 2, 2, 2))


def test_text_alignment_own_other_and_per_template():
    text = torch.stack([torch.eye(3), -torch.eye(3)])  # 2 templates × 3 classes × D=3
    images = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    out = interpret.text_alignment(images, torch.tensor([0, 1]), text, ["t1", "t2"])
    c = 1 / np.sqrt(2)
    # template 1: own cosines 1 and c; template 2: -1 and -c
    assert out["per_template"] == pytest.approx({"t1": (1 + c) / 2, "t2": -(1 + c) / 2})
    assert out["own"] == pytest.approx(0.0, abs=1e-6)
    assert out["other"] == pytest.approx(0.0, abs=1e-6)  # image 0 vs classes 1,2: 0; image 1 vs 0: 0, vs 2: ±c cancel
    assert out["gap"] == pytest.approx(out["own"] - out["other"])


def test_lambda_probe_records_step_zero_and_every_step():
    dual = DualNet("mlp", 4, hidden=8, lambda_init=2.0)
    trainer = SimpleNamespace(method=SimpleNamespace(multipliers=dual), reference=torch.nn.Identity(),
                              device=torch.device("cpu"), step=0)
    probe = interpret.LambdaProbe(torch.randn(5, 4), every=2)
    probe.attach(trainer)
    np.testing.assert_allclose(probe.snapshots[0], 2.0, rtol=1e-5)  # λ_init everywhere
    with torch.no_grad():
        dual.net[-1].bias.fill_(0.0)
    for step in (1, 2, 3, 4):
        probe({"kind": "train", "step": step})
    probe({"kind": "eval", "step": 4})
    assert sorted(probe.snapshots) == [0, 2, 4]
    np.testing.assert_allclose(probe.snapshots[4], np.log(2.0), rtol=1e-5)  # softplus(0)
    fare = interpret.LambdaProbe(torch.randn(5, 4))
    fare.attach(SimpleNamespace(method=SimpleNamespace()))  # a method without a learned multiplier
    fare({"kind": "train", "step": 1})
    assert fare.snapshots == {}
    with pytest.raises(ValueError):
        interpret.LambdaProbe(torch.randn(2, 4), every=0)


def test_encoder_views_and_umap_layout_are_reproducible(tiny_clip, digits_bundle, one_thread):
    from lorekit.evaluate import pgd_accuracy
    from lorekit.models import ZeroShotClassifier

    images, labels = (t[:40] for t in digits_bundle.test.tensors)
    weights = tiny_clip.class_embeddings(digits_bundle.classnames, digits_bundle.templates)
    views = interpret.encoder_views(tiny_clip.encoder, weights, images, labels, 4 / 255, steps=3, seed=0)
    assert views.clean.shape == views.adversarial.shape == (40, 64)
    head = ZeroShotClassifier(tiny_clip.encoder, weights)
    assert views.pred_clean.tolist() == head(images).argmax(-1).tolist()
    # the same seeded attack as lorekit.evaluate's robust accuracy
    robust = (views.pred_adversarial == labels).float().mean().item()
    assert robust == pytest.approx(pgd_accuracy(head, images, labels, 4 / 255, steps=3, seed=0))
    a = interpret.umap_layout(views, random_state=0, n_neighbors=5)
    b = interpret.umap_layout(views, random_state=0, n_neighbors=5)
    assert a["clean"].shape == a["adversarial"].shape == (40, 2)
    np.testing.assert_array_equal(a["clean"], b["clean"])


# --------------------------------------------------------------------------- widgets
def test_live_curves_draw_live_then_leave_a_static_figure(monkeypatch):
    shown = []

    class Handle:
        def update(self, obj, raw=False):
            shown.append((obj, raw))

    def fake_display(obj, display_id=False):
        shown.append(obj)
        return Handle()

    monkeypatch.setattr(widgets, "display", fake_display)
    monkeypatch.setattr(pio.renderers, "default", plots.RENDERER)
    live = widgets.LiveCurves(rho=0.1, interval_s=3600).show()
    widget = shown[0]
    assert isinstance(widget, go.FigureWidget)
    for r in _records()[:2]:  # train records only: throttled, nothing drawn yet
        live(r)
    assert len(_trace(widget, "loss").y) == 0
    live(_records()[2])  # an eval record is always drawn
    assert list(_trace(widget, "loss").y) == [9.0, 8.0]
    for r in _records()[3:]:
        live(r)
    fig = live.finish()
    assert list(_trace(fig, "loss").y) == [9.0, 8.0, 7.0, 6.0] and len(live.records) == 6
    bundle, raw = shown[-1]  # the widget's output replaced by the static figure's mime bundle
    assert raw and bundle["application/vnd.plotly.v1+json"]["data"][0]["y"] == [9.0, 8.0, 7.0, 6.0]
    assert isinstance(widgets.LiveCurves().finish(), go.Figure)  # never shown: just the figure


def test_training_panel_maps_controls_to_a_config_and_runs(tmp_path, one_thread):
    small = dict(steps=2, eval_every=1, batch_size=16, attack_steps=2, eval_samples=32, lr=1e-4)
    panel = widgets.TrainingPanel("tiny", tmp_path, overrides=small)
    assert panel.method.value == "lore" and panel.primal_steps.value == 2  # the recipe's K for LORE
    panel.method.value = "fare-reg"
    assert panel.primal_steps.value == 1  # the recipe leaves FARE-reg at its default K
    panel.eps.value, panel.primal_steps.value, panel.lam.value = 2.0, 3, 10.0
    cfg = panel.config()
    assert (cfg.method, cfg.eps, cfg.lam, cfg.primal_steps, cfg.steps) == ("fare-reg", 2 / 255, 10.0, 3, 2)
    assert cfg.run_dir.startswith(str(tmp_path))
    assert panel.rho.layout.display == "none" and panel.lam.layout.display is None
    summary = panel.run()
    assert summary["method"] == "fare-reg" and "done" in panel.status.value and not panel.run_button.disabled
    assert summary["ledger"]["updates"] == 2 * 3
    assert len(_trace(panel.figure, "clean acc").x) == 2 and len(_trace(panel.figure, "clean term").x) == 2
    panel.overrides["batch_size"] = 10_000  # larger than the training set: a ConfigError, shown
    assert panel.run() is None and "batch_size" in panel.status.value and not panel.run_button.disabled


def test_hover_explorer_shows_the_hovered_image():
    from plotly.callbacks import InputDeviceState, Points

    coords = {"lore": {"clean": np.zeros((2, 2)), "adversarial": np.ones((2, 2))}}
    uris = ["data:image/png;base64,AAAA", "data:image/png;base64,BBBB"]
    box = widgets.hover_explorer(plots.umap_grid(coords, [0, 1], ["zero", "one"], image_uris=uris))
    widget, pane = box.children
    trace = widget.data[1]  # class 'one', clean view: the image with index 1
    state = InputDeviceState(ctrl=False, alt=False, shift=False, meta=False, button=0, buttons=0)
    trace._dispatch_on_hover(Points(point_inds=[0], xs=[0.0], ys=[0.0], trace_name="one", trace_index=1), state)
    assert uris[1] in pane.value and "image #1" in pane.value and "one" in pane.value
    json.dumps(widget.to_dict())  # the widget's figure stays serialisable


def test_front_draws_seed_error_bars_and_fare_along_its_training_eps():
    rows = [{"method": "lore", "rho": r, "clean_acc": 0.9 - r, "robust_acc": 0.4 + r, "clean_acc_std": 0.01,
             "robust_acc_std": 0.02} for r in (0.1, 0.01)]
    rows += [{"method": "fare", "eps": e / 255, "label": f"ε={e}", "clean_acc": 0.9 - e / 100, "robust_acc": 0.3 + e / 100}
             for e in (8, 4)]
    fig = plots.front(rows, eps=4 / 255)
    lore, fare = _trace(fig, "LORE"), _trace(fig, "FARE")
    assert list(lore.error_x.array) == [0.01, 0.01] and list(lore.error_y.array) == [0.02, 0.02]
    assert list(fare.text) == ["ε=4", "ε=8"] and fare.mode == "lines+markers+text"  # a line along ε
    assert fare.error_x.array is None  # no std given: no error bars
