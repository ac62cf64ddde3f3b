"""Parameter sweeps over notebooks: run a papermill notebook once per point of a grid, in worker processes or jobs.

Layout written by :func:`run_sweep`::

    <out_root>/<sweep>/index.json                 notebook, base parameters, every point's run id/status/job id
    <out_root>/<sweep>/<run-id>/<notebook>.ipynb  the executed notebook (kept on failure; never widget state)
    <out_root>/<sweep>/<run-id>/result.json       status, parameters, wall time, error, the notebook's own results
    <out_root>/<sweep>/<run-id>/...               anything else the notebook writes: it runs with cwd = its run dir

Notebook convention: a cell tagged ``parameters`` declares every parameter; the notebook may write a
``results.json`` into its working directory, which is copied into ``result.json`` under ``"results"``.

Running a sweep again skips points whose ``result.json`` says ok for identical parameters and redoes the rest
(failed, interrupted and new points, and points left without a result by a killed run).

Where points run (see :func:`run_sweep`): worker processes on this machine (default), one per GPU with ``devices``,
or one submitit job per point (``executor="slurm"``, see :mod:`lorekit.sweep_cluster`).

Python::

    points = grid(method=["lore"], rho=[0.01, 0.05]) + grid(method=["fare-reg"], lam=[0.1, 1.0]) + [{"method": "fare"}]
    res = run_sweep("notebooks/02_train.ipynb", "rho-lam", points, base={"steps": 20, "out_dir": "."}, workers=2)

Command line (``python -m lorekit sweep``, see :func:`add_arguments`)::

    python -m lorekit sweep notebooks/02_train.ipynb --name rho --grid rho=0.01,0.05,0.1 --grid method=lore \\
        --set steps=20 --set out_dir=. --workers 2
    python -m lorekit sweep ... --devices auto                      # one point per visible GPU at a time
    python -m lorekit sweep ... --executor slurm --slurm partition=gpu --slurm time=240 --slurm gpus_per_node=1

(Notebook 2 writes its run and ``results.json`` under ``out_dir`` relative to its cwd; ``.`` is the point's
directory.)
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import itertools
import json
import multiprocessing
import numbers
import os
import re
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from multiprocessing.queues import SimpleQueue
from pathlib import Path
from typing import Any, NamedTuple

INDEX_FILE = "index.json"
RESULT_FILE = "result.json"
NOTEBOOK_RESULTS_FILE = "results.json"
WIDGET_STATE_MIME = "application/vnd.jupyter.widget-state+json"
MAX_RUN_ID_LENGTH = 120
EXECUTORS = ("local", "slurm", "submitit-local")
# sysexits.h EX_TEMPFAIL: the exit code of a training run stopped by SIGTERM/SIGUSR1 (preempted, try again).
EX_TEMPFAIL = 75
# The signals a training run stops on (Windows has no SIGUSR1).
PREEMPTION_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))
# Kernels starting at the same time on one machine (workers, or jobs sharing a node) can be handed the same free TCP
# port, and one of them dies at start-up ("Address already in use"): a point whose kernel never ran is started again.
KERNEL_START_ATTEMPTS = 3

_SWEEP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=,-]*")
_UNSAFE = re.compile(r"[^A-Za-z0-9.,+-]+")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class SweepError(ValueError):
    """A sweep request that cannot be run as given (unknown parameter, bad value, name clash, ...)."""


@dataclass
class SweepResult:
    """A sweep's index and the ``result.json`` of each point that has one, keyed by run id in point order."""

    sweep_dir: Path
    index: dict[str, Any]
    results: dict[str, dict[str, Any]]

    @property
    def ok(self) -> list[str]:
        """Run ids of the points that finished without error."""
        return [rid for rid, res in self.results.items() if res["status"] == "ok"]

    @property
    def failed(self) -> list[str]:
        """Run ids of the points that ran and did not finish ok: their notebook raised, their worker or job died, or
        they were interrupted (a subset, see :attr:`interrupted`). A re-run of the sweep redoes all of them."""
        return [rid for rid, res in self.results.items() if res["status"] != "ok"]

    @property
    def interrupted(self) -> list[str]:
        """Run ids of the points stopped from outside (preempted, signalled, job cancelled) rather than failing."""
        return [rid for rid, res in self.results.items() if res["status"] == "interrupted"]

    def rows(self) -> list[dict[str, Any]]:
        """One flat dict per finished point (parameters, then the notebook's results), e.g. for a DataFrame."""
        return [
            {
                "run_id": rid,
                "status": res["status"],
                "wall_time_s": res["wall_time_s"],
                **res["parameters"],
                **(res.get("results") or {}),
            }
            for rid, res in self.results.items()
        ]


