"""Wall time of lorekit's APGD-CE + APGD-T against pyautoattack's, on the same inputs at equal strength.

Equal strength: both run APGD-CE (1 restart) then APGD-T (9 targets) with the same iterations on
the same samples, and the robust accuracies are printed side by side. Implementations run in
alternation, `--repeats` times each, and the median wall time counts (the machine may be shared).
The optional 'lorekit-nocompact' variant keeps fooled samples in the batch until the end of each
run, as the official code does, to show what compaction saves. Writes bench/results/bench_apgd.json.

    python bench/bench_apgd.py --threads 1
    python bench/bench_apgd.py --samples 100 --eps 4 --n-iter 20 --variants lorekit pyautoattack lorekit-nocompact
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crosscheck_autoattack import FARE, RESULTS, classifiers, pyautoattack_robust  # noqa: E402

from lorekit.apgd import autoattack_custom  # noqa: E402
from lorekit.robustness import machine  # noqa: E402

VARIANTS = ("lorekit", "pyautoattack", "lorekit-nocompact")


def run_variant(variant: str, clf: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, n_iter: int,
                batch_size: int) -> tuple[float, float]:
    """(robust accuracy, wall seconds) of one implementation."""
    start = time.perf_counter()
    if variant == "pyautoattack":
        acc = pyautoattack_robust(clf, x, y, eps, n_iter, batch_size).float().mean().item()
    else:
        acc = autoattack_custom(clf, x, y, eps, n_iter=n_iter, n_target_classes=9, batch_size=batch_size,
                                compact=variant == "lorekit").robust_accuracy
    return acc, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--eps", type=float, nargs="+", default=[2, 4, 8], help="units of 1/255")
    parser.add_argument("--n-iter", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["lorekit", "pyautoattack"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--cache-dir", default=os.environ.get("LOREKIT_CACHE", ".cache"))
    parser.add_argument("--out", default=str(RESULTS / "bench_apgd.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models, x, y = classifiers(args.cache_dir, args.samples)
    rows = []
    for name, clf in models.items():
        for eps in args.eps:
            times: dict[str, list[float]] = {v: [] for v in args.variants}
            accs: dict[str, float] = {}
            for _ in range(args.repeats):
                for variant in args.variants:
                    accs[variant], seconds = run_variant(variant, clf, x, y, eps / 255, args.n_iter, args.batch_size)
                    times[variant].append(seconds)
            median = {v: statistics.median(t) for v, t in times.items()}
            row = {"encoder": name, "eps_255": eps, "robust_acc": accs, "seconds": times, "median_seconds": median}
            if "pyautoattack" in median and "lorekit" in median:
                row["time_ratio_lorekit_over_pyautoattack"] = median["lorekit"] / median["pyautoattack"]
            rows.append(row)
            print(f"{name:9s} ε={eps:g}/255  " + "  ".join(f"{v}: acc {accs[v]:.3f} {median[v]:7.1f}s"
                                                        for v in args.variants)
                  + (f"  ratio {row['time_ratio_lorekit_over_pyautoattack']:.2f}"
                     if "time_ratio_lorekit_over_pyautoattack" in row else ""), flush=True)
    totals = {v: sum(r["median_seconds"][v] for r in rows) for v in args.variants}
    out = {"samples": args.samples, "n_iter": args.n_iter, "n_target_classes": 9, "apgd_ce_restarts": 1,
           "batch_size": args.batch_size, "threads": args.threads, "repeats": args.repeats,
           "robust_encoder": FARE.to_dict(), "machine": {**machine(), "device": "cpu"}, "rows": rows,
           "total_median_seconds": totals}
    if "pyautoattack" in totals and "lorekit" in totals:
        out["total_time_ratio_lorekit_over_pyautoattack"] = totals["lorekit"] / totals["pyautoattack"]
        print(f"total: lorekit {totals['lorekit']:.1f}s, pyautoattack {totals['pyautoattack']:.1f}s, "
              f"ratio {out['total_time_ratio_lorekit_over_pyautoattack']:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
