"""GPU benchmark: images/s, peak memory and model FLOP utilisation (MFU) of one FARE and one LORE training step,
side by side with the FARE reference code's way of running the step, and lorekit's APGD against pyautoattack.

    python bench/bench_gpu.py                  # ViT-B-32, ViT-B-16, ViT-L-14 at 224 px, fp32 and bf16, one GPU
    python bench/bench_gpu.py --models ViT-B-32 --precisions bf16 --repeats 3
    python bench/bench_gpu.py --smoke          # the whole script on the tiny model, 1 repeat (the CPU will do)

Random weights throughout (speed does not depend on them; nothing is downloaded). Writes
bench/results/gpu_<device>.json with the machine's description; `python bench/report.py --write` renders it
into README.md. Without CUDA it refuses to run (except --smoke).

Training steps. lorekit's Trainer on the 'bench-step' recipe (ε = 4/255, PGD-10, step ε/4): FARE with K = 1 and
LORE with K = 5 encoder updates per batch, one method at a time (its trainer alone on the GPU), `--warmup`
untimed steps then `--repeats` timed ones; images/s = batch / median step time; peak memory =
torch.cuda.max_memory_allocated over the timed steps (weights, reference copy, optimiser state, activations).

MFU = model FLOPs per step / step time / the GPU's peak dense FLOP/s for the precision used. Model FLOPs per
step = encoder passes of the timed steps from the compute ledger (trainer.ledger: forward and backward images per
phase; the training phases only — reference, attack, update — as FARE's telemetry forward is overhead, not model
work) × the FLOPs of one image's pass, counted once per model with torch.utils.flop_counter.FlopCounterMode:
a forward, a backward to the input only (a PGD iteration; ≈ 1× forward) and a backward to the parameters (an
update; ≈ 2× forward). The peak is PEAK_TFLOPS's: bf16 autocast against the bf16 tensor-core peak; fp32 against
the TF32 peak when float32 matmuls may use TF32 (torch.backends.cuda.matmul.allow_tf32), else the fp32 peak.

Reference. The same FARE step as chs20/RobustVLM runs it (bench/reference_fare.py: fp32, TF32 off,
torch.nn.DataParallel, its own PGD loop), timed the same way; its MFU counts the same model FLOPs as lorekit's
FARE step (the same algorithm), and each lorekit FARE row reports its images/s ÷ the reference's.

APGD. lorekit.apgd.autoattack_custom (APGD-CE, 1 restart, then APGD-T, 9 targets; with and without
compaction) against pyautoattack on the same GPU, classifier and samples (bench/bench_apgd.py's `run_variant`):
the zero-shot head of `--apgd-model` over 10 random class embeddings, on random images labelled with the head's
own clean predictions so that every sample is attacked. With random weights the robust accuracy decides what is
measured: where samples resist (a small ε), every iteration of both attacks is spent on them — the per-iteration
cost; where they fall, what compaction saves. The robust accuracies are reported with the times.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import re
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import TensorDataset
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from bench_apgd import VARIANTS, run_variant  # noqa: E402
from reference_fare import ReferenceFARE  # noqa: E402

from lorekit.config import resolve_device  # noqa: E402
from lorekit.ledger import TRAINING_PHASES  # noqa: E402
from lorekit.models import ImageEncoder, ZeroShotClassifier, load_clip  # noqa: E402
from lorekit.recipes import recipe  # noqa: E402
from lorekit.robustness import machine  # noqa: E402
from lorekit.trainer import Trainer  # noqa: E402

RESULTS = ROOT / "bench" / "results"
METHODS = ("fare", "lore")
MODELS = ("ViT-B-32", "ViT-B-16", "ViT-L-14")
PRECISIONS = ("fp32", "bf16")
# Per-model default batch: the paper's 128, less for ViT-L-14, whose LORE step (2B images with grad) would not
# fit an 80 GB GPU in fp32 at 128. A configuration that runs out of memory is recorded as such, not fatal.
BATCH_SIZES = {"ViT-B-32": 128, "ViT-B-16": 128, "ViT-L-14": 32}

# Peak dense (no 2:4 sparsity) TFLOP/s per GPU, from NVIDIA's datasheets: the H100 datasheet (SXM5 / PCIe / NVL
# columns), the H200 datasheet (SXM / NVL) and the A100 datasheet (SXM4 and PCIe, 40 and 80 GB: one set of peaks).
# The datasheets quote TF32 and BF16 tensor-core figures with sparsity; the dense figure is half.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 SXM": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
    "H100 PCIe": {"fp32": 51.0, "tf32": 378.0, "bf16": 756.0},
    "H100 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5},
    "H200 SXM": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
    "H200 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0},
}
# torch.cuda.get_device_name() → PEAK_TFLOPS key; the first pattern found in the name wins (e.g. "NVIDIA H100 80GB
# HBM3" is the SXM5 part, "NVIDIA H100 PCIe" the PCIe one, "NVIDIA H200" the SXM one, "NVIDIA A100-SXM4-80GB";
# "NVIDIA GH200 480GB" lands on H200 SXM, whose peaks are the GH200's too).
GPU_NAMES = (("H200 NVL", "H200 NVL"), ("H200", "H200 SXM"), ("H100 NVL", "H100 NVL"), ("H100 PCIe", "H100 PCIe"),
             ("H100", "H100 SXM"), ("A100", "A100"))


def gpu_kind(device_name: str) -> str | None:
    """The PEAK_TFLOPS key of a CUDA device name, or None for a GPU the table does not know."""
    return next((kind for pattern, kind in GPU_NAMES if pattern.lower() in device_name.lower()), None)


def peak_kind(precision: str, device: torch.device) -> str:
    """Which peak a run counts against: 'bf16', 'tf32' (fp32 matmuls allowed to use TF32) or 'fp32'."""
    if precision == "bf16":
        return "bf16"
    return "tf32" if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32 else "fp32"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- FLOPs
def pass_flops(encoder: ImageEncoder, device: torch.device) -> dict[str, float]:
    """FLOPs of one image through `encoder`: forward, backward to the input only, backward to the parameters.

    Counted with grad enabled, as training runs (nn.MultiheadAttention's no-grad fast path is not counted by
    FlopCounterMode); the batch of 2 is divided out.
    """
    x = torch.rand(2, 3, *encoder.image_size, device=device)
    xi = x.clone().requires_grad_(True)

    def count(fn: Callable[[], Any]) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / len(x)

    encoder.eval()
    forward = count(lambda: encoder(xi))
    to_input = count(lambda: encoder(xi).float().pow(2).sum().backward(inputs=[xi])) - forward
    to_params = count(lambda: encoder(x).float().pow(2).sum().backward()) - forward
    encoder.zero_grad(set_to_none=True)
    return {"forward": forward, "backward_input": to_input, "backward_params": to_params}


def ledger_flops(forward: dict[str, int], backward: dict[str, int], flops: dict[str, float]) -> float:
    """Model FLOPs of the passes a ledger counted in the training phases (attack backwards go to the input only)."""
    return sum(forward[p] * flops["forward"]
               + backward[p] * flops["backward_input" if p == "attack" else "backward_params"]
               for p in TRAINING_PHASES)


# ----------------------------------------------------------------------------- timing
def _timed_steps(step: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> tuple[float, int | None]:
    """(median seconds per step, peak bytes allocated over the timed steps; None off CUDA)."""
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


@contextmanager
def _tf32_matmuls(allowed: bool) -> Iterator[None]:
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _row(model: str, precision: str, method: str, k: int, batch: int, seconds: float, peak: int | None,
         flops: float | None, peak_tflops: dict[str, float] | None, kind: str) -> dict[str, Any]:
    tflops = None if flops is None else flops / seconds / 1e12
    return {"model": model, "precision": precision, "method": method, "K": k, "batch_size": batch, "step_s": seconds,
            "images_per_s": batch / seconds, "peak_memory_gib": None if peak is None else peak / 2 ** 30,
            "flops_per_step": flops, "tflops": tflops, "peak_kind": kind,
            "mfu": tflops / peak_tflops[kind] if peak_tflops and tflops is not None else None}


def _embed_dim(encoder: ImageEncoder, device: torch.device) -> int:
    with torch.no_grad():
        return encoder(torch.rand(1, 3, *encoder.image_size, device=device)).shape[-1]


def bench_model(model: str, batch: int, precisions: tuple[str, ...], warmup: int, repeats: int,
                device: torch.device, peak_tflops: dict[str, float] | None) -> dict[str, Any]:
    """Every training-step row of one model: lorekit's FARE and LORE per precision, then the reference's FARE."""
    # The pristine image tower stays on the CPU (the text tower is dropped); each run trains its own copy.
    template = load_clip(model, "", device="cpu").encoder
    flops = pass_flops(copy.deepcopy(template).to(device), device)
    gen = torch.Generator().manual_seed(0)
    x_cpu = torch.rand(batch, 3, *template.image_size, generator=gen)
    y_cpu = torch.randint(0, 1000, (batch,), generator=gen)
    x, y = x_cpu.to(device), y_cpu.to(device)
    rows: list[dict[str, Any]] = []
    fare_flops = None
    for precision in precisions:
        for method in METHODS:
            cfg = recipe("bench-step", method, model=model, pretrained="", batch_size=batch, precision=precision,
                         run_dir="/nonexistent")
            try:
                trainer = Trainer(cfg, copy.deepcopy(template), TensorDataset(x_cpu, y_cpu))
                before = trainer.ledger.state_dict()
                seconds, peak = _timed_steps(lambda t=trainer: t.train_step(x, y), device, warmup, repeats)
                after, steps = trainer.ledger.state_dict(), warmup + repeats
                per_step = ledger_flops(
                    {p: (after["forward"][p] - before["forward"][p]) / steps for p in TRAINING_PHASES},
                    {p: (after["backward"][p] - before["backward"][p]) / steps for p in TRAINING_PHASES}, flops)
                fare_flops = per_step if method == "fare" else fare_flops
                rows.append(_row(model, precision, method, cfg.updates_per_batch, batch, seconds, peak, per_step,
                                 peak_tflops, peak_kind(precision, device)))
            except torch.OutOfMemoryError:
                rows.append({"model": model, "precision": precision, "method": method, "batch_size": batch,
                             "error": "out of memory"})
            trainer = None
            _free(device)
            print(json.dumps(rows[-1]), flush=True)
    cfg = recipe("bench-step", "fare", model=model, pretrained="", batch_size=batch, run_dir="/nonexistent")
    try:
        encoder = copy.deepcopy(template).to(device)
        with _tf32_matmuls(False):
            ref = ReferenceFARE(encoder.visual, encoder.mean.flatten().tolist(), encoder.std.flatten().tolist(),
                                _embed_dim(encoder, device), eps=cfg.eps, iterations=cfg.attack_steps,
                                stepsize=cfg.step_size)
            seconds, peak = _timed_steps(lambda: ref.step(x, y), device, warmup, repeats)
        # the same algorithm as lorekit's FARE step: the same model FLOPs (its logging forward is overhead)
        rows.append(_row(model, "fp32", "fare-reference", 1, batch, seconds, peak, fare_flops, peak_tflops, "fp32"))
    except torch.OutOfMemoryError:
        rows.append({"model": model, "precision": "fp32", "method": "fare-reference", "batch_size": batch,
                     "error": "out of memory"})
    encoder = ref = None
    _free(device)
    print(json.dumps(rows[-1]), flush=True)
    reference = rows[-1].get("images_per_s")
    for row in rows:
        if row["method"] == "fare" and reference and "images_per_s" in row:
            row["speedup_vs_reference"] = row["images_per_s"] / reference
    return {"model": model, "image_size": list(template.image_size), "batch_size": batch, "pass_flops": flops,
            "rows": rows}


# ----------------------------------------------------------------------------- APGD
def bench_apgd(model: str, device: torch.device, samples: int, n_iter: int, eps_255: list[float],
               batch_size: int) -> dict[str, Any]:
    """lorekit's APGD-CE + APGD-T (with and without compaction) and pyautoattack's, on one classifier and sample."""
    encoder = load_clip(model, "", device="cpu").encoder.to(device)
    gen = torch.Generator().manual_seed(0)
    classifier = ZeroShotClassifier(encoder, torch.randn(10, _embed_dim(encoder, device), generator=gen)).to(device)
    x = torch.rand(samples, 3, *encoder.image_size, generator=gen).to(device)
    with torch.inference_mode():
        y = torch.cat([classifier(x[s:s + batch_size]).argmax(1) for s in range(0, samples, batch_size)])
    rows = []
    for eps in eps_255:
        for variant in VARIANTS:
            acc, seconds, _ = run_variant(variant, classifier, x, y, eps / 255, n_iter, batch_size)
            rows.append({"eps_255": eps, "variant": variant, "robust_acc": acc, "seconds": seconds})
            print(json.dumps(rows[-1]), flush=True)
    return {"model": model, "samples": samples, "n_iter": n_iter, "n_target_classes": 9, "apgd_ce_restarts": 1,
            "classes": 10, "batch_size": batch_size, "rows": rows}


# ----------------------------------------------------------------------------- main
def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    p.add_argument("--batch-size", type=int, default=0, help=f"0: per model, {BATCH_SIZES}")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--apgd-model", default="ViT-B-32")
    p.add_argument("--apgd-samples", type=int, default=128)
    p.add_argument("--apgd-iter", type=int, default=100)
    p.add_argument("--apgd-eps", type=float, nargs="*", default=[0.1, 4], help="units of 1/255; none: skip APGD")
    p.add_argument("--peak-tflops", type=float, nargs=3, metavar=("FP32", "TF32", "BF16"),
                   help="dense peaks of a GPU the table does not know")
    p.add_argument("--smoke", action="store_true", help="tiny model, 1 repeat, a few APGD samples: checks the script")
    p.add_argument("--out", default="", help="result file (default bench/results/gpu_<device>.json; "
                   "--smoke writes none unless given)")
    args = p.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py: no CUDA device is visible (torch.cuda.is_available() is False); it measures "
                         "GPUs only. Run it on a GPU box, or pass --smoke for a quick check of the script on the CPU")
    if args.smoke:
        # fp32 only: bf16 autocast on a CPU is slow, and the bf16 path differs only in the trainer's setting
        args.models, args.precisions, args.batch_size, args.warmup, args.repeats = ["lorekit-tiny"], ["fp32"], 4, 1, 1
        args.apgd_model, args.apgd_samples, args.apgd_iter, args.apgd_eps = "lorekit-tiny", 8, 5, [4]
    device = resolve_device("auto")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    kind = gpu_kind(name) if device.type == "cuda" else None
    peak = (dict(zip(("fp32", "tf32", "bf16"), args.peak_tflops, strict=True)) if args.peak_tflops
            else PEAK_TFLOPS.get(kind) if kind else None)
    if device.type == "cuda" and peak is None:
        print(f"bench_gpu.py: {name!r} is not in PEAK_TFLOPS; MFU is left out (pass --peak-tflops)", file=sys.stderr)
    settings = recipe("bench-step", "lore")
    out: dict[str, Any] = {
        "machine": {**machine(), "device": name, "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32},
        "peak_tflops": {"gpu": f"{name} (--peak-tflops)" if args.peak_tflops else kind, "dense": peak},
        "settings": {"eps": settings.eps, "attack_steps": settings.attack_steps, "step_size": settings.step_size,
                     "K": {m: recipe("bench-step", m).updates_per_batch for m in METHODS},
                     "warmup": args.warmup, "repeats": args.repeats, "smoke": args.smoke},
        "models": [], "apgd": None}
    path = Path(args.out) if args.out else None if args.smoke else RESULTS / f"gpu_{_slug(name)}.json"

    def save() -> None:  # after every part: an interrupted run keeps what it measured
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(out, indent=2) + "\n")

    for model in args.models:
        batch = args.batch_size or BATCH_SIZES.get(model, 128)
        out["models"].append(bench_model(model, batch, tuple(args.precisions), args.warmup, args.repeats, device,
                                         peak))
        save()
    if args.apgd_eps:
        out["apgd"] = bench_apgd(args.apgd_model, device, args.apgd_samples, args.apgd_iter, args.apgd_eps,
                                 batch_size=args.apgd_samples)
        save()
    print(f"written {path}" if path else json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
