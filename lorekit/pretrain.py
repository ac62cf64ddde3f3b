"""Contrastive pretraining of the embedded tiny CLIP ('lorekit-tiny') on the digits train split.

Run once on first use and cached under <cache_dir>/ (the path is printed); a file lock makes
concurrent first uses (sweep workers, test processes) wait for one pretraining instead of racing.
The objective is CLIP's symmetric image–text contrastive loss with the class prompts of the
batch as the text side: with ten classes, many images share a caption, so the text→image
direction uses a uniform target over the images of that class.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from filelock import FileLock

from .config import ConfigError, default_cache_dir
from .progress import Progress
from .rundir import atomic_write

TINY_MODEL = "lorekit-tiny"
TINY_TAG = "digits"
# Model configs are data (open_clip style): registering the folder makes 'lorekit-tiny' a model name.
open_clip.add_model_config(Path(__file__).parent / "model_configs")

# One thread: float sums then do not depend on the machine's core count or the caller's thread setting,
# so every machine of a kind pretrains the same bits and the notebooks' checked numbers hold everywhere.
PRETRAIN_THREADS = 1
SETTINGS = {"steps": 500, "batch_size": 128, "lr": 1e-3, "weight_decay": 0.05, "warmup": 50, "seed": 0,
            "shift": 2, "version": 3}


def _augment(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random translations of up to `shift` pixels (zero padding), one per image."""
    b, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift))
    dy, dx = (torch.randint(0, 2 * shift + 1, (2, b), generator=gen)).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


def pretrain_tiny(settings: dict = SETTINGS, progress: bool = True) -> dict[str, torch.Tensor]:
    """Train lorekit-tiny from scratch on the digits train split; return its state dict."""
    from .data import digits

    torch.manual_seed(settings["seed"])
    gen = torch.Generator().manual_seed(settings["seed"])
    model = open_clip.create_model(TINY_MODEL)
    tokenizer = open_clip.get_tokenizer(TINY_MODEL)
    bundle = digits()
    x_all, y_all = bundle.train.tensors
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    prompts = tokenizer([t.format(c=c) for c in bundle.classnames for t in bundle.templates])
    prompts = prompts.view(len(bundle.classnames), len(bundle.templates), -1)
    opt = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"])
    total, warm = settings["steps"], settings["warmup"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / total)).item()))
    model.train()
    bar = Progress(total, "pretraining lorekit-tiny on digits", enabled=progress)
    for _ in range(total):
        idx = torch.randint(0, len(y_all), (settings["batch_size"],), generator=gen)
        x, y = _augment(x_all[idx], settings["shift"], gen), y_all[idx]
        pick = torch.randint(0, prompts.shape[1], (prompts.shape[0],), generator=gen)
        text = prompts[torch.arange(prompts.shape[0]), pick]
        img = F.normalize(model.encode_image((x - mean) / std), dim=-1)
        txt = F.normalize(model.encode_text(text), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T
        same = (y[None, :] == torch.arange(len(txt))[:, None]).float()
        present = same.sum(1) > 0
        t2i = -(same[present] / same[present].sum(1, keepdim=True) * logits.T[present].log_softmax(-1)).sum(1).mean()
        loss = 0.5 * (F.cross_entropy(logits, y) + t2i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        bar.update(loss=loss.item())
    bar.close()
    return model.eval().state_dict()


def tiny_checkpoint_path(cache_dir: str | Path | None = None) -> Path:
    """Where the pretrained lorekit-tiny checkpoint is cached; its name carries a hash of SETTINGS."""
    digest = hashlib.sha256(json.dumps(SETTINGS, sort_keys=True).encode()).hexdigest()[:10]
    return Path(cache_dir or default_cache_dir()).expanduser() / f"lorekit-tiny-digits-{digest}.pt"


def pretrained_tiny_checkpoint(cache_dir: str | Path | None = None) -> Path:
    """Path of the cached pretrained lorekit-tiny checkpoint, pretraining it on first use."""
    path = tiny_checkpoint_path(cache_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cache_dir={str(path.parent)!r}: cannot create the cache folder ({e})") from None
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            print(f"lorekit: pretraining the embedded lorekit-tiny CLIP on digits (once); caching to {path}")
            start = time.perf_counter()
            threads = torch.get_num_threads()
            torch.set_num_threads(PRETRAIN_THREADS)
            try:
                state = pretrain_tiny()
            finally:
                torch.set_num_threads(threads)
            atomic_write(path, lambda p: torch.save(state, p))
            print(f"lorekit: pretraining took {time.perf_counter() - start:.0f} s")
    return path
