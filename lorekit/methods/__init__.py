"""The training objectives, one module each, chosen once by name from this registry.

Adding a method: a module with a `Method` subclass (see `base`), and one line in `METHODS`.
"""

from __future__ import annotations

from ..config import ConfigError
from .advclip_lora import AdvCLIPLoRA
from .base import Batch, Context, Method, Update
from .fare import FARE
from .fare_reg import FAREReg
from .lore import LORE
from .tecoa import TeCoA
from .typo_po import TypoPO

METHODS: dict[str, type[Method]] = {m.name: m for m in (FARE, FAREReg, LORE, TeCoA, AdvCLIPLoRA, TypoPO)}


def get(name: str) -> type[Method]:
    """The method class registered under `name`; a ConfigError listing the valid names otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"method={name!r}: must be one of {', '.join(METHODS)}") from None


def knob(name: str) -> str | None:
    """The config field along which a method's front runs (LORE: 'rho'); None for a single point or a non-method."""
    return METHODS[name].knob if name in METHODS else None


def label(name: str) -> str:
    """A method's display name ('LORE'), or the name itself for non-methods such as 'original'."""
    return METHODS[name].label if name in METHODS else name


__all__ = ["METHODS", "Batch", "Context", "Method", "Update", "get", "knob", "label"]
