"""Command line: python -m lorekit {train,eval,robust-eval,export,demo,sweep} ...  (see --help of each)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from contextlib import nullcontext

from . import export, recipes, robustness, sweep
from .config import ConfigError, TrainConfig, add_config_arguments, given_fields, resolve_device
from .progress import silenced
from .stopping import RunStopped


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every option's default appended unless its help already states it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and "default" not in text and action.default not in (None, False, "", [],
                                                                                        argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def _train(args: argparse.Namespace) -> int:
    from .trainer import train

    overrides = given_fields(args)
    cfg = recipes.recipe(args.recipe, **overrides) if args.recipe else TrainConfig.from_dict(overrides)
    summary = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one report
        print(json.dumps(summary["final"], indent=2))
        print(f"run written to {summary['run_dir']}")
    return 0


EVAL_MODEL_FIELDS = ("model", "pretrained", "dataset")  # eval's flags that a --run's config sets instead


def _eval(args: argparse.Namespace) -> int:
    from .evaluate import ATTACKS
    from .rundir import is_finished, read_config
    from .workbench import setup

    bad = [e for e in args.eps if not 0 < e <= 255]
    if bad or args.samples < 1 or args.steps < 1:
        raise ConfigError(f"eps={bad}: every ε must lie in (0, 255] (units of 1/255)" if bad else
                          f"samples={args.samples}, steps={args.steps}: both must be integers >= 1")
    if not set(args.attack) <= set(ATTACKS):
        raise ConfigError(f"attack={args.attack}: choose one or more of {', '.join(ATTACKS)}")
    resolve_device(args.device)
    given = {k: getattr(args, k) for k in EVAL_MODEL_FIELDS if getattr(args, k) is not None}
    if args.run:
        if given:
            raise ConfigError(f"run={args.run!r}: the model and data set come from the run's config; leave out "
                              + ", ".join(f"--{k}" for k in given))
        cfg = read_config(args.run, device=args.device, eval_samples=args.samples)
        if not is_finished(args.run):
            raise ConfigError(f"run={args.run!r}: not a finished run (no summary.json); finish it first with "
                              "`python -m lorekit train` and the flags it was started with, plus --resume")
    else:
        cfg = TrainConfig(**given, device=args.device, eval_samples=args.samples).validate()
    bench = setup(cfg)
    eps = [e / 255 for e in args.eps]
    rho = cfg.rho if args.run else None
    if args.run:  # with the run's own text tower when it trained one
        results = bench.evaluate_run(args.run, eps, steps=args.steps, rho=rho, seed=0, attacks=args.attack,
                                     progress=True)
    else:
        results = bench.evaluate(bench.original, eps, steps=args.steps, rho=rho, seed=0, attacks=args.attack,
                                 progress=True)
    print(json.dumps(results, indent=2))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    import shlex
    import sys

    if args.rewrite:
        from .demo import rewrite

        rewrite(args.out)
        return 0
    command = "python -m lorekit demo" + "".join(f" {shlex.quote(a)}" for a in sys.argv[2:])
    run_demo(out_dir=args.out, steps=args.steps, seeds=args.seeds, workers=args.workers, progress=not args.quiet,
             command=command)
    return 0


def _add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress reports (results are still printed)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorekit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, description: str, wrap: bool = True) -> argparse.ArgumentParser:
        text = "\n\n".join(textwrap.fill(par, 100) for par in description.split("\n\n")) if wrap else description
        return commands.add_parser(name, help=help, description=text, formatter_class=HelpFormatter)

    p = command("train", "fine-tune an image encoder (any registered method)",
                "Fine-tune a CLIP image encoder adversarially (FARE, FARE-reg, LORE or TeCoA) into a run directory: "
                "config.json, metrics.jsonl, checkpoints, encoder.pt, summary.json. Progress goes to stderr.\n\n"
                + (TrainConfig.__doc__ or ""))
    p.add_argument("--recipe", default="", help="named recipe (lorekit/recipes.toml) the other flags override: "
                   + ", ".join(recipes.names()))
    add_config_arguments(p)
    _add_quiet(p)
    p.set_defaults(func=_train)

    p = command("eval", "zero-shot clean/robust (PGD, FGSM, APGD) accuracy and embedding fidelity",
                "Evaluate an image encoder on a fixed seeded subset of a data set's test split: zero-shot clean "
                "accuracy, robust accuracy under each --attack at each ε, and (for a run) cosine and fidelity "
                "to the original encoder. The encoder is a finished run's (--run, which also names the model and "
                "data set) or a model's own (--model/--pretrained/--dataset). Prints JSON.")
    p.add_argument("--run", default="", help="a finished run directory written by `lorekit train` (uses its config)")
    p.add_argument("--model", help=f"open_clip model name or hf-hub:org/name (default: {TrainConfig.model})")
    p.add_argument("--pretrained", help=f"pretrained tag or checkpoint file (default: {TrainConfig.pretrained}; "
                   "none for an hf-hub model)")
    p.add_argument("--dataset", help=f"data set name or image folder (default: {TrainConfig.dataset})")
    p.add_argument("--eps", type=float, nargs="+", default=[2, 4, 8], help="ε values in units of 1/255")
    p.add_argument("--samples", type=int, default=1000, help="test images to evaluate (seeded subset)")
    p.add_argument("--attack", nargs="+", default=["pgd"], metavar="ATTACK",
                   help="attacks on the zero-shot cross-entropy, one or more of: pgd (lorekit's PGD: random start, "
                        "momentum, step ε/4), fgsm (one step of size ε), apgd (APGD-CE + APGD-T, AutoAttack's "
                        "'custom'), typographic (a wrong class name written on each image, lorekit.typographic; "
                        "no ε); robust accuracy is reported as robust_acc@ε, fgsm_acc@ε, apgd_acc@ε, typographic "
                        "accuracy as typo_acc and the fraction classified as the written class as typo_written")
    p.add_argument("--steps", type=int, default=20, help="PGD and APGD iterations (the AdvCLIP-LoRA paper: PGD-100)")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    _add_quiet(p)
    p.set_defaults(func=_eval)

    p = command("robust-eval", "AutoAttack-style zero-shot robustness (APGD-CE + APGD-T)", robustness.__doc__, wrap=False)
    robustness.add_arguments(p)
    _add_quiet(p)
    p.set_defaults(func=robustness.run)

    p = command("export", "write a finished run as an open_clip / Hugging Face Hub model folder", export.__doc__,
                wrap=False)
    export.add_arguments(p)
    p.set_defaults(func=export.run)

    p = command("demo", "FARE, update-matched FARE, FARE-reg and LORE on the embedded default: a table and a plot",
                "Fine-tune on digits with the 'demo' recipe (lorekit/recipes.toml): FARE, FARE with LORE's K updates "
                "per batch, FARE-reg at each λ of a small sweep (the table shows the best, see lorekit/demo.py), and "
                "LORE; then evaluate them and the original encoder: clean zero-shot accuracy on every suite domain, "
                "PGD-20 robust accuracy on digits at ε = 2, 4/255, fidelity, constraint satisfaction, training "
                "passes. Writes results.md, results.json and demo.png to --out; re-running reuses finished runs.")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--steps", type=int, default=None, help="training steps per method (default: the demo "
                   "recipe's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds; several give mean ± std")
    p.add_argument("--workers", type=int, default=2, help="runs trained at a time (processes, one thread each)")
    p.add_argument("--rewrite", action="store_true", help="only write results.md and demo.png again from "
                   "OUT/results.json (no training, no evaluation)")
    _add_quiet(p)
    p.set_defaults(func=_demo)

    p = command("sweep", "run a notebook over a parameter grid with papermill", sweep.__doc__.split("\n\n")[0])
    sweep.add_arguments(p)
    p.set_defaults(func=sweep.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with silenced() if getattr(args, "quiet", False) else nullcontext():
            return args.func(args)
    except ConfigError as e:
        print(f"lorekit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:  # a signal (checkpoint written) or divergence: one line, no traceback
        print(f"lorekit {args.command}: stopped: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
