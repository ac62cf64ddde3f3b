"""Named recipes (lorekit/recipes.toml) are the one source of the demo's, the notebooks', the sweep's and the
benches' settings; they are validated like any config."""

import subprocess
import sys

import pytest

from lorekit import recipes
from lorekit.config import ConfigError


def test_every_recipe_is_a_valid_config_for_every_method_it_suits():
    from lorekit.methods import METHODS

    assert {"demo", "tiny", "rho-front", "bench-fare4", "bench-step", "paper", "advclip-lora",
            "tiny-adversarial-lora"} <= set(recipes.names())
    for name, description in recipes.names().items():
        assert description, name
        for method in METHODS:
            try:
                cfg = recipes.recipe(name, method)
            except ConfigError as e:  # only a method's own requirement (AdvCLIP-LoRA's adapters) refuses a recipe
                assert str(e).startswith(f"method={method!r}") and name not in ("advclip-lora", "tiny-adversarial-lora")
                continue
            assert cfg.method == method


def test_extends_method_tables_and_overrides():
    tiny_lore, tiny_fare = recipes.recipe("tiny", "lore"), recipes.recipe("tiny", "fare")
    assert tiny_lore.updates_per_batch == 2 and tiny_fare.updates_per_batch == 1  # [tiny.lore] only
    assert recipes.recipe("tiny-train", "lore").primal_steps == 2  # inherited with `extends`
    front = recipes.recipe("rho-front")
    assert (front.dual_lr, front.steps, front.lr, front.eps, front.rho) == (0.02, 100, 1e-4, pytest.approx(8 / 255), 0.01)
    assert (front.batch_size, front.attack_steps) == (32, 5)
    assert recipes.recipe("demo", "fare", steps=7, rho=None).steps == 7  # None keeps the recipe's value
    assert recipes.recipe("bench-fare4").method == "fare"


def test_bad_recipes_are_refused_by_name(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="recipe='nope': unknown; valid recipes: demo"):
        recipes.recipe("nope")
    with pytest.raises(ConfigError, match="steps=0: must be an integer >= 1"):
        recipes.recipe("demo", steps=0)
    bad = tmp_path / "recipes.toml"
    bad.write_text('[a]\ndescription = "x"\nstepz = 3\n[b]\nextends = "c"\n[d]\n[d.fair]\nrho = 1\n')
    monkeypatch.setattr(recipes, "RECIPES_FILE", bad)
    recipes._table.cache_clear()
    try:
        with pytest.raises(ConfigError, match="recipe 'a': 'stepz' is not a TrainConfig field"):
            recipes.fields("a")
        with pytest.raises(ConfigError, match="extends='c' is not a recipe"):
            recipes.fields("b")
        with pytest.raises(ConfigError, match=r"\[d.fair\] is not a method table"):
            recipes.fields("d")
    finally:
        recipes._table.cache_clear()


def test_cli_trains_a_recipe_with_k_updates_for_fare(tmp_path):
    out = subprocess.run([sys.executable, "-m", "lorekit", "train", "--recipe", "tiny", "--method", "fare",
                          "--primal-steps", "5", "--steps", "2", "--batch-size", "8", "--attack-steps", "1",
                          "--eval-samples", "16", "--run-dir", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    import json

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["updates_per_batch"] == 5 and summary["ledger"]["updates"] == 10
    assert summary["ledger"]["passes_fwd_update"] == 2 * 5 * 8
