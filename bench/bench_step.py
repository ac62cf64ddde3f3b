"""Training-step cost: measured wall time per FARE / LORE step against the encoder passes it needs.

The bound for one step is the time of the passes the method cannot avoid, each timed alone on
the same batch, in round-robin with the steps themselves (so a ratio is measured side by side):
    reference forward (no grad, B images)
  + attack_steps × forward+backward to the input (B images)
  + updates × forward+backward to the parameters + optimiser step (on the images per update)
The step's updates and images per update come from the compute ledger of one step (FARE: 1 update on
B images; LORE: K updates on 2B images, adversarial + clean). The ratio step/bound is the overhead of
everything else (attack bookkeeping, telemetry, the dual step, FARE's telemetry forward). Goal: ≤ 1.15.

    python bench/bench_step.py                                   # embedded default, CPU
    python bench/bench_step.py --model ViT-B-32 --batch-size 128 --precision bf16   # GPU box

Settings: the 'bench-step' recipe (lorekit/recipes.toml). Writes
bench/results/step_<model>_<device>_<precision>.json with the machine's description.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from lorekit.config import resolve_device
from lorekit.models import load_clip
from lorekit.recipes import recipe
from lorekit.robustness import machine
from lorekit.trainer import Trainer

METHODS = ("fare", "lore")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _interleaved(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                 warmup: int) -> dict[str, float]:
    """Median wall time of each fn, timed in round-robin (`warmup` untimed rounds first), so that every
    measurement of a ratio shares the machine's state: clock, caches, other load."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def bench(model: str, pretrained: str, batch_size: int, precision: str, repeats: int, attack_steps: int,
          primal_steps: int, warmup: int = 2) -> dict:
    device = resolve_device("auto")
    clip = load_clip(model, pretrained, device=device)
    size = clip.encoder.image_size
    data = torch.utils.data.TensorDataset(torch.rand(batch_size * 2, 3, *size), torch.zeros(batch_size * 2).long())
    x = data.tensors[0][:batch_size].to(device)
    y = data.tensors[1][:batch_size].to(device)
    out = {"model": model, "batch_size": batch_size, "precision": precision, "attack_steps": attack_steps,
           "repeats": repeats, "machine": {**machine(), "device": str(device)}, "methods": {}}
    trainers = {method: Trainer(recipe("bench-step", method, model=model, pretrained=pretrained,
                                       batch_size=batch_size, attack_steps=attack_steps, primal_steps=primal_steps,
                                       precision=precision, run_dir="/nonexistent"), clip.encoder, data)
                for method in METHODS}
    # what one step of each method spends: updates, and images per update (from the ledger)
    spend = {}
    for method, trainer in trainers.items():
        trainer.train_step(x, y)
        updates = trainer.ledger.updates
        spend[method] = (updates, trainer.ledger.forward["update"] // updates // batch_size)
    trainer = trainers[METHODS[0]]  # the passes below are the same for all: one encoder, one autocast setting
    enc = trainer.encoder

    def ref_forward():
        with torch.no_grad(), trainer.autocast():
            trainer.reference(x)

    def input_fwd_bwd():  # one PGD iteration: a gradient to the input only, in eval mode as the attack runs
        enc.eval()
        xi = x.clone().requires_grad_(True)
        with trainer.autocast():
            loss = enc(xi).float().pow(2).sum()
        torch.autograd.grad(loss, xi)
        enc.train()

    def update(batch: torch.Tensor):
        def step():
            with trainer.autocast():
                loss = enc(batch).float().pow(2).sum() * 1e-12  # tiny: keep the weights where they are
            trainer.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            trainer.optimizer.step()
        return step

    def train_step(method: str):
        return lambda: {k: v.item() for k, v in trainers[method].train_step(x, y).items()}

    sizes = sorted({n for _, n in spend.values()})
    t = _interleaved({"ref_forward": ref_forward, "input_fwd_bwd": input_fwd_bwd,
                      **{f"update_{n}B": update(torch.cat([x] * n)) for n in sizes},
                      **{method: train_step(method) for method in METHODS}}, device, repeats, warmup)
    for method, (updates, n) in spend.items():
        bound = t["ref_forward"] + attack_steps * t["input_fwd_bwd"] + updates * t[f"update_{n}B"]
        step = t[method]
        out["methods"][method] = {"step_s": step, "bound_s": bound, "ratio": step / bound, "updates": updates,
                                  "images_per_update": n * batch_size, "images_per_s": batch_size / step,
                                  "ref_forward_s": t["ref_forward"], "input_fwd_bwd_s": t["input_fwd_bwd"],
                                  "param_update_s": t[f"update_{n}B"]}
        print(f"{method}: step {step * 1e3:.1f} ms, bound {bound * 1e3:.1f} ms, ratio {step / bound:.3f}, "
              f"{batch_size / step:.1f} images/s")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="lorekit-tiny")
    p.add_argument("--pretrained", default="", help="'' = random weights (speed does not depend on them)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--attack-steps", type=int, default=10)
    p.add_argument("--primal-steps", type=int, default=0, help="K for every method; 0: each method's default")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    res = bench(args.model, args.pretrained, args.batch_size, args.precision, args.repeats, args.attack_steps,
                args.primal_steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"step_{args.model}_{res['machine']['device'].split(':')[0]}_{args.precision}.json"
    (out / name).write_text(json.dumps(res, indent=2) + "\n")
    print(f"written {out / name}")


if __name__ == "__main__":
    main()
