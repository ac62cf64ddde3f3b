"""Tests for lorekit.sweep: validation, casting and naming without a kernel, then real papermill sweeps of
tests/fixtures/sweep_toy.ipynb (worker processes, a failing point, resume after a re-run and after SIGKILL,
one worker per device, SIGTERM to a running point, submitit jobs: local, and SLURM through a fake sbatch)."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime
from pathlib import Path

import nbformat
import numpy as np
import pytest
from filelock import FileLock

from lorekit import sweep
from lorekit.sweep import (
    WIDGET_STATE_MIME,
    SweepError,
    grid,
    load_sweep,
    notebook_parameters,
    run_id,
    run_ids,
    run_sweep,
    strip_widget_state,
    to_builtin,
)

TOY = Path(__file__).parent / "fixtures" / "sweep_toy.ipynb"
REPO = Path(__file__).resolve().parents[1]
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9.,+~_-]*")


def _cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sweep.add_arguments(parser)
    return parser.parse_args(argv)


def _executions(log: Path) -> dict[str, int]:
    """How often each run id's notebook started (the toy notebook appends its run dir name to log_path)."""
    counts: dict[str, int] = {}
    for line in log.read_text().splitlines():
        counts[line] = counts.get(line, 0) + 1
    return counts


# ------------------------------------------------------------------------------- no kernel needed


def test_notebook_parameters_reads_the_parameters_cell():
    params = notebook_parameters(TOY)
    assert list(params) == ["x", "method", "sizes", "fail", "widget", "wait_for", "log_path"]
    assert params["x"] == {"default": 1.0, "type": "float", "help": "a numeric parameter"}
    assert params["method"]["default"] == "toy"
    assert params["sizes"]["default"] == [1]


def test_unknown_parameter_is_rejected_before_anything_is_written(tmp_path, capsys):
    root = tmp_path / "runs"
    with pytest.raises(SweepError) as err:
        run_sweep(TOY, "s", [{"x": 1.0, "rho": 0.1}], base={"stepz": 3}, out_root=root)
    message = str(err.value)
    assert "rho" in message and "stepz" in message
    assert "x, method, sizes, fail, widget, wait_for, log_path" in message
    assert not root.exists()

    assert sweep.run(_cli(str(TOY), "--name", "s", "--out-root", str(root), "--grid", "rho=0.1,0.2")) == 2
    assert "unknown parameter(s) for sweep_toy.ipynb: rho" in capsys.readouterr().err
    assert not root.exists()


@pytest.mark.parametrize(
    ("points", "base", "name", "match"),
    [
        ([{"x": Path("a")}], None, "s", "parameter 'x': cannot pass"),
        ([{"sizes": [1, object()]}], None, "s", r"parameter 'sizes\[1\]'"),
        ([{"x": 1.0}], {"method": 1j}, "s", "parameter 'method'"),
        ([{"x": 1.0}, {"x": np.float64(1.0)}], None, "s", "points 0 and 1 are identical"),
        ([], None, "s", "no points"),
        ([{"x": 1.0}], None, "../escape", "plain directory name"),
    ],
)
def test_bad_requests_are_rejected_before_anything_is_written(tmp_path, points, base, name, match):
    with pytest.raises(SweepError, match=match):
        run_sweep(TOY, name, points, base=base, out_root=tmp_path / "runs")
    assert list(tmp_path.iterdir()) == []


def test_a_sweep_being_run_elsewhere_is_refused(tmp_path):
    (tmp_path / "busy").mkdir()
    with FileLock(str(tmp_path / "busy" / ".lock")), pytest.raises(SweepError, match="being run by another process"):
        run_sweep(TOY, "busy", [{"x": 1.0}], out_root=tmp_path)


def test_to_builtin_casts_numpy_and_tuples():
    cases = [
        (np.int64(3), 3, int),
        (np.float32(0.05), 0.05, float),  # not 0.05000000074505806
        (np.float64(0.25), 0.25, float),
        (np.bool_(True), True, bool),
        (np.str_("lore"), "lore", str),
        (np.array(7, dtype=np.int16), 7, int),
        ((1, np.int32(2)), [1, 2], list),
        (np.array([0.5, 1.5]), [0.5, 1.5], list),
        ({"eps": (np.float32(0.5),), "k": None}, {"eps": [0.5], "k": None}, dict),
    ]
    for value, expected, kind in cases:
        cast = to_builtin(value, "p")
        assert cast == expected and type(cast) is kind, value
    nested = to_builtin({"a": [np.int8(1), (np.float16(0.5),)]})
    assert json.dumps(nested) == '{"a": [1, [0.5]]}'
    for bad, where in [(1 + 2j, "'p'"), (object(), "'p'"), ({1: 2}, "dict keys"), ([1, [Path(".")]], r"'p\[1\]\[0\]'")]:
        with pytest.raises(SweepError, match=where):
            to_builtin(bad, "p")


