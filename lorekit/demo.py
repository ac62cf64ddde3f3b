"""The README's first command: FARE vs LORE on the embedded default, a table and a plot.

Both methods train with the 'demo' recipe (lorekit/recipes.toml): the same ε, steps, batch size,
learning rate and seed; then the original, FARE and LORE encoders are evaluated on the whole held-out
digits split: clean zero-shot accuracy, robust accuracy under PGD at ε ∈ {2, 4, 8}/255, cosine
alignment and embedding fidelity to the original encoder. Re-running reuses finished runs and
resumes interrupted ones.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from . import methods
from .data import DIGITS_TEST_SIZE
from .recipes import recipe
from .rundir import atomic_write_json, atomic_write_text, check_output_dir
from .trainer import train
from .workbench import setup

RECIPE = "demo"
METHODS = ("fare", "lore")
EVAL_EPS = (2 / 255, 4 / 255, 8 / 255)
EVAL_PGD_STEPS = 20


def run_demo(out_dir: str | Path = "runs/demo", steps: int | None = None,
             progress: bool = True) -> dict[str, dict[str, float]]:
    """Train FARE and LORE, evaluate them with the original encoder, print and save the table.

    The configs and output folders are checked before anything is loaded or written."""
    out = Path(out_dir)
    base = recipe(RECIPE, steps=steps)
    configs = {method: recipe(RECIPE, method, steps=steps, run_dir=str(out / method)) for method in METHODS}
    for path in (out, *(cfg.run_path for cfg in configs.values())):
        check_output_dir(path, "out")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    bench = setup(replace(base, eval_samples=DIGITS_TEST_SIZE))  # the whole held-out split
    encoders = {"original": bench.original}
    for method, cfg in configs.items():
        train(cfg, existing="reuse", progress=progress)
        encoders[methods.label(method)] = bench.encoder_of(cfg.run_dir)
    results = {name: bench.evaluate(encoder, EVAL_EPS, steps=EVAL_PGD_STEPS, rho=base.rho, progress=progress,
                                    desc=f"evaluating {name}")
               for name, encoder in encoders.items()}
    wall = time.perf_counter() - start
    table = format_table(results)
    print(table)
    print(f"demo wall time {wall:.0f} s (torch threads: {torch.get_num_threads()})")
    atomic_write_json(out / "results.json", {"config": base.to_dict(), "eval_eps": list(EVAL_EPS),
                                             "pgd_steps": EVAL_PGD_STEPS, "results": results,
                                             "wall_time_s": wall})
    atomic_write_text(out / "results.md", table + "\n")
    plot(results, out / "demo.png")
    print(f"demo: table, results.json and demo.png written to {out}")
    return results


def format_table(results: dict[str, dict[str, float]]) -> str:
    eps_keys = [k for k in next(iter(results.values())) if k.startswith("robust_acc@")]
    head = ["encoder", "clean acc"] + [f"robust @{k.split('@')[1]}/255" for k in eps_keys] + ["cosine", "fidelity"]
    rows = [head, ["---"] * len(head)]
    for name, r in results.items():
        rows.append([name, f"{100 * r['clean_acc']:.1f}"] + [f"{100 * r[k]:.1f}" for k in eps_keys]
                    + [f"{r['cosine']:.3f}", f"{r['fidelity']:.3f}"])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def plot(results: dict[str, dict[str, float]], path: Path) -> None:
    """Accuracy against ε (ε=0 is clean accuracy) for each encoder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, r in results.items():
        eps_keys = [k for k in r if k.startswith("robust_acc@")]
        xs = [0.0] + [float(k.split("@")[1]) for k in eps_keys]
        ax.plot(xs, [100 * r["clean_acc"]] + [100 * r[k] for k in eps_keys], marker="o", label=name)
    ax.set_xlabel("ε (×1/255, ℓ∞ PGD); 0 = clean")
    ax.set_ylabel("zero-shot accuracy (%)")
    ax.set_title("Embedded default: original vs FARE vs LORE")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
