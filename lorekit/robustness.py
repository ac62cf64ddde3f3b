"""Zero-shot robustness evaluation: clean and AutoAttack-custom (APGD-CE + APGD-T) robust accuracy
per ε on a fixed seeded sample, resumable and auditable, with gradient-masking sanity checks.

Output directory layout (every file written atomically):

- config.json    the evaluation settings; resuming with different settings is refused
- clean.jsonl    per sample: dataset index, label, clean prediction (re-checked on resume, which
                 catches a different model or data set behind the same out_dir)
- eps<k>/chunk<c>.jsonl  per sample: robust flag, the attack that fooled it, adversarial
                 prediction, ‖δ‖∞ (k = ε·255); a chunk that exists is never recomputed
- sanity.json    the sanity checks' measurements and verdicts
- results.json   the summary: clean accuracy, robust accuracy per ε, sanity verdicts, wall times

Sanity checks (run on every evaluation, reported in results.json; a failure prints a warning and
sets `sanity_passed` false, it does not abort):

- monotone: robust accuracy never increases with ε (and never exceeds clean accuracy);
- tiny_eps: APGD-CE at a tiny ε (1e-6 by default) keeps accuracy ≈ clean accuracy;
- noise: uniform noise in the ε-box costs far less accuracy (≤ 1/4) than the attack;
- pgd: every sample that PGD (lorekit.attacks.pgd on the cross-entropy) fools, APGD fools too;
- zero_gradient: no correctly classified sample has an all-zero input gradient of the logit
  margin (shattered or quantised inputs).
The tiny-ε, PGD and gradient checks use the first `sanity_samples` samples and `sanity_iter`
iterations; the noise check uses all samples. Tolerances scale with the sample size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .apgd import apgd, autoattack_custom, custom_attacks, frozen_parameters
from .attacks import ce_attack_loss, pgd
from .config import NORMS, ConfigError, check_choice, default_cache_dir, field_docs, pretrained_for, resolve_device
from .data import check_dataset
from .progress import Progress
from .rundir import atomic_write_text, check_output_dir

SANITY_CHECKS = ("monotone", "tiny_eps", "noise", "pgd", "zero_gradient")


# ------------------------------------------------------------------------------------ config
@dataclass
class RobustEvalConfig:
    """Settings of one robustness evaluation (`python -m lorekit robust-eval`)."""

    model: str = "lorekit-tiny"
    """open_clip model name or 'hf-hub:org/name'."""
    pretrained: str = "digits"
    """Pretrained tag or checkpoint file of the model (the default means none for an 'hf-hub:' model)."""
    image_encoder: str = ""
    """Optional fine-tuned image-tower weights (a run's encoder.pt); '' keeps the pretrained tower."""
    dataset: str = "digits"
    """A domain of the embedded suite ('digits', 'words', ...), a torchvision data set name under
    data_root, or an image folder."""
    data_root: str = ""
    """Directory of torchvision data sets; '' means <cache_dir>/data."""
    cache_dir: str = field(default_factory=default_cache_dir)
    """Cache of pretrained checkpoints and data."""
    n_samples: int = 1000
    """Size of the fixed seeded sample of the test split."""
    eps: tuple[float, ...] = (1 / 255, 2 / 255, 4 / 255)
    """Perturbation radii in [0,1] pixel units (the CLI takes them in units of 1/255)."""
    norm: str = "linf"
    """Threat model: 'linf' or 'l2'."""
    n_iter: int = 100
    """APGD iterations per run (each APGD-T target is a run)."""
    n_target_classes: int = 9
    """APGD-T target classes (capped at n_classes − 1)."""
    n_restarts: int = 1
    """APGD-CE restarts."""
    batch_size: int = 250
    """Images per attack batch."""
    chunk_size: int = 250
    """Samples per resumable unit of work (a chunk file per ε)."""
    seed: int = 0
    """Seed of the sample and of the attacks' random starts."""
    out_dir: str = ""
    """Output directory; '' means runs/robust-eval/<model>-<pretrained>-<dataset>[-<encoder>]."""
    device: str = "auto"
    """'auto' (CUDA when present), 'cpu' or 'cuda'."""
    sanity_samples: int = 200
    """Samples used by the tiny-ε, PGD and zero-gradient checks."""
    sanity_iter: int = 20
    """Iterations of the sanity checks' PGD and tiny-ε APGD."""
    tiny_eps: float = 1e-6
    """The 'ε → 0' radius of the tiny-ε check."""

    def validate(self) -> "RobustEvalConfig":
        """Check every field; raise ConfigError naming the first bad one."""
        self.eps = tuple(float(e) for e in self.eps)
        if not self.eps:
            raise ConfigError("eps=(): give at least one ε")
        bad = [e for e in self.eps if not (math.isfinite(e) and 0 < e <= 1)]
        if bad:
            shown = ", ".join(f"{e * 255:g}/255" for e in bad)  # as the CLI's --eps was typed, in 1/255
            raise ConfigError(f"eps={shown}: every ε must lie in (0, 1] in pixel units, i.e. (0, 255]/255 "
                              f"(e.g. 4/255={4 / 255:.5f}; the CLI's --eps is in units of 1/255)")
        if len(set(self.eps)) != len(self.eps):
            raise ConfigError(f"eps={list(self.eps)}: values repeat")
        check_choice("norm", self.norm, NORMS)
        for name in ("n_samples", "n_iter", "n_target_classes", "n_restarts", "batch_size", "chunk_size",
                     "sanity_samples", "sanity_iter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r}: must be an integer >= 1")
        if not 0 < self.tiny_eps < min(self.eps):
            raise ConfigError(f"tiny_eps={self.tiny_eps!r}: must lie in (0, min(eps))")
        check_dataset(self.dataset)
        if self.image_encoder and not Path(self.image_encoder).is_file():
            raise ConfigError(f"image_encoder={self.image_encoder!r}: file not found (a run's encoder.pt)")
        self.pretrained = pretrained_for(self.model, self.pretrained)
        resolve_device(self.device)
        check_output_dir(self.out_path, "out_dir")
        return self

    @property
    def out_path(self) -> Path:
        if self.out_dir:
            return Path(self.out_dir)
        tag = f"{self.model}-{self.pretrained}-{Path(self.dataset).name}".replace("/", "_").replace(":", "_")
        if self.image_encoder:
            tag += "-" + Path(self.image_encoder).parent.name
        return Path("runs") / "robust-eval" / tag


# --------------------------------------------------------------------------------- helpers
def _eps_tag(eps: float) -> str:
    return f"eps{round(eps * 255, 4):g}"


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """Where the numbers were measured."""
    return {"platform": platform.platform(), "cpu": _cpu_model(), "python": sys.version.split()[0],
            "torch": torch.__version__, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


@torch.inference_mode()
def _predict(classifier: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([classifier(x[s:s + batch_size]).argmax(1) for s in range(0, len(x), batch_size)])


def _tolerance(n: int) -> float:
    """Accuracy slack of the checks: two samples, and at least half a percent."""
    return max(2.0 / max(n, 1), 0.005)


# ------------------------------------------------------------------------------ sanity checks
def check_monotone(clean_acc: float, robust: dict[float, float], n: int) -> dict[str, Any]:
    """Robust accuracy must not rise with ε, nor exceed the clean accuracy."""
    tol = _tolerance(n)
    points = [(0.0, clean_acc)] + sorted(robust.items())
    rises = [(a, b, acc_a, acc_b) for (a, acc_a), (b, acc_b) in zip(points, points[1:]) if acc_b > acc_a + tol]
    return {"passed": not rises, "tolerance": tol,
            "detail": "; ".join(f"accuracy rises from {acc_a:.4f} at ε={a * 255:g}/255 to {acc_b:.4f} at "
                                f"ε={b * 255:g}/255" for a, b, acc_a, acc_b in rises) or "non-increasing in ε"}


def check_tiny_eps(clean_acc: float, tiny_acc: float, n: int) -> dict[str, Any]:
    """At ε → 0 the attack must leave the clean accuracy (almost) unchanged."""
    tol = _tolerance(n)
    passed = tiny_acc >= clean_acc - tol
    return {"passed": passed, "clean_acc": clean_acc, "tiny_eps_acc": tiny_acc, "tolerance": tol,
            "detail": "≈ clean accuracy" if passed else
            f"the attack at a tiny ε drops accuracy {clean_acc:.4f} → {tiny_acc:.4f}: a randomised or numerically "
            "unstable model, or an attack that leaves the ε-ball"}


def check_noise(clean_acc: float, noise_acc: dict[float, float], robust: dict[float, float], n: int) -> dict[str, Any]:
    """Uniform noise of size ε must cost far less accuracy than the attack: at most a quarter as much.

    A gradient-masked model leaves APGD no better than its few random starts, which cost about as
    much as noise; an attack that works costs many times more than noise.
    """
    tol = _tolerance(n)
    bad = [e for e in robust if (clean_acc - noise_acc[e]) > max(0.25 * (clean_acc - robust[e]), tol)]
    return {"passed": not bad, "noise_acc": {_eps_tag(e): noise_acc[e] for e in robust}, "tolerance": tol,
            "detail": "; ".join(f"at ε={e * 255:g}/255 noise costs {clean_acc - noise_acc[e]:.4f}, the attack "
                                f"{clean_acc - robust[e]:.4f}: the attack is barely better than noise (gradient "
                                "masking?)" for e in bad) or "noise costs far less than the attack"}


def check_pgd(pgd_fooled_only: dict[float, int], n: int) -> dict[str, Any]:
    """Samples fooled by PGD but not by APGD (per ε): APGD should fool a superset."""
    limit = max(1, int(_tolerance(n) * n))
    bad = {e: k for e, k in pgd_fooled_only.items() if k > limit}
    return {"passed": not bad, "pgd_only": {_eps_tag(e): k for e, k in pgd_fooled_only.items()}, "limit": limit,
            "detail": "; ".join(f"at ε={e * 255:g}/255 PGD fools {k} samples APGD does not" for e, k in bad.items())
            or "APGD fools every sample PGD fools (up to the limit)"}


def check_zero_gradient(zero_fraction: float) -> dict[str, Any]:
    passed = zero_fraction == 0
    return {"passed": passed, "zero_gradient_fraction": zero_fraction,
            "detail": "all input gradients non-zero" if passed else
            f"{zero_fraction:.1%} of correctly classified samples have an all-zero input gradient: gradient-based "
            "attacks cannot work there (quantised / shattered inputs); use a gradient-free or adaptive attack"}


def margin_gradient_zero_fraction(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of samples whose gradient of z_y − max_{i≠y} z_i w.r.t. the input is exactly zero.

    The margin, unlike the cross-entropy, does not saturate, so a zero here means a masked gradient.
    """
    if len(x) == 0:
        return 0.0
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = classifier(x).float()
        other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
        margin = logits.gather(1, y[:, None]).squeeze(1) - other
        grad, = torch.autograd.grad(margin.sum(), x)
    return (grad.flatten(1).abs().amax(1) == 0).float().mean().item()


@torch.inference_mode()
def noise_accuracy(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, norm: str = "linf",
                   batch_size: int = 250, seed: int = 0) -> float:
    """Accuracy under one draw of uniform noise in the ε-box (ℓ∞) or on the ε-sphere (ℓ2)."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    correct = 0
    for s in range(0, len(x), batch_size):
        xb = x[s:s + batch_size]
        noise = torch.rand(xb.shape, generator=gen, device=x.device) * 2 - 1
        if norm == "l2":
            noise = noise / noise.flatten(1).norm(dim=1).view(-1, *([1] * (xb.dim() - 1)))
        correct += int((classifier((xb + eps * noise).clamp(0, 1)).argmax(1) == y[s:s + batch_size]).sum())
    return correct / max(len(x), 1)


# ---------------------------------------------------------------------------- evaluation
def _settings_digest(indices: Sequence[int], labels: torch.Tensor) -> str:
    h = hashlib.sha256(json.dumps([list(map(int, indices)), labels.tolist()]).encode())
    return h.hexdigest()[:16]


def evaluate_robustness(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps_list: Sequence[float],
                        out_dir: str | Path, *, indices: Sequence[int] | None = None, norm: str = "linf",
                        n_iter: int = 100, n_target_classes: int = 9, n_restarts: int = 1, batch_size: int = 250,
                        chunk_size: int = 250, seed: int = 0, sanity_samples: int = 200, sanity_iter: int = 20,
                        tiny_eps: float = 1e-6, meta: dict[str, Any] | None = None,
                        progress: bool = True) -> dict[str, Any]:
    """Clean and APGD-CE+APGD-T robust accuracy per ε of `classifier` on (images, labels), resumable.

    `indices` are the samples' positions in their data set (recorded per sample; default 0..N−1).
    `meta` (e.g. model and data set names) is stored with the settings. Returns the summary that is
    also written to out_dir/results.json.
    """
    n = len(images)
    if n < 1:
        raise ConfigError("n_samples=0: must be an integer >= 1")
    indices = list(range(n)) if indices is None else [int(i) for i in indices]
    eps_list = sorted(float(e) for e in eps_list)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"eps": eps_list, "norm": norm, "n_iter": n_iter, "n_target_classes": n_target_classes,
                "n_restarts": n_restarts, "chunk_size": chunk_size, "seed": seed, "n_samples": n,
                "sanity_samples": sanity_samples, "sanity_iter": sanity_iter, "tiny_eps": tiny_eps,
                "samples_digest": _settings_digest(indices, labels), **(meta or {})}
    _check_resume(out / "config.json", settings)
    classifier.eval()
    start = time.perf_counter()

    clean_pred = _predict(classifier, images, batch_size)
    _check_clean(out / "clean.jsonl", indices, labels, clean_pred)
    clean_correct = clean_pred == labels
    clean_acc = clean_correct.float().mean().item()

    robust: dict[float, torch.Tensor] = {}
    timings: dict[str, float] = {}
    chunks = [(s, min(n, s + chunk_size)) for s in range(0, n, chunk_size)]
    with Progress(len(eps_list) * len(chunks), "APGD-CE+APGD-T", unit="chunk", enabled=progress) as bar:
        for eps in eps_list:
            folder = out / _eps_tag(eps)
            folder.mkdir(exist_ok=True)
            flags, t_eps = [], time.perf_counter()
            for k, (a, b) in enumerate(chunks):
                bar.update(0, at=f"ε={eps * 255:g}/255 chunk {k + 1}/{len(chunks)}")
                path = folder / f"chunk{k:04d}.jsonl"
                if not path.exists():
                    res = autoattack_custom(classifier, images[a:b], labels[a:b], eps, n_iter=n_iter,
                                            n_target_classes=n_target_classes, norm=norm, n_restarts=n_restarts,
                                            batch_size=batch_size, seed=seed + 1000 * k)
                    size = (res.x_adv - images[a:b]).flatten(1)
                    size = size.abs().amax(1) if norm == "linf" else size.norm(dim=1)
                    _write_jsonl(path, [{"index": indices[a + i], "label": int(labels[a + i]), "robust": bool(r),
                                         "fooled_by": f, "adv_pred": int(p), "delta": float(d)}
                                        for i, (r, f, p, d) in enumerate(zip(res.robust.tolist(), res.fooled_by,
                                                                             res.adv_pred.tolist(), size.tolist()))])
                rows = _read_jsonl(path)
                if [r["index"] for r in rows] != indices[a:b]:
                    raise ConfigError(f"out_dir={str(out)!r}: {path.name} holds other samples; use a fresh out_dir")
                flags += [r["robust"] for r in rows]
                bar.update()
            robust[eps] = torch.tensor(flags)
            timings[_eps_tag(eps)] = time.perf_counter() - t_eps

    robust_acc = {e: f.float().mean().item() for e, f in robust.items()}
    sanity = _sanity(classifier, images, labels, clean_correct, robust, robust_acc, clean_acc, out, norm=norm,
                     batch_size=batch_size, seed=seed, sanity_samples=sanity_samples, sanity_iter=sanity_iter,
                     tiny_eps=tiny_eps, progress=progress)
    passed = all(c["passed"] for c in sanity.values())
    for name, c in sanity.items():
        if not c["passed"]:
            print(f"lorekit robust-eval: sanity check '{name}' FAILED: {c['detail']}", file=sys.stderr)
    with torch.inference_mode():
        attacks = list(custom_attacks(classifier(images[:1]).shape[1]))
    summary = {"clean_acc": clean_acc, "robust_acc": {_eps_tag(e): a for e, a in robust_acc.items()},
               "eps": eps_list, "n_samples": n, "attacks": attacks,
               "sanity_passed": passed, "sanity": sanity, "settings": settings, "out_dir": str(out),
               "machine": machine(),
               "seconds": {"total_this_session": time.perf_counter() - start, **timings}}
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2))
    return summary


def _check_resume(path: Path, settings: dict[str, Any]) -> None:
    if path.exists():
        saved = json.loads(path.read_text())
        diff = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        if diff:
            raise ConfigError(f"out_dir={str(path.parent)!r}: holds an evaluation with other settings (differing: "
                              f"{', '.join(diff)}); use another out_dir or delete it")
    else:
        atomic_write_text(path, json.dumps(settings, indent=2))


def _check_clean(path: Path, indices: list[int], labels: torch.Tensor, pred: torch.Tensor) -> None:
    rows = [{"index": i, "label": int(l), "clean_pred": int(p)} for i, l, p in zip(indices, labels.tolist(),
                                                                                    pred.tolist())]
    if path.exists():
        saved = _read_jsonl(path)
        if saved != rows:
            changed = sum(a != b for a, b in zip(saved, rows)) + abs(len(saved) - len(rows))
            raise ConfigError(f"out_dir={str(path.parent)!r}: {changed} clean predictions differ from the saved "
                              "ones (another model or data behind the same out_dir); use another out_dir")
    else:
        _write_jsonl(path, rows)


def _sanity(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, clean_correct: torch.Tensor,
            robust: dict[float, torch.Tensor], robust_acc: dict[float, float], clean_acc: float, out: Path, *,
            norm: str, batch_size: int, seed: int, sanity_samples: int, sanity_iter: int, tiny_eps: float,
            progress: bool) -> dict[str, dict[str, Any]]:
    """Run (or load, on resume) the measurements of the sanity checks, then judge them."""
    path = out / "sanity.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    n, m = len(images), min(sanity_samples, len(images))
    xs, ys, ok = images[:m], labels[:m], clean_correct[:m]
    steps = [key for key in ("tiny_acc", "zero_gradient_fraction", "noise_acc") if key not in saved]
    steps += [e for e in robust if _eps_tag(e) not in saved.get("pgd_only", {})]
    with Progress(len(steps), "sanity checks", unit="check", enabled=progress) as bar:
        for step in steps:
            if step == "tiny_acc":
                res = apgd(classifier, xs[ok], ys[ok], tiny_eps, norm=norm, n_iter=sanity_iter,
                           generator=torch.Generator(device=xs.device).manual_seed(seed))
                saved["tiny_acc"] = (int(ok.sum()) - int(res.fooled.sum())) / m
                saved["tiny_clean_acc"] = ok.float().mean().item()
            elif step == "zero_gradient_fraction":
                with frozen_parameters(classifier):
                    saved["zero_gradient_fraction"] = margin_gradient_zero_fraction(classifier, xs[ok], ys[ok])
            elif step == "noise_acc":
                saved["noise_acc"] = {_eps_tag(e): noise_accuracy(classifier, images, labels, e, norm=norm,
                                                                  batch_size=batch_size, seed=seed) for e in robust}
            else:
                gen = torch.Generator(device=xs.device).manual_seed(seed)
                fooled = torch.zeros(m, dtype=torch.bool, device=xs.device)
                with frozen_parameters(classifier):
                    for s in range(0, m, batch_size):
                        x_adv = pgd(ce_attack_loss(classifier, ys[s:s + batch_size]), xs[s:s + batch_size], step,
                                    steps=sanity_iter, norm=norm, generator=gen)
                        with torch.inference_mode():
                            fooled[s:s + batch_size] = classifier(x_adv).argmax(1) != ys[s:s + batch_size]
                apgd_robust = robust[step][:m].to(fooled.device)
                saved.setdefault("pgd_only", {})[_eps_tag(step)] = int((fooled & apgd_robust).sum())
            atomic_write_text(path, json.dumps(saved, indent=2))
            bar.update()
    noise = {e: saved["noise_acc"][_eps_tag(e)] for e in robust}
    return {"monotone": check_monotone(clean_acc, robust_acc, n),
            "tiny_eps": check_tiny_eps(saved["tiny_clean_acc"], saved["tiny_acc"], m),
            "noise": check_noise(clean_acc, noise, robust_acc, n),
            "pgd": check_pgd({e: saved["pgd_only"][_eps_tag(e)] for e in robust}, m),
            "zero_gradient": check_zero_gradient(saved["zero_gradient_fraction"])}


def robust_eval(config: RobustEvalConfig, progress: bool = True) -> dict[str, Any]:
    """Load the model and data named by the config (lorekit.workbench), then `evaluate_robustness`."""
    from .config import TrainConfig
    from .workbench import setup

    config.validate()
    bench = setup(TrainConfig(model=config.model, pretrained=config.pretrained, dataset=config.dataset,
                              data_root=config.data_root, cache_dir=config.cache_dir, eval_samples=config.n_samples,
                              device=config.device), subset_seed=config.seed)
    encoder = bench.load_encoder(config.image_encoder) if config.image_encoder else bench.original
    meta = {"model": config.model, "pretrained": config.pretrained, "image_encoder": config.image_encoder,
            "dataset": config.dataset}
    return evaluate_robustness(bench.classifier(encoder).eval(), bench.images, bench.labels, config.eps,
                               config.out_path, indices=bench.indices, norm=config.norm, n_iter=config.n_iter,
                               n_target_classes=config.n_target_classes, n_restarts=config.n_restarts,
                               batch_size=config.batch_size, chunk_size=config.chunk_size, seed=config.seed,
                               sanity_samples=config.sanity_samples, sanity_iter=config.sanity_iter,
                               tiny_eps=config.tiny_eps, meta=meta, progress=progress)


# ----------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `python -m lorekit robust-eval`, one per RobustEvalConfig field (ε in units of 1/255)."""
    defaults, helps = RobustEvalConfig(), field_docs(RobustEvalConfig)
    for f in fields(RobustEvalConfig):
        flag, default = "--" + f.name.replace("_", "-"), getattr(defaults, f.name)
        if f.name == "eps":
            parser.add_argument(flag, type=float, nargs="+", default=[round(e * 255, 4) for e in default],
                                help="perturbation radii in units of 1/255 (default: 1 2 4)")
        else:
            parser.add_argument(flag, dest=f.name, type=type(default), default=default,
                                help=f"{helps.get(f.name, '')} (default: {default!r})")


def config_from_args(args: argparse.Namespace) -> RobustEvalConfig:
    values = {f.name: getattr(args, f.name) for f in fields(RobustEvalConfig)}
    values["eps"] = tuple(e / 255 for e in args.eps)
    return RobustEvalConfig(**values).validate()


def run(args: argparse.Namespace) -> int:
    """Run the evaluation the parsed flags describe; print the summary. ConfigError propagates."""
    summary = robust_eval(config_from_args(args))
    short = {k: summary[k] for k in ("clean_acc", "robust_acc", "sanity_passed")}
    print(json.dumps(short, indent=2))
    print(f"per-sample outcomes and results.json in {summary['out_dir']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: `python -m lorekit.robustness ...` (same flags as robust-eval)."""
    parser = argparse.ArgumentParser(prog="lorekit robust-eval", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ConfigError as e:
        print(f"lorekit robust-eval: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

