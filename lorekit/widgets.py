"""Running training from notebooks, live curves, and the ipywidgets controls of the training notebook.

- `with_run_dir` / `train_or_reuse`: every notebook run lives in `<out_dir>/<tag>-<hash of the
  config>`, so different settings never collide; a finished run with the same config is reused
  only when asked (`reuse=True`), otherwise it is trained again from scratch (so a notebook's
  numbers always come from the current code).
- `LiveCurves`: a trainer callback that draws the training curves live in a FigureWidget and,
  when training ends, replaces it with the final static figure. In JupyterLab the curves move
  while training runs; executed headlessly (papermill, nbval, nbconvert) the stored output is
  simply the final static figure.
- `TrainingPanel`: controls for the main knobs (method, ρ, λ, ε, K, steps) and a Run button that
  trains and updates a plotly FigureWidget live from the trainer callback. Nothing trains until
  the button is clicked, so executing the notebook headlessly only displays the controls.
- `hover_explorer`: a FigureWidget next to an image pane that shows the hovered point's image
  (the data URIs `plots.umap_grid` stores in layout.meta['images']).
"""

from __future__ import annotations

import hashlib
import html
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import ipywidgets as W
import plotly.graph_objects as go
from IPython.display import display

from .config import NON_SEMANTIC_FIELDS, ConfigError, TrainConfig
from .plots import method_name, mime_bundle, training_curves, update_training_curves
from .trainer import Trainer, build, finished_and_current, read_metrics

Record = dict[str, Any]


# --------------------------------------------------------------------------- runs
def config_hash(cfg: TrainConfig) -> str:
    """Short hash of the fields that make a run different (not run_dir, device, workers, ...)."""
    semantic = {k: v for k, v in cfg.to_dict().items() if k not in NON_SEMANTIC_FIELDS}
    return hashlib.sha1(json.dumps(semantic, sort_keys=True).encode()).hexdigest()[:8]


def with_run_dir(cfg: TrainConfig, out_dir: str | Path) -> TrainConfig:
    """`cfg` with run_dir = <out_dir>/<method-eps-seed[-rho|-lam]>-<config hash>, validated."""
    cfg = replace(cfg, run_dir="").validate()
    return replace(cfg, run_dir=str(Path(out_dir) / f"{cfg.run_path.name}-{config_hash(cfg)}"))


def train_or_reuse(cfg: TrainConfig, callback: Callable[[Record], None] | None = None, *, reuse: bool = False,
                   progress: bool = False, on_build: Callable[[Trainer], None] | None = None) -> Record:
    """Train `cfg` (its run_dir set, e.g. by `with_run_dir`) and return the run's summary.

    reuse=True: a finished run with the same config, fine-tuned from the same base weights, is read
    back (its records are replayed to `callback`), an unfinished one is resumed. reuse=False: an existing run in run_dir is
    deleted and trained again. `on_build(trainer)` runs before training (e.g. `LambdaProbe.attach`).
    """
    if not cfg.run_dir:
        raise ConfigError("run_dir='': set it first (lorekit.widgets.with_run_dir)")
    run, resume = cfg.run_path, False
    if run.exists():
        if any(run.iterdir()) and not (run / "config.json").is_file():
            raise ConfigError(f"run_dir={str(run)!r} exists and is not a lorekit run; refusing to delete it")
        if reuse and (run / "summary.json").is_file():
            saved = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
            if config_hash(saved) != config_hash(cfg):
                raise ConfigError(f"run_dir={str(run)!r} holds a run with a different config; choose another run_dir")
        if reuse and finished_and_current(cfg):
            if callback is not None:
                for record in read_metrics(run):
                    callback(record)
            return json.loads((run / "summary.json").read_text())
        # A finished run that is not current (other base weights) is trained again, not resumed.
        resume = reuse and (run / "checkpoint.pt").is_file() and not (run / "summary.json").is_file()
        if not resume:
            shutil.rmtree(run)
    trainer, _ = build(replace(cfg, resume=resume))
    if on_build is not None:
        on_build(trainer)
    return trainer.fit(callback, progress=progress)


