"""Progress of a long phase (pretraining, training, evaluation, attacks): a tqdm bar on a terminal, else a
short plain line every few seconds.

Not plain tqdm: written to a file or a pipe (a log, `| tee`, a SLURM output file), tqdm's bar is one line
that is redrawn with carriage returns, so the log holds one multi-kilobyte line of \\r updates that `tail`,
`grep` and log viewers cannot read. When stderr is not a terminal the same updates become lines such as

    lore: step 40/150 (27%), 1.2 step/s, loss 3.21, eta 1m30s

at most one every `interval` seconds, plus one at the start and one at the end. Used as a context manager,
a background thread also reports while a single unit of work outlasts the interval (one APGD chunk can take
minutes), so the log never goes silent for longer than that; the `with` block guarantees that thread stops.

`silenced()` turns every progress report off for a while: the command line's --quiet.
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator, TextIO

_silenced = 0


@contextmanager
def silenced() -> Iterator[None]:
    """No progress is reported inside this block (e.g. `python -m lorekit train --quiet`)."""
    global _silenced
    _silenced += 1
    try:
        yield
    finally:
        _silenced -= 1


def format_duration(seconds: float) -> str:
    """12s, 1m30s, 2h05m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Reports `done` of `total` units of work under a description; a context manager.

    `update(n, **stats)` adds n units and shows the stats (a loss, a violation rate) with the next report.
    With enabled=False (or inside `silenced()`) it reports nothing.
    """

    def __init__(self, total: int, desc: str, *, unit: str = "step", initial: int = 0, enabled: bool = True,
                 interval: float = 5.0, stream: TextIO | None = None) -> None:
        self.total, self.desc, self.unit, self.done, self.interval = total, desc, unit, initial, interval
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and not _silenced
        self.stats: dict[str, float | str] = {}
        self._start = self._last = time.perf_counter()
        self._initial = initial
        self._bar = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if not self.enabled:
            return
        if self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream)
        else:
            self._emit()

    def update(self, n: int = 1, **stats: float | str) -> None:
        if not self.enabled:
            return
        with self._lock:
            self.done += n
            self.stats.update(stats)
            if self._bar is not None:
                self._bar.update(n)
                if stats:
                    self._bar.set_postfix({k: _fmt(v) for k, v in stats.items()}, refresh=False)
            elif time.perf_counter() - self._last >= self.interval:
                self._emit()

    def close(self) -> None:
        if not self.enabled or self._stop.is_set():
            return
        self._stop.set()
        with self._lock:
            if self._bar is not None:
                self._bar.close()
            else:
                took = format_duration(time.perf_counter() - self._start)
                stats = "".join(f", {k} {_fmt(v)}" for k, v in self.stats.items())
                self._write(f"{self.desc}: done, {self.unit} {self.done}/{self.total} in {took}{stats}")

    def __enter__(self) -> "Progress":
        if self.enabled and self._bar is None:
            threading.Thread(target=self._heartbeat, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ plain lines
    def line(self) -> str:
        """The current report: done/total, percentage, rate, stats and the estimated time left."""
        elapsed = time.perf_counter() - self._start
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        parts = [f"{self.desc}: {self.unit} {self.done}/{self.total}{pct}"]
        new = self.done - self._initial
        if new > 0:
            rate = new / elapsed
            parts.append(f"{_fmt(rate)} {self.unit}/s" if rate >= 1 else f"{_fmt(1 / rate)} s/{self.unit}")
        parts += [f"{k} {_fmt(v)}" for k, v in self.stats.items()]
        if new > 0 and self.total > self.done:
            parts.append(f"eta {format_duration((self.total - self.done) * elapsed / new)}")
        elif new == 0 and elapsed >= 1:
            parts.append(f"{format_duration(elapsed)} elapsed")
        return ", ".join(parts)

    def _emit(self) -> None:
        self._write(self.line())

    def _write(self, text: str) -> None:
        self._last = time.perf_counter()
        print(text, file=self.stream, flush=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.interval / 2):
            with self._lock:
                if not self._stop.is_set() and time.perf_counter() - self._last >= self.interval:
                    self._emit()


def _fmt(value: float | str) -> str:
    """Three significant digits without exponents for everyday sizes: 0.0123, 1.2, 37.8, 150."""
    if not isinstance(value, float):
        return str(value)
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
