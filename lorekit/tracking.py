"""Experiment tracking beside metrics.jsonl: the same scalars to TensorBoard and/or Weights & Biases.

Every numeric field of a record goes out as `<kind>/<field>` (train/loss, eval/robust_acc, ...) at the
record's step; metrics.jsonl stays the source of truth that resume, the plots and the sweeps read.
wandb is not a dependency: report_to='wandb' needs it installed and says so before any work.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from .config import ConfigError, TrainConfig

TENSORBOARD_DIR = "tensorboard"


def check_available(cfg: TrainConfig) -> None:
    """Refuse a tracker whose package is missing, before any work."""
    wanted = cfg.report_to.split(",")
    for name, module in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if name in wanted:
            try:
                __import__(module)
            except ImportError:
                raise ConfigError(f"report_to={cfg.report_to!r}: {name} is not installed "
                                  f"(pip install {name})") from None


class Tracker:
    """Sends records to the trackers cfg.report_to names (none: a no-op)."""

    def __init__(self, cfg: TrainConfig, run: Path) -> None:
        wanted = cfg.report_to.split(",")
        self._tb = self._wandb = None
        if "tensorboard" in wanted:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run / TENSORBOARD_DIR))
        if "wandb" in wanted:
            import wandb

            # a stable id per run directory: a resumed run continues the same wandb run
            run_id = hashlib.sha1(str(run.resolve()).encode()).hexdigest()[:12]
            self._wandb = wandb.init(project="lorekit", name=run.name, id=run_id, resume="allow", dir=str(run),
                                     config=cfg.to_dict())

    def log(self, record: dict[str, Any]) -> None:
        scalars = {f"{record['kind']}/{k}": v for k, v in record.items()
                   if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, record["step"])
        if self._wandb is not None:
            self._wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
