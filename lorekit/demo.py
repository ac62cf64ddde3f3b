"""The README's first command: FARE vs LORE on the embedded default, a table and a plot.

Both methods train with the same ε, steps, batch size, learning rate and seed; then the
original, FARE and LORE encoders are evaluated on the whole held-out digits split: clean
zero-shot accuracy, robust accuracy under PGD at ε ∈ {2, 4, 8}/255, cosine alignment and
embedding fidelity to the original encoder. Re-running reuses finished runs and resumes
interrupted ones.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from .config import TrainConfig
from .data import digits
from .evaluate import evaluate_encoder
from .models import frozen_copy, load_clip
from .trainer import atomic_write_json, build, finished_and_current, resolve_device

EVAL_EPS = (2 / 255, 4 / 255, 8 / 255)
EVAL_PGD_STEPS = 20
# The embedded tiny model moves much less per step than a real CLIP at the paper's 1e-5.
DEMO = TrainConfig(eps=4 / 255, steps=150, batch_size=64, lr=1e-4, rho=0.1, primal_steps=5, eval_every=50,
                   eval_samples=256, seed=0)


def _train_or_reuse(cfg: TrainConfig) -> None:
    run = cfg.run_path
    if finished_and_current(cfg):
        print(f"demo: reusing finished run {run}")
        return
    if (run / "summary.json").exists():
        print(f"demo: {run} is finished but from another config or other base weights; training it again")
        shutil.rmtree(run)
    resume = (run / "checkpoint.pt").exists()
    trainer, _ = build(replace(cfg, resume=resume))
    trainer.fit()


def run_demo(out_dir: str | Path = "runs/demo", steps: int | None = None,
             base: TrainConfig = DEMO) -> dict[str, dict[str, float]]:
    """Train FARE and LORE, evaluate them with the original encoder, print and save the table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    base = replace(base, steps=steps or base.steps).validate()
    clip = load_clip(base.model, base.pretrained, cache_dir=base.cache_dir, device=resolve_device(base.device))
    original = frozen_copy(clip.encoder)
    encoders = {"original": original}
    for method in ("fare", "lore"):
        cfg = replace(base, method=method, run_dir=str(out / method))
        _train_or_reuse(cfg)
        tuned = load_clip(cfg.model, cfg.pretrained, image_encoder=out / method / "encoder.pt",
                          cache_dir=cfg.cache_dir, device=original.mean.device)
        encoders[method.upper()] = tuned.encoder
    bundle = digits()
    images, labels = bundle.test.tensors
    weights = clip.class_embeddings(bundle.classnames, bundle.templates)
    results = {}
    for name, encoder in encoders.items():
        results[name] = evaluate_encoder(encoder, original, weights, images.to(original.mean.device),
                                         labels.to(original.mean.device), EVAL_EPS, rho=base.rho,
                                         steps=EVAL_PGD_STEPS, seed=base.seed)
    wall = time.perf_counter() - start
    table = format_table(results)
    print(table)
    print(f"demo wall time {wall:.0f} s (torch threads: {torch.get_num_threads()})")
    atomic_write_json(out / "results.json", {"config": base.to_dict(), "eval_eps": list(EVAL_EPS),
                                             "pgd_steps": EVAL_PGD_STEPS, "results": results,
                                             "wall_time_s": wall})
    (out / "results.md").write_text(table + "\n")
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
