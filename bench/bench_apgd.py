"""Wall time of lorekit's APGD-CE + APGD-T against pyautoattack's, on the same inputs at equal strength.

Equal strength: both run APGD-CE (1 restart) then APGD-T (9 targets) with the same iterations on
the same samples, and the robust accuracies are printed side by side. Implementations run in
alternation, `--repeats` times each; medians of wall time and of process CPU time are reported
(CPU time is the steadier one on a shared machine; with --threads 1 it tracks wall time).
The optional 'lorekit-nocompact' variant keeps fooled samples in the batch until the end of each
run, as the official code does, to show what compaction saves. Writes bench/results/bench_apgd.json.

    python bench/bench_apgd.py --threads 1
    python bench/bench_apgd.py --samples 100 --eps 4 --n-iter 20 --variants lorekit pyautoattack lorekit-nocompact
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crosscheck_autoattack import FARE, add_common_arguments, pyautoattack_robust, setup  # noqa: E402

from lorekit.apgd import autoattack_custom  # noqa: E402
from lorekit.robustness import machine  # noqa: E402

VARIANTS = ("lorekit", "pyautoattack", "lorekit-nocompact")


def run_variant(variant: str, clf: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, n_iter: int,
                batch_size: int) -> tuple[float, float, float]:
    """(robust accuracy, wall seconds, process CPU seconds) of one implementation.

    CPU seconds are the steadier measure on a shared machine: other processes stretch wall time.
    """
    start, cpu = time.perf_counter(), time.process_time()
    if variant == "pyautoattack":
        acc = pyautoattack_robust(clf, x, y, eps, n_iter, batch_size).float().mean().item()
    else:
        acc = autoattack_custom(clf, x, y, eps, n_iter=n_iter, n_target_classes=9, batch_size=batch_size,
                                compact=variant == "lorekit").robust_accuracy
    return acc, time.perf_counter() - start, time.process_time() - cpu


def _write(args: argparse.Namespace, rows: list[dict]) -> dict:
    totals = {kind: {v: sum(r[f"median_{kind}"][v] for r in rows) for v in args.variants} for kind in ("wall", "cpu")}
    out = {"samples": args.samples, "n_iter": args.n_iter, "n_target_classes": 9, "apgd_ce_restarts": 1,
           "batch_size": args.batch_size, "threads": args.threads, "repeats": args.repeats,
           "robust_encoder": FARE.to_dict(), "machine": {**machine(), "device": "cpu"}, "rows": rows,
           "total_seconds": totals}
    if {"lorekit", "pyautoattack"} <= set(args.variants):
        out["total_ratio_lorekit_over_pyautoattack"] = {
            kind: totals[kind]["lorekit"] / totals[kind]["pyautoattack"] for kind in ("wall", "cpu")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, samples=200, out="bench_apgd.json")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["lorekit", "pyautoattack"])
    args = parser.parse_args(argv)
    models, x, y = setup(args)
    rows = []
    for name, clf in models.items():
        for eps in args.eps:
            wall: dict[str, list[float]] = {v: [] for v in args.variants}
            cpu: dict[str, list[float]] = {v: [] for v in args.variants}
            accs: dict[str, float] = {}
            for _ in range(args.repeats):
                for variant in args.variants:
                    accs[variant], seconds, cpu_seconds = run_variant(variant, clf, x, y, eps / 255, args.n_iter,
                                                                      args.batch_size)
                    wall[variant].append(seconds)
                    cpu[variant].append(cpu_seconds)
            row = {"encoder": name, "eps_255": eps, "robust_acc": accs, "wall_seconds": wall, "cpu_seconds": cpu,
                   "median_wall": {v: statistics.median(t) for v, t in wall.items()},
                   "median_cpu": {v: statistics.median(t) for v, t in cpu.items()}}
            rows.append(row)
            print(f"{name:9s} ε={eps:g}/255  " + "  ".join(
                f"{v}: acc {accs[v]:.3f} wall {row['median_wall'][v]:6.1f}s cpu {row['median_cpu'][v]:6.1f}s"
                for v in args.variants) + "".join(
                f"  ratio({kind}) {row[f'median_{kind}']['lorekit'] / row[f'median_{kind}']['pyautoattack']:.2f}"
                for kind in ("wall", "cpu") if {"lorekit", "pyautoattack"} <= set(args.variants)), flush=True)
            _write(args, rows)  # after every row: a long run that is interrupted keeps its numbers
    out = _write(args, rows)
    if "total_ratio_lorekit_over_pyautoattack" in out:
        print("total: " + ", ".join(f"{kind}: lorekit {out['total_seconds'][kind]['lorekit']:.1f}s, pyautoattack "
                                    f"{out['total_seconds'][kind]['pyautoattack']:.1f}s, ratio "
                                    f"{out['total_ratio_lorekit_over_pyautoattack'][kind]:.2f}"
                                    for kind in ("wall", "cpu")))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
