"""Live training curves and the ipywidgets controls of the training notebook.

(Notebook runs live in `<out_dir>/<run name>-<config hash>` (`lorekit.rundir.with_run_dir`), trained by
`lorekit.train(cfg, existing="reuse" | "overwrite")`.)

- `LiveCurves`: a trainer callback that draws the training curves live in a FigureWidget and,
  when training ends, replaces it with the final static figure. In JupyterLab the curves move
  while training runs; executed headlessly (papermill, nbval, nbconvert) the stored output is
  simply the final static figure.
- `TrainingPanel`: controls for the main knobs (method, ρ, λ, ε, K, steps) over a named recipe, and a
  Run button that trains and updates a plotly FigureWidget live from the trainer callback. Nothing trains until
  the button is clicked, so executing the notebook headlessly only displays the controls.
- `hover_explorer`: a FigureWidget next to an image pane that shows the hovered point's image
  (the data URIs `plots.umap_grid` stores in layout.meta['images']).
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any

import ipywidgets as W
import plotly.graph_objects as go
from IPython.display import display

from .config import ConfigError, TrainConfig
from .methods import METHODS, label as method_name
from .plots import mime_bundle, training_curves, update_training_curves
from .recipes import recipe as make_recipe
from .rundir import with_run_dir
from .trainer import train

Record = dict[str, Any]


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


def constraint_level(cfg: TrainConfig) -> float | None:
    """ρ where the method constrains to it (drawn on the distance panel), else None."""
    return cfg.rho if "rho" in METHODS[cfg.method].fields else None


class TrainingPanel(W.VBox):
    """Controls for method (those the recipe suits), ρ, λ, ε, K and steps over a named recipe; Run trains with them
    and plots live."""

    def __init__(self, recipe: str, out_dir: str | Path, *, overrides: dict[str, Any] | None = None,
                 reuse: bool = False, interval_s: float = 0.5) -> None:
        self.recipe, self.overrides = recipe, {k: v for k, v in (overrides or {}).items() if v is not None}
        self.out_dir, self.reuse, self.interval_s = Path(out_dir), reuse, interval_s
        base = self._config()
        style = {"description_width": "90px"}
        self.method = W.Dropdown(options=[(m.label, name) for name, m in METHODS.items() if self._suits(name)],
                                 value=base.method, description="method", style=style)
        self.rho = W.SelectionSlider(options=_log_steps(base.rho, -3, 0), value=base.rho, description="ρ",
                                     style=style)
        self.lam = W.SelectionSlider(options=_log_steps(base.lam, -2, 2), value=base.lam, description="λ",
                                     style=style)
        self.eps = W.FloatSlider(value=round(base.eps * 255, 1), min=0.5, max=16, step=0.5, description="ε ×1/255",
                                 style=style)
        self.primal_steps = W.IntSlider(value=base.updates_per_batch, min=1, max=10, description="K", style=style)
        self.steps = W.IntSlider(value=base.steps, min=1, max=max(500, base.steps), description="steps", style=style)
        self.run_button = W.Button(description="Run", button_style="primary", icon="play")
        self.status = W.HTML(value="Set the knobs, then click <b>Run</b>.")
        self.figure = go.FigureWidget(training_curves([], rho=constraint_level(base), title="Training (panel)"))
        self.figure.layout.width = 1050  # a FigureWidget does not follow the output's width
        self.summary: dict[str, Any] | None = None
        self.run_button.on_click(lambda _: self.run())
        self.method.observe(lambda _: self._method_changed(), names="value")
        self._show_relevant()
        controls = W.HBox([W.VBox([self.method, self.rho, self.lam]), W.VBox([self.eps, self.primal_steps, self.steps]),
                           W.VBox([self.run_button])])
        super().__init__([controls, self.status, self.figure])

    def _config(self, method: str | None = None, **knobs: Any) -> TrainConfig:
        given = {k: v for k, v in self.overrides.items() if k != "method"}
        return make_recipe(self.recipe, method or self.overrides.get("method"), **{**given, **knobs})

    def _suits(self, method: str) -> bool:
        """Whether the recipe (with the overrides) is a config `method` can train (AdvCLIP-LoRA needs adapters)."""
        try:
            self._config(method)
        except ConfigError:
            return False
        return True

    def _method_changed(self) -> None:
        self.primal_steps.value = self._config(self.method.value).updates_per_batch  # the recipe's K for it
        self._show_relevant()

    def _show_relevant(self) -> None:
        fields = METHODS[self.method.value].fields
        self.rho.layout.display = None if "rho" in fields else "none"
        self.lam.layout.display = None if "lam" in fields else "none"

    def config(self) -> TrainConfig:
        """The recipe with the controls' values, its run_dir under out_dir."""
        cfg = self._config(self.method.value, rho=float(self.rho.value), lam=float(self.lam.value),
                           eps=float(self.eps.value) / 255, primal_steps=int(self.primal_steps.value),
                           steps=int(self.steps.value))
        return with_run_dir(cfg, self.out_dir)

    def run(self) -> dict[str, Any] | None:
        """Train with the current controls, redrawing the FigureWidget from the trainer callback."""
        self.run_button.disabled = True
        records: list[Record] = []
        last = [0.0]
        try:
            cfg = self.config()
            rho = constraint_level(cfg)
            update_training_curves(self.figure, records, rho=rho)  # clear the previous run's curves

            def on_record(record: Record) -> None:
                records.append(record)
                if record["kind"] == "eval" or time.monotonic() - last[0] >= self.interval_s:
                    update_training_curves(self.figure, records, rho=rho)
                    self.status.value = f"training {method_name(cfg.method)}: step {record['step']}/{cfg.steps}"
                    last[0] = time.monotonic()

            self.status.value = f"training {method_name(cfg.method)} in {html.escape(str(cfg.run_path))} ..."
            self.summary = train(cfg, existing="reuse" if self.reuse else "overwrite", callback=on_record,
                                 progress=False)
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
