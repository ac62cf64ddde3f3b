"""Command line: python -m lorekit {train,eval,robust-eval,export,demo,sweep} ...  (see --help of each)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace

from . import export, recipes, robustness, sweep
from .config import ConfigError, TrainConfig, add_config_arguments, given_fields
from .stopping import RunStopped


def _train(args: argparse.Namespace) -> int:
    from .trainer import train

    overrides = given_fields(args)
    cfg = recipes.recipe(args.recipe, **overrides) if args.recipe else TrainConfig.from_dict(overrides)
    summary = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one report
        print(json.dumps(summary["final"], indent=2))
        print(f"run written to {summary['run_dir']}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .evaluate import ATTACKS
    from .rundir import read_config
    from .workbench import setup

    bad = [e for e in args.eps if not 0 < e <= 255]
    if bad or args.samples < 1 or args.steps < 1:
        raise ConfigError(f"eps={bad}: every ε must lie in (0, 255] (units of 1/255)" if bad else
                          f"samples={args.samples}, steps={args.steps}: both must be integers >= 1")
    if not set(args.attack) <= set(ATTACKS):
        raise ConfigError(f"attack={args.attack}: choose one or more of {', '.join(ATTACKS)}")
    if args.run:
        saved = read_config(args.run)
        cfg, rho = replace(saved, device=args.device, eval_samples=args.samples), saved.rho
    else:
        cfg, rho = TrainConfig(model=args.model, pretrained=args.pretrained, dataset=args.dataset,
                               device=args.device, eval_samples=args.samples), None
    bench = setup(cfg)
    eps = [e / 255 for e in args.eps]
    if args.run:  # with the run's own text tower when it trained one
        results = bench.evaluate_run(args.run, eps, steps=args.steps, rho=rho, seed=0, attacks=args.attack)
    else:
        results = bench.evaluate(bench.original, eps, steps=args.steps, rho=rho, seed=0, attacks=args.attack)
    print(json.dumps(results, indent=2))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out_dir=args.out, steps=args.steps)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorekit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("train", help="fine-tune an image encoder (any registered method)",
                            description=TrainConfig.__doc__)
    p.add_argument("--recipe", default="", help="named recipe (lorekit/recipes.toml) the other flags override: "
                   + ", ".join(recipes.names()))
    add_config_arguments(p)
    p.set_defaults(func=_train)

    p = commands.add_parser("eval", help="zero-shot clean/robust (PGD, FGSM, APGD) accuracy and embedding fidelity")
    p.add_argument("--run", default="", help="a run directory written by `lorekit train` (uses its config)")
    p.add_argument("--model", default="lorekit-tiny", help="open_clip model name or hf-hub:org/name")
    p.add_argument("--pretrained", default="digits", help="pretrained tag or checkpoint file")
    p.add_argument("--dataset", default="digits", help="data set name or image folder")
    p.add_argument("--eps", type=float, nargs="+", default=[2, 4, 8], help="ε values in units of 1/255")
    p.add_argument("--samples", type=int, default=1000, help="test images to evaluate (seeded subset)")
    p.add_argument("--attack", nargs="+", default=["pgd"], metavar="ATTACK",
                   help="attacks on the zero-shot cross-entropy, one or more of: pgd (lorekit's PGD: random start, "
                        "momentum, step ε/4), fgsm (one step of size ε), apgd (APGD-CE + APGD-T, AutoAttack's "
                        "'custom'); robust accuracy is reported as robust_acc@ε, fgsm_acc@ε, apgd_acc@ε")
    p.add_argument("--steps", type=int, default=20, help="PGD and APGD iterations (the AdvCLIP-LoRA paper: PGD-100)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    p.set_defaults(func=_eval)

    p = commands.add_parser("robust-eval", help="AutoAttack-style zero-shot robustness (APGD-CE + APGD-T)")
    robustness.add_arguments(p)
    p.set_defaults(func=robustness.run)

    p = commands.add_parser("export", help="write a finished run as an open_clip / Hugging Face Hub model folder")
    export.add_arguments(p)
    p.set_defaults(func=export.run)

    p = commands.add_parser("demo", help="FARE vs LORE on the embedded default, with a table and a plot")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--steps", type=int, default=None, help="training steps per method (default: the demo's)")
    p.set_defaults(func=_demo)

    p = commands.add_parser("sweep", help="run a notebook over a parameter grid with papermill")
    sweep.add_arguments(p)
    p.set_defaults(func=sweep.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"lorekit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:  # a signal (checkpoint written) or divergence: one line, no traceback
        print(f"lorekit {args.command}: stopped: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
