"""The README's first command: FARE, update-matched FARE, FARE-reg and LORE on the embedded default.

Every row fine-tunes the embedded model's image tower on digits with the 'demo' recipe (lorekit/recipes.toml:
the same ε, steps, batch size, learning rate, attack and seed) and is evaluated the same way:

- clean zero-shot accuracy on the held-out split of every suite domain (digits, words, shapes, textures;
  400 images each, 397 for digits) and their average: fine-tuning sees digits only, so the other domains
  show what zero-shot accuracy the fine-tuning costs (the LORE paper's point, made there on 13 data sets);
- robust zero-shot accuracy on digits under PGD-`EVAL_PGD_STEPS` (cross-entropy, seeded) at ε ∈ EVAL_EPS,
  on a fixed subset of `ROBUST_SAMPLES` held-out digits (the same images for every row and seed);
- embedding fidelity mean ‖φθ(x) − φθ0(x)‖²/‖φθ0(x)‖² and the fraction of images that satisfy LORE's constraint
  at the demo's ρ, on the held-out digits (defined for every row, the original's is 1);
- the training passes the run spent (lorekit.ledger: reference, attack and update passes).

Rows: the original encoder; FARE (one update per adversarial batch); FARE with K updates per batch (LORE's K: the
update-matched control); FARE-reg at the best λ of a small sweep (`FARE_REG_LAMS`, chosen by `best_lam`); LORE.
The runs train in `workers` processes at a time (one torch thread each). With several seeds every cell is the
mean ± std over the seeds. Re-running reuses finished runs.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .data import DIGITS_TEST_SIZE, fixed_subset, load_dataset, stack
from .evaluate import clean_accuracy, embedding_metrics, pgd_accuracy, robust_key
from .models import ZeroShotClassifier
from .recipes import recipe
from .rundir import atomic_write_json, atomic_write_text, check_output_dir, read_metrics
from .suite import SUITE

RECIPE = "demo"
EVAL_EPS = (2 / 255, 4 / 255)
EVAL_PGD_STEPS = 20
ROBUST_SAMPLES = 200  # held-out digits attacked per row (a fixed subset, drawn with seed 0)
FARE_REG_LAMS = (1.0, 10.0, 100.0)  # FARE-reg's small λ sweep; `best_lam` picks the row's λ from it
SELECT_EPS = 4 / 255  # best_lam's robustness criterion: robust accuracy at this ε
ORIGINAL = "original"


# ------------------------------------------------------------------------------------------- the rows
@dataclass(frozen=True)
class Job:
    """One training run of the demo: a row (or a FARE-reg sweep point) at one seed."""

    key: str  # 'fare', 'fare-k5', 'fare-reg-lam0.3', 'lore'
    method: str
    seed: int
    overrides: dict[str, Any] = field(default_factory=dict)

    def config(self, out: Path, steps: int | None = None):
        return recipe(RECIPE, self.method, steps=steps, seed=self.seed,
                      run_dir=str(out / "runs" / f"seed{self.seed}" / self.key), **self.overrides)


def jobs(seeds: Sequence[int], lams: Sequence[float] = FARE_REG_LAMS) -> list[Job]:
    """Every run the demo trains: per seed FARE, FARE with LORE's K, FARE-reg at each λ, LORE (LORE first:
    it is the slowest, so two workers finish together)."""
    k = recipe(RECIPE, "lore").updates_per_batch
    out = []
    for seed in seeds:
        out += [Job("lore", "lore", seed), Job("fare", "fare", seed), Job(f"fare-k{k}", "fare", seed, {"primal_steps": k})]
        out += [Job(f"fare-reg-lam{lam:g}", "fare-reg", seed, {"lam": lam}) for lam in lams]
    return out


def row_labels(k: int) -> dict[str, str]:
    return {ORIGINAL: "original", "fare": "FARE", f"fare-k{k}": f"FARE, K={k} (update-matched)", "fare-reg": "FARE-reg",
            "lore": f"LORE (K={k})"}


# ------------------------------------------------------------------------------------------- evaluation
class SuiteEvaluator:
    """The demo's evaluation: zero-shot clean accuracy on every suite domain, PGD robust accuracy on a digits
    subset, fidelity and constraint satisfaction on the workbench's held-out digits. The same images for every
    encoder. Notebook 3 evaluates its sweep's points with it too (`eps`, `pgd_steps` its own)."""

    def __init__(self, bench, rho: float, robust_samples: int = ROBUST_SAMPLES, *,
                 eps: Sequence[float] = EVAL_EPS, pgd_steps: int = EVAL_PGD_STEPS) -> None:
        self.bench, self.rho, self.eps, self.pgd_steps = bench, rho, tuple(eps), pgd_steps
        clip, device = bench.clip, bench.device
        self.domains: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for name in SUITE:
            if name == bench.cfg.dataset:
                x, y = stack(bench.data.test)
                weights = bench.class_embeddings
            else:
                data = load_dataset(name, image_size=clip.encoder.image_size[0])
                x, y = stack(data.test)
                weights = clip.class_embeddings(data.classnames, data.templates, device)
            self.domains[name] = (x.to(device), y.to(device), weights)
        idx = fixed_subset(len(bench.images), robust_samples, 0)
        self.robust_images, self.robust_labels = bench.images[idx], bench.labels[idx]

    @classmethod
    def from_config(cls, cfg, robust_samples: int = ROBUST_SAMPLES) -> "SuiteEvaluator":
        """The evaluator of `cfg`'s model on the whole held-out split of its data set (digits)."""
        from .workbench import setup

        return cls(setup(replace(cfg, eval_samples=DIGITS_TEST_SIZE)), cfg.rho, robust_samples)

    def __call__(self, encoder: torch.nn.Module, seed: int = 0) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, (x, y, weights) in self.domains.items():
            out[f"clean_{name}"] = clean_accuracy(ZeroShotClassifier(encoder, weights), x, y)
        out["clean_avg"] = sum(out[f"clean_{n}"] for n in self.domains) / len(self.domains)
        digits = ZeroShotClassifier(encoder, self.bench.class_embeddings)
        for eps in self.eps:
            out[robust_key(eps)] = pgd_accuracy(digits, self.robust_images, self.robust_labels, eps,
                                                steps=self.pgd_steps, seed=seed)
        out.update(embedding_metrics(encoder, self.bench.original, self.bench.images, self.rho))
        return out


