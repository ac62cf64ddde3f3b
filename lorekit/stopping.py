"""Why a run stops before its last step, and how it stops cleanly.

Signals. Ctrl-C (SIGINT), SIGTERM and SIGUSR1 (what SLURM sends before a time limit or a preemption)
only set a flag; the training loop reads it at every step boundary (agreed over all ranks), writes a
checkpoint there and raises `Interrupted`. The command line turns that into one line and a distinct
exit code: 75 (EX_TEMPFAIL, "try again": sweeps and job schedulers redo the run, `--resume` continues
it) for SIGTERM and SIGUSR1, 130 for Ctrl-C. A second Ctrl-C stops at once.

Divergence. A non-finite loss term, multiplier, gradient norm or parameter raises `Diverged` naming the
step and the term; the last checkpoint written before it is kept, and no non-finite weights are saved.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

PREEMPTED = 75  # EX_TEMPFAIL
CTRL_C = 130  # 128 + SIGINT, the shell's convention
DIVERGED = 3
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class RunStopped(RuntimeError):
    """A run ended before its last step; `exit_code` is what the command line returns."""

    exit_code = 1


class Interrupted(RunStopped):
    """A signal stopped the run at a step boundary, after a checkpoint there."""

    def __init__(self, signum: int, step: int, steps: int, run: Path) -> None:
        self.signum, self.step = signum, step
        self.exit_code = CTRL_C if signum == signal.SIGINT else PREEMPTED
        super().__init__(f"{signal.Signals(signum).name} at step {step}/{steps}: checkpoint written to "
                         f"{run}; continue with --resume (resume=True)")


class Diverged(RunStopped):
    """A non-finite value appeared at `step`; the run stopped without saving it."""

    exit_code = DIVERGED

    def __init__(self, step: int, term: str, value: float, checkpoint: str) -> None:
        self.step, self.term = step, term
        super().__init__(f"diverged at step {step}: {term} is {value}; nothing from this step was saved, "
                         f"{checkpoint}. Lower lr (or dual_lr) and start a new run")


class StopFlag:
    """Set by SIGINT / SIGTERM / SIGUSR1 while `installed()`; the loop reads `signum` at step boundaries."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum
        if signum == signal.SIGINT:  # a second Ctrl-C: the default handler, KeyboardInterrupt at once
            signal.signal(signal.SIGINT, signal.default_int_handler)

    @contextmanager
    def installed(self) -> Iterator["StopFlag"]:
        """Catch the signals for the duration (main thread only: elsewhere Python cannot set handlers)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