# --------------------------------------------------------------------------- live curves
class LiveCurves:
    """Trainer callback that draws `plots.training_curves` while training runs.

    `show()` displays a FigureWidget that is redrawn at most every `interval_s` (and at every
    evaluation); `finish()` replaces that output, through its display id, with the final static
    figure. In JupyterLab the curves move while training runs; a notebook executed headlessly
    stores only the static figure (the widget's state is never stored). JupyterLab's plotly
    renderer ignores updates of an already drawn figure, hence the widget for the live part.
    """

    def __init__(self, *, rho: float | None = None, title: str = "Training", interval_s: float = 1.0) -> None:
        self.records: list[Record] = []
        self.rho, self.interval_s = rho, interval_s
        self.figure = training_curves([], rho=rho, title=title)
        self._widget: go.FigureWidget | None = None
        self._handle: Any = None
        self._last = time.monotonic()

    def show(self) -> "LiveCurves":
        """Display the live FigureWidget (empty until the first records arrive)."""
        self._widget = go.FigureWidget(self.figure)
        self._handle = display(self._widget, display_id=True)
        return self

    def __call__(self, record: Record) -> None:
        self.records.append(record)
        due = record.get("kind") == "eval" or time.monotonic() - self._last >= self.interval_s
        if self._widget is not None and due:
            update_training_curves(self._widget, self.records, rho=self.rho)
            self._last = time.monotonic()

    def finish(self) -> go.Figure:
        """Draw every record into the static figure, show it in place of the widget, and return it."""
        update_training_curves(self.figure, self.records, rho=self.rho)
        if self._handle is not None:
            # The mime bundle, not the figure: a figure displays itself through _ipython_display_,
            # which ignores display ids, so the widget would stay and a second output would appear.
            self._handle.update(mime_bundle(self.figure), raw=True)
            self._widget.close()
            self._widget = self._handle = None
        return self.figure


# --------------------------------------------------------------------------- the training panel
def _log_steps(value: float, low: int, high: int) -> list[float]:
    """1-2-5 steps from 10^low to 10^high, plus `value` itself (so the slider starts exactly on it)."""
    steps = {round(m * 10.0 ** e, 12) for e in range(low, high) for m in (1, 2, 5)} | {10.0 ** high, float(value)}
    return sorted(steps)


