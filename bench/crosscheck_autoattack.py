"""Cross-check lorekit's APGD-CE + APGD-T against the official AutoAttack code (pyautoattack).

Same samples, same ε, same iterations, APGD-CE with 1 restart, APGD-T with 9 target classes, on
the embedded tiny CLIP's original image encoder and on a FARE-fine-tuned one (trained here with
lorekit.trainer, reused when its run directory already holds it). Prints a table and writes
bench/results/crosscheck_autoattack.json with both robust accuracies, their per-sample agreement,
wall times, and a description of the machine.

    python bench/crosscheck_autoattack.py                      # 300 samples, ε ∈ {2,4,8}/255, 100 iterations
    python bench/crosscheck_autoattack.py --samples 100 --n-iter 20 --eps 4   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorekit.apgd import autoattack_custom  # noqa: E402
from lorekit.recipes import recipe  # noqa: E402
from lorekit.robustness import machine  # noqa: E402
from lorekit.trainer import train  # noqa: E402
from lorekit.workbench import setup as workbench  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# FARE⁴ on the tiny model: the 'bench-fare4' recipe (the demo's settings; its lr suits the tiny model).
FARE = recipe("bench-fare4", run_dir="runs/bench-fare4")


def classifiers(cache_dir: str, samples: int, seed: int = 0) -> tuple[dict[str, torch.nn.Module], torch.Tensor,
                                                                     torch.Tensor]:
    """{'original', 'fare4'} zero-shot classifiers on the digits test split, and the fixed sample."""
    cfg = replace(FARE, cache_dir=cache_dir)
    train(cfg, existing="reuse")  # trained once, read back after
    bench = workbench(replace(cfg, eval_samples=samples), subset_seed=seed)
    return ({"original": bench.classifier().eval(), "fare4": bench.classifier(bench.encoder_of(cfg.run_dir)).eval()},
            bench.images, bench.labels)


def add_common_arguments(parser: argparse.ArgumentParser, samples: int, out: str) -> None:
    """The options this script and bench_apgd.py share (sample, grid, threads, cache, output file)."""
    parser.add_argument("--samples", type=int, default=samples)
    parser.add_argument("--eps", type=float, nargs="+", default=[2, 4, 8], help="units of 1/255")
    parser.add_argument("--n-iter", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--cache-dir", default=os.environ.get("LOREKIT_CACHE", ".cache"))
    parser.add_argument("--out", default=str(RESULTS / out))


def setup(args: argparse.Namespace) -> tuple[dict[str, torch.nn.Module], torch.Tensor, torch.Tensor]:
    """Pin the thread count, then build the classifiers and the fixed sample."""
    torch.set_num_threads(args.threads)
    return classifiers(args.cache_dir, args.samples)


def pyautoattack_robust(classifier: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, n_iter: int,
                        batch_size: int, seed: int = 0) -> torch.Tensor:
    """Robust flags from the official code, set up to match `autoattack_custom`'s defaults."""
    from pyautoattack import AutoAttack

    aa = AutoAttack(classifier, attacks=["apgd-ce", "apgd-t"], eps=eps, norm="Linf", version="custom", seed=seed,
                    device=x.device)  # its default is the CPU, wherever the model and samples are
    aa.apgd.n_restarts = 1  # 'custom' keeps 5 otherwise
    aa.apgd_targeted.n_target_classes = 9
    for attack in (aa.apgd, aa.apgd_targeted):  # the step-size schedule is derived at construction
        attack.n_iter, attack.n_iter_2 = n_iter, max(int(0.22 * n_iter), 1)
        attack.n_iter_min, attack.size_decr = max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1)
    x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=batch_size)
    with torch.inference_mode():
        return classifier(x_adv).argmax(1) == y


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, samples=300, out="crosscheck_autoattack.json")
    args = parser.parse_args(argv)
    models, x, y = setup(args)
    rows = []
    print(f"{'encoder':9s} {'eps':>6s} {'clean':>6s} {'lorekit':>8s} {'pyAA':>6s} {'agree':>6s} {'t_lk':>7s} "
          f"{'t_pyAA':>7s}")
    for name, clf in models.items():
        for eps in args.eps:
            ours, t_ours = timed(autoattack_custom, clf, x, y, eps / 255, n_iter=args.n_iter, n_target_classes=9,
                                 batch_size=args.batch_size, seed=0)
            theirs, t_theirs = timed(pyautoattack_robust, clf, x, y, eps / 255, args.n_iter, args.batch_size)
            row = {"encoder": name, "eps": eps / 255, "eps_255": eps, "clean_acc": ours.clean_accuracy,
                   "robust_acc_lorekit": ours.robust_accuracy, "robust_acc_pyautoattack": theirs.float().mean().item(),
                   "agreement": (ours.robust == theirs).float().mean().item(),
                   "robust_only_lorekit": int((ours.robust & ~theirs).sum()),
                   "robust_only_pyautoattack": int((~ours.robust & theirs).sum()),
                   "seconds_lorekit": t_ours, "seconds_pyautoattack": t_theirs}
            rows.append(row)
            print(f"{name:9s} {eps:4g}/255 {row['clean_acc']:6.3f} {row['robust_acc_lorekit']:8.3f} "
                  f"{row['robust_acc_pyautoattack']:6.3f} {row['agreement']:6.3f} {t_ours:6.1f}s {t_theirs:6.1f}s",
                  flush=True)
    out = {"samples": args.samples, "n_iter": args.n_iter, "n_target_classes": 9, "apgd_ce_restarts": 1,
           "batch_size": args.batch_size, "threads": args.threads, "robust_encoder": FARE.to_dict(),
           "machine": {**machine(), "device": "cpu"}, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
