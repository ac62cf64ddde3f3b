"""Run the training notebook in JupyterLab inside a real (headless) Chromium and check what renders.

    .venv/bin/python scripts/browser_check.py [--screenshot papermill_runs/browser_check.png]

Steps: copy notebooks/02_train.ipynb (outputs cleared) into a temporary folder; start
`jupyter lab` headless on 127.0.0.1 with a random token; open the notebook in Debian's Chromium
driven by playwright (`executable_path`, nothing downloaded); run all cells from the Run menu;
wait for the kernel to finish; check that the ipywidgets controls and the plotly training figure
rendered and that no cell raised; click the panel's Run button and check that its FigureWidget
draws the curves live; save a screenshot. Prints what it found; exits 1 if anything is missing.

Needs: `apt-get install chromium` and `pip install playwright` (never `playwright install`).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(workdir: Path, notebook: Path) -> Path:
    """Copy the notebook, outputs cleared, to <workdir>/notebooks/ (its out_dir '../runs/..' stays inside workdir)."""
    nb = nbformat.read(notebook, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    target = workdir / "notebooks" / notebook.name
    target.parent.mkdir(parents=True)
    nbformat.write(nb, target)
    return target


def start_lab(workdir: Path, port: int, token: str, log: Path) -> subprocess.Popen:
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(workdir / ".jupyter"), JUPYTER_RUNTIME_DIR=str(workdir / ".runtime"),
               JUPYTERLAB_WORKSPACES_DIR=str(workdir / ".workspaces"))
    env.setdefault("LOREKIT_CACHE", str(REPO / ".cache"))
    cmd = [str(Path(sys.executable).parent / "jupyter"), "lab", "--no-browser", f"--port={port}",
           f"--ServerApp.token={token}", "--ServerApp.ip=127.0.0.1", f"--ServerApp.root_dir={workdir}",
           "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # containers and CI machines often run as root
        cmd.append("--allow-root")
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/api/status?token={token}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = "\n".join(log.read_text().splitlines()[-15:])
            raise RuntimeError(f"jupyter lab exited with {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    tail = "\n".join(log.read_text().splitlines()[-15:])
    raise RuntimeError(f"jupyter lab did not answer within 90 s:\n{tail}")


KERNEL_STATUS = """() => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  return k ? k.status : null;
}"""
PENDING = """() => [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]
  .filter(p => p.textContent.includes('*')).length"""
# Drawn line traces of the first plotly figure inside (true) or outside (false) a widget; -1 if there is none.
FIGURE_POINTS = """(inWidget) => {
  const el = [...document.querySelectorAll('.js-plotly-plot')].find(e => !!e.closest('.jupyter-widgets') === inWidget);
  if (!el) return -1;
  return [...el.querySelectorAll('.scatterlayer .trace path.js-line')]
    .filter(p => (p.getAttribute('d') || '').length > 8).length; }"""


def check(notebook: Path, screenshot: Path, chromium: str, timeout: float, click_run: bool) -> dict:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    workdir = Path(tempfile.mkdtemp(prefix="lorekit-browser-"))
    found: dict = {"missing": []}
    proc = None

    def wait(what: str, fn, *args, **kwargs) -> bool:
        try:
            fn(*args, **kwargs)
            return True
        except PlaywrightTimeout:
            found["missing"].append(what)
            return False

    try:
        copy = prepare(workdir, notebook)
        port, token = free_port(), secrets.token_hex(16)
        proc = start_lab(workdir, port, token, workdir / "jupyter.log")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1500, "height": 2300})
            page.goto(f"http://127.0.0.1:{port}/lab/tree/notebooks/{copy.name}?reset&token={token}")
            page.wait_for_selector(".jp-Notebook .jp-CodeCell", timeout=90_000)
            page.wait_for_function(f"({KERNEL_STATUS})() === 'idle'", timeout=90_000)
            # Run all cells the way a user does: the Run menu.
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
            t0 = time.monotonic()
            page.wait_for_function(f"({PENDING})() > 0", timeout=30_000)
            wait("run all finished", page.wait_for_function, f"({PENDING})() === 0 && ({KERNEL_STATUS})() === 'idle'",
                 timeout=timeout * 1000, polling=500)
            found["run_all_s"] = round(time.monotonic() - t0, 1)
            found["code_cells"] = page.locator(".jp-CodeCell").count()
            found["executed_cells"] = page.locator(".jp-CodeCell .jp-InputPrompt", has_text="[").count()
            found["error_outputs"] = page.locator('[data-mime-type="application/vnd.jupyter.error"]').count()
            panel = page.locator(".jp-OutputArea-output .jupyter-widgets.widget-vbox").first
            wait("widget panel", panel.wait_for, timeout=30_000)
            found["widget_dropdowns"] = page.locator(".widget-dropdown").count()
            found["widget_sliders"] = page.locator(".widget-slider").count()
            found["widget_run_button"] = page.locator(".jupyter-widgets button", has_text="Run").count()
            # The training cell's figure: a plotly div outside the widget panel, with drawn lines.
            wait("plotly training figure", page.wait_for_function, f"({FIGURE_POINTS})(false) > 0", timeout=60_000)
            found["plotly_figures"] = page.locator(".js-plotly-plot").count()
            found["training_figure_lines"] = page.evaluate(FIGURE_POINTS, False)
            found["panel_figure_lines_before_click"] = page.evaluate(FIGURE_POINTS, True)
            if click_run and found["widget_run_button"]:
                page.locator(".jupyter-widgets button", has_text="Run").first.click()
                status = page.locator(".jupyter-widgets .widget-html", has_text="done").first
                if wait("panel run finished", status.wait_for, timeout=timeout * 1000):
                    found["panel_status"] = status.inner_text().strip()[:160]
                found["panel_figure_lines_after_click"] = page.evaluate(FIGURE_POINTS, True)
            news = page.get_by_role("button", name="No", exact=True)  # JupyterLab's "notify about news?" toast
            if news.count():
                news.first.click()
            page.evaluate("() => { const o = document.querySelector('.jp-OutputArea-output .jupyter-widgets');"
                          " if (o) o.closest('.jp-Cell').scrollIntoView({block: 'start'}); }")
            page.wait_for_timeout(1000)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot))
            found["screenshot"] = str(screenshot)
            browser.close()
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--notebook", type=Path, default=REPO / "notebooks" / "02_train.ipynb")
    parser.add_argument("--screenshot", type=Path, default=REPO / "papermill_runs" / "browser_check.png")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium executable (Debian's package)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for the notebook's run")
    parser.add_argument("--no-click", action="store_true", help="do not click the panel's Run button")
    args = parser.parse_args(argv)
    if not Path(args.chromium).is_file():
        print(f"no Chromium at {args.chromium}: apt-get install chromium", file=sys.stderr)
        return 2
    found = check(args.notebook.resolve(), args.screenshot.resolve(), args.chromium, args.timeout, not args.no_click)
    print(json.dumps(found, indent=2))
    problems = list(found["missing"]) + [name for name, ok in (
        ("cells did not all run", found["executed_cells"] == found["code_cells"]),
        ("error outputs", found["error_outputs"] == 0),
        ("no widget controls", found["widget_dropdowns"] >= 1 and found["widget_sliders"] >= 1
         and found["widget_run_button"] >= 1),
        ("no plotly training figure", found["training_figure_lines"] > 0),
        ("the panel's Run did not draw", args.no_click or found.get("panel_figure_lines_after_click", 0) > 0),
    ) if not ok]
    print("browser check: " + ("OK" if not problems else "FAILED: " + ", ".join(problems)))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