# --------------------------------------------------------------------------------------------- points


def grid(**lists: Iterable[Any]) -> list[dict[str, Any]]:
    """Cartesian product of value lists, e.g. ``grid(rho=[0.01, 0.1], method=["lore"])`` -> 2 points.

    Several grids concatenate into one sweep: ``grid(...) + grid(...) + [{...}]``.
    """
    values = {}
    for name, vals in lists.items():
        # A bare string would silently become one point per character.
        if isinstance(vals, (str, bytes, Mapping)) or not isinstance(vals, Iterable):
            raise SweepError(f"grid({name}=...) needs a list of values, got {type(vals).__name__} {vals!r}")
        values[name] = list(vals)
        if not values[name]:
            raise SweepError(f"grid({name}=[]) has no values")
    return [dict(zip(values, combo, strict=True)) for combo in itertools.product(*values.values())]


def to_builtin(value: Any, name: str = "value") -> Any:
    """Cast a parameter value to the builtins papermill injects as literals (it injects anything else as a string).

    numpy scalars -> int/float/bool/str, tuples and arrays -> lists; dict keys must be strings.
    Raises :class:`SweepError` naming the parameter for anything else (paths, objects, complex numbers...).
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if getattr(value, "shape", None) == () and hasattr(value, "item"):
        if getattr(getattr(value, "dtype", None), "kind", None) == "f":
            # numpy's str() is the shortest repr for the dtype: float32(0.05) -> 0.05, not 0.05000000074505806.
            return float(str(value))
        item = value.item()
        if type(item) in (bool, int, float, str):
            return item
    elif hasattr(value, "tolist") and hasattr(value, "ndim"):
        return to_builtin(value.tolist(), name)
    if isinstance(value, (list, tuple)):
        return [to_builtin(v, f"{name}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        bad_keys = [k for k in value if not isinstance(k, str)]
        if bad_keys:
            raise SweepError(f"parameter {name!r}: dict keys must be strings, got {bad_keys[0]!r}")
        return {k: to_builtin(v, f"{name}[{k!r}]") for k, v in value.items()}
    raise SweepError(
        f"parameter {name!r}: cannot pass {type(value).__name__} {value!r} to a notebook; "
        "use None, str, bool, int, float, or lists/dicts of those"
    )


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


def _short_hash(point: Mapping[str, Any]) -> str:
    return hashlib.sha1(_canonical(point).encode()).hexdigest()[:8]


def _format_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return repr(value)  # int, float (0.05, 1e-05), bool, None


def _sanitize(text: str) -> str:
    return _UNSAFE.sub("+", text).strip("+.")


def run_id(point: Mapping[str, Any]) -> str:
    """Readable, filesystem-safe name of one point: ``{"rho": 0.05, "method": "lore"}`` -> ``method-lore_rho-0.05``.

    Keys are sorted, so the id does not depend on the order they were given in; base parameters are not part of it.
    Long ids are cut and end in a hash of the point. :func:`run_ids` also makes ids unique within a sweep.
    """
    if not point:
        return "base"
    rid = "_".join(f"{_sanitize(k)}-{_sanitize(_format_value(to_builtin(point[k], k)))}" for k in sorted(point))
    if len(rid) > MAX_RUN_ID_LENGTH:
        rid = f"{rid[: MAX_RUN_ID_LENGTH - 9]}~{_short_hash(point)}"
    return rid


def run_ids(points: list[Mapping[str, Any]]) -> list[str]:
    """:func:`run_id` of every point; points whose ids collide after sanitising get a hash suffix."""
    ids = [run_id(p) for p in points]
    # Compared case-blind: "x-A" and "x-a" are one directory on macOS and Windows.
    folded = [rid.casefold() for rid in ids]
    return [
        f"{rid}~{_short_hash(to_builtin(p))}" if folded.count(rid.casefold()) > 1 else rid
        for rid, p in zip(ids, points, strict=True)
    ]


# ----------------------------------------------------------------------------------------- notebook


def _literal_or_text(source: str) -> Any:
    try:
        return ast.literal_eval(source)
    except (ValueError, SyntaxError):
        return source


def notebook_parameters(notebook: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The notebook's ``parameters`` cell as ``{name: {"default", "type", "help"}}``.

    ``default`` is the Python value where the default is a literal, else its source text (e.g. ``"np.pi"``);
    ``type`` is papermill's inferred type name (from an annotation, else None); ``help`` the trailing comment.
    """
    import papermill  # slow import (~1 s): only where a notebook is touched

    path = Path(notebook)
    if not path.is_file():
        raise SweepError(f"notebook not found: {path}")
    try:
        found = papermill.inspect_notebook(str(path))
    except Exception as exc:  # nbformat raises JSON, schema and conversion errors of unrelated types
        reason = f"{type(exc).__name__}: {exc}"
        raise SweepError(f"notebook {path}: cannot read it as a Jupyter notebook ({reason})") from None
    return {
        name: {"default": _literal_or_text(p["default"]), "type": p["inferred_type_name"], "help": p["help"]}
        for name, p in found.items()
    }