_EVALUATOR: SuiteEvaluator | None = None


def _worker_init(parent: int) -> None:
    torch.set_num_threads(1)
    threading.Thread(target=_stop_when_orphaned, args=(parent,), daemon=True).start()


def _stop_when_orphaned(parent: int) -> None:
    """A worker whose demo process was killed (a lone SIGTERM, SIGKILL) would go on through the queued runs:
    it signals itself instead, every second, so a run in progress checkpoints at its next step boundary and
    stops (lorekit.stopping), and the next signal ends the worker."""
    while True:
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)


def _run_job(job: Job, out: str, steps: int | None, robust_samples: int) -> dict[str, Any]:
    """Train one job (or read it back) and evaluate it; in a worker process."""
    from .trainer import train

    global _EVALUATOR
    cfg = job.config(Path(out), steps)
    summary = train(cfg, existing="reuse", progress=False)
    if _EVALUATOR is None or _EVALUATOR.rho != cfg.rho:
        _EVALUATOR = SuiteEvaluator.from_config(cfg, robust_samples)
    metrics = _EVALUATOR(_EVALUATOR.bench.encoder_of(cfg.run_dir))
    metrics["training_passes"] = summary["ledger"]["training_passes"]
    metrics["updates"] = summary["ledger"]["updates"]
    metrics["train_wall_s"] = summary["ledger"]["wall_time_s"]
    records = [r for r in read_metrics(cfg.run_path) if r.get("kind") == "train"]
    curves = {"step": [r["step"] for r in records], "violation": [r["violation"] for r in records],
              "rel_dist": [r["rel_dist"] for r in records]}
    if records and "lambda_mean" in records[0]:
        for key in ("lambda_mean", "lambda_q10", "lambda_q90"):
            curves[key] = [r[key] for r in records]
    return {"key": job.key, "method": job.method, "seed": job.seed, "overrides": job.overrides,
            "metrics": metrics, "curves": curves}


