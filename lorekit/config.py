"""The one typed config that drives the trainer, the command line and the notebooks.

Every field carries a docstring (the string literal under it, as in cleanrl); `field_docs`
reads those docstrings so `python -m lorekit train --help` and papermill's parameter
documentation show the same text. `TrainConfig.validate` runs before any work starts and
raises `ConfigError` naming the offending field and what would be valid.

argparse is used instead of tyro because papermill hands parameters over as plain literals
(sometimes strings) and the notebooks, the CLI and Python callers must all pass through the
same validator and the same error messages.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import json
import math
import os
import textwrap
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

METHODS = ("fare", "fare-reg", "lore", "tecoa")
DUAL_KINDS = ("mlp", "linear", "scalar")
NORMS = ("linf", "l2")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")


class ConfigError(ValueError):
    """A config field holds a value the run cannot use; the message names the field."""


def default_cache_dir() -> str:
    """Where pretrained checkpoints and data live: $LOREKIT_CACHE, else ~/.cache/lorekit."""
    return os.environ.get("LOREKIT_CACHE", str(Path("~/.cache/lorekit").expanduser()))


@dataclass
class TrainConfig:
    """Everything one fine-tuning run needs. Defaults: LORE on the embedded default."""

    method: str = "lore"
    """Training objective: 'fare' (unsupervised adversarial embedding loss), 'fare-reg' (FARE plus a
    constant-λ clean penalty), 'lore' (constrained, primal-dual with a learned λ(x)) or 'tecoa'
    (supervised cross-entropy of the zero-shot classifier on adversarial images)."""

    model: str = "lorekit-tiny"
    """open_clip model name (e.g. 'ViT-B-32', 'ViT-L-14-quickgelu') or 'hf-hub:org/name'."""

    pretrained: str = "digits"
    """open_clip pretrained tag ('openai', 'laion2b_s34b_b79k'), a local checkpoint file, or ''
    for random weights. 'digits' is lorekit-tiny pretrained on the embedded suite (cached)."""

    dataset: str = "digits"
    """A domain of the embedded suite ('digits', 'words', 'shapes', 'textures'; offline), a torchvision
    data set name ('cifar10', 'mnist', 'stl10', ...) found under data_root, or the path of an image
    folder (one sub-folder per class)."""

    data_root: str = ""
    """Directory holding torchvision data sets; '' means <cache_dir>/data. Nothing is downloaded."""

    cache_dir: str = field(default_factory=default_cache_dir)
    """Cache for the pretrained embedded model and data ($LOREKIT_CACHE, else ~/.cache/lorekit)."""

    eps: float = 4 / 255
    """Training perturbation radius in [0,1] pixel units (4/255 = four grey levels)."""

    norm: str = "linf"
    """Threat model of the training attack: 'linf' or 'l2'."""

    attack_steps: int = 10
    """PGD iterations per batch for the training attack."""

    attack_step_size: float = 0.0
    """PGD step size in pixel units; 0 means eps/4 (FARE's 1/255 at eps=4/255)."""

    rho: float = 0.1
    """LORE constraint level: ||φθ(x) - φθ0(x)||² ≤ rho·||φθ0(x)||² on clean images."""

    lam: float = 1.0
    """Constant penalty weight λ of FARE-reg's clean term (ignored by the other methods)."""

    dual: str = "mlp"
    """LORE dual network Fω: 'mlp' (2 layers, per sample), 'linear' (per sample) or 'scalar'."""

    dual_hidden: int = 512
    """Hidden width of the MLP dual network."""

    dual_lr: float = 5e-4
    """Learning rate of the dual ascent step on ω (Adam)."""

    lambda_init: float = 1.0
    """Initial value of λ(x) = softplus(Fω(φθ0(x))), set through the output bias."""

    primal_steps: int = 5
    """K: primal updates of the encoder per batch (LORE only) with λ held fixed."""

    steps: int = 150
    """Number of training batches (outer iterations)."""

    batch_size: int = 64
    """Images per batch."""

    lr: float = 1e-5
    """Encoder learning rate (AdamW); the paper's 1e-5 is for real CLIP models."""

    weight_decay: float = 1e-4
    """AdamW weight decay of the encoder."""

    warmup: float = 0.1
    """Fraction of the encoder updates spent in linear warm-up before the cosine decay."""

    seed: int = 0
    """Seed for data order, attack starts and initialisation."""

    device: str = "auto"
    """'auto' (CUDA when present), 'cpu' or 'cuda'."""

    precision: str = "auto"
    """'auto' (bf16 autocast on CUDA, fp32 on CPU), 'fp32' or 'bf16'."""

    eval_every: int = 50
    """Run the periodic held-out evaluation every this many steps (0 turns it off)."""

    eval_samples: int = 256
    """Size of the fixed held-out subset used by the periodic evaluation."""

    checkpoint_every: int = 50
    """Write a resumable checkpoint every this many steps (and always at the end)."""

    workers: int = 0
    """DataLoader worker processes for file-backed data sets (the embedded one needs none)."""

    run_dir: str = ""
    """Run directory; '' means runs/<method>-eps<..>-seed<..>."""

    resume: bool = False
    """Continue the run found in run_dir from its last checkpoint."""

    # ------------------------------------------------------------------ derived values
    @property
    def step_size(self) -> float:
        return self.attack_step_size or self.eps / 4

    @property
    def run_path(self) -> Path:
        if self.run_dir:
            return Path(self.run_dir)
        tag = f"{self.method}-eps{round(self.eps * 255, 2):g}-seed{self.seed}"
        if self.method == "lore":
            tag += f"-rho{self.rho:g}"
        elif self.method == "fare-reg":
            tag += f"-lam{self.lam:g}"
        return Path("runs") / tag

    @property
    def data_path(self) -> Path:
        return Path(self.data_root) if self.data_root else Path(self.cache_dir) / "data"

    # ------------------------------------------------------------------ validation
    def validate(self) -> "TrainConfig":
        """Check types and ranges of every field; raise ConfigError on the first bad one."""
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            setattr(self, f.name, _coerce(f.name, value, hints[f.name]))
        check_choice("method", self.method, METHODS)
        check_choice("dual", self.dual, DUAL_KINDS)
        check_choice("norm", self.norm, NORMS)
        check_choice("device", self.device, DEVICES)
        check_choice("precision", self.precision, PRECISIONS)
        if not 0 < self.eps <= 1:
            raise ConfigError(f"eps={self.eps!r}: must lie in (0, 1] (pixel units, e.g. 4/255={4/255:.5f})")
        if self.rho < 0:
            raise ConfigError(f"rho={self.rho!r}: must be a non-negative number (e.g. 0.1)")
        if self.lam < 0:
            raise ConfigError(f"lam={self.lam!r}: must be a non-negative number")
        if self.lambda_init <= 0:
            raise ConfigError(f"lambda_init={self.lambda_init!r}: must be > 0 (λ is a softplus output)")
        if self.attack_step_size < 0:
            raise ConfigError(f"attack_step_size={self.attack_step_size!r}: must be >= 0 (0 means eps/4)")
        for name in ("lr", "dual_lr"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be > 0")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay={self.weight_decay!r}: must be >= 0")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warmup={self.warmup!r}: must be a fraction in [0, 1)")
        if self.primal_steps < 1:
            raise ConfigError(f"primal_steps={self.primal_steps!r}: K must be an integer >= 1")
        for name in ("steps", "batch_size", "attack_steps", "dual_hidden", "checkpoint_every", "eval_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be an integer >= 1")
        for name in ("eval_every", "workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be an integer >= 0")
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ConfigError("device='cuda': no CUDA device is visible; use 'auto' or 'cpu'")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Build from a mapping (a papermill parameters dict, a saved config.json); unknown keys fail."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; valid fields: {sorted(names)}")
        return cls(**d).validate()