def _validate(
    notebook: Path, points: list[Mapping[str, Any]], base: Mapping[str, Any]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Check names against the parameters cell and cast values; returns (base, points) as builtins."""
    if not isinstance(points, list) or not all(isinstance(p, Mapping) for p in points):
        raise SweepError("points must be a list of dicts (see grid())")
    if not points:
        raise SweepError("the sweep has no points")
    known = notebook_parameters(notebook)
    given = set(base).union(*points)
    unknown = sorted(given - set(known), key=str)
    if unknown:
        listed = ", ".join(known) if known else "none: the notebook has no cell tagged 'parameters'"
        raise SweepError(
            f"unknown parameter(s) for {notebook.name}: {', '.join(map(str, unknown))}; "
            f"the notebook's parameters are: {listed}"
        )
    base_c = {k: to_builtin(v, k) for k, v in base.items()}
    points_c = [{k: to_builtin(v, k) for k, v in p.items()} for p in points]
    seen: dict[str, int] = {}
    for i, p in enumerate(points_c):
        j = seen.setdefault(_canonical(p), i)
        if j != i:
            raise SweepError(f"points {j} and {i} are identical: {p}")
    return base_c, points_c


def strip_widget_state(nb: Any) -> bool:
    """Remove saved widget state (``metadata.widgets`` and widget-state outputs) from a notebook node in place.

    Widget views (tiny references to a model) stay. Returns whether anything was removed.
    """
    changed = nb.metadata.pop("widgets", None) is not None
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.get("data", {}).pop(WIDGET_STATE_MIME, None) is not None:
                changed = True
    return changed


# ------------------------------------------------------------------------------------------- points


class _Point(NamedTuple):
    """One point's call of :func:`_run_point`, as sent to a worker process or pickled into a submitit job."""

    notebook: str
    run_dir: str
    run_id: str
    params: dict[str, Any]
    kernel_name: str | None
    timeout: float | None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _write_json(path: Path, obj: Any) -> None:
    """Atomic write: readers (and a re-run after a kill) never see a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _use_own_kernelspec() -> None:
    # Kernel "python3" must be this interpreter's ipykernel, not a same-named kernelspec found first elsewhere
    # (JUPYTER_PATH entries, or the user's directory outside a virtualenv): JUPYTER_PATH is searched first.
    own = str(Path(sys.prefix) / "share" / "jupyter")
    os.environ["JUPYTER_PATH"] = os.pathsep.join(p for p in (own, os.environ.get("JUPYTER_PATH")) if p)


@contextmanager
def _preemption_signals(forward: bool) -> Iterator[list[str]]:
    """Catch SIGTERM/SIGUSR1 while a point runs and list their names, so that the process running the point lives on
    to record it as interrupted (a worker then takes the next point).

    With ``forward`` the signal is passed on to the kernel, where a training run checkpoints and exits with
    EX_TEMPFAIL: the kernel runs in a session of its own and would not see a signal meant for the point. Under SLURM
    every process of a job is signalled by SLURM itself, so jobs do not forward.
    """
    received: list[str] = []
    if forward:
        import psutil  # an ipykernel dependency; imported here, not inside the handler, which can run mid-import

    def handle(signum: int, _frame: object) -> None:
        received.append(signal.Signals(signum).name)
        if forward:
            for child in psutil.Process().children():
                try:
                    child.send_signal(signum)
                except psutil.NoSuchProcess:
                    pass

    previous = {sig: signal.signal(sig, handle) for sig in PREEMPTION_SIGNALS}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _kernel_ran(output: Path) -> bool:
    """Whether papermill's output notebook shows a cell started, i.e. the kernel came up."""
    import nbformat

    if not output.exists():
        return False
    return any(cell.metadata.get("papermill", {}).get("start_time") for cell in nbformat.read(output, 4).cells)


def _papermill(point: _Point, output: Path, received: list[str]) -> None:
    """Execute the point's notebook into ``output``, starting the kernel again if it died before running a cell
    (unless a preemption signal, listed in ``received``, was what stopped it)."""
    import papermill

    for attempt in range(1, KERNEL_START_ATTEMPTS + 1):
        try:
            papermill.execute_notebook(
                point.notebook,
                str(output),
                parameters=point.params,
                cwd=point.run_dir,
                kernel_name=point.kernel_name,
                execution_timeout=point.timeout,
                progress_bar=False,
                store_widget_state=False,  # nbclient option: do not collect widget state in the first place
            )
            return
        except papermill.PapermillExecutionError:
            raise
        except Exception:
            if attempt == KERNEL_START_ATTEMPTS or received or _kernel_ran(output):
                raise


def _execute(
    point: _Point, output: Path, stderr_log: Path, received: list[str]
) -> tuple[str | None, str | None, bool]:
    """Run the notebook with papermill: (error, traceback, stopped), ``stopped`` when the notebook was stopped from
    outside (a training run's preemption exit, or SIGINT to the kernel) rather than failing by itself."""
    import papermill

    error = trace = None
    stopped = False
    # The kernel inherits fd 2: its start-up warning (one per point) would garble the progress bar, and a dying
    # kernel's last words belong with the point. Kept in stderr.log, removed when empty.
    saved_stderr = os.dup(2)
    with open(stderr_log, "w") as log:
        os.dup2(log.fileno(), 2)
        try:
            _papermill(point, output, received)
        except papermill.PapermillExecutionError as exc:
            error, trace = f"{exc.ename}: {exc.evalue}", _ANSI.sub("", str(exc)).strip()
            # sys.exit(EX_TEMPFAIL) in a cell surfaces as a SystemExit error, the kernel living on.
            stopped = exc.ename == "KeyboardInterrupt" or (exc.ename, exc.evalue) == ("SystemExit", str(EX_TEMPFAIL))
        except Exception as exc:  # kernel death, cell timeout, unreadable notebook: recorded, never fatal to the sweep
            error, trace = f"{type(exc).__name__}: {exc}", traceback.format_exc()
        finally:
            sys.stderr.flush()
            os.dup2(saved_stderr, 2)
            os.close(saved_stderr)
    return error, trace, stopped


def _run_point(point: _Point, *, forward_signals: bool = True, job_id: str | None = None) -> dict[str, Any]:
    """Execute one point in its own directory (in a worker process or a job); writes and returns its result.json.

    Status ``ok``, ``failed``, or ``interrupted``: stopped by a preemption signal to this process (see
    :func:`_preemption_signals`) or from inside the notebook by a training run's preemption exit.
    """
    import nbformat

    run_path = Path(point.run_dir)
    # Outputs of a failed or killed attempt must not leak into this one.
    shutil.rmtree(run_path, ignore_errors=True)
    run_path.mkdir(parents=True)
    output = run_path / Path(point.notebook).name
    stderr_log = run_path / "stderr.log"
    started_at, t0 = _now(), time.perf_counter()
    # Also while the result is written: a signal then must not kill the worker either.
    with _preemption_signals(forward_signals) as received:
        error, trace, stopped = _execute(point, output, stderr_log, received)
        wall = time.perf_counter() - t0
        if stderr_log.stat().st_size == 0:
            stderr_log.unlink()

        if output.exists():
            nb = nbformat.read(output, as_version=4)
            if strip_widget_state(nb):
                nbformat.write(nb, output)
        nb_results = None
        results_path = run_path / NOTEBOOK_RESULTS_FILE
        if results_path.exists():
            try:
                nb_results = json.loads(results_path.read_text())
            except ValueError as exc:
                error = error or f"{NOTEBOOK_RESULTS_FILE} written by the notebook is not valid JSON: {exc}"
        status = "ok"
        if error is not None:
            status = "interrupted" if stopped or received else "failed"
            if received:
                error = f"{error} ({', '.join(received)} received)"
        result = {
            "run_id": point.run_id,
            "status": status,
            "parameters": point.params,
            "notebook": output.name,
            "started_at": started_at,
            "wall_time_s": round(wall, 3),
            "error": error,
            "traceback": trace,
            "results": nb_results,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "job_id": job_id,
        }
        _write_json(run_path / RESULT_FILE, result)
    return result


def _record_failure(
    run_dir: Path,
    rid: str,
    params: dict[str, Any],
    error: str,
    trace: str,
    *,
    status: str = "failed",
    job_id: str | None = None,
) -> dict[str, Any]:
    """Write and return the result of a point that ended outside its notebook (its worker or job died)."""
    result = {
        "run_id": rid,
        "status": status,
        "parameters": params,
        "notebook": None,
        "started_at": None,
        "wall_time_s": None,
        "error": error,
        "traceback": trace,
        "results": None,
        "cuda_visible_devices": None,
        "job_id": job_id,
    }
    run_dir.mkdir(exist_ok=True)
    _write_json(run_dir / RESULT_FILE, result)
    return result


# ------------------------------------------------------------------------------------------ devices


def visible_devices() -> tuple[list[str], str]:
    """The CUDA devices a worker can be pinned to, as CUDA_VISIBLE_DEVICES values, and where that list came from.

    An existing CUDA_VISIBLE_DEVICES (a SLURM allocation, a container) is the list: a worker must name one of its
    entries (indices or GPU/MIG UUIDs), since a child's CUDA_VISIBLE_DEVICES replaces its parent's rather than
    indexing into it. Otherwise the indices ``0 .. torch.cuda.device_count() - 1``.
    """
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        ids = []
        for entry in (e.strip() for e in listed.split(",")):
            if not entry or entry.startswith("-"):  # CUDA hides an invalid entry and all after it ("-1": none)
                break
            ids.append(entry)
        return ids, "CUDA_VISIBLE_DEVICES"
    import torch  # slow import (~1 s): only where devices are asked for

    return [str(i) for i in range(torch.cuda.device_count())], "torch.cuda.device_count()"


def resolve_devices(devices: str | Sequence[str | int] | None) -> list[str] | None:
    """The CUDA device ids to pin one worker each to, or None for CPU workers.

    ``None`` or ``""`` (a notebook's string parameter left empty): CPU workers. ``"auto"``: every visible device, None
    where there is none. Otherwise ids as a list or a comma-separated string (``"0,1,2,3"``), each visible (see
    :func:`visible_devices`) and given once.
    """
    if devices is None or devices == "":
        return None
    if devices == "auto":
        return visible_devices()[0] or None
    if isinstance(devices, str):
        ids = [d.strip() for d in devices.split(",")]
    elif isinstance(devices, Sequence) and all(
        isinstance(d, (str, numbers.Integral)) and not isinstance(d, bool) for d in devices
    ):
        ids = [str(d).strip() for d in devices]
    else:
        raise SweepError(f"devices must be 'auto', ids like '0,1,2,3', or a list of ids; got {devices!r}")
    if not ids or not all(ids):
        raise SweepError(f"devices {devices!r}: empty device id; give ids like '0,1,2,3', or 'auto'")
    repeated = sorted({d for d in ids if ids.count(d) > 1})
    if repeated:
        raise SweepError(f"devices {devices!r}: {', '.join(repeated)} given twice; a device runs one point at a time")
    visible, source = visible_devices()
    unknown = [d for d in ids if d not in visible]
    if unknown:
        raise SweepError(
            f"devices {devices!r}: unknown device id(s) {', '.join(unknown)}; "
            f"visible devices ({source}): {', '.join(visible) or 'none'}"
        )
    return ids


# ---------------------------------------------------------------------------------------- local pool


def _exit_with_parent(parent_pid: int) -> None:
    # A SIGKILLed sweep must not leave workers running points that would race a re-run. The kernel in turn
    # exits with its worker (ipykernel polls its parent, JPY_PARENT_PID).
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


def _init_worker(parent_pid: int, threads: int, devices: SimpleQueue | None) -> None:
    # Workers share the cores: more BLAS/OpenMP threads than cores makes spinning threads starve each other
    # (measured here: 2 processes x 2 threads on 2 cores ran a training step ~10x slower than 1 thread each).
    # The kernel inherits this environment.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(threads))
    if devices is not None:
        # This worker's one device for its whole life, so that a device runs one point at a time; set before
        # anything here touches CUDA, and inherited by every kernel the worker starts.
        os.environ["CUDA_VISIBLE_DEVICES"] = devices.get()
    _use_own_kernelspec()
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()


def _outcome(future: Future[dict[str, Any]], rid: str, params: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The point's result; if the worker failed outside the notebook (e.g. its process died), a failed result
    written in its place."""
    try:
        return future.result()
    except Exception as exc:
        return _record_failure(run_dir, rid, params, f"{type(exc).__name__}: {exc}", traceback.format_exc())


def _run_in_pool(
    points: list[_Point],
    workers: int,
    devices: list[str] | None,
    record: Callable[[_Point, dict[str, Any]], None],
) -> None:
    """Run the points in worker processes, ``workers`` at a time or one per device; ``record`` each result as it
    comes."""
    n = min(len(devices) if devices else workers, len(points))
    # spawn: papermill's cwd is a process-wide chdir, and forking a process with threads is unsafe.
    context = multiprocessing.get_context("spawn")
    device_queue = None
    if devices:
        # Each worker takes one device as it starts; the pool starts no more than n workers and never replaces one.
        device_queue = context.SimpleQueue()
        for device in devices[:n]:
            device_queue.put(device)
    pool = ProcessPoolExecutor(
        max_workers=n,
        mp_context=context,
        initializer=_init_worker,
        initargs=(os.getpid(), max(1, (os.cpu_count() or 1) // n), device_queue),
    )
    with pool:
        futures = {pool.submit(_run_point, point): point for point in points}
        try:
            for future in as_completed(futures):
                point = futures[future]
                record(point, _outcome(future, point.run_id, point.params, Path(point.run_dir)))
        except BaseException:
            # Ctrl-C: do not start the queued points (leaving the pool would otherwise wait for all of them).
            pool.shutdown(wait=False, cancel_futures=True)
            raise


# -------------------------------------------------------------------------------------------- sweep


def _index_entry(rid: str, point: dict[str, Any], result: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "run_id": rid,
        "params": point,
        "status": result["status"] if result else "pending",
        "wall_time_s": result["wall_time_s"] if result else None,
        "error": result["error"] if result else None,
        "job_id": result.get("job_id") if result else None,
    }


def _check_placement(
    executor: str, workers: int | None, devices: str | Sequence[str | int] | None, slurm: Mapping[str, Any] | None
) -> list[str] | None:
    """Check where points are to run; returns the device ids workers are pinned to (None: CPU workers or jobs)."""
    if executor not in EXECUTORS:
        raise SweepError(f"executor {executor!r} is not one of: {', '.join(EXECUTORS)}")
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
        raise SweepError(f"workers must be a positive integer, got {workers!r}")
    if executor != "local":
        if workers is not None or devices not in (None, ""):
            raise SweepError(
                f"workers and devices are for executor='local'; with executor={executor!r} each point is a job: "
                "ask SLURM for its GPU and how many run at once with slurm options gpus_per_node and array_parallelism"
            )
        return None
    if slurm:
        raise SweepError(f"slurm options {dict(slurm)} need executor='slurm'")
    ids = resolve_devices(devices)
    if ids and workers not in (None, len(ids)):
        raise SweepError(
            f"workers={workers} conflicts with devices {devices!r}: one worker runs per device ({len(ids)}); "
            "leave workers out"
        )
    return ids


def run_sweep(
    notebook: str | os.PathLike[str],
    sweep_name: str,
    points: list[Mapping[str, Any]],
    *,
    base: Mapping[str, Any] | None = None,
    workers: int | None = None,
    devices: str | Sequence[str | int] | None = None,
    executor: str = "local",
    slurm: Mapping[str, Any] | None = None,
    out_root: str | os.PathLike[str] = "papermill_runs",
    kernel_name: str | None = None,
    timeout: float | None = None,
    progress: bool = True,
) -> SweepResult:
    """Run ``notebook`` once per point with parameters ``{**base, **point}``.

    Where the points run (``executor``):

    * ``"local"`` (default): worker processes on this machine, ``workers`` at a time (default 1) splitting the CPU
      threads; or, with ``devices`` (``"auto"``: every visible CUDA device; or ids like ``"0,1,2,3"``), one worker
      per device, pinned to it through CUDA_VISIBLE_DEVICES, so N devices run N points at a time, one each.
      ``"auto"`` on a machine without CUDA devices means CPU workers. ``workers`` may be left out with ``devices``.
    * ``"slurm"``: one SLURM job per point, submitted as a job array through submitit, with the sbatch options in
      ``slurm`` (``time`` required; see :class:`lorekit.sweep_cluster.JobRunner`); this process waits for the jobs.
    * ``"submitit-local"``: the same jobs as local processes (all at once, without GPUs), to try a cluster sweep.

    Everything is validated before anything is written: unknown parameter names, values that papermill would
    inject as strings, identical points, an existing sweep of the same name made from a different notebook, device
    ids, SLURM options. Points already done (``result.json`` ok, identical parameters) are skipped; a point that
    fails or is interrupted is recorded and does not stop the others. ``kernel_name`` defaults to the notebook's
    kernelspec (``python3`` is resolved to this interpreter's ipykernel); ``timeout`` is papermill's per-cell
    execution timeout in seconds. Output directory: ``<out_root>/<sweep_name>/`` (``out_root`` relative to the
    current directory).
    """
    from filelock import FileLock, Timeout
    from tqdm.auto import tqdm

    if not isinstance(sweep_name, str) or not _SWEEP_NAME.fullmatch(sweep_name):
        raise SweepError(f"sweep name {sweep_name!r} must be a plain directory name (letters, digits, . _ + = , -)")
    device_ids = _check_placement(executor, workers, devices, slurm)
    nb_path = Path(notebook).resolve()
    base_c, points_c = _validate(nb_path, points, base or {})
    ids = run_ids(points_c)
    sweep_dir = Path(out_root).resolve() / sweep_name
    index_path = sweep_dir / INDEX_FILE
    previous = _read_json(index_path)
    if previous and previous.get("notebook") != str(nb_path):
        raise SweepError(
            f"sweep {sweep_name!r} in {sweep_dir} was made from {previous.get('notebook')}, not {nb_path}; "
            "choose another sweep name or delete that directory"
        )
    jobs = None
    if executor != "local":
        from .sweep_cluster import JobRunner

        jobs = JobRunner(executor, slurm or {}, sweep_dir / "submitit")

    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SweepError(f"out_root {str(out_root)!r}: cannot create the sweep's folder {sweep_dir} ({exc})") from None
    lock = FileLock(str(sweep_dir / ".lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise SweepError(f"sweep {sweep_name!r} is being run by another process ({sweep_dir})") from None
    try:
        results: dict[str, dict[str, Any]] = {}
        todo = []
        for rid, point in zip(ids, points_c, strict=True):
            params = {**base_c, **point}
            done = _read_json(sweep_dir / rid / RESULT_FILE)
            if done and done.get("status") == "ok" and _canonical(done.get("parameters")) == _canonical(params):
                results[rid] = done
            else:
                todo.append(_Point(str(nb_path), str(sweep_dir / rid), rid, params, kernel_name, timeout))
        index = {
            "sweep": sweep_name,
            "notebook": str(nb_path),
            "base": base_c,
            "executor": executor,
            "devices": device_ids,
            "created_at": previous.get("created_at", _now()) if previous else _now(),
            "updated_at": _now(),
            "points": [_index_entry(rid, p, results.get(rid)) for rid, p in zip(ids, points_c, strict=True)],
        }
        _write_json(index_path, index)
        if todo:
            position = {rid: i for i, rid in enumerate(ids)}
            counts = {"ok": len(results), "failed": 0, "interrupted": 0}
            bar = tqdm(total=len(ids), initial=len(results), desc=sweep_name, unit="point", disable=not progress)
            bar.set_postfix(counts)

            def submitted(job_ids: Mapping[str, str]) -> None:
                for rid, job_id in job_ids.items():
                    index["points"][position[rid]]["job_id"] = job_id
                _write_json(index_path, index)

            def record(point: _Point, result: dict[str, Any]) -> None:
                rid = point.run_id
                results[rid] = result
                index["points"][position[rid]] = _index_entry(rid, points_c[position[rid]], result)
                index["updated_at"] = _now()
                _write_json(index_path, index)
                counts[result["status"]] += 1
                bar.set_postfix(counts)
                bar.update()

            with bar:
                if jobs is None:
                    _run_in_pool(todo, workers or 1, device_ids, record)
                else:
                    jobs.run(todo, submitted=submitted, record=record)
        return SweepResult(sweep_dir, index, {rid: results[rid] for rid in ids if rid in results})
    finally:
        lock.release()


def load_sweep(sweep_dir: str | os.PathLike[str]) -> SweepResult:
    """Read a (finished or partial) sweep back: its index and the result.json of every point that has one."""
    sweep_path = Path(sweep_dir)
    index = _read_json(sweep_path / INDEX_FILE)
    if index is None:
        raise SweepError(f"no sweep index at {sweep_path / INDEX_FILE}")
    results = {}
    for entry in index["points"]:
        result = _read_json(sweep_path / entry["run_id"] / RESULT_FILE)
        if result is not None:
            results[entry["run_id"]] = result
    return SweepResult(sweep_path, index, results)


# ---------------------------------------------------------------------------------------------- CLI


def _parse_value(text: str) -> Any:
    """A Python literal (``0.1``, ``True``, ``[1, 2]``, ``None``), else the text itself as a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are outside brackets and quotes: ``"[1,2],'a,b',c"`` -> ``["[1,2]", "'a,b'", "c"]``."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def _split_assignment(text: str, option: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise SweepError(f"{option} expects NAME=VALUE, got {text!r}")
    return key.strip(), value


def _spec_from_args(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(points, base) from the parsed command line."""
    lists: dict[str, list[Any]] = {}
    for item in args.grid:
        key, text = _split_assignment(item, "--grid")
        parts = _split_top_level(text)
        if key in lists or not all(parts):
            raise SweepError(f"--grid {item!r}: give each name once, with non-empty comma-separated values")
        lists[key] = [_parse_value(p) for p in parts]
    base: dict[str, Any] = {}
    for item in args.fixed:
        key, text = _split_assignment(item, "--set")
        if key in base or key in lists:
            raise SweepError(f"--set {item!r}: {key} is already given")
        base[key] = _parse_value(text)
    points = grid(**lists) if lists else []
    if args.points is not None:
        extra = _read_json(args.points)
        if not isinstance(extra, list):
            raise SweepError(f"--points {args.points}: not a readable JSON list of objects")
        points += extra
    return points or [{}], base


def _slurm_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--slurm KEY=VALUE`` options as a dict; keys in sbatch (``cpus-per-task``) or submitit spelling."""
    options: dict[str, Any] = {}
    for item in args.slurm:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier() or key in options:
            raise SweepError(f"--slurm expects KEY=VALUE with each key once, got {item!r}")
        options[key] = _parse_value(text)
    return options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``sweep`` subcommand's arguments to ``parser``."""
    parser.add_argument("notebook", type=Path, help="notebook with a cell tagged 'parameters'")
    parser.add_argument("--name", required=True, help="sweep name; outputs go to OUT_ROOT/NAME/")
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="NAME=V1,V2,...",
        help="values to sweep (repeatable; the sweep is the product). Values are Python literals, else strings",
    )
    parser.add_argument(
        "--set", dest="fixed", action="append", default=[], metavar="NAME=VALUE", help="fixed parameter (repeatable)"
    )
    parser.add_argument(
        "--points", type=Path, help="JSON file with a list of points (objects), run in addition to the --grid product"
    )
    parser.add_argument(
        "--workers", type=int, help="points run in parallel on this machine (default 1; with --devices one per device)"
    )
    parser.add_argument(
        "--devices",
        metavar="auto|ID,ID,...",
        help="one worker per CUDA device, pinned to it: 'auto' (every visible device) or ids, e.g. 0,1,2,3",
    )
    parser.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="local",
        help="local: worker processes (default); slurm: one SLURM job per point (submitit); "
        "submitit-local: those jobs as local processes, to try a cluster sweep",
    )
    parser.add_argument(
        "--slurm",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="sbatch option for --executor slurm (repeatable), e.g. partition=gpu time=240 (minutes, required) "
        "gpus_per_node=1 cpus_per_task=8 mem=64G account=NAME array_parallelism=8",
    )
    parser.add_argument("--out-root", default="papermill_runs", help="folder that holds the sweep's folder")
    parser.add_argument("--kernel", dest="kernel_name", help="kernel name (default: the notebook's kernelspec)")
    parser.add_argument("--timeout", type=float, help="per-cell execution timeout in seconds")
    parser.add_argument("--no-progress", "--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run the sweep described by ``args`` and print one line per point.

    Returns the exit code: 0 all points ok, 1 some failed or were interrupted, 2 the request was invalid (nothing
    run).
    """
    try:
        points, base = _spec_from_args(args)
        res = run_sweep(
            args.notebook,
            args.name,
            points,
            base=base,
            workers=args.workers,
            devices=args.devices,
            executor=args.executor,
            slurm=_slurm_from_args(args),
            out_root=args.out_root,
            kernel_name=args.kernel_name,
            timeout=args.timeout,
            progress=not args.no_progress,
        )
    except SweepError as exc:
        print(f"lorekit sweep: error: {exc}", file=sys.stderr)
        return 2
    for entry in res.index["points"]:
        wall = "" if entry["wall_time_s"] is None else f"{entry['wall_time_s']:.1f}s"
        job = f"  job {entry['job_id']}" if entry["job_id"] else ""
        error = f"  {entry['error']}" if entry["error"] else ""
        print(f"{entry['status']:<11} {wall:>8}  {entry['run_id']}{job}{error}")
    interrupted = f" ({len(res.interrupted)} interrupted: re-run to redo)" if res.interrupted else ""
    print(f"{len(res.ok)} ok, {len(res.failed)} failed{interrupted}: {res.sweep_dir / INDEX_FILE}")
    return 1 if res.failed else 0