def test_run_ids_are_readable_stable_unique_and_safe():
    assert run_id({"rho": 0.05, "method": "lore"}) == "method-lore_rho-0.05"
    assert run_id({"method": "lore", "rho": 0.05}) == "method-lore_rho-0.05"
    assert run_id({}) == "base"
    assert run_id({"lam": 1e-5, "path": "/data/a b"}) == "lam-1e-05_path-data+a+b"
    assert run_id({"sizes": (1, 2), "on": np.bool_(True), "k": None}) == "k-None_on-True_sizes-1,2"
    assert run_id({"rho": np.float32(0.05)}) == "rho-0.05"

    long_point = {"tag": "x" * 300}
    assert len(run_id(long_point)) <= sweep.MAX_RUN_ID_LENGTH
    assert run_id(long_point) == run_id(dict(long_point)) != run_id({"tag": "x" * 299})

    ids = run_ids([{"p": "a/b"}, {"p": "a b"}, {"p": "c"}])
    assert ids[0].startswith("p-a+b~") and ids[1].startswith("p-a+b~") and ids[0] != ids[1]
    assert ids[2] == "p-c"
    assert run_ids([{"m": "LORE"}, {"m": "lore"}])[0].startswith("m-LORE~")
    assert ids == run_ids([{"p": "a/b"}, {"p": "a b"}, {"p": "c"}])
    assert all(SAFE_ID.fullmatch(i) for i in [*ids, run_id(long_point)])


def test_grid_is_a_cartesian_product_and_grids_concatenate():
    lore, fare_reg = grid(method=["lore"], rho=[0.01, 0.1]), grid(method=["fare_reg"], lam=np.array([1.0]))
    points = lore + fare_reg + [{"method": "fare"}]
    assert points == [
        {"method": "lore", "rho": 0.01},
        {"method": "lore", "rho": 0.1},
        {"method": "fare_reg", "lam": 1.0},
        {"method": "fare"},
    ]
    for not_a_list in ("lore", 0.1):
        with pytest.raises(SweepError, match="list of values"):
            grid(method=not_a_list)
    with pytest.raises(SweepError, match="no values"):
        grid(rho=[])


def test_cli_values_are_python_literals_else_strings():
    points, base = sweep._spec_from_args(
        _cli(
            "nb.ipynb", "--name", "n",
            "--grid", "rho=0.01,0.05,0.1", "--grid", "method=lore",
            "--set", "steps=20", "--set", "tag=a,b", "--set", "out=/tmp/x y",
        )
    )  # fmt: skip
    assert [run_id(p) for p in points] == ["method-lore_rho-0.01", "method-lore_rho-0.05", "method-lore_rho-0.1"]
    assert base == {"steps": 20, "tag": "a,b", "out": "/tmp/x y"}

    points, base = sweep._spec_from_args(
        _cli("nb.ipynb", "--name", "n", "--grid", "sizes=[1,2],[3]", "--grid", "s='a,b',c,None")
    )
    assert [p["sizes"] for p in points[::3]] == [[1, 2], [3]]
    assert [p["s"] for p in points[:3]] == ["a,b", "c", None]
    assert sweep._spec_from_args(_cli("nb.ipynb", "--name", "n")) == ([{}], {})
    for argv in (
        ["--grid", "rho"],  # no values
        ["--grid", "rho=1,,2"],  # an empty value
        ["--grid", "a=1", "--grid", "a=2"],  # a name twice
        ["--grid", "a=1", "--set", "a=2"],
    ):
        with pytest.raises(SweepError):
            sweep._spec_from_args(_cli("nb.ipynb", "--name", "n", *argv))


