"""lorekit: a workbench for LORE (Lagrangian-Optimized Robust Embeddings) and its baselines.

    import lorekit
    cfg = lorekit.recipe("demo", "lore", rho=0.05)        # a named recipe, validated
    summary = lorekit.train(cfg)                           # runs/<method>-eps4-seed0-rho0.05/
    run = lorekit.load_run(summary["run_dir"])             # (cfg, fine-tuned CLIP, original encoder)

`METHODS` is the registry of training objectives; `setup` loads the model, data and evaluation
subset a config names (lorekit.workbench).
"""

from importlib.metadata import PackageNotFoundError, version

from .config import ConfigError, TrainConfig
from .methods import METHODS
from .models import load_clip
from .recipes import recipe
from .rundir import load_run, read_metrics
from .trainer import Trainer, train
from .workbench import Workbench, setup

try:
    __version__ = version("lorekit")
except PackageNotFoundError:  # imported from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["METHODS", "ConfigError", "TrainConfig", "Trainer", "Workbench", "__version__", "load_clip", "load_run",
           "read_metrics", "recipe", "setup", "train"]