# The fields whose differences do not make a different run (resuming one, or moving devices).
NON_SEMANTIC_FIELDS = frozenset({"resume", "run_dir", "device", "workers", "cache_dir", "data_root"})


def config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Names of the semantic fields on which two saved configs disagree."""
    keys = (set(a) | set(b)) - NON_SEMANTIC_FIELDS
    return sorted(k for k in keys if a.get(k) != b.get(k))


def check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    """Raise ConfigError naming the field and the valid values unless `value` is one of them."""
    if value not in valid:
        raise ConfigError(f"{name}={value!r}: must be one of {', '.join(valid)}")


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Cast papermill/CLI literals (strings, numpy scalars) to the field's builtin type."""
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError
            return bool(value)
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(_eval_fraction(value) if isinstance(value, str) else value)
            if not math.isfinite(out):
                raise ValueError
            return out
        return str(value)
    except (TypeError, ValueError):
        kind = {bool: "true/false", int: "an integer", float: "a finite number (fractions like 4/255 are fine)"}
        raise ConfigError(f"{name}={value!r}: must be {kind.get(hint, hint.__name__)}") from None


def _eval_fraction(text: str) -> float:
    """'4/255' -> 0.01569; plain numbers pass through float()."""
    if "/" in text:
        num, den = text.split("/", 1)
        return float(num) / float(den)
    return float(text)


@functools.cache
def field_docs(cls: type = TrainConfig) -> dict[str, str]:
    """Map each dataclass field to the docstring written under it."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def add_config_arguments(parser: argparse.ArgumentParser, cls: type = TrainConfig) -> None:
    """One --flag per config field, typed as str so validate() does the casting and the errors."""
    docs = field_docs(cls)
    for f in fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{docs.get(f.name, '')} (default: {default})")
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=type(default).__name__.upper(),
                                help=f"{docs.get(f.name, '')} (default: {default!r})")


def config_from_args(args: argparse.Namespace, cls: type = TrainConfig, **overrides: Any):
    given = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
    given.update(overrides)
    return cls.from_dict(given)


def load_config_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read a JSON config ({e})") from None
