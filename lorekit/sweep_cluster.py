"""Sweep points as submitit jobs: one SLURM job per point, or local submitit processes to try a cluster sweep.

:func:`lorekit.sweep.run_sweep` with ``executor="slurm"`` submits every point not done yet as one job array (at most
``array_parallelism`` running at once), writes the job ids into ``index.json``, waits, and records each point's
result as its job ends. A job runs its point exactly as a local worker does, on the shared file system: same run
directory, ``result.json`` and ``index.json``. submitit's own files (the pickled call and result, the job's
stdout/stderr as ``<job-id>_0_log.out``/``.err``) go to ``<sweep>/submitit/<job-id>/``.

``executor="submitit-local"`` runs the same jobs as processes on this machine, all at once and without GPUs
(submitit's local executor hides them): it needs no cluster, for tests and for trying a sweep before submitting it.

submitit is an optional dependency (``pip install 'lorekit[cluster]'``), imported only here.
"""

from __future__ import annotations

import shutil
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .sweep import SweepError, _Point, _record_failure, _run_point, _use_own_kernelspec

if TYPE_CHECKING:
    import submitit

# How often the submitting process looks for finished jobs. On SLURM each look touches every job's folder on the
# shared file system, so not often.
POLL_S = {"slurm": 10.0, "submitit-local": 0.5}
# submitit kills a local job after timeout_min (default 2 minutes); a point has no time limit, as in a worker.
LOCAL_TIMEOUT_MIN = 7 * 24 * 60
# Job states (SLURM's, and a local job killed by a signal) of a job stopped from outside, not failing by itself.
INTERRUPTED_STATES = frozenset({"PREEMPTED", "CANCELLED", "NODE_FAIL", "REQUEUED", "INTERRUPTED"})


def _run_job(point: _Point, forward_signals: bool) -> dict[str, Any]:
    """A point inside its job (this is what is pickled and submitted)."""
    import submitit

    _use_own_kernelspec()
    return _run_point(point, forward_signals=forward_signals, job_id=submitit.JobEnvironment().job_id)


class JobRunner:
    """Runs sweep points as submitit jobs of one kind, its options checked when it is made.

    ``kind`` is ``"slurm"`` or ``"submitit-local"``. ``options`` (SLURM only) are submitit's SlurmExecutor
    parameters, i.e. sbatch options with ``_`` for ``-`` (either spelling is accepted): ``time`` (minutes, or
    ``"D-HH:MM:SS"``; required, as submitit's default is 5 minutes), ``partition``, ``gpus_per_node``,
    ``cpus_per_task``, ``mem`` (``"64G"``), ``account``, ``qos``, ``constraint``, ``array_parallelism`` (jobs running
    at once), ``setup`` (shell lines run first, e.g. ``["module load cuda"]``), ``additional_parameters`` (any other
    sbatch option, e.g. ``{"requeue": True}``). ``folder`` receives submitit's files.
    """

    executor: submitit.Executor

    def __init__(self, kind: str, options: Mapping[str, Any], folder: Path) -> None:
        try:
            import submitit
        except ImportError:
            raise SweepError(
                f"executor={kind!r} needs submitit: pip install 'lorekit[cluster]' (or 'submitit>=1.5')"
            ) from None
        self.kind = kind
        if kind == "submitit-local":
            if options:
                raise SweepError(f"slurm options {dict(options)} need executor='slurm'")
            self.executor = submitit.LocalExecutor(folder / "%j")
            self.executor.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN)
            return
        params = {key.replace("-", "_"): value for key, value in options.items()}
        if "time" not in params:
            raise SweepError(
                "executor='slurm' needs a time limit per point: slurm option time=MINUTES (or 'D-HH:MM:SS'); "
                "submitit's default is 5 minutes"
            )
        # Near its time limit SLURM signals every process of a job, the kernel included: send SIGUSR1, which a training
        # run stops on (checkpoint, exit 75), rather than submitit's SIGUSR2, which would just kill the kernel.
        extra = dict(params.pop("additional_parameters", None) or {})
        extra.setdefault("signal", f"USR1@{params.get('signal_delay_s', 90)}")
        params["additional_parameters"] = extra
        if shutil.which("sbatch") is None or shutil.which("srun") is None:
            raise SweepError(
                "executor='slurm' needs SLURM's sbatch and srun on PATH (run the sweep on a login node); "
                "executor='submitit-local' runs the same jobs on this machine"
            )
        self.executor = submitit.SlurmExecutor(folder / "%j")
        try:
            self.executor.update_parameters(**params)
        except ValueError as exc:  # names every valid option
            raise SweepError(f"slurm options: {exc}") from None

    def run(
        self,
        points: list[_Point],
        *,
        submitted: Callable[[Mapping[str, str]], None],
        record: Callable[[_Point, dict[str, Any]], None],
    ) -> None:
        """Submit every point (one job array), pass the job ids to ``submitted``, then ``record`` each point's result
        as its job ends.

        A job that ends without a result (killed, out of time or memory, its node lost) is recorded as failed, or as
        interrupted when it was stopped from outside (preempted, cancelled). Leaving early (Ctrl-C) cancels the jobs
        still queued or running, so that none outlives the sweep to race its re-run.
        """
        # A SLURM job's processes are all signalled by SLURM; a local job's kernel only sees what is passed on.
        forward = self.kind != "slurm"
        try:
            with self.executor.batch():
                jobs = [self.executor.submit(_run_job, point, forward) for point in points]
        except Exception as exc:  # sbatch refused the array (e.g. an unknown partition): nothing was submitted
            raise SweepError(f"submitting the jobs failed: {exc}") from exc
        submitted({point.run_id: job.job_id for job, point in zip(jobs, points, strict=True)})
        waiting = list(zip(jobs, points, strict=True))
        try:
            while waiting:
                running = []
                for job, point in waiting:
                    if job.done():
                        record(point, self._outcome(job, point))
                    else:
                        running.append((job, point))
                waiting = running
                if waiting:
                    time.sleep(POLL_S[self.kind])
        except BaseException:
            for job, _ in waiting:
                job.cancel(check=False)
            raise

    @staticmethod
    def _outcome(job: submitit.Job[dict[str, Any]], point: _Point) -> dict[str, Any]:
        """The point's result, or a failed/interrupted one written in its place if the job ended without one."""
        try:
            return job.result()
        except Exception:
            state = (job.state or "UNKNOWN").split()[0]  # e.g. "CANCELLED by 1234"
            return _record_failure(
                Path(point.run_dir),
                point.run_id,
                point.params,
                f"job {job.job_id} ended without a result (state {state}); its log: {job.paths.stderr}",
                traceback.format_exc(),
                status="interrupted" if state in INTERRUPTED_STATES else "failed",
                job_id=job.job_id,
            )
