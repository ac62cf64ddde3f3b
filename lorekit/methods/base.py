"""The method interface: a training objective as a small object that the loop drives without knowing which.

Per batch the loop computes the reference embeddings φθ0(x) and hands the method a `Batch`. The method
says what its attack maximises (`attack_loss`; `adversarial` turns that into the adversarial batch,
PGD by default), then `update` makes its encoder updates through `ctx.primal_step` and returns what it
optimised as an `Update`. A method's own state (LORE's dual network) goes into checkpoints through
`state_dict` / `load_state_dict`. `label` and `knob` name it in tables, plots and run names;
`check_config` refuses settings the method cannot train with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, ContextManager, Sequence

import torch
from torch import nn

from ..attacks import LossFn, embedding_attack_loss

if TYPE_CHECKING:
    from ..config import TrainConfig


@dataclass
class Batch:
    """One training batch: clean images in [0,1], labels, φθ0(x), and the adversarial images once made.

    `first` is the place of x[0] in the global batch `step` (this rank's shard under data parallelism):
    a method that draws per-sample randomness seeds sample i with (seed, step, first + i), as the loop's
    PGD does, so a run does not depend on the number of processes or on being resumed."""

    x: torch.Tensor
    y: torch.Tensor
    ref: torch.Tensor
    x_adv: torch.Tensor | None = None
    step: int = 0
    first: int = 0


@dataclass
class Update:
    """What one batch's update optimised, for the telemetry.

    losses: 'loss' (the objective of the last update) and its terms, logged as loss and loss_<term>.
    stats: more telemetry; a 1-D per-sample tensor is logged as <name>_mean and quantiles <name>_q10/50/90.
    clean: φθ(x) from the update's own forward, so the loop needs no extra forward to log fidelity.
    """

    losses: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    clean: torch.Tensor | None = None


@dataclass
class Context:
    """What the loop lends a method: the encoder, its zero-shot head, precision, and the primal step."""

    cfg: "TrainConfig"
    encoder: nn.Module  # φθ itself: attacks and evaluation run through it
    trained: nn.Module  # the module the update runs through (φθ, or its DistributedDataParallel wrapper)
    head: nn.Module | None  # zero-shot classifier on φθ (None without class embeddings)
    trained_head: nn.Module | None  # the same head on `trained`
    embed_dim: int
    device: torch.device
    autocast: Callable[[], ContextManager[Any]]
    primal_step: Callable[[torch.Tensor], None]  # one encoder update on a loss: backward, AdamW step, schedule
    reduce_gradients: Callable[[nn.Module], None] = lambda module: None  # averages a method's own gradients over ranks
    clip: Any = None  # the whole models.LoadedCLIP (text tower, tokenizer) when the trainer was built from one
    classnames: Sequence[str] = ()  # the training data's class names and prompt templates, for methods that
    templates: Sequence[str] = ()  # recompute class embeddings through a text tower that trains
    reference: nn.Module | None = None  # φθ0, the loop's frozen reference (a frozen copy, or the adapted model
    # with its adapters off): for methods that need more of it than φθ0(x), which the loop hands over in Batch.ref

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """φθ(images) through the trained module, as float32."""
        with self.autocast():
            return self.trained(images).float()


class Method:
    """Base class of the training objectives; subclasses live in one module each (see the registry)."""

    name: ClassVar[str]
    label: ClassVar[str]  # in tables, legends and titles
    color: ClassVar[str] = "#7f7f7f"  # in figures
    knob: ClassVar[str | None] = None  # the config field that moves it along its clean-vs-robust front
    knob_label: ClassVar[str] = ""  # the knob's symbol in figures (ρ, λ)
    fields: ClassVar[tuple[str, ...]] = ()  # the config fields only this method reads
    primal_steps: ClassVar[int] = 1  # K, encoder updates per adversarial batch, when the config leaves it 0
    needs_head: ClassVar[bool] = False  # needs class embeddings (a zero-shot head) to train
    clean_in_update: ClassVar[bool] = False  # each update also forwards the clean images (LORE, FARE-reg)

    @classmethod
    def check_config(cls, cfg: "TrainConfig") -> None:
        """Refuse, with a ConfigError naming the field, a config this method cannot train (TrainConfig.validate
        calls it, so the refusal comes before any work). Every setting is fine by default."""

    @classmethod
    def passes_per_step(cls, cfg: "TrainConfig") -> int:
        """Training passes one global batch costs, as lorekit.ledger counts them: the reference forward, the
        attack's forward+backward per PGD iteration, and K updates' forward+backward (over [x+δ; x] when the
        update also sees the clean images). tests/test_methods.py checks it against the ledger."""
        b, k = cfg.batch_size, cfg.primal_steps or cls.primal_steps
        return b + 2 * cfg.attack_steps * b + 2 * k * b * (2 if cls.clean_in_update else 1)

    def __init__(self, cfg: "TrainConfig", ctx: Context) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.k = cfg.primal_steps or self.primal_steps

    def attack_loss(self, batch: Batch) -> LossFn:
        """What the attack maximises; by default the embedding distance ‖φθ(x+δ) − φθ0(x)‖²."""
        return embedding_attack_loss(self.ctx.encoder, batch.ref)

    def adversarial(self, batch: Batch, pgd: Callable[[LossFn], torch.Tensor]) -> torch.Tensor:
        """The adversarial batch; `pgd(loss_fn)` runs the configured attack on the encoder in eval mode."""
        return pgd(self.attack_loss(batch))

    def update(self, batch: Batch) -> Update:
        raise NotImplementedError

    def evaluate(self, classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Metrics of the method's own threat that the loop's held-out evaluation adds to clean and PGD
        accuracy (typo-po: accuracy on typographic images); `classifier` is the zero-shot head on φθ."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
