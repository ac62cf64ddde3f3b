"""Run directories: how a run is laid out on disk, written, checked, resumed, reused and read back.

    config.json     the validated TrainConfig, written first
    metrics.jsonl   one JSON record per training step, plus periodic and final 'eval' records
    checkpoint.pt   everything needed to resume, rewritten every `checkpoint_every` steps
    encoder.pt      the fine-tuned image encoder's state dict, written at the end
    adapter.pt      instead of encoder.pt when only adapters trained (adapter='lora'): their weights only
    summary.json    final evaluation, compute ledger, base weights; its presence means "finished"
    .lock           held by the one process writing the run (`lock`)

Every file is written atomically (a temporary file in the same folder, then a rename), so neither a
reader nor a resumed run ever sees half a file; metrics.jsonl is appended to, and a last line cut short
by a kill is dropped when it is read. What to do with a run directory that already holds a run is one
decision, `prepare(cfg, existing)`, shared by the command line, the notebooks and the demo; it runs
under the directory's lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

from .config import NON_SEMANTIC_FIELDS, ConfigError, TrainConfig, config_diff, describe

Record = dict[str, Any]

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
ENCODER = "encoder.pt"
ADAPTER = "adapter.pt"
SUMMARY = "summary.json"
LOCK = ".lock"

# What `prepare` does with a run directory that already holds a run:
#   error      refuse, unless cfg.resume continues that same run (the command line's default)
#   reuse      read a finished run back if it is current, resume an unfinished one, else start over
#   overwrite  delete it and start over (a notebook re-run that must reflect the current code)
EXISTING = ("error", "reuse", "overwrite")


# ----------------------------------------------------------------------------- atomic files
def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary path next to `path`, then rename it over `path`.

    `write` may create a file, or a folder (which can only replace a missing or empty `path`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        else:
            tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: str | Path) -> Any:
    """The JSON in `path`; a ConfigError naming the file when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read JSON ({type(e).__name__}: {e})") from None


def check_output_dir(path: str | Path, field: str) -> None:
    """Refuse an output folder that cannot be created or written, before any work: `path` (or a parent of it)
    is a file, or the nearest existing folder is not writable. ConfigError names `field`."""
    path = Path(path)
    existing = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == path.absolute() else f"lies under {str(existing)!r}, which is a file"
        raise ConfigError(f"{field}={str(path)!r}: {where}, not a folder; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{field}={str(path)!r}: cannot write to {str(existing)!r} (permission denied); "
                          "choose a writable folder")


# ----------------------------------------------------------------------------- naming
def config_hash(cfg: TrainConfig) -> str:
    """Short hash of the fields that make a run different (not run_dir, device, workers, ...)."""
    semantic = {k: v for k, v in cfg.to_dict().items() if k not in NON_SEMANTIC_FIELDS}
    return hashlib.sha1(json.dumps(semantic, sort_keys=True).encode()).hexdigest()[:8]


def with_run_dir(cfg: TrainConfig, out_dir: str | Path) -> TrainConfig:
    """`cfg` with run_dir = <out_dir>/<default run name>-<config hash>, so two configs never share a folder."""
    cfg = replace(cfg, run_dir="").validate()
    return replace(cfg, run_dir=str(Path(out_dir) / f"{cfg.run_path.name}-{config_hash(cfg)}"))


# ----------------------------------------------------------------------------- state of a run
def is_finished(run: str | Path) -> bool:
    return (Path(run) / SUMMARY).is_file()


def finished_and_current(cfg: TrainConfig) -> bool:
    """Whether cfg.run_dir holds a finished run of exactly `cfg`, fine-tuned from the weights that
    cfg.model / cfg.pretrained name today (not, say, an earlier pretraining of the embedded model)."""
    from .models import weights_id

    run = cfg.run_path
    try:
        saved = json.loads((run / CONFIG).read_text())
        summary = json.loads((run / SUMMARY).read_text())
    except (OSError, ValueError):
        return False
    return not config_diff(saved, cfg.to_dict()) and (
        summary.get("base_weights") == weights_id(cfg.model, cfg.pretrained, cfg.cache_dir))


