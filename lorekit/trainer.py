"""One trainer for FARE, FARE-reg, LORE and TeCoA, with resumable run directories.

Per batch: reference embeddings φθ0(x) once, without grad; an adversarial batch by PGD against
the method's attack loss with the encoder in eval mode; then the method's update:

- FARE / FARE-reg / TeCoA: one AdamW step on the encoder.
- LORE: λ(x) = λω(φθ0(x)) is computed and held fixed, K primal steps descend the Lagrangian
  in θ, then one dual step ascends E[λω(x)·g(x)] in ω with g(x) detached. g(x) comes from the
  last primal step's forward pass (θ before that step's update), which saves a forward pass.

The learning-rate schedule counts encoder updates (steps·K for LORE). Batches are a pure
function of (seed, step), and the attack generator's state is checkpointed, so a resumed run
repeats the uninterrupted one exactly on CPU.

A run directory holds config.json, metrics.jsonl (one JSON object per step, plus periodic
'eval' records), checkpoint.pt (everything needed to resume, written atomically), encoder.pt
(the fine-tuned encoder's state dict) and summary.json.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset
from tqdm.auto import tqdm

from . import losses
from .attacks import ce_attack_loss, embedding_attack_loss, pgd
from .config import ConfigError, TrainConfig, config_diff
from .dual import DualNet, dual_step
from .evaluate import clean_accuracy, embedding_metrics, pgd_accuracy
from .models import ZeroShotClassifier, frozen_copy, weights_id

Record = dict[str, Any]
QUANTILES = (0.1, 0.5, 0.9)


def resolve_device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


def atomic_write_bytes(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename: never a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, lambda p: p.write_text(json.dumps(obj, indent=2) + "\n"))


def check_run_dir(cfg: TrainConfig) -> None:
    """Refuse a run directory that already holds a run, unless resuming that same run."""
    cfg_path = cfg.run_path / "config.json"
    if not cfg_path.exists():
        if cfg.resume:
            raise ConfigError(f"resume=True: run_dir={str(cfg.run_path)!r} holds no run (no config.json)")
        return
    try:
        saved = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"run_dir={str(cfg.run_path)!r}: config.json is corrupt ({e})") from None
    diff = config_diff(saved, cfg.to_dict())
    if diff:
        detail = ", ".join(f"{k}: saved {saved.get(k)!r} vs {getattr(cfg, k, None)!r}" for k in diff)
        raise ConfigError(f"run_dir={str(cfg.run_path)!r} already holds a run with a different config ({detail}); "
                          "choose another run_dir")
    if not cfg.resume:
        raise ConfigError(f"run_dir={str(cfg.run_path)!r} already holds this run; pass resume=True (--resume) "
                          "to continue it, or choose another run_dir")


class StepBatchSampler(Sampler[list[int]]):
    """Batch indices as a pure function of (seed, step): epoch e is a seeded permutation."""

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int, steps: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.steps = start_step, steps
        self.per_epoch = n // batch_size

    def batch(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.per_epoch)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        return perm[k * self.batch_size:(k + 1) * self.batch_size].tolist()

    def __iter__(self):
        return (self.batch(s) for s in range(self.start_step, self.steps))

    def __len__(self) -> int:
        return self.steps - self.start_step


def warmup_cosine(total: int, warmup: int) -> Callable[[int], float]:
    def factor(update: int) -> float:
        if update < warmup:
            return (update + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (update - warmup) / max(1, total - warmup)))
    return factor


class Trainer:
    """Fine-tunes any `nn.Module` image encoder ([0,1] images -> embeddings) with `cfg.method`.

    `class_embeddings` (a zero-shot head) is needed by TeCoA and enables the periodic accuracy
    evaluation; without it the periodic evaluation reports embedding metrics only.
    """

    def __init__(self, cfg: TrainConfig, encoder: nn.Module, train_set: Dataset, *,
                 eval_images: torch.Tensor | None = None, eval_labels: torch.Tensor | None = None,
                 class_embeddings: torch.Tensor | None = None, reference: nn.Module | None = None,
                 base_weights: str | None = None) -> None:
        self.cfg = cfg.validate()
        self.base_weights = base_weights  # models.weights_id of the encoder's starting weights, when known
        if cfg.method == "tecoa" and class_embeddings is None:
            raise ConfigError("method='tecoa' needs class embeddings (a zero-shot head) for its cross-entropy")
        if len(train_set) < cfg.batch_size:
            raise ConfigError(f"batch_size={cfg.batch_size}: larger than the training set ({len(train_set)} images)")
        self.device = resolve_device(cfg.device)
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
        torch.manual_seed(cfg.seed)
        self.encoder = encoder.to(self.device)
        self.reference = (reference or frozen_copy(encoder)).to(self.device).eval()
        self.train_set = train_set
        self.eval_images = eval_images.to(self.device) if eval_images is not None else None
        self.eval_labels = eval_labels.to(self.device) if eval_labels is not None else None
        self.class_embeddings = class_embeddings.to(self.device) if class_embeddings is not None else None
        self.classifier = (ZeroShotClassifier(self.encoder, self.class_embeddings)
                           if self.class_embeddings is not None else None)

        params = [p for p in self.encoder.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        updates = cfg.steps * (cfg.primal_steps if cfg.method == "lore" else 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           warmup_cosine(updates, int(cfg.warmup * updates)))
        self.dual: DualNet | None = None
        self.dual_optimizer: torch.optim.Optimizer | None = None
        if cfg.method == "lore":
            with torch.no_grad():
                embed_dim = self.reference(self._first_image()).shape[-1]
            self.dual = DualNet(cfg.dual, embed_dim, cfg.dual_hidden, cfg.lambda_init).to(self.device)
            self.dual_optimizer = torch.optim.Adam(self.dual.parameters(), lr=cfg.dual_lr)
        self.attack_gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.step = 0

    # ------------------------------------------------------------------ data
    def _first_image(self) -> torch.Tensor:
        return self.train_set[0][0].unsqueeze(0).to(self.device)

    def _batches(self):
        sampler = StepBatchSampler(len(self.train_set), self.cfg.batch_size, self.cfg.seed, self.step, self.cfg.steps)
        if isinstance(self.train_set, TensorDataset):  # in memory: index directly, no loader overhead
            x_all, y_all = self.train_set.tensors
            return ((x_all[idx], y_all[idx]) for idx in sampler)
        return iter(DataLoader(self.train_set, batch_sampler=sampler, num_workers=self.cfg.workers,
                               pin_memory=self.device.type == "cuda"))

    # ------------------------------------------------------------------ one step
    def _attack(self, x: torch.Tensor, y: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        self.encoder.eval()
        loss_fn = (ce_attack_loss(self.classifier, y) if cfg.method == "tecoa"
                   else embedding_attack_loss(self.encoder, ref))
        with self.autocast():
            x_adv = pgd(loss_fn, x, cfg.eps, steps=cfg.attack_steps, step_size=cfg.step_size, norm=cfg.norm,
                        generator=self.attack_gen)
        self.encoder.train()
        return x_adv

    def _update(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> Record:
        """One batch of the configured method; returns the step's telemetry (tensors)."""
        cfg = self.cfg
        with torch.no_grad(), self.autocast():
            ref = self.reference(x).float()
        x_adv = self._attack(x, y, ref)
        log: Record = {}
        if cfg.method == "lore":
            lam = self.dual(ref).detach()
            for _ in range(cfg.primal_steps):
                with self.autocast():
                    adv, clean = self.encoder(torch.cat([x_adv, x])).float().chunk(2)
                terms = losses.lagrangian(adv, clean, ref, lam, cfg.rho)
                self._update(terms["loss"])
            slack = losses.constraint_slack(clean.detach(), ref, cfg.rho)
            log["dual_objective"] = dual_step(self.dual, self.dual_optimizer, ref, slack)
            log["lambda_mean"] = lam.mean()
            for q, v in zip(QUANTILES, torch.quantile(lam, torch.tensor(QUANTILES, device=lam.device))):
                log[f"lambda_q{int(q * 100)}"] = v
            log["violation"] = (slack > 0).float().mean()
        elif cfg.method == "fare-reg":
            with self.autocast():
                adv, clean = self.encoder(torch.cat([x_adv, x])).float().chunk(2)
            terms = losses.fare_reg_loss(adv, clean, ref, cfg.lam)
            self._update(terms["loss"])
        else:
            with self.autocast():
                if cfg.method == "tecoa":
                    terms = losses.tecoa_loss(self.classifier(x_adv), y)
                else:
                    terms = losses.fare_loss(self.encoder(x_adv).float(), ref)
            self._update(terms["loss"])
            with torch.no_grad(), self.autocast():  # telemetry only: FARE/TeCoA never look at clean images
                clean = self.encoder(x).float()
        clean = clean.detach()
        rel = losses.sqdist(clean, ref) / ref.pow(2).sum(-1).clamp_min(1e-12)
        log.update({k if k == "loss" else f"loss_{k}": v.detach() for k, v in terms.items()})
        log["clean_cosine"] = torch.nn.functional.cosine_similarity(clean, ref, dim=-1).mean()
        log["rel_dist"] = rel.mean()
        if cfg.method != "lore":
            log["violation"] = (rel > cfg.rho).float().mean()
        return log

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> Record:
        """Periodic held-out evaluation: clean and PGD robust accuracy at the training ε, fidelity."""
        if self.eval_images is None:
            return {}
        self.encoder.eval()
        out: Record = embedding_metrics(self.encoder, self.reference, self.eval_images, self.cfg.rho)
        if self.classifier is not None:
            with self.autocast():
                out["clean_acc"] = clean_accuracy(self.classifier, self.eval_images, self.eval_labels)
                out["robust_acc"] = pgd_accuracy(self.classifier, self.eval_images, self.eval_labels, self.cfg.eps,
                                                 steps=self.cfg.attack_steps, norm=self.cfg.norm, seed=self.cfg.seed)
        self.encoder.train()
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        state = {"step": self.step, "encoder": self.encoder.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(),
                 "rng": {"torch": torch.get_rng_state(), "attack": self.attack_gen.get_state()}}
        if torch.cuda.is_available():
            state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        if self.base_weights is not None:
            state["base_weights"] = self.base_weights
        if self.dual is not None:
            state["dual"] = self.dual.state_dict()
            state["dual_optimizer"] = self.dual_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.encoder.load_state_dict(state["encoder"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        self.attack_gen.set_state(state["rng"]["attack"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if self.dual is not None:
            self.dual.load_state_dict(state["dual"])
            self.dual_optimizer.load_state_dict(state["dual_optimizer"])

    def save_checkpoint(self, run: Path) -> None:
        atomic_write_bytes(run / "checkpoint.pt", lambda p: torch.save(self.state_dict(), p))

    def load_checkpoint(self, run: Path) -> None:
        path = run / "checkpoint.pt"
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as e:
            raise ConfigError(f"{path}: missing or corrupt checkpoint, cannot resume "
                              f"({type(e).__name__}: {str(e)[:200]})") from None
        saved = state.get("base_weights")
        if self.base_weights is not None and saved != self.base_weights:
            raise ConfigError(f"{path}: this run was fine-tuned from {saved or 'unrecorded weights'}, but "
                              f"model={self.cfg.model!r} pretrained={self.cfg.pretrained!r} now resolves to "
                              f"{self.base_weights}; resuming would mix the two. Start a new run_dir")
        try:
            self.load_state_dict(state)
        except Exception as e:
            raise ConfigError(f"{path}: checkpoint does not fit this run, cannot resume "
                              f"({type(e).__name__}: {str(e)[:200]})") from None

    # ------------------------------------------------------------------ the loop
    def fit(self, callback: Callable[[Record], None] | None = None, progress: bool = True) -> Record:
        """Train to cfg.steps in cfg.run_path (resuming if asked); return the summary."""
        cfg, run = self.cfg, self.cfg.run_path
        if cfg.resume:
            self.load_checkpoint(run)
            _truncate_metrics(run / "metrics.jsonl", self.step, cfg.steps)
        else:
            run.mkdir(parents=True, exist_ok=True)
            atomic_write_json(run / "config.json", cfg.to_dict())
            (run / "metrics.jsonl").write_text("")
        start_time = time.perf_counter()
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"{cfg.method}", disable=not progress)
        with open(run / "metrics.jsonl", "a") as metrics:
            for x, y in self._batches():
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                t0 = time.perf_counter()
                log = self.train_step(x, y)
                values = dict(zip(log, torch.stack([v.float() for v in log.values()]).tolist()))
                dt = time.perf_counter() - t0  # .tolist() above synchronised the device
                self.step += 1
                record = {"kind": "train", "step": self.step, **values, "lr": self.scheduler.get_last_lr()[0],
                          "step_time": dt, "images_per_s": len(x) / dt}
                records = [record]
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    records.append({"kind": "eval", "step": self.step, **self.evaluate()})
                for r in records:
                    metrics.write(json.dumps(r) + "\n")
                    if callback is not None:
                        callback(r)
                metrics.flush()
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    self.save_checkpoint(run)
                bar.update(1)
                bar.set_postfix(loss=f"{values['loss']:.3g}", viol=f"{values['violation']:.2f}")
        bar.close()
        final = {"kind": "eval", "step": self.step, **self.evaluate()}
        with open(run / "metrics.jsonl", "a") as metrics:
            metrics.write(json.dumps(final) + "\n")
        if callback is not None:
            callback(final)
        atomic_write_bytes(run / "encoder.pt", lambda p: torch.save(self.encoder.state_dict(), p))
        summary = {"run_dir": str(run), "method": cfg.method, "steps": self.step, "final": final,
                   "base_weights": self.base_weights, "wall_time_s": time.perf_counter() - start_time}
        atomic_write_json(run / "summary.json", summary)
        return summary


def _truncate_metrics(path: Path, step: int, final_step: int) -> None:
    """Drop records past the checkpoint, and the final evaluation: the resumed run writes those again."""
    if not path.exists():
        return

    def keep_record(r: Record) -> bool:
        return r["step"] < step or (r["step"] == step and not (r["kind"] == "eval" and step == final_step))

    keep = [line for line in path.read_text().splitlines() if line and keep_record(json.loads(line))]
    atomic_write_bytes(path, lambda p: p.write_text("".join(line + "\n" for line in keep)))


def read_metrics(run_dir: str | Path) -> list[Record]:
    """All records of a run's metrics.jsonl (train and eval), in order."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def build(cfg: TrainConfig) -> tuple[Trainer, Any]:
    """Validate, check the run dir, load model and data: every error before anything is written."""
    from .data import fixed_subset, load_dataset, stack
    from .models import load_clip

    cfg.validate()
    check_run_dir(cfg)
    device = resolve_device(cfg.device)
    clip = load_clip(cfg.model, cfg.pretrained, cache_dir=cfg.cache_dir, device=device)
    bundle = load_dataset(cfg.dataset, root=cfg.data_path, image_size=clip.encoder.image_size[0])
    images, labels = stack(bundle.test, fixed_subset(len(bundle.test), cfg.eval_samples))
    weights = clip.class_embeddings(bundle.classnames, bundle.templates, device)
    trainer = Trainer(cfg, clip.encoder, bundle.train, eval_images=images, eval_labels=labels,
                      class_embeddings=weights, base_weights=weights_id(cfg.model, cfg.pretrained, cfg.cache_dir))
    return trainer, clip


def finished_and_current(cfg: TrainConfig) -> bool:
    """Whether cfg.run_dir holds a finished run of exactly `cfg`, fine-tuned from the weights that
    cfg.model / cfg.pretrained name today (not, say, an earlier pretraining of the embedded model)."""
    run = cfg.run_path
    try:
        saved = json.loads((run / "config.json").read_text())
        summary = json.loads((run / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return not config_diff(saved, cfg.to_dict()) and (
        summary.get("base_weights") == weights_id(cfg.model, cfg.pretrained, cfg.cache_dir))


def train(cfg: TrainConfig, callback: Callable[[Record], None] | None = None, progress: bool = True) -> Record:
    """Build everything from the config and train; the entry point of the CLI and the notebooks."""
    trainer, _ = build(cfg)
    return trainer.fit(callback, progress)


def load_run(run_dir: str | Path, device: torch.device | str = "cpu"):
    """(config, fine-tuned LoadedCLIP, frozen original encoder) of a finished run directory."""
    from .config import load_config_json
    from .models import load_clip

    run = Path(run_dir)
    if not (run / "config.json").is_file():
        raise ConfigError(f"run={str(run)!r}: not a run directory (no config.json)")
    cfg = TrainConfig.from_dict(load_config_json(run / "config.json"))
    tuned = load_clip(cfg.model, cfg.pretrained, image_encoder=run / "encoder.pt", cache_dir=cfg.cache_dir,
                      device=device)
    original = load_clip(cfg.model, cfg.pretrained, cache_dir=cfg.cache_dir, device=device).encoder
    return cfg, tuned, frozen_copy(original)