def _run_original(out: str, robust_samples: int) -> dict[str, Any]:
    global _EVALUATOR
    cfg = recipe(RECIPE, "lore")
    _EVALUATOR = SuiteEvaluator.from_config(cfg, robust_samples)
    metrics = _EVALUATOR(_EVALUATOR.bench.original)
    metrics.update(training_passes=0, updates=0, train_wall_s=0.0)
    return {"key": ORIGINAL, "method": ORIGINAL, "seed": None, "overrides": {}, "metrics": metrics, "curves": {}}


# ------------------------------------------------------------------------------------------- the table
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def aggregate(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, tuple[float, float]]]:
    """{row key: {metric: (mean, std)}} over the runs (seeds) of each key."""
    keys = list(dict.fromkeys(r["key"] for r in runs))
    out = {}
    for key in keys:
        rows = [r["metrics"] for r in runs if r["key"] == key]
        out[key] = {m: mean_std([r[m] for r in rows]) for m in rows[0]}
    return out


def best_lam(agg: Mapping[str, Mapping[str, tuple[float, float]]], lams: Sequence[float],
             reference: str = "fare", eps: float = SELECT_EPS) -> float:
    """FARE-reg's λ for the table: among the swept λ whose mean robust accuracy at `eps` is at least
    `reference`'s (FARE's), the one with the best mean average clean accuracy over the suite; when no λ is
    that robust, the most robust λ."""
    rkey = robust_key(eps)
    target = agg[reference][rkey][0]
    stats = {lam: agg[f"fare-reg-lam{lam:g}"] for lam in lams}
    robust_enough = [lam for lam in lams if stats[lam][rkey][0] >= target]
    if robust_enough:
        return max(robust_enough, key=lambda lam: (stats[lam]["clean_avg"][0], stats[lam][rkey][0]))
    return max(lams, key=lambda lam: (stats[lam][rkey][0], stats[lam]["clean_avg"][0]))


def _cell(stat: tuple[float, float], scale: float, digits: int, seeds: int) -> str:
    mean, std = stat
    text = f"{scale * mean:.{digits}f}"
    return text + (f" ± {scale * std:.{digits}f}" if seeds > 1 else "")


def format_table(rows: Mapping[str, Mapping[str, tuple[float, float]]], labels: Mapping[str, str],
                 seeds: int = 1) -> str:
    """The markdown table: one line per row (in `rows` order), cells 'mean ± std' over `seeds` seeds."""
    eps_keys = [robust_key(e) for e in EVAL_EPS]
    head = (["encoder"] + [f"clean {d}" for d in SUITE] + ["clean avg"]
            + [f"PGD-{EVAL_PGD_STEPS} @{k.split('@')[1]}/255" for k in eps_keys]
            + ["fidelity", "satisfied", "training passes"])
    lines = [head, ["---"] * len(head)]
    for key, r in rows.items():
        passes = r["training_passes"][0]
        lines.append([labels.get(key, key)] + [_cell(r[f"clean_{d}"], 100, 1, seeds) for d in SUITE]
                     + [_cell(r["clean_avg"], 100, 1, seeds)] + [_cell(r[k], 100, 1, seeds) for k in eps_keys]
                     + [_cell(r["fidelity"], 1, 3, seeds), _cell(r["satisfied"], 100, 0, seeds) + " %",
                        f"{passes / 1e3:.1f} k" if passes else "0"])
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_demo(out_dir: str | Path = "runs/demo", steps: int | None = None, seeds: Sequence[int] = (0,),
             workers: int = 2, lams: Sequence[float] = FARE_REG_LAMS, robust_samples: int = ROBUST_SAMPLES,
             progress: bool = True, command: str = "python -m lorekit demo") -> dict[str, Any]:
    """Train every row at every seed, evaluate, print and write results.md, results.json and demo.png."""
    out = Path(out_dir)
    base = recipe(RECIPE, "lore", steps=steps)
    todo = jobs(seeds, lams)
    check_output_dir(out, "out")
    for job in todo:
        check_output_dir(job.config(out, steps).run_path, "out")
    out.mkdir(parents=True, exist_ok=True)
    commit = git_commit()  # the code that runs: taken before the runs, so later edits do not mislabel it
    start = time.perf_counter()
    ctx = get_context("spawn")
    with ProcessPoolExecutor(max_workers=max(1, workers), mp_context=ctx, initializer=_worker_init,
                             initargs=(os.getpid(),)) as pool:
        futures = [pool.submit(_run_job, job, str(out), steps, robust_samples) for job in todo]
        original = pool.submit(_run_original, str(out), robust_samples)
        runs = []
        for i, fut in enumerate(futures):
            runs.append(fut.result())
            if progress:
                r = runs[-1]
                print(f"[{i + 1}/{len(todo)}] seed {r['seed']} {r['key']}: clean avg {100 * r['metrics']['clean_avg']:.1f}"
                      f", robust@4 {100 * r['metrics'][robust_key(4 / 255)]:.1f}, satisfied "
                      f"{100 * r['metrics']['satisfied']:.0f} % ({time.perf_counter() - start:.0f} s)", flush=True)
        runs.append(original.result())
    wall = time.perf_counter() - start
    return write_report(out, runs, base, seeds=seeds, lams=lams, robust_samples=robust_samples, workers=workers,
                        wall=wall, commit=commit, command=command)


