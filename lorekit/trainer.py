"""One training loop for every method, with resumable run directories and a compute ledger.

Per batch: the reference embeddings φθ0(x), once, without grad; the method's adversarial batch (PGD
against its attack loss, the encoder in eval mode); the method's update (K encoder updates through
`primal_step`); telemetry. The loop never names a method: cfg.method picks one from the registry
(lorekit.methods) once, and the method asks the loop for encoder updates.

The learning-rate schedule counts encoder updates (steps·K, for every method). Batches are a pure
function of (seed, step), and the attack's random start of a sample a pure function of (seed, step,
its place in the global batch), so a resumed run repeats the uninterrupted one exactly on CPU, and a
run on N processes (torchrun, lorekit.distributed: each rank trains on its shard of every global
batch) is the one-process run up to floating-point reduction order, whatever N it resumes with.
A signal stops the run at a step boundary after a checkpoint; a non-finite value stops it before
anything of that step is saved (lorekit.stopping). The run directory's layout is lorekit.rundir's.
"""

from __future__ import annotations

import functools
import json
import math
import time
from contextlib import nullcontext
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from . import methods, rundir
from .attacks import LossFn, pgd, seeded_random_start
from .config import ConfigError, TrainConfig, describe
from .distributed import World
from .evaluate import batch_count, clean_accuracy, embedding_metrics, pgd_accuracy
from .ledger import Ledger
from .losses import sqdist
from .methods import Batch, Context, Update
from .models import ZeroShotClassifier, frozen_copy, parameter_counts
from .progress import Progress
from .stopping import Diverged, Interrupted, StopFlag
from .tracking import Tracker

Record = dict[str, Any]
QUANTILES = (0.1, 0.5, 0.9)


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


def noise_seed(seed: int, step: int, position: int) -> int:
    """The seed of the attack's random start for the sample at `position` of global batch `step`."""
    return ((seed * 1_000_003 + step) * 1_000_003 + position) % 2**63


