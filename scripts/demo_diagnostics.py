"""Why LORE beats FARE in the demo's table but not the update-matched control: single-seed diagnostics at the
demo's recipe (lorekit/recipes.toml 'demo'), evaluated exactly like the demo's rows (lorekit.demo.SuiteEvaluator).

    PYTHONPATH=. python scripts/demo_diagnostics.py [--out runs/diagnostics] [--seed 0]

Runs, two at a time: LORE at ρ = 0.03 and 0.1 (does the constraint still bind?), LORE with K = 1 (the updates),
LORE with the paper's dual lr 5e-4 and with a scalar λ (the multiplier's speed and its input), and FARE-reg with
K = 5 at λ = 10 and 30 (a constant penalty with LORE's updates). Writes results.json and results.md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from lorekit import demo
from lorekit.evaluate import robust_key

JOBS = (("lore-rho0.1", "lore", {"rho": 0.1}), ("lore-rho0.03", "lore", {"rho": 0.03}),
        ("lore-k1", "lore", {"primal_steps": 1}), ("lore-duallr5e-4", "lore", {"dual_lr": 5e-4}),
        ("lore-scalar", "lore", {"dual": "scalar"}),
        ("farereg-k5-lam10", "fare-reg", {"primal_steps": 5, "lam": 10.0}),
        ("farereg-k5-lam30", "fare-reg", {"primal_steps": 5, "lam": 30.0}))


def summary(run: dict) -> dict:
    m, c = run["metrics"], run["curves"]
    lam = c.get("lambda_mean", [])
    return {"key": run["key"], "overrides": run["overrides"], "clean_avg": 100 * m["clean_avg"],
            "robust@2": 100 * m[robust_key(2 / 255)], "robust@4": 100 * m[robust_key(4 / 255)],
            "fidelity": m["fidelity"], "satisfied": 100 * m["satisfied"], "training_passes": m["training_passes"],
            "lambda_max": max(lam) if lam else None, "lambda_last": lam[-1] if lam else None,
            "violation_last10": sum(c["violation"][-10:]) / 10}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/diagnostics")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    out = Path(args.out)
    jobs = [demo.Job(key, method, args.seed, overrides) for key, method, overrides in JOBS]
    start = time.perf_counter()
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"), initializer=demo._worker_init,
                             initargs=(os.getpid(),)) as pool:
        rows = [summary(f.result()) for f in [pool.submit(demo._run_job, j, str(out), None, demo.ROBUST_SAMPLES)
                                              for j in jobs]]
    write(out, rows, {"command": "PYTHONPATH=. python scripts/demo_diagnostics.py --out " + str(out),
                      "commit": demo.git_commit(), "seed": args.seed, "wall_time_s": time.perf_counter() - start})


def write(out: Path, rows: list[dict], meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    lines = ["| run | clean avg | PGD-20 @2/255 | PGD-20 @4/255 | fidelity | satisfied (own ρ) | max mean λ | last mean λ |"
             " training passes |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lam = (f"{r['lambda_max']:.1f} | {r['lambda_last']:.2f}" if r["lambda_max"] is not None else "— | —")
        lines.append(f"| {r['key']} | {r['clean_avg']:.1f} | {r['robust@2']:.1f} | {r['robust@4']:.1f} | "
                     f"{r['fidelity']:.4f} | {r['satisfied']:.0f} % | {lam} | {r['training_passes'] / 1e3:.1f} k |")
    (out / "results.md").write_text(f"Command: `{meta['command']}`; commit {meta['commit']}; seed {meta['seed']}; "
                                    f"the demo's recipe and evaluation.\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