def test_a_worker_that_dies_is_recorded_as_a_failed_point(tmp_path):
    future: Future = Future()
    future.set_exception(BrokenProcessPool("A process in the process pool was terminated abruptly"))
    result = sweep._outcome(future, "x-1", {"x": 1}, tmp_path / "x-1")
    assert result["status"] == "failed" and result["error"].startswith("BrokenProcessPool: A process")
    assert json.loads((tmp_path / "x-1" / "result.json").read_text()) == result


def test_strip_widget_state():
    nb = nbformat.v4.new_notebook()
    nb.metadata["widgets"] = {WIDGET_STATE_MIME: {"state": {"m": {}}}}
    view = {"application/vnd.jupyter.widget-view+json": {"model_id": "m"}, WIDGET_STATE_MIME: {"state": {}}}
    nb.cells = [nbformat.v4.new_code_cell("w", outputs=[nbformat.v4.new_output("display_data", data=view)])]
    assert strip_widget_state(nb)
    assert "widgets" not in nb.metadata
    assert list(nb.cells[0].outputs[0].data) == ["application/vnd.jupyter.widget-view+json"]
    assert not strip_widget_state(nb)


# ------------------------------------------------------------------------------- real sweeps


def test_sweep_records_failure_strips_widgets_and_reruns_only_what_is_missing(tmp_path, monkeypatch, capsys):
    # A python3 kernelspec with a broken interpreter ahead of everything else on the search path: the
    # sweep must still run its points in this interpreter's kernel.
    bogus = tmp_path / "jupyter" / "kernels" / "python3"
    bogus.mkdir(parents=True)
    argv = ["/nonexistent/python", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (bogus / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "bogus", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))

    root, log = tmp_path / "runs", tmp_path / "executions.log"
    base = {"log_path": str(log)}
    points = [{"x": np.float32(0.5), "sizes": (1, 2)}, {"x": np.int64(2), "fail": True}, {"x": 3.0, "widget": True}]
    ok1, bad, ok2 = ids = ["sizes-1,2_x-0.5", "fail-True_x-2", "widget-True_x-3.0"]

    res = run_sweep(TOY, "toy", points, base=base, workers=2, out_root=root, progress=False)

    assert list(res.results) == ids and res.ok == [ok1, ok2] and res.failed == [bad]
    assert _executions(log) == {ok1: 1, bad: 1, ok2: 1}
    first = res.results[ok1]
    assert first["status"] == "ok" and first["error"] is None and first["wall_time_s"] > 0
    assert first["parameters"] == {"log_path": str(log), "x": 0.5, "sizes": [1, 2]}
    # The notebook saw builtins (not strings), ran in its run dir and in this interpreter's kernel.
    notebook_saw = {k: first["results"][k] for k in ("y", "types", "sys_prefix")}
    assert notebook_saw == {"y": 1.0, "types": {"x": "float", "sizes": "list"}, "sys_prefix": sys.prefix}
    assert (root / "toy" / ok1 / "results.json").exists()

    failed = res.results[bad]
    assert failed["error"] == "RuntimeError: deliberate failure at x=2"
    assert 'raise RuntimeError(f"deliberate failure at x={x}")' in failed["traceback"]
    assert failed["results"] is None
    failed_nb = nbformat.read(root / "toy" / bad / "sweep_toy.ipynb", as_version=4)
    assert failed_nb.metadata.papermill.exception is True

    for rid in ids:
        text = (root / "toy" / rid / "sweep_toy.ipynb").read_text()
        assert WIDGET_STATE_MIME not in text and '"widgets"' not in text
    widget_nb = nbformat.read(root / "toy" / ok2 / "sweep_toy.ipynb", as_version=4)
    outputs = [o for c in widget_nb.cells for o in c.get("outputs", [])]
    views = [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert len(views) == 1  # the widget really was displayed

    index = json.loads((root / "toy" / "index.json").read_text())
    assert index["sweep"] == "toy" and index["notebook"] == str(TOY.resolve()) and index["base"] == base
    assert [(p["run_id"], p["status"]) for p in index["points"]] == [(ok1, "ok"), (bad, "failed"), (ok2, "ok")]
    assert index["points"][0]["params"] == {"x": 0.5, "sizes": [1, 2]}
    assert index["points"][1]["error"] == failed["error"]
    assert all(p["wall_time_s"] > 0 for p in index["points"])
    assert load_sweep(root / "toy").results == res.results
    assert [(r["run_id"], r["x"], r.get("y")) for r in res.rows()] == [(ok1, 0.5, 1.0), (bad, 2, None), (ok2, 3.0, 6.0)]

    other = tmp_path / "other.ipynb"
    other.write_text(TOY.read_text())
    with pytest.raises(SweepError, match="was made from"):
        run_sweep(other, "toy", [{"x": 1.0}], out_root=root)

    # Same sweep again from the command line, plus one new point: only the failed and the new point run.
    done_mtimes = {rid: (root / "toy" / rid / "result.json").stat().st_mtime_ns for rid in (ok1, ok2)}
    points_file = tmp_path / "points.json"
    same_points = [{"x": 0.5, "sizes": [1, 2]}, {"x": 2, "fail": True}, {"x": 3.0, "widget": True}]
    points_file.write_text(json.dumps(same_points))
    args = _cli(
        str(TOY), "--name", "toy", "--out-root", str(root), "--points", str(points_file),
        "--grid", "x=4.0", "--set", f"log_path={log}", "--workers", "2", "--no-progress",
    )  # fmt: skip
    assert sweep.run(args) == 1
    assert "3 ok, 1 failed" in capsys.readouterr().out
    assert _executions(log) == {ok1: 1, bad: 2, ok2: 1, "x-4.0": 1}
    assert {rid: (root / "toy" / rid / "result.json").stat().st_mtime_ns for rid in (ok1, ok2)} == done_mtimes
    again = load_sweep(root / "toy")
    assert [p["run_id"] for p in again.index["points"]] == ["x-4.0", ok1, bad, ok2]
    assert again.results["x-4.0"]["results"]["y"] == 8.0


def test_killed_sweep_resumes_with_only_the_missing_points(tmp_path):
    psutil = pytest.importorskip("psutil")
    root, log, go = tmp_path / "runs", tmp_path / "executions.log", tmp_path / "go"
    points = [{"x": 1.0}, {"x": 2.0, "wait_for": str(go)}]  # the second point blocks until `go` exists
    fast, slow = run_ids(points)
    code = (
        "import json, sys\nfrom lorekit.sweep import run_sweep\n"
        "run_sweep(sys.argv[1], 'killed', json.loads(sys.argv[2]), base={'log_path': sys.argv[3]},"
        " out_root=sys.argv[4], progress=False)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(TOY), json.dumps(points), str(log), str(root)], cwd=tmp_path, env=env
    )
    try:
        deadline = time.monotonic() + 90
        while not (log.exists() and slow in _executions(log)):
            assert proc.poll() is None and time.monotonic() < deadline, "the slow point never started"
            time.sleep(0.1)
        assert (root / "killed" / fast / "result.json").exists()
        workers_and_kernels = psutil.Process(proc.pid).children(recursive=True)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # Orphaned workers and kernels must go away by themselves, not race the re-run.
    _, alive = psutil.wait_procs(workers_and_kernels, timeout=20)
    for p in alive:
        p.kill()
    assert alive == []

    assert (root / "killed" / slow / "sweep_toy.ipynb").exists()
    assert not (root / "killed" / slow / "result.json").exists()
    index = json.loads((root / "killed" / "index.json").read_text())
    assert [(p["run_id"], p["status"]) for p in index["points"]] == [(fast, "ok"), (slow, "pending")]

    go.touch()
    res = run_sweep(TOY, "killed", points, base={"log_path": str(log)}, out_root=root, progress=False)
    assert res.ok == [fast, slow]
    assert _executions(log) == {fast: 1, slow: 2}
    assert [p["status"] for p in load_sweep(root / "killed").index["points"]] == ["ok", "ok"]


def test_make_sweep_parameters_are_notebook_3_parameters_and_valid_configs():
    """`make sweep` feeds notebooks/params/rho_front.yaml to notebook 3: every name must be a parameter of the
    right type there (papermill only warns on unknown names), and every point a valid training config."""
    import yaml

    from lorekit.methods import get
    from lorekit.recipes import recipe

    params = yaml.safe_load((REPO / "notebooks" / "params" / "rho_front.yaml").read_text())
    known = notebook_parameters(REPO / "notebooks" / "03_rho_sweep.ipynb")
    assert set(params) <= set(known), set(params) - set(known)
    types = {"list": list, "float": (float, int), "int": int, "bool": bool, "str": str}
    for name, value in params.items():
        assert isinstance(value, types[known[name]["type"]]), (name, value, known[name]["type"])
    assert params["reuse"] is True  # a re-run after a kill must finish the sweep, not start it over
    # fronts of all three methods over their own knobs, over >= 3 seeds, at one budget of training passes
    assert len(params["rhos"]) >= 3 and len(params["lams"]) >= 2 and len(params["fare_eps"]) >= 2
    assert len(params["seeds"]) >= 3 and params["budget"] > 0
    passes = []
    for point in [{"method": "lore", "rho": r} for r in params["rhos"]] + [
            {"method": "fare-reg", "lam": lam} for lam in params["lams"]] + [
            {"method": "fare", "eps": e / 255} for e in params["fare_eps"]]:
        cfg = recipe(params["recipe"], budget=params["budget"], **point)  # validates; the budget sets the steps
        passes.append(cfg.steps * get(cfg.method).passes_per_step(cfg))
    assert all(params["budget"] * 0.95 <= p <= params["budget"] for p in passes), passes  # equal compute


# ------------------------------------------------------------------------------- devices, interruptions, jobs


def _spans_overlap(spans: list[tuple[float, float]]) -> bool:
    spans = sorted(spans)
    return any(later_start < end for (_, end), (later_start, _) in zip(spans, spans[1:]))


def test_devices_run_one_point_per_device_at_a_time(tmp_path, monkeypatch):
    # Two visible "GPUs", as in a SLURM allocation: the workers are pinned to them whether or not CUDA is there.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    points = grid(x=[1.0, 2.0, 3.0])  # so that a device runs two
    res = run_sweep(TOY, "gpus", points, devices="auto", out_root=tmp_path, progress=False)

    assert res.ok == run_ids(points) and res.index["devices"] == ["0", "1"]
    spans: dict[str, list[tuple[float, float]]] = {}  # device -> when its points ran (their kernels' whole lives)
    for result in res.results.values():
        seen = result["results"]["cuda_visible_devices"]  # what the notebook's kernel saw
        assert seen == result["cuda_visible_devices"] and seen in {"0", "1"}
        start = datetime.fromisoformat(result["started_at"]).timestamp()
        spans.setdefault(seen, []).append((start, start + result["wall_time_s"]))
    assert set(spans) == {"0", "1"}
    assert not any(_spans_overlap(s) for s in spans.values())
    # Two devices, two points at a time: the sweep as a whole did overlap.
    assert _spans_overlap([span for s in spans.values() for span in s])


@pytest.mark.parametrize(
    ("visible", "kwargs", "match"),
    [
        ("0,1", {"devices": "0,2"}, r"unknown device id\(s\) 2; visible devices \(CUDA_VISIBLE_DEVICES\): 0, 1"),
        ("0,1", {"devices": ["1", 1]}, "1 given twice; a device runs one point at a time"),
        ("0,1", {"devices": []}, "empty device id"),
        ("0,1", {"devices": "0,,1"}, "empty device id"),
        ("0,1", {"devices": 2}, "devices must be 'auto'"),
        ("0,1", {"devices": "auto", "workers": 3}, r"workers=3 conflicts with devices 'auto': one worker runs per"),
        ("0,1", {"devices": "0,1", "executor": "slurm"}, "workers and devices are for executor='local'"),
        ("0,1", {"executor": "submitit-local", "workers": 2}, "workers and devices are for executor='local'"),
        ("0,1", {"slurm": {"time": 10}}, r"slurm options \{'time': 10\} need executor='slurm'"),
        ("0,1", {"executor": "pbs"}, "executor 'pbs' is not one of: local, slurm, submitit-local"),
        ("-1", {"devices": "0"}, r"visible devices \(CUDA_VISIBLE_DEVICES\): none"),
        ("", {"devices": "0"}, r"visible devices \(CUDA_VISIBLE_DEVICES\): none"),
    ],
)
def test_bad_placements_are_rejected_before_anything_is_written(tmp_path, monkeypatch, visible, kwargs, match):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    with pytest.raises(SweepError, match=match):
        run_sweep(TOY, "s", [{"x": 1.0}], out_root=tmp_path / "runs", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_visible_devices_and_auto(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aa, MIG-bb,-1,3")  # CUDA ignores "-1" and everything after it
    assert sweep.visible_devices() == (["GPU-aa", "MIG-bb"], "CUDA_VISIBLE_DEVICES")
    assert sweep.resolve_devices("auto") == ["GPU-aa", "MIG-bb"]
    assert sweep.resolve_devices(["MIG-bb"]) == ["MIG-bb"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    assert sweep.resolve_devices([np.int64(2), 0]) == ["2", "0"] and sweep.resolve_devices(" 1 ,2") == ["1", "2"]
    assert sweep.resolve_devices(None) is None and sweep.resolve_devices("") is None  # "": a notebook's unset str
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert sweep.resolve_devices("auto") is None  # no device: CPU workers, as without devices
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    import torch

    count = torch.cuda.device_count()
    assert sweep.visible_devices() == ([str(i) for i in range(count)], "torch.cuda.device_count()")
    assert sweep.resolve_devices("auto") == ([str(i) for i in range(count)] or None)


def test_cli_devices_executor_and_slurm_options():
    args = _cli(
        "nb.ipynb", "--name", "n", "--devices", "0,1", "--executor", "slurm",
        "--slurm", "partition=gpu", "--slurm", "time=240", "--slurm", "cpus-per-task=8", "--slurm", "mem=64G",
        "--slurm", "setup=['module load cuda']",
    )  # fmt: skip
    assert (args.devices, args.executor, args.workers) == ("0,1", "slurm", None)
    assert sweep._slurm_from_args(args) == {
        "partition": "gpu", "time": 240, "cpus_per_task": 8, "mem": "64G", "setup": ["module load cuda"]
    }  # fmt: skip
    for bad in ("time", "time=1,cpus_per_task=2=3", "=3"):
        with pytest.raises(SweepError, match="--slurm expects KEY=VALUE"):
            sweep._slurm_from_args(_cli("nb.ipynb", "--name", "n", "--slurm", bad, "--slurm", "time=2"))


def test_sigterm_to_a_running_point_records_it_as_interrupted_and_a_rerun_redoes_it(tmp_path):
    root, log, go = tmp_path / "runs", tmp_path / "executions.log", tmp_path / "go"
    points = [{"x": 1.0, "wait_for": str(go)}, {"x": 2.0}]  # one worker: the second point runs after the first
    held, other = run_ids(points)
    outcome: dict[str, sweep.SweepResult] = {}

    def run() -> None:
        outcome["res"] = run_sweep(TOY, "sig", points, base={"log_path": str(log)}, out_root=root, progress=False)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 90
    while not (log.exists() and held in _executions(log)):
        assert thread.is_alive() and time.monotonic() < deadline, "the held point never started"
        time.sleep(0.1)
    pids = json.loads((root / "sig" / held / "pids.json").read_text())
    # To the worker, as a scheduler or a user would: it passes SIGTERM on to the kernel, where the notebook stops
    # like a preempted training run (sys.exit(75)).
    os.kill(pids["parent"], signal.SIGTERM)
    thread.join(90)
    res = outcome["res"]

    assert res.interrupted == [held] and res.failed == [held] and res.ok == [other]
    assert res.results[held]["error"] == "SystemExit: 75 (SIGTERM received)"
    assert res.index["points"][0]["status"] == "interrupted"
    # The worker survived and ran the next point.
    assert json.loads((root / "sig" / other / "pids.json").read_text())["parent"] == pids["parent"]

    go.touch()
    again = run_sweep(TOY, "sig", points, base={"log_path": str(log)}, out_root=root, progress=False)
    assert again.ok == [held, other] and again.interrupted == []
    assert _executions(log) == {held: 2, other: 1}


def test_submitit_local_sweep_records_jobs_and_failures_and_reruns_only_what_is_missing(tmp_path, capsys):
    root, log = tmp_path / "runs", tmp_path / "executions.log"
    points = [{"x": 1.0}, {"x": 2.0, "fail": True}]
    ok, bad = run_ids(points)
    res = run_sweep(TOY, "jobs", points, base={"log_path": str(log)}, executor="submitit-local", out_root=root,
                    progress=False)  # fmt: skip

    assert res.ok == [ok] and res.failed == [bad] and res.interrupted == []
    assert res.results[bad]["error"] == "RuntimeError: deliberate failure at x=2.0"
    index = json.loads((root / "jobs" / "index.json").read_text())
    assert index["executor"] == "submitit-local"
    job_ids = {p["run_id"]: p["job_id"] for p in index["points"]}
    assert all(job_ids.values()) and len(set(job_ids.values())) == 2
    for rid, job_id in job_ids.items():
        assert res.results[rid]["job_id"] == job_id
        assert (root / "jobs" / "submitit" / job_id / f"{job_id}_0_log.out").exists()
    assert res.results[ok]["cuda_visible_devices"] == ""  # submitit's local jobs see no GPU

    # The same sweep again from the command line: only the failed point is submitted again.
    points_file = tmp_path / "points.json"
    points_file.write_text(json.dumps(points))
    argv = [str(TOY), "--name", "jobs", "--out-root", str(root), "--set", f"log_path={log}", "--no-progress",
            "--executor", "submitit-local", "--points", str(points_file)]  # fmt: skip
    assert sweep.run(_cli(*argv)) == 1
    assert "1 ok, 1 failed" in capsys.readouterr().out
    assert _executions(log) == {ok: 1, bad: 2}
    again = load_sweep(root / "jobs")
    assert again.index["points"][0]["job_id"] == job_ids[ok]
    assert again.index["points"][1]["job_id"] not in (None, job_ids[bad])


FAKE_SBATCH = """#!/bin/bash
# sbatch as far as submitit needs it: keep the script, run each array task in the background, print the job id.
[[ -n $FAKE_SBATCH_ERROR ]] && { echo "sbatch: error: $FAKE_SBATCH_ERROR" >&2; exit 1; }
cp "$1" "$FAKE_SLURM_DIR/job.sh"
last=$(sed -n 's/^#SBATCH --array=0-\\([0-9]*\\).*/\\1/p' "$1")
for i in $(seq 0 "${last:-0}"); do
    SLURM_JOB_ID=$((4243 + i)) SLURM_ARRAY_JOB_ID=4242 SLURM_ARRAY_TASK_ID=$i bash "$1" >/dev/null 2>&1 &
done
echo "Submitted batch job 4242"
"""
FAKE_SRUN = """#!/bin/bash
while [[ $1 == --* ]]; do [[ $1 == --unbuffered ]] && shift || shift 2; done
exec "$@"
"""


def test_slurm_sweep_submits_one_job_array_with_the_given_options(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(tmp_path))
    monkeypatch.setattr("lorekit.sweep_cluster.POLL_S", {"slurm": 0.5})
    points = [{"x": 1.0}, {"x": 2.0}]
    for options, match in (
        ({"partition": "gpu"}, "needs a time limit per point"),
        ({"time": 30, "gpu": 1}, r"Unavailable parameter\(s\): \['gpu'\]"),
    ):
        with pytest.raises(SweepError, match=match):
            run_sweep(TOY, "slurm", points, executor="slurm", slurm=options, out_root=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()
    monkeypatch.setenv("FAKE_SBATCH_ERROR", "invalid partition specified: gpu")
    with pytest.raises(SweepError, match="submitting the jobs failed: .*invalid partition specified: gpu"):
        run_sweep(TOY, "slurm", points, executor="slurm", slurm={"time": 30}, out_root=tmp_path / "runs")
    monkeypatch.delenv("FAKE_SBATCH_ERROR")

    options = {"partition": "gpu", "time": 30, "gpus-per-node": 1, "cpus_per_task": 2, "mem": "1G",
               "account": "proj", "array_parallelism": 2}  # fmt: skip
    res = run_sweep(TOY, "slurm", points, executor="slurm", slurm=options, out_root=tmp_path / "runs", progress=False)

    assert res.ok == run_ids(points)
    assert [p["job_id"] for p in res.index["points"]] == ["4242_0", "4242_1"]
    assert [r["job_id"] for r in res.results.values()] == ["4242_0", "4242_1"]
    script = (tmp_path / "job.sh").read_text()
    for flag in ("--partition=gpu", "--time=30", "--gpus-per-node=1", "--cpus-per-task=2", "--mem=1G",
                 "--account=proj", "--array=0-1%2", "--signal=USR1@90"):  # fmt: skip
        assert f"#SBATCH {flag}\n" in script


def test_cluster_executors_need_submitit_and_slurm(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    with pytest.raises(SweepError, match="needs SLURM's sbatch and srun on PATH"):
        run_sweep(TOY, "s", [{"x": 1.0}], executor="slurm", slurm={"time": 10}, out_root=tmp_path / "runs")
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed
    with pytest.raises(SweepError, match=r"executor='submitit-local' needs submitit: pip install 'lorekit\[cluster\]'"):
        run_sweep(TOY, "s", [{"x": 1.0}], executor="submitit-local", out_root=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()