def write_report(out: Path, runs: Sequence[Mapping[str, Any]], base, *, seeds: Sequence[int], lams: Sequence[float],
                 robust_samples: int, workers: int, wall: float, commit: str, command: str) -> dict[str, Any]:
    """The table (printed and results.md), results.json and demo.png from the evaluated runs."""
    agg = aggregate(runs)
    lam = best_lam(agg, lams)
    rkey = robust_key(SELECT_EPS)
    matched = agg[f"fare-reg-lam{lam:g}"][rkey][0] >= agg["fare"][rkey][0]
    k = base.updates_per_batch
    rows = {ORIGINAL: agg[ORIGINAL], "fare": agg["fare"], f"fare-k{k}": agg[f"fare-k{k}"],
            "fare-reg": agg[f"fare-reg-lam{lam:g}"], "lore": agg["lore"]}
    swept = ", ".join(f"{v:g}" for v in lams)
    labels = {**row_labels(k), "fare-reg": f"FARE-reg (λ={lam:g} of {swept}" + ("" if matched else ": most robust")
              + ")"}
    table = format_table(rows, labels, len(seeds))
    seeds_text = " ".join(map(str, seeds))
    rule = (f"FARE-reg's λ: of λ ∈ {{{swept}}}, the one with the best mean clean avg among those whose mean "
            f"robust@{SELECT_EPS * 255:g} is at least FARE's; when none is, the most robust one "
            + ("(here λ=%g reached FARE's robustness)." % lam if matched
               else f"(here none did: λ={lam:g} is the most robust, {100 * rows['fare-reg'][rkey][0]:.2f} vs FARE's "
                    f"{100 * rows['fare'][rkey][0]:.2f})."))
    header = (f"Demo recipe: ε = {base.eps * 255:g}/255 (ℓ∞ PGD-{base.attack_steps} in training), {base.steps} batches "
              f"of {base.batch_size} digits, AdamW lr {base.lr:g}; LORE ρ = {base.rho:g}, K = {k}, dual lr "
              f"{base.dual_lr:g}. Seeds: {seeds_text} ({'mean ± std' if len(seeds) > 1 else 'one seed'}). "
              f"Clean: zero-shot on each suite domain's held-out split; robust: digits, PGD-{EVAL_PGD_STEPS} "
              f"(cross-entropy) on {robust_samples} fixed held-out digits; fidelity ‖φθ−φθ0‖²/‖φθ0‖² and satisfied "
              f"(‖φθ−φθ0‖² ≤ ρ‖φθ0‖², ρ = {base.rho:g}) on the held-out digits; training passes from each run's "
              f"ledger. {rule}\n\n"
              f"Command: `{command}`; commit {commit}; wall time {wall:.0f} s "
              f"({workers} worker process(es), 1 torch thread each).\n")
    print(table)
    print(f"demo wall time {wall:.0f} s")
    atomic_write_json(out / "results.json", {
        "command": command, "commit": commit, "config": base.to_dict(), "seeds": list(seeds), "eval_eps": list(EVAL_EPS),
        "pgd_steps": EVAL_PGD_STEPS, "robust_samples": robust_samples, "fare_reg_lams": list(lams),
        "fare_reg_best_lam": lam, "wall_time_s": wall, "workers": workers,
        "rows": {key: {m: list(v) for m, v in r.items()} for key, r in rows.items()}, "labels": labels,
        "runs": list(runs)})
    atomic_write_text(out / "results.md", header + "\n" + table + "\n")
    plot(runs, rows, labels, out / "demo.png", rho=base.rho, lam=lam, k=k)
    print(f"demo: results.md, results.json and demo.png written to {out}")
    return {"rows": rows, "labels": labels, "runs": runs, "wall_time_s": wall, "best_lam": lam}


