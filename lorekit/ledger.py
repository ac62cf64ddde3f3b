"""The compute ledger: what a run spends, counted as it is spent.

How a pass is counted: one image through an encoder in one direction is one pass. A forward of a
batch of B images through φθ or φθ0 counts B forward passes; a backward through φθ (to its
parameters, to its input, or both: one backward either way) counts B backward passes. LORE's
forward of the adversarial and clean halves together, [x+δ; x], is 2B forward and 2B backward.

Passes are counted per phase of a training step:

    reference   φθ0(x), once per batch (no backward)
    attack      the PGD iterations: a forward and a backward to the input each
    update      the method's own forwards and backwards (K of each per batch for K primal steps)
    telemetry   no-grad forwards made only to log fidelity (FARE and TeCoA, whose updates never
                look at clean images)

Periodic and final evaluations are not training compute and are not counted. Under data parallelism
the counts are global (all ranks' images). `updates` counts the
encoder's optimizer steps; `wall_time_s` the time spent in training steps (evaluations and
checkpoints excluded). The counts come from hooks on the encoder modules, so they are what ran,
not a formula.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

PHASES = ("reference", "attack", "update", "telemetry")
TRAINING_PHASES = ("reference", "attack", "update")  # what a compute budget counts: telemetry could be dropped


class Ledger:
    """Forward and backward encoder passes per phase, optimizer updates and wall time of one run."""

    def __init__(self, processes: int = 1) -> None:
        # Data-parallel ranks run identical shards: each counts its own passes times the number of ranks, so
        # every rank holds the global totals (and any rank's checkpoint can resume any world size).
        self.processes = processes
        self.forward = dict.fromkeys(PHASES, 0)
        self.backward = dict.fromkeys(PHASES, 0)
        self.updates = 0
        self.wall_time_s = 0.0
        self._phase: str | None = None
        self._depth = 0  # nesting of watched forwards in progress

    def watch(self, *modules: nn.Module) -> "Ledger":
        """Count every forward (and the backward through it) of these modules in the current phase.

        A watched module called inside another (a reference that runs the encoder with its adapters
        off) counts once, as the outer call.
        """
        for module in modules:
            module.register_forward_pre_hook(self._enter)
            module.register_forward_hook(self._on_forward)
        return self

    def _enter(self, module: nn.Module, inputs: Any) -> None:
        self._depth += 1

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name not in PHASES:
            raise ValueError(f"phase={name!r}: must be one of {', '.join(PHASES)}")
        outer, self._phase = self._phase, name
        self._depth = 0  # phases start between forwards; a forward that raised left no exit hook behind
        try:
            yield
        finally:
            self._phase = outer

    def _on_forward(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self._depth -= 1
        if self._depth or self._phase is None or not isinstance(output, torch.Tensor):
            return
        n = output.shape[0] * self.processes
        self.forward[self._phase] += n
        if output.requires_grad:  # the hook fires when a backward reaches this output
            output.register_hook(functools.partial(self._on_backward, self._phase, n))

    def _on_backward(self, phase: str, n: int, grad: torch.Tensor) -> None:
        self.backward[phase] += n

    @property
    def passes(self) -> int:
        """All encoder passes, forward and backward, of every phase."""
        return sum(self.forward.values()) + sum(self.backward.values())

    @property
    def training_passes(self) -> int:
        """The passes a compute budget counts: reference, attack and update (not telemetry)."""
        return sum(self.forward[p] + self.backward[p] for p in TRAINING_PHASES)

    def totals(self) -> dict[str, float]:
        """Running totals as flat record fields: passes, training_passes, passes_<fwd|bwd>_<phase>, ..."""
        out: dict[str, float] = {"passes": self.passes, "training_passes": self.training_passes}
        for p in PHASES:
            out[f"passes_fwd_{p}"] = self.forward[p]
            out[f"passes_bwd_{p}"] = self.backward[p]
        out["updates"] = self.updates
        out["wall_time_s"] = self.wall_time_s
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"forward": dict(self.forward), "backward": dict(self.backward), "updates": self.updates,
                "wall_time_s": self.wall_time_s}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.forward.update(state["forward"])
        self.backward.update(state["backward"])
        self.updates = int(state["updates"])
        self.wall_time_s = float(state["wall_time_s"])