def check(cfg: TrainConfig) -> TrainConfig:
    """Refuse a run directory that already holds a run, unless resuming that same run.

    A run that stopped before its first checkpoint (nothing to resume, nothing to lose) starts over.
    Returns the config to train.
    """
    cfg_path = cfg.run_path / CONFIG
    if not cfg_path.exists():
        if cfg.resume:
            raise ConfigError(f"resume=True: run_dir={str(cfg.run_path)!r} holds no run (no {CONFIG}); "
                              "leave out --resume to start it")
        return cfg
    try:
        saved = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"run_dir={str(cfg.run_path)!r}: {CONFIG} is corrupt ({e})") from None
    diff = config_diff(saved, cfg.to_dict())
    if not (cfg.run_path / CHECKPOINT).is_file() and not is_finished(cfg.run_path):
        # nothing to resume and nothing to lose (e.g. it diverged at once): start over, with this config
        print(f"lorekit: {cfg.run_path} holds a run that stopped before its first checkpoint; starting it over"
              + (f" with this config ({', '.join(diff)} changed)" if diff else ""))
        remove(cfg.run_path)
        return replace(cfg, resume=False)
    if diff:
        detail = ", ".join(f"{k}: saved {saved.get(k)!r} vs {getattr(cfg, k, None)!r}" for k in diff)
        raise ConfigError(f"run_dir={str(cfg.run_path)!r} already holds a run with a different config ({detail}); "
                          "choose another run_dir")
    if not cfg.resume:
        raise ConfigError(f"run_dir={str(cfg.run_path)!r} already holds this run; pass resume=True (--resume) "
                          "to continue it, or choose another run_dir")
    return cfg


def remove(run: str | Path) -> None:
    """Empty a run directory (its lock stays with its holder), refusing anything that does not look like one."""
    run = Path(run)
    if not run.exists():
        return
    contents = [p for p in run.iterdir() if p.name != LOCK]
    if contents and not (run / CONFIG).is_file():
        raise ConfigError(f"run_dir={str(run)!r} exists and is not a lorekit run (no {CONFIG}); refusing to delete it")
    for p in contents:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


