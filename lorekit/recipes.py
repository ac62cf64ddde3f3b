"""Named recipes: TrainConfig fields stored as data in recipes.toml, the one place the demo, the notebooks,
`make sweep` and the benchmarks take their settings from (see the file's header for the format)."""

from __future__ import annotations

import functools
import tomllib
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

from .config import ConfigError, TrainConfig

RECIPES_FILE = Path(__file__).with_name("recipes.toml")
_META = ("description", "extends")


@functools.cache
def _table() -> dict[str, dict[str, Any]]:
    return tomllib.loads(RECIPES_FILE.read_text())


def names() -> dict[str, str]:
    """Every recipe's name and description."""
    return {name: body.get("description", "") for name, body in _table().items()}


def fields(name: str, method: str | None = None) -> dict[str, Any]:
    """The TrainConfig fields recipe `name` sets for `method` (its own, else the recipe's method)."""
    from .methods import METHODS

    table = _table()
    if name not in table:
        raise ConfigError(f"recipe={name!r}: unknown; valid recipes: {', '.join(table)}")
    chain, seen = [], set()
    while name is not None:
        if name in seen or name not in table:
            raise ConfigError(f"recipe {chain[-1]!r} in {RECIPES_FILE}: extends={name!r} is "
                              f"{'a cycle' if name in seen else 'not a recipe'}")
        seen.add(name)
        chain.append(name)
        name = table[name].get("extends")
    valid = {f.name for f in dataclass_fields(TrainConfig)}
    out: dict[str, Any] = {}
    for recipe_name in reversed(chain):  # the base first, so each recipe overrides what it extends
        body = table[recipe_name]
        for key, value in body.items():
            if isinstance(value, dict):
                if key not in METHODS:
                    raise ConfigError(f"recipe {recipe_name!r}: [{recipe_name}.{key}] is not a method table "
                                      f"(methods: {', '.join(METHODS)})")
            elif key not in valid and key not in _META:
                raise ConfigError(f"recipe {recipe_name!r}: {key!r} is not a TrainConfig field")
            elif key not in _META:
                out[key] = value
    chosen = method or out.get("method") or TrainConfig.method
    for recipe_name in reversed(chain):
        out.update(table[recipe_name].get(chosen, {}))
    if method is not None:
        out["method"] = method
    return out


def recipe(name: str, method: str | None = None, **overrides: Any) -> TrainConfig:
    """The validated TrainConfig of recipe `name` for `method`, with `overrides` (None values ignored)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return TrainConfig.from_dict({**fields(name, method), **given})
