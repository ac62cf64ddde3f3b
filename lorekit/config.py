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
import math
import os
import textwrap
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DUAL_KINDS = ("mlp", "linear", "scalar")
NORMS = ("linf", "l2")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
ADAPTERS = ("none", "lora")
REPORTERS = ("none", "tensorboard", "wandb")
PO_LOSSES = ("dpo", "ipo")
TYPO_STYLES = ("auto", "paper", "label")  # lorekit.typographic.STYLE_NAMES


class ConfigError(ValueError):
    """A config field holds a value the run cannot use; the message names the field."""


def describe(error: BaseException, limit: int = 300) -> str:
    """'Type: message' on one line, for quoting a library's exception inside a ConfigError; a long message is
    cut at a word and marked with an ellipsis rather than ending mid-word."""
    text = " ".join(str(error).split())
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " …"
    return f"{type(error).__name__}: {text}"


def default_cache_dir() -> str:
    """Where pretrained checkpoints and data live: $LOREKIT_CACHE, else ~/.cache/lorekit."""
    return os.environ.get("LOREKIT_CACHE", str(Path("~/.cache/lorekit").expanduser()))


@dataclass
class TrainConfig:
    """Everything one fine-tuning run needs. Defaults: LORE on the embedded default."""

    method: str = "lore"
    """Training objective, a name in the method registry (lorekit.methods): 'fare' (unsupervised
    adversarial embedding loss), 'fare-reg' (FARE plus a constant-λ clean penalty), 'lore'
    (constrained, primal-dual with a learned λ(x)), 'tecoa' (supervised cross-entropy of the
    zero-shot classifier on adversarial images), 'advclip-lora' (TeCoA's loss with LoRA on both towers,
    the class embeddings recomputed through the adapted text tower; needs adapter='lora') or 'typo-po'
    (preference optimisation against typographic attacks: DPO or IPO on the zero-shot softmax, true class
    preferred over the class name written on the image, against the frozen reference)."""

    model: str = "lorekit-tiny"
    """open_clip model name (e.g. 'ViT-B-32', 'ViT-L-14-quickgelu') or 'hf-hub:org/name'."""

    pretrained: str = "digits"
    """open_clip pretrained tag ('openai', 'laion2b_s34b_b79k'), a local checkpoint file, or ''
    for random weights. 'digits' is lorekit-tiny pretrained on the embedded suite (cached); an
    'hf-hub:' model carries its own weights, so there the default 'digits' means ''."""

    dataset: str = "digits"
    """A domain of the embedded suite ('digits', 'words', 'shapes', 'textures'; offline), a torchvision
    data set name ('cifar10', 'mnist', 'stl10', ...) found under data_root, or the path of an image
    folder (one sub-folder per class)."""

    data_root: str = ""
    """Directory holding torchvision data sets; '' means <cache_dir>/data. Nothing is downloaded."""

    shots: int = 0
    """Few-shot training: this many training images per class, drawn with `seed` (lorekit.data.few_shot;
    AdvCLIP-LoRA uses 1 to 16). 0 trains on the whole training split. More shots than the smallest class
    holds is refused, naming the class; so is a batch_size larger than the subset (shots × classes)."""

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

    po_loss: str = "dpo"
    """typo-po's preference loss: 'dpo' (−log σ(β·h), Rafailov et al. 2023) or 'ipo' ((h − 1/(2β))²,
    Azar et al. 2024), h the log-ratio margin of the true over the written class (lorekit.methods.typo_po)."""

    po_beta: float = 0.1
    """typo-po's β (> 0): DPO's inverse temperature; IPO's target margin is 1/(2β)."""

    po_kl: float = 1.0
    """typo-po's weight (>= 0) of KL(π_ref ‖ π) on the clean images, which keeps clean predictions in place."""

    typo_style: str = "auto"
    """How typo-po writes wrong class names (lorekit.typographic): 'paper' (font 9–18 % of the height, on the
    image), 'label' (50–69 % of the height on a contrasting label) or 'auto' ('paper' at >= 96 px, else 'label')."""

    dual: str = "mlp"
    """LORE dual network Fω: 'mlp' (2 layers, per sample), 'linear' (per sample) or 'scalar'."""

    dual_hidden: int = 512
    """Hidden width of the MLP dual network."""

    dual_lr: float = 5e-4
    """Learning rate of the dual ascent step on ω (Adam)."""

    lambda_init: float = 1.0
    """Initial value of λ(x) = softplus(Fω(φθ0(x))), set through the output bias."""

    primal_steps: int = 0
    """K: encoder updates per adversarial batch, for every method (LORE holds λ fixed across them);
    0 means the method's default: 5 for LORE, 1 for the others. The schedule spans steps·K updates."""

    adapter: str = "none"
    """Which weights train: 'none' (the whole image tower) or 'lora' (LoRA adapters on the attention
    projections, through peft; everything else frozen, and the frozen reference φθ0 is the same model with
    the adapters switched off: no second copy). Combines with any method."""

    lora_rank: int = 8
    """LoRA rank r of each adapted projection (adapter='lora')."""

    lora_alpha: float = 8.0
    """LoRA scale numerator: an adapter adds (alpha/rank)·B·A to its projection (adapter='lora')."""

    lora_dropout: float = 0.0
    """Dropout on each adapter's input in training (adapter='lora'); AdvCLIP-LoRA uses 0.25."""

    lora_targets: str = "q,k,v"
    """Comma-separated attention projections that get adapters: any of q, k, v, o (adapter='lora')."""

    lora_towers: str = "image"
    """Towers whose attention blocks get adapters: 'image', 'text' or 'both' (adapter='lora')."""

    steps: int = 150
    """Number of training batches (outer iterations)."""

    budget: int = 0
    """Compute budget in training passes (images × encoder passes, as lorekit.ledger counts them); when
    > 0 it sets `steps` to the most batches that fit, so methods of different cost are compared at equal
    compute. 0: train for `steps` batches."""

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

    tf32: bool = True
    """On CUDA, TensorFloat-32 for fp32 matmuls and convolutions (Ampere and newer; ~1e-3 relative precision).
    The FARE reference code runs with it off."""

    compile: bool = False
    """torch.compile the image tower (its first steps pay the compilation, each input shape once)."""

    grad_checkpointing: bool = False
    """Recompute the tower's activations in the backward pass instead of storing them (open_clip towers
    that support it): less memory for big towers and batches, about a third more compute."""

    report_to: str = "none"
    """Where the scalars of metrics.jsonl also go: 'none', 'tensorboard' (event files in
    <run_dir>/tensorboard), 'wandb' (when installed; not a dependency), or 'tensorboard,wandb'."""

    eval_every: int = 50
    """Run the periodic held-out evaluation every this many steps (0 turns it off)."""

    eval_samples: int = 256
    """Size of the fixed held-out subset used by the periodic evaluation."""

    checkpoint_every: int = 50
    """Write a resumable checkpoint every this many steps (and always at the end)."""

    workers: int = 0
    """DataLoader worker processes for file-backed data sets (the embedded one needs none); batches are
    read into pinned memory on CUDA and moved to the device once per batch."""

    run_dir: str = ""
    """Run directory; '' means runs/<method>-eps<..>-seed<..>."""

    resume: bool = False
    """Continue the run found in run_dir from its last checkpoint."""

    # ------------------------------------------------------------------ derived values
    @property
    def step_size(self) -> float:
        return self.attack_step_size or self.eps / 4

    @property
    def updates_per_batch(self) -> int:
        """K as the run uses it: primal_steps, or the method's default when that is 0."""
        from .methods import get

        return self.primal_steps or get(self.method).primal_steps

    @property
    def run_path(self) -> Path:
        if self.run_dir:
            return Path(self.run_dir)
        from .methods import get

        method = get(self.method)
        tag = f"{self.method}-eps{round(self.eps * 255, 2):g}-seed{self.seed}"
        if method.knob:
            tag += f"-{method.knob}{getattr(self, method.knob):g}"
        if self.updates_per_batch != method.primal_steps:
            tag += f"-K{self.updates_per_batch}"
        return Path("runs") / tag

    @property
    def lora(self) -> dict[str, Any]:
        """The keyword arguments of lorekit.adapters.add_lora that the lora_* fields give."""
        return {"rank": self.lora_rank, "alpha": self.lora_alpha, "dropout": self.lora_dropout,
                "targets": tuple(t.strip() for t in self.lora_targets.split(",")), "towers": self.lora_towers}

    @property
    def trains_text_tower(self) -> bool:
        """Whether adapters sit on the text tower, so the run's class embeddings are its own, not the base model's."""
        return self.adapter == "lora" and self.lora_towers in ("text", "both")

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
        from .methods import METHODS

        self.pretrained = pretrained_for(self.model, self.pretrained)
        check_choice("method", self.method, tuple(METHODS))
        check_choice("dual", self.dual, DUAL_KINDS)
        check_choice("norm", self.norm, NORMS)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("adapter", self.adapter, ADAPTERS)
        check_choice("po_loss", self.po_loss, PO_LOSSES)
        check_choice("typo_style", self.typo_style, TYPO_STYLES)
        trackers = [t.strip() for t in self.report_to.split(",")]
        if not trackers or any(t not in REPORTERS for t in trackers) or ("none" in trackers and len(trackers) > 1):
            raise ConfigError(f"report_to={self.report_to!r}: must be 'none' or a comma-separated list of "
                              f"{', '.join(REPORTERS[1:])}")
        if self.adapter == "lora":
            from .adapters import LoraSettings

            try:
                LoraSettings(**self.lora)
            except ConfigError as e:  # its messages name the setting: 'rank=0: ...' is the field lora_rank
                raise ConfigError(f"lora_{e}") from None
        if not 0 < self.eps <= 1:
            raise ConfigError(f"eps={self.eps!r}: must lie in (0, 1] (pixel units, e.g. 4/255={4/255:.5f})")
        if self.rho < 0:
            raise ConfigError(f"rho={self.rho!r}: must be a non-negative number (e.g. 0.1)")
        if self.lam < 0:
            raise ConfigError(f"lam={self.lam!r}: must be a non-negative number")
        if self.po_beta <= 0:
            raise ConfigError(f"po_beta={self.po_beta!r}: must be > 0 (e.g. 0.1)")
        if self.po_kl < 0:
            raise ConfigError(f"po_kl={self.po_kl!r}: must be a non-negative number (0 drops the clean KL term)")
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
        if self.primal_steps < 0:
            raise ConfigError(f"primal_steps={self.primal_steps!r}: K must be an integer >= 1, or 0 for the "
                              "method's default")
        for name in ("steps", "batch_size", "attack_steps", "dual_hidden", "checkpoint_every", "eval_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be an integer >= 1")
        for name in ("eval_every", "workers", "budget", "shots"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be an integer >= 0")
        from .methods import get

        get(self.method).check_config(self)
        if self.budget:
            per_step = get(self.method).passes_per_step(self)
            if self.budget < per_step:
                raise ConfigError(f"budget={self.budget}: less than one step of {self.method} "
                                  f"({per_step} training passes at batch_size={self.batch_size})")
            self.steps = self.budget // per_step
        resolve_device(self.device)
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
NON_SEMANTIC_FIELDS = frozenset({"resume", "run_dir", "device", "workers", "cache_dir", "data_root", "compile",
                                 "grad_checkpointing", "report_to"})


def config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Names of the semantic fields on which two saved configs disagree (K compared as the runs use it)."""
    a, b = _resolved_k(a), _resolved_k(b)
    keys = (set(a) | set(b)) - NON_SEMANTIC_FIELDS
    return sorted(k for k in keys if a.get(k) != b.get(k))


def _resolved_k(d: dict[str, Any]) -> dict[str, Any]:
    from .methods import METHODS

    if d.get("primal_steps") == 0 and d.get("method") in METHODS:
        return {**d, "primal_steps": METHODS[d["method"]].primal_steps}
    return d


def resolve_device(name: str):
    """The torch device a 'device' setting names: 'auto' is CUDA when present, else the CPU."""
    import torch

    check_choice("device", name, DEVICES)
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda': no CUDA device is visible; use 'auto' or 'cpu'")
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


def pretrained_for(model: str, pretrained: str) -> str:
    """The pretrained setting to load `model` with: '' for an 'hf-hub:' model left at the default tag.

    The default, 'digits', is the embedded model's tag; a hub model brings its own weights, so the documented
    `--model hf-hub:org/name` works without also passing `--pretrained ''`. Any other tag is kept (and refused
    for a hub model by lorekit.models, with a message).
    """
    return "" if model.startswith("hf-hub:") and pretrained == TrainConfig.pretrained else pretrained


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
            number = float(value) if isinstance(value, str) and any(c in value.lower() for c in ".e") else value
            if isinstance(number, bool) or (isinstance(number, float) and not number.is_integer()):
                raise ValueError  # '1e3' and '5.0' are whole numbers, '2.5' is not
            return int(number)
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
        if float(den) == 0:
            raise ValueError("division by zero")
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
    docs = {name: doc.replace("%", "%%") for name, doc in field_docs(cls).items()}  # argparse %-formats help
    for f in fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{docs.get(f.name, '')} (default: {default})")
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=type(default).__name__.upper(),
                                help=f"{docs.get(f.name, '')} (default: {default!r})")


def given_fields(args: argparse.Namespace, cls: type = TrainConfig) -> dict[str, Any]:
    """The config fields given on the command line (flags left out are absent, not defaults)."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