class Trainer:
    """Fine-tunes any `nn.Module` image encoder ([0,1] images -> embeddings) with the method cfg.method names.

    `class_embeddings` (a zero-shot head) is needed by methods that classify (TeCoA) and enables the
    periodic accuracy evaluation; without it the periodic evaluation reports embedding metrics only.
    `world` is the data-parallel world (lorekit.distributed.World.from_env under torchrun). `clip`,
    `classnames` and `templates` reach methods that need the text tower (lorekit.methods.base.Context).

    What trains is the encoder, or with `adapters` every adapter of the adapted model (those on the text tower
    too, when the config put some there): the optimizer, the train/eval switches, the finiteness check and the
    parameter counts all cover `self.trainable`. When the config trains the text tower, the zero-shot head
    of the periodic evaluation is rebuilt from it at every evaluation.
    """

    def __init__(self, cfg: TrainConfig, encoder: nn.Module, train_set: Dataset, *,
                 eval_images: torch.Tensor | None = None, eval_labels: torch.Tensor | None = None,
                 class_embeddings: torch.Tensor | None = None, reference: nn.Module | None = None,
                 adapters: Any = None, base_weights: str | None = None, world: World | None = None,
                 clip: Any = None, classnames: Sequence[str] = (), templates: Sequence[str] = ()) -> None:
        self.cfg = cfg.validate()
        method = methods.get(cfg.method)
        self.world = world or World.from_env(cfg.device)
        self.base_weights = base_weights  # models.weights_id of the encoder's starting weights, when known
        self.adapters = adapters  # adapters.LoraCLIP when only adapters train: checkpoints hold their weights only
        if method.needs_head and class_embeddings is None:
            raise ConfigError(f"method={cfg.method!r} needs class embeddings (a zero-shot head) for its loss")
        if len(train_set) < cfg.batch_size:
            few = f", the {cfg.shots}-shot subset" if cfg.shots else ""
            raise ConfigError(f"batch_size={cfg.batch_size}: larger than the training set ({len(train_set)} images{few}); "
                              f"use batch_size <= {len(train_set)}")
        if cfg.batch_size % self.world.size:
            raise ConfigError(f"batch_size={cfg.batch_size}: the global batch must split evenly over the "
                              f"{self.world.size} processes (a multiple of {self.world.size})")
        self.device = self.world.device
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
        torch.manual_seed(cfg.seed)
        self.encoder = encoder.to(self.device)
        self.trainable = adapters.model if adapters is not None else self.encoder  # holds every trained parameter
        self.clip, self.classnames, self.templates = clip, classnames, templates
        self.reference = (reference if reference is not None else frozen_copy(encoder)).to(self.device).eval()
        tower = getattr(self.encoder, "visual", self.encoder)  # the open_clip tower inside an ImageEncoder
        if cfg.grad_checkpointing:
            # open_clip's ModifiedResNet has the method but it does nothing: look for a module that switched on
            if hasattr(tower, "set_grad_checkpointing"):
                tower.set_grad_checkpointing(True)
            if not any(getattr(m, "grad_checkpointing", False) is True for m in tower.modules()):
                raise ConfigError(f"grad_checkpointing=True: {type(tower).__name__} cannot recompute its activations "
                                  "(open_clip's ViT and text-transformer towers can; its ResNets cannot)")
        if cfg.compile:
            tower.compile()  # in place: the ledger's hooks on the wrapper and the state-dict keys stay as they are
        self.train_set = train_set
        self.eval_images = eval_images.to(self.device) if eval_images is not None else None
        self.eval_labels = eval_labels.to(self.device) if eval_labels is not None else None
        self.class_embeddings = class_embeddings.to(self.device) if class_embeddings is not None else None
        self.classifier = (ZeroShotClassifier(self.encoder, self.class_embeddings)
                           if self.class_embeddings is not None else None)

        self.params = [p for p in self.trainable.parameters() if p.requires_grad]
        in_encoder = {id(p) for p in self.encoder.parameters()}
        # DistributedDataParallel averages the encoder's gradients; these (text-tower adapters) are averaged by hand
        self.params_outside_encoder = [p for p in self.params if id(p) not in in_encoder]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        updates = cfg.steps * cfg.updates_per_batch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           warmup_cosine(updates, int(cfg.warmup * updates)))
        self.ledger = Ledger(self.world.size).watch(*{id(m): m for m in (self.encoder, self.reference)}.values())
        with torch.no_grad():
            embed_dim = self.reference(self._first_image()).shape[-1]
        self.trained = self.world.wrap(self.encoder)
        trained_head = ZeroShotClassifier(self.trained, self.class_embeddings) if self.classifier is not None else None
        ctx = Context(cfg, self.encoder, self.trained, self.classifier, trained_head, embed_dim, self.device,
                      self.autocast, self._primal_step, self.world.average_gradients, clip, classnames, templates,
                      self.reference)
        self.method = method(cfg, ctx)
        self.step = 0
        self._grad_norm: torch.Tensor | None = None  # the largest gradient norm of the step's updates

    # ------------------------------------------------------------------ data
    def _first_image(self) -> torch.Tensor:
        return self.train_set[0][0].unsqueeze(0).to(self.device)

    def _batches(self):
        """This rank's shard of each global batch from the current step on (every rank reads only its own)."""
        sampler = StepBatchSampler(len(self.train_set), self.cfg.batch_size, self.cfg.seed, self.step, self.cfg.steps)
        shard = self.cfg.batch_size // self.world.size
        shards = ([*idx[self.world.rank * shard:(self.world.rank + 1) * shard]] for idx in sampler)
        if isinstance(self.train_set, TensorDataset):  # in memory: index directly, no loader overhead
            x_all, y_all = self.train_set.tensors
            return ((x_all[idx], y_all[idx]) for idx in shards)
        return iter(DataLoader(self.train_set, batch_sampler=list(shards), num_workers=self.cfg.workers,
                               pin_memory=self.device.type == "cuda"))

    # ------------------------------------------------------------------ one step
    def _attack(self, batch: Batch, loss_fn: LossFn) -> torch.Tensor:
        cfg, x = self.cfg, batch.x
        start = seeded_random_start(x, cfg.eps, cfg.norm,
                                    [noise_seed(cfg.seed, batch.step, batch.first + i) for i in range(len(x))])
        self.trainable.eval()
        with self.autocast():
            x_adv = pgd(loss_fn, x, cfg.eps, steps=cfg.attack_steps, step_size=cfg.step_size, norm=cfg.norm,
                        start=start)
        self.trainable.train()
        return x_adv

    def _primal_step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.world.average_gradients(self.params_outside_encoder)
        norm = torch.nn.utils.clip_grad_norm_(self.params, float("inf"))  # only measured: inf clips nothing
        self._grad_norm = norm if self._grad_norm is None else torch.maximum(self._grad_norm, norm)
        self.optimizer.step()
        self.scheduler.step()
        self.ledger.updates += 1

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> Record:
        """One batch (this rank's shard) of the configured method; returns the step's telemetry (0-d tensors)."""
        self._grad_norm = None
        with torch.no_grad(), self.autocast(), self.ledger.phase("reference"):
            ref = self.reference(x).float()
        batch = Batch(x, y, ref, step=self.step, first=self.world.rank * len(x))
        with self.ledger.phase("attack"):
            batch.x_adv = self.method.adversarial(batch, functools.partial(self._attack, batch))
        with self.ledger.phase("update"):
            update = self.method.update(batch)
        clean = update.clean
        if clean is None:  # the update never looked at clean images: one forward, for the telemetry only
            with torch.no_grad(), self.autocast(), self.ledger.phase("telemetry"):
                clean = self.encoder(x).float()
        return self._telemetry(update, clean, ref)

    def _telemetry(self, update: Update, clean: torch.Tensor, ref: torch.Tensor) -> Record:
        log: Record = {k if k == "loss" else f"loss_{k}": v.detach() for k, v in update.losses.items()}
        for name, value in update.stats.items():
            if value.dim() == 1:  # per sample, over the global batch: its mean and quantiles
                value = self.world.gather(value)
                log[f"{name}_mean"] = value.mean()
                for q, v in zip(QUANTILES, torch.quantile(value.float(), torch.tensor(QUANTILES, device=value.device))):
                    log[f"{name}_q{int(q * 100)}"] = v
            else:
                log[name] = value.detach()
        rel = sqdist(clean, ref) / ref.pow(2).sum(-1).clamp_min(1e-12)
        log["clean_cosine"] = torch.nn.functional.cosine_similarity(clean, ref, dim=-1).mean()
        log["rel_dist"] = rel.mean()
        log["violation"] = (rel > self.cfg.rho).float().mean()
        if self._grad_norm is not None:
            log["grad_norm"] = self._grad_norm
        return log

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, progress: bool = False) -> Record:
        """Held-out evaluation: clean and PGD robust accuracy at the training ε, fidelity; `progress` reports
        its batches (the final evaluation; the periodic ones run inside the training's progress)."""
        if self.eval_images is None:
            return {}
        self.trainable.eval()
        out: Record = embedding_metrics(self.encoder, self.reference, self.eval_images, self.cfg.rho)
        if self.classifier is not None:
            if self.cfg.trains_text_tower and self.clip is not None:  # the head follows the text tower as it trains
                weights = self.clip.class_embeddings(self.classnames, self.templates, self.device)
                self.classifier.weights.copy_(F.normalize(weights.float(), dim=-1))
            with self.autocast(), Progress(2 * batch_count(len(self.eval_images)), f"{self.cfg.method} evaluation",
                                           unit="batch", enabled=progress) as bar:
                out["clean_acc"] = clean_accuracy(self.classifier, self.eval_images, self.eval_labels, progress=bar)
                out["robust_acc"] = pgd_accuracy(self.classifier, self.eval_images, self.eval_labels, self.cfg.eps,
                                                 steps=self.cfg.attack_steps, norm=self.cfg.norm, seed=self.cfg.seed,
                                                 progress=bar)
                out.update(self.method.evaluate(self.classifier, self.eval_images, self.eval_labels))
        self.trainable.train()
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        state = {"step": self.step, "encoder": self._weights(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "method": self.method.state_dict(),
                 "ledger": self.ledger.state_dict(), "rng": {"torch": torch.get_rng_state()}}
        if torch.cuda.is_available():
            state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        if self.base_weights is not None:
            state["base_weights"] = self.base_weights
        return state

    def _weights(self) -> dict[str, torch.Tensor]:
        """What trains: the encoder's state dict, or only the adapters' weights."""
        return self.adapters.adapter_state_dict() if self.adapters is not None else self.encoder.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        if self.adapters is not None:
            self.adapters.load_adapter_state_dict(state["encoder"])
        else:
            self.encoder.load_state_dict(state["encoder"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.method.load_state_dict(state["method"])
        self.ledger.load_state_dict(state["ledger"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def _check_finite_weights(self) -> None:
        """No non-finite weights are ever saved: a parameter that overflowed stops the run instead."""
        bad = [n for n, p in self.trainable.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        if bad:
            raise Diverged(self.step, f"parameter {bad[0]}", float("nan"), self._last_checkpoint())

    def _last_checkpoint(self) -> str:
        path = self.cfg.run_path / rundir.CHECKPOINT
        if not path.is_file():
            return "and no checkpoint had been written yet"
        step = torch.load(path, map_location="cpu", weights_only=True)["step"]
        return f"the last good checkpoint (step {step}) is kept in {path}"

    def save_checkpoint(self) -> None:
        """Write the checkpoint (rank 0; every rank holds the same state) and wait until it is on disk."""
        self._check_finite_weights()
        if self.world.is_main:
            rundir.atomic_write(self.cfg.run_path / rundir.CHECKPOINT, lambda p: torch.save(self.state_dict(), p))
        self.world.barrier()

    def load_checkpoint(self) -> None:
        path = self.cfg.run_path / rundir.CHECKPOINT
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as e:
            raise ConfigError(f"{path}: missing or corrupt checkpoint, cannot resume "
                              f"({describe(e)})") from None
        saved = state.get("base_weights")
        if self.base_weights is not None and saved != self.base_weights:
            raise ConfigError(f"{path}: this run was fine-tuned from {saved or 'unrecorded weights'}, but "
                              f"model={self.cfg.model!r} pretrained={self.cfg.pretrained!r} now resolves to "
                              f"{self.base_weights}; resuming would mix the two. Start a new run_dir")
        try:
            self.load_state_dict(state)
        except Exception as e:
            raise ConfigError(f"{path}: checkpoint does not fit this run, cannot resume "
                              f"({describe(e)})") from None

    # ------------------------------------------------------------------ the loop
    def fit(self, callback: Callable[[Record], None] | None = None, progress: bool = True) -> Record:
        """Train to cfg.steps in cfg.run_path (resuming if asked); return the summary."""
        cfg, run, main = self.cfg, self.cfg.run_path, self.world.is_main
        if cfg.resume:
            self.load_checkpoint()
            if main:
                rundir.truncate_metrics(run, self.step, cfg.steps)
        elif main:
            rundir.start(cfg)
        start_time = time.perf_counter()
        reset_peak_memory()
        tracker = Tracker(cfg, run) if main else None
        bar = Progress(cfg.steps, cfg.method, initial=self.step, enabled=progress and main)
        flag = StopFlag()
        try:
            with flag.installed(), (open(run / rundir.METRICS, "a") if main else nullcontext()) as metrics:
                for x, y in self._batches():
                    x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                    t0 = time.perf_counter()
                    log = self.train_step(x, y)
                    values = dict(zip(log, self.world.mean(torch.stack([v.float() for v in log.values()])).tolist()))
                    # every rank stops at the same step boundary: the flag is agreed over all of them
                    signum = int(self.world.maximum(torch.tensor(flag.signum or 0, device=self.device)).item())
                    dt = time.perf_counter() - t0  # .tolist() above synchronised the device
                    self.step += 1
                    self.ledger.wall_time_s += dt
                    record = {"kind": "train", "step": self.step, **values, "lr": self.scheduler.get_last_lr()[0],
                              "step_time": dt, "images_per_s": cfg.batch_size / dt, **self.ledger.totals()}
                    bad = next((k for k, v in values.items() if not math.isfinite(v)), None)
                    records = [record]
                    if bad is None and cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                        records.append({"kind": "eval", "step": self.step, **(self.evaluate() if main else {})})
                    if main:
                        for r in records:
                            metrics.write(json.dumps(r) + "\n")
                            tracker.log(r)
                            if callback is not None:
                                callback(r)
                        metrics.flush()
                    if bad is not None:
                        raise Diverged(self.step, bad, values[bad], self._last_checkpoint())
                    if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps or signum:
                        self.save_checkpoint()
                    bar.update(1, loss=values["loss"], viol=values["violation"])
                    if signum and self.step < cfg.steps:
                        raise Interrupted(signum, self.step, cfg.steps, run)
            bar.close()
            self._check_finite_weights()
            summary = {"run_dir": str(run), "method": cfg.method, "steps": self.step,
                       "updates_per_batch": cfg.updates_per_batch, "world_size": self.world.size,
                       "ledger": self.ledger.totals()}
            if main:
                summary.update(self._finish(tracker, callback, start_time, progress))
            return self.world.broadcast(summary)  # every rank returns rank 0's summary
        finally:
            bar.close()
            if tracker is not None:
                tracker.close()
            self.world.barrier()  # no rank leaves (torchrun stops the others when one exits) before rank 0 wrote

    def _finish(self, tracker: Tracker, callback: Callable[[Record], None] | None, start_time: float,
                progress: bool) -> Record:
        """Rank 0: the final evaluation, the fine-tuned weights and the summary."""
        run = self.cfg.run_path
        final = {"kind": "eval", "step": self.step, **self.evaluate(progress)}
        with open(run / rundir.METRICS, "a") as metrics:
            metrics.write(json.dumps(final) + "\n")
        tracker.log(final)
        if callback is not None:
            callback(final)
        weights = rundir.ADAPTER if self.adapters is not None else rundir.ENCODER
        rundir.atomic_write(run / weights, lambda p: torch.save(self._weights(), p))
        trainable, total = parameter_counts(self.trainable)
        summary = {"final": final, "parameters": {"trainable": trainable, "total": total},
                   "peak_memory_mib": peak_memory_mib(), "base_weights": self.base_weights,
                   "wall_time_s": time.perf_counter() - start_time}
        rundir.atomic_write_json(run / rundir.SUMMARY, {"run_dir": str(run), "method": self.cfg.method,
                                                        "steps": self.step,
                                                        "updates_per_batch": self.cfg.updates_per_batch,
                                                        "world_size": self.world.size,
                                                        "ledger": self.ledger.totals(), **summary})
        return summary


def reset_peak_memory() -> None:
    """Start measuring the peak anew, so a run reports its own (several runs share a notebook's process):
    the CUDA allocator's peak, and on Linux the resident set's high-water mark (/proc/self/clear_refs)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux: the resident-set peak stays the process's
        pass


def peak_memory_mib() -> float:
    """Peak memory since `reset_peak_memory`: the CUDA allocator's on a GPU, else the resident set (MiB)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def build(cfg: TrainConfig, world: World | None = None) -> Trainer:
    """A Trainer for cfg's model and data (lorekit.workbench.setup); every loading error before any work.

    adapter='lora' adds adapters to the model in place; the reference is then the same encoder with them off.
    """
    from .tracking import check_available
    from .workbench import setup

    check_available(cfg)
    bench = setup(cfg)
    reference, adapters = None, None
    if cfg.adapter == "lora":
        from .adapters import AdaptersOff, add_lora

        torch.manual_seed(cfg.seed)  # the adapters' random initialisation belongs to the run, like everything else
        adapters = add_lora(bench.clip.model, **cfg.lora)
        reference = AdaptersOff(bench.clip.encoder, adapters)
    else:
        reference = bench.original  # a frozen copy, taken before any update
    return Trainer(cfg, bench.clip.encoder, bench.data.train, eval_images=bench.images, eval_labels=bench.labels,
                   class_embeddings=bench.class_embeddings, reference=reference, adapters=adapters,
                   base_weights=bench.base_weights, world=world, clip=bench.clip, classnames=bench.data.classnames,
                   templates=bench.data.templates)


def train(cfg: TrainConfig, *, existing: str = "error", callback: Callable[[Record], None] | None = None,
          progress: bool = True, on_build: Callable[[Trainer], None] | None = None) -> Record:
    """Train `cfg` in cfg.run_dir and return the run's summary: the entry point of the CLI, demo and notebooks.

    `existing` says what to do with a run already in run_dir (lorekit.rundir.EXISTING): 'error' (refuse
    unless cfg.resume), 'reuse' (read a finished current run back, replaying its records to `callback`;
    resume an unfinished one) or 'overwrite'. `on_build(trainer)` runs before training starts. Under
    torchrun every rank calls it; rank 0 owns the run directory (its lock, its files).
    """
    cfg = cfg.validate()
    world = World.from_env(cfg.device)
    with rundir.lock(cfg.run_path) if world.is_main else nullcontext():
        decided = rundir.prepare(cfg, existing) if world.is_main else None
        cfg, reused = world.broadcast(decided)  # every rank trains the config rank 0 decided on
        if reused is not None:
            if callback is not None:
                for record in rundir.read_metrics(cfg.run_path):
                    callback(record)
            return reused
        trainer = build(cfg, world)
        if on_build is not None:
            on_build(trainer)
        return trainer.fit(callback, progress)
