"""Contrastive pretraining of the embedded tiny CLIP ('lorekit-tiny') on the train splits of the suite.

Run once on first use and cached under <cache_dir>/ (the path is printed); a file lock makes
concurrent first uses (sweep workers, test processes) wait for one pretraining instead of racing.
The objective is CLIP's symmetric image–text contrastive loss on batches mixed from every domain of
`lorekit.suite` (digits, words, shapes, textures), with one prompt per class (a random template of
its domain) as the text side and the classes of the image's own domain as its negatives: many
images share a caption, so the text→image direction uses a uniform target over the images of that
class. The cache key hashes SETTINGS, the model config and the suite's version, so a change to any
of them pretrains anew.
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
from .suite import SUITE_VERSION, load_suite

TINY_MODEL = "lorekit-tiny"
TINY_TAG = "digits"
# Model configs are data (open_clip style): registering the folder makes 'lorekit-tiny' a model name.
open_clip.add_model_config(Path(__file__).parent / "model_configs")

# One thread: float sums then do not depend on the machine's core count or the caller's thread setting,
# so every machine of a kind pretrains the same bits and the notebooks' checked numbers hold everywhere.
PRETRAIN_THREADS = 1
SETTINGS = {"steps": 1500, "batch_size": 64, "lr": 2e-3, "weight_decay": 0.05, "warmup": 100, "seed": 0,
            "shift": 2, "domains": {"digits": 1.0, "words": 2.0, "shapes": 1.0, "textures": 2.0}, "version": 4}


def _augment(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random translations of up to `shift` pixels (zero padding), one per image."""
    b, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift))
    dy, dx = (torch.randint(0, 2 * shift + 1, (2, b), generator=gen)).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


def _suite_prompts(tokenizer, bundles) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokenised prompts of every (domain, class), flat; and per class its first row and template count."""
    texts, first, count = [], [], []
    for b in bundles:
        for c in b.classnames:
            first.append(len(texts))
            count.append(len(b.templates))
            texts += [t.format(c=c) for t in b.templates]
    return tokenizer(texts), torch.tensor(first), torch.tensor(count)


def pretrain_tiny(settings: dict = SETTINGS, progress: bool = True) -> dict[str, torch.Tensor]:
    """Train lorekit-tiny from scratch on the union of the suite's train splits; return its state dict."""
    torch.manual_seed(settings["seed"])
    gen = torch.Generator().manual_seed(settings["seed"])
    model = open_clip.create_model(TINY_MODEL)
    # The suite's prompts use a few dozen of the 49408 token embeddings: fixed random vectors serve as
    # well, and training the whole table would cost more than the image tower's update.
    model.token_embedding.requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(TINY_MODEL)
    bundles = [b for b in load_suite() if b.name in settings["domains"]]
    # Classes of all domains in one label space: domain d's class c is offset[d] + c.
    offsets = torch.tensor([0] + [len(b.classnames) for b in bundles]).cumsum(0)
    x_all = torch.cat([b.train.tensors[0] for b in bundles])
    y_all = torch.cat([b.train.tensors[1] + offsets[d] for d, b in enumerate(bundles)])
    # A domain's share of each batch follows its weight (the slow learners, words and textures, get more).
    sample_weight = torch.cat([torch.full((len(b.train),), settings["domains"][b.name] / len(b.train),
                                          dtype=torch.float64) for b in bundles])
    prompts, first, count = _suite_prompts(tokenizer, bundles)
    n_classes = len(first)
    class_domain = torch.repeat_interleave(torch.arange(len(bundles)), offsets.diff())
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings["lr"],
                            weight_decay=settings["weight_decay"])
    total, warm = settings["steps"], settings["warmup"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / total)).item()))
    model.train()
    bar = Progress(total, "pretraining lorekit-tiny on the suite", enabled=progress)
    for _ in range(total):
        idx = torch.multinomial(sample_weight, settings["batch_size"], replacement=True, generator=gen)
        x, y = _augment(x_all[idx], settings["shift"], gen), y_all[idx]
        pick = (torch.rand(n_classes, generator=gen) * count).long()
        text = prompts[first + pick]
        img = F.normalize(model.encode_image((x - mean) / std), dim=-1)
        txt = F.normalize(model.encode_text(text), dim=-1)
        # Negatives come from the image's own domain only, as in zero-shot evaluation: prompts that share a
        # class name across domains ("a handwritten digit three", 'the word "three"') are never pushed
        # apart, so an image of the typed word lies near every prompt of its name, as in CLIP.
        own = class_domain[y][:, None] == class_domain[None, :]
        logits = (model.logit_scale.exp() * img @ txt.T).masked_fill(~own, float("-inf"))
        same = (y[None, :] == torch.arange(n_classes)[:, None]).float()
        present = same.sum(1) > 0
        target = same[present] / same[present].sum(1, keepdim=True)
        t2i = -(target * logits.T[present].log_softmax(-1).where(target > 0, 0.0)).sum(1).mean()  # 0·(−∞) → 0
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
    """Where the pretrained lorekit-tiny checkpoint is cached; its name carries a hash of what makes it."""
    key = {"settings": SETTINGS, "model": open_clip.get_model_config(TINY_MODEL), "suite": SUITE_VERSION}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return Path(cache_dir or default_cache_dir()).expanduser() / f"lorekit-tiny-suite-{digest}.pt"


def pretrained_tiny_checkpoint(cache_dir: str | Path | None = None) -> Path:
    """Path of the cached pretrained lorekit-tiny checkpoint, pretraining it on first use."""
    path = tiny_checkpoint_path(cache_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cache_dir={str(path.parent)!r}: cannot create the cache folder ({e})") from None
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            print(f"lorekit: pretraining the embedded lorekit-tiny CLIP on the suite (once); caching to {path}")
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