def rewrite(out_dir: str | Path) -> dict[str, Any]:
    """Write results.md and demo.png again from `out_dir`/results.json (no training, no evaluation)."""
    from .config import TrainConfig

    out = Path(out_dir)
    data = load_results(out / "results.json")
    return write_report(out, data["runs"], TrainConfig.from_dict(data["config"]), seeds=data["seeds"],
                        lams=data["fare_reg_lams"], robust_samples=data["robust_samples"], workers=data["workers"],
                        wall=data["wall_time_s"], commit=data["commit"], command=data["command"])


# ------------------------------------------------------------------------------------------- the figure
def _mean_curve(runs: Sequence[Mapping[str, Any]], key: str, name: str) -> tuple[list[int], list[float]]:
    curves = [r["curves"] for r in runs if r["key"] == key and r["curves"].get(name)]
    if not curves:
        return [], []
    n = min(len(c[name]) for c in curves)
    return curves[0]["step"][:n], [sum(c[name][i] for c in curves) / len(curves) for i in range(n)]


def _smooth(values: Sequence[float], window: int = 5) -> list[float]:
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1): i + 1]
        out.append(sum(part) / len(part))
    return out


def plot(runs: Sequence[Mapping[str, Any]], rows: Mapping[str, Mapping[str, tuple[float, float]]],
         labels: Mapping[str, str], path: Path, *, rho: float, lam: float, k: int) -> None:
    """Three panels: average clean vs robust accuracy per row (± std); the fraction of the training batch
    violating ‖φθ−φθ0‖² ≤ ρ‖φθ0‖² over training; LORE's λ(x) (mean, 10–90 % band) over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .methods import METHODS

    colors = {ORIGINAL: "#555555", "fare": METHODS["fare"].color, f"fare-k{k}": "#17becf",
              "fare-reg": METHODS["fare-reg"].color, "lore": METHODS["lore"].color}
    run_key = {"fare-reg": f"fare-reg-lam{lam:g}"}
    rkey = robust_key(SELECT_EPS)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for key, r in rows.items():
        ax.errorbar(100 * r["clean_avg"][0], 100 * r[rkey][0], xerr=100 * r["clean_avg"][1], yerr=100 * r[rkey][1],
                    fmt="*" if key == ORIGINAL else "o", ms=10, color=colors[key], label=labels[key], capsize=3)
    ax.set_xlabel("clean zero-shot accuracy, suite average (%)")
    ax.set_ylabel(f"digits robust accuracy, PGD-{EVAL_PGD_STEPS} @{SELECT_EPS * 255:g}/255 (%)")
    ax.set_title("clean vs robust (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    ax = axes[1]
    for key in rows:
        if key == ORIGINAL:
            continue
        steps, values = _mean_curve(runs, run_key.get(key, key), "violation")
        ax.plot(steps, [100 * v for v in _smooth(values)], color=colors[key], label=labels[key])
    ax.set_xlabel("training step")
    ax.set_ylabel("batch violating the constraint (%)")
    ax.set_title(f"constraint violation, ρ = {rho:g} (5-step mean)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[2]
    steps, mean = _mean_curve(runs, "lore", "lambda_mean")
    _, q10 = _mean_curve(runs, "lore", "lambda_q10")
    _, q90 = _mean_curve(runs, "lore", "lambda_q90")
    if steps:
        ax.fill_between(steps, q10, q90, color=colors["lore"], alpha=0.25, label="10–90 % of the batch")
        ax.plot(steps, mean, color=colors["lore"], label="mean λ(x)")
    ax.set_xlabel("training step")
    ax.set_ylabel("λ(x)")
    ax.set_title("LORE's multiplier over training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_results(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


__all__ = ["run_demo", "format_table", "aggregate", "best_lam", "mean_std", "SuiteEvaluator", "jobs"]