@contextmanager
def lock(run: str | Path) -> Iterator[None]:
    """Own the run directory for the duration; a second writer is refused with a message naming the holder.

    An flock belongs to the open file, so the kernel releases it when its holder dies (kill -9 included):
    no stale lock is ever left behind. A directory this call created and nothing else filled is removed
    again, so a run refused or failing before it starts leaves nothing behind.
    """
    run = Path(run)
    check_output_dir(run, "run_dir")
    created = [p for p in (run, *run.parents) if not p.exists()]  # what to remove again if nothing is written
    try:
        run.mkdir(parents=True, exist_ok=True)
        fd = os.open(run / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(f"run_dir={str(run)!r}: cannot be written ({e.strerror}); choose another run_dir") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            raise ConfigError(f"run_dir={str(run)!r} is in use by {holder}; wait for it to finish, stop it, or "
                              "choose another run_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                  .encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            if created and [p.name for p in run.iterdir()] == [LOCK]:
                (run / LOCK).unlink()
                for folder in created:  # innermost first: each is empty once the one inside it is gone
                    try:
                        folder.rmdir()
                    except OSError:  # something else arrived in it meanwhile: leave it
                        break
    finally:
        os.close(fd)


def prepare(cfg: TrainConfig, existing: str = "error") -> tuple[TrainConfig, Record | None]:
    """Make cfg.run_dir ready for `cfg` under the `existing` policy (see EXISTING).

    Returns the config to train (its `resume` set when an unfinished run continues) and, when a finished
    current run is reused, that run's summary (then there is nothing to train).
    """
    if existing not in EXISTING:
        raise ConfigError(f"existing={existing!r}: must be one of {', '.join(EXISTING)}")
    run = cfg.run_path
    if existing == "error":
        return check(cfg), None
    if existing == "reuse":
        if finished_and_current(cfg):
            return cfg, read_json(run / SUMMARY)
        same = (run / CONFIG).is_file() and not config_diff(read_json(run / CONFIG), cfg.to_dict())
        if same and (run / CHECKPOINT).is_file() and not is_finished(run):
            return replace(cfg, resume=True), None
    remove(run)
    return replace(cfg, resume=False), None


def start(cfg: TrainConfig) -> None:
    """Create the run directory of a new run: its config, and an empty metrics file."""
    run = cfg.run_path
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run / CONFIG, cfg.to_dict())
    (run / METRICS).write_text("")


# ----------------------------------------------------------------------------- metrics
def _metrics_lines(path: Path) -> list[tuple[str, Record]]:
    """(line, record) pairs; a last line cut short by a kill or a full disk is dropped, any other bad line named."""
    lines = [line for line in path.read_text().splitlines() if line]
    out = []
    for number, line in enumerate(lines, 1):
        try:
            out.append((line, json.loads(line)))
        except ValueError:
            if number < len(lines):
                raise ConfigError(f"{path}, line {number}: not a JSON record ({line[:60]!r}); the file is damaged "
                                  "beyond its last line") from None
    return out


def read_metrics(run: str | Path) -> list[Record]:
    """All records of a run's metrics.jsonl (train and eval), in order."""
    return [r for _, r in _metrics_lines(Path(run) / METRICS)]


def truncate_metrics(run: str | Path, step: int, final_step: int) -> None:
    """Drop records past the checkpoint (and a torn last line), and the final evaluation: the resumed run
    writes those again."""
    path = Path(run) / METRICS
    if not path.exists():
        return

    def keep_record(r: Record) -> bool:
        return r["step"] < step or (r["step"] == step and not (r["kind"] == "eval" and step == final_step))

    keep = [line for line, r in _metrics_lines(path) if keep_record(r)]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


# ----------------------------------------------------------------------------- reading a run back
class LoadedRun(NamedTuple):
    """A finished run: its config, the fine-tuned model, and the frozen original image encoder."""

    cfg: TrainConfig
    clip: Any  # models.LoadedCLIP with the fine-tuned image tower
    original: Any  # the frozen φθ0


def read_config(run_dir: str | Path, **overrides: Any) -> TrainConfig:
    """The validated config a run directory was trained with, with `overrides` applied before validation
    (e.g. device: a run trained on a GPU is read back on a machine without one)."""
    run = Path(run_dir)
    if not (run / CONFIG).is_file():
        raise ConfigError(f"run={str(run)!r}: not a run directory (no {CONFIG})")
    saved = read_json(run / CONFIG)
    if not isinstance(saved, dict):
        raise ConfigError(f"run={str(run)!r}: {CONFIG} does not hold a config object")
    return TrainConfig.from_dict({**saved, **overrides})


def tuned_model(run_dir: str | Path, base: Any) -> Any:
    """A finished run's fine-tuned open_clip model: `base` (its starting LoadedCLIP) with the run's weights,
    as a new LoadedCLIP. A LoRA run's adapters are folded in: the result is a plain open_clip model."""
    import copy

    from .models import ImageEncoder, LoadedCLIP, check_finite, load_encoder_weights

    run = Path(run_dir)
    if (run / ADAPTER).is_file():
        from .adapters import merged_copy

        state = _load_tensors(run / ADAPTER)
        check_finite(state, run / ADAPTER)
        model = merged_copy(base.model, read_config(run, device="cpu").lora, state)  # any device: only .lora is read
        encoder = ImageEncoder(model.visual, base.encoder.image_size, base.encoder.mean.flatten().tolist(),
                               base.encoder.std.flatten().tolist()).to(base.encoder.mean.device)
        return LoadedCLIP(model, base.tokenizer, base.name, base.pretrained, encoder)
    model = copy.deepcopy(base.model)
    encoder = ImageEncoder(model.visual, base.encoder.image_size, base.encoder.mean.flatten().tolist(),
                           base.encoder.std.flatten().tolist()).to(base.encoder.mean.device)
    load_encoder_weights(encoder, run / ENCODER)
    return LoadedCLIP(model, base.tokenizer, base.name, base.pretrained, encoder)


def _load_tensors(path: Path) -> dict[str, Any]:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"{path}: not a readable weights file ({describe(e)})") from None


def load_run(run_dir: str | Path, device: Any = "cpu") -> LoadedRun:
    """(config, fine-tuned LoadedCLIP, frozen original encoder) of a finished run directory."""
    from .models import frozen_copy, load_clip

    run = Path(run_dir)
    cfg = read_config(run, device="auto")  # the device it trained on may not exist here; `device` is where it loads
    if not is_finished(run):
        raise ConfigError(f"run={str(run)!r}: not finished (no {SUMMARY}); resume it with --resume first")
    base = load_clip(cfg.model, cfg.pretrained, cache_dir=cfg.cache_dir, device=device)
    return LoadedRun(cfg, tuned_model(run, base), frozen_copy(base.encoder))