class TrainingPanel(W.VBox):
    """Controls for method, ρ, λ, ε, K and steps; Run trains `base` with them and plots live."""

    def __init__(self, base: TrainConfig, out_dir: str | Path, *, reuse: bool = False,
                 interval_s: float = 0.5) -> None:
        self.base, self.out_dir, self.reuse, self.interval_s = base.validate(), Path(out_dir), reuse, interval_s
        style = {"description_width": "90px"}
        methods = [(method_name(m), m) for m in ("fare", "fare-reg", "lore")]
        start = base.method if base.method in dict(methods).values() else "lore"
        self.method = W.Dropdown(options=methods, value=start, description="method", style=style)
        self.rho = W.SelectionSlider(options=_log_steps(base.rho, -3, 0), value=base.rho, description="ρ (LORE)",
                                     style=style)
        self.lam = W.SelectionSlider(options=_log_steps(base.lam, -2, 2), value=base.lam, description="λ (FARE-reg)",
                                     style=style)
        self.eps = W.FloatSlider(value=round(base.eps * 255, 1), min=0.5, max=16, step=0.5, description="ε ×1/255",
                                 style=style)
        self.primal_steps = W.IntSlider(value=base.primal_steps, min=1, max=10, description="K (LORE)", style=style)
        self.steps = W.IntSlider(value=base.steps, min=1, max=max(500, base.steps), description="steps", style=style)
        self.run_button = W.Button(description="Run", button_style="primary", icon="play")
        self.status = W.HTML(value="Set the knobs, then click <b>Run</b>.")
        self.figure = go.FigureWidget(training_curves([], rho=base.rho, title="Training (panel)"))
        self.figure.layout.width = 1050  # a FigureWidget does not follow the output's width
        self.summary: Record | None = None
        self.run_button.on_click(lambda _: self.run())
        self.method.observe(lambda _: self._show_relevant(), names="value")
        self._show_relevant()
        controls = W.HBox([W.VBox([self.method, self.rho, self.lam]), W.VBox([self.eps, self.primal_steps, self.steps]),
                           W.VBox([self.run_button])])
        super().__init__([controls, self.status, self.figure])

    def _show_relevant(self) -> None:
        self.rho.layout.display = None if self.method.value == "lore" else "none"
        self.primal_steps.layout.display = None if self.method.value == "lore" else "none"
        self.lam.layout.display = None if self.method.value == "fare-reg" else "none"

    def config(self) -> TrainConfig:
        """The base config with the controls' values, its run_dir under out_dir."""
        cfg = replace(self.base, method=self.method.value, rho=float(self.rho.value), lam=float(self.lam.value),
                      eps=float(self.eps.value) / 255, primal_steps=int(self.primal_steps.value),
                      steps=int(self.steps.value))
        return with_run_dir(cfg, self.out_dir)

    def run(self) -> Record | None:
        """Train with the current controls, redrawing the FigureWidget from the trainer callback."""
        self.run_button.disabled = True
        records: list[Record] = []
        last = [0.0]
        try:
            cfg = self.config()
            rho = cfg.rho if cfg.method == "lore" else None
            update_training_curves(self.figure, records, rho=rho)  # clear the previous run's curves

            def on_record(record: Record) -> None:
                records.append(record)
                if record["kind"] == "eval" or time.monotonic() - last[0] >= self.interval_s:
                    update_training_curves(self.figure, records, rho=rho)
                    self.status.value = f"training {method_name(cfg.method)}: step {record['step']}/{cfg.steps}"
                    last[0] = time.monotonic()

            self.status.value = f"training {method_name(cfg.method)} in {html.escape(str(cfg.run_path))} ..."
            self.summary = train_or_reuse(cfg, on_record, reuse=self.reuse)
            update_training_curves(self.figure, records, rho=rho)
            final = self.summary["final"]
            shown = ", ".join(f"{k} {final[k]:.3f}" for k in ("clean_acc", "robust_acc", "cosine", "fidelity")
                              if k in final)
            self.status.value = f"done: {html.escape(shown)} ({html.escape(self.summary['run_dir'])})"
            return self.summary
        except ConfigError as e:
            self.status.value = f"<span style='color:#c00'>{html.escape(str(e))}</span>"
            return None
        finally:
            self.run_button.disabled = False


# --------------------------------------------------------------------------- image hover
def hover_explorer(fig: go.Figure, *, image_size: int = 96) -> W.HBox:
    """A FigureWidget of `fig` beside an image pane showing the hovered point's image.

    The image is layout.meta['images'][customdata[0]], the layout `plots.umap_grid` writes.
    """
    widget = go.FigureWidget(fig)
    images = (widget.layout.meta or {}).get("images", [])
    pane = W.HTML(value="<i>hover a point</i>", layout=W.Layout(width=f"{image_size + 40}px"))

    def on_hover(trace: Any, points: Any, _state: Any) -> None:
        if not points.point_inds:
            return
        index, *rest = trace.customdata[points.point_inds[0]]
        pane.value = (f"<img src='{images[int(index)]}' width={image_size} height={image_size} "
                      f"style='image-rendering:pixelated;background:#000'><br>image #{int(index)} "
                      + html.escape(" ".join(str(c) for c in rest)))

    for trace in widget.data:
        if trace.customdata is not None:
            trace.on_hover(on_hover)
    return W.HBox([widget, pane])
