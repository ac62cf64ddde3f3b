"""Loading open_clip models, the [0,1]-pixel image-encoder wrapper, and the zero-shot classifier.

Attacks work in pixel space, so resizing and mean/std normalisation live inside
`ImageEncoder.forward`: an ε of 4/255 always means four grey levels.

Nothing is downloaded: the files a pretrained tag or an 'hf-hub:' name needs are looked up in the local
Hugging Face caches first (`weights_cache`), and open_clip then loads them with the hub in offline mode.
Without that, a missing file meant a minute of network retries and chained tracebacks.
"""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import open_clip
from open_clip.utils import freeze_batch_norm_2d
import torch
import torch.nn.functional as F
from torch import nn

from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

from .config import ConfigError, describe
from .pretrain import TINY_MODEL, TINY_TAG, pretrained_tiny_checkpoint, tiny_checkpoint_path

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
HF_HUB_PREFIX = "hf-hub:"


class ImageEncoder(nn.Module):
    """[0,1] RGB images -> raw (not L2-normalised) embeddings of any image tower.

    Resizes (short side, then centre crop, as the model's own preprocessing does) and normalises
    inside forward, differentiably, so attacks and ε stay in pixel space. BatchNorm layers (ResNet
    towers, the embedded model's included) are frozen to their running statistics, in place: with
    batch statistics φθ(x) would depend on the rest of the batch, differ between train and eval mode,
    and differ from φθ0(x) before any update, which would blur FARE's loss and LORE's constraint.
    """

    def __init__(self, visual: nn.Module, image_size: int | Sequence[int],
                 mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.visual = freeze_batch_norm_2d(visual)
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.image_size: tuple[int, int] = (int(size[0]), int(size[1]))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[-2:]) != self.image_size:
            images = _resize_center_crop(images, self.image_size)
        return self.visual((images - self.mean) / self.std)


def _resize_center_crop(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    h, w = images.shape[-2:]
    scale = max(size[0] / h, size[1] / w)
    new = (max(size[0], round(h * scale)), max(size[1], round(w * scale)))
    images = F.interpolate(images, size=new, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (new[0] - size[0]) // 2, (new[1] - size[1]) // 2
    return images[..., top:top + size[0], left:left + size[1]]


def parameter_counts(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) number of parameters of a module."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """`module` in eval mode (dropout off) for the duration; its previous mode is restored afterwards."""
    training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(training)


def frozen_copy(module: nn.Module) -> nn.Module:
    """φθ0: an independent, frozen, eval-mode copy of the encoder."""
    ref = copy.deepcopy(module).eval()
    ref.requires_grad_(False)
    return ref


@dataclass
class LoadedCLIP:
    """An open_clip model with its tokenizer and a pixel-space wrapper of its image tower."""

    model: nn.Module
    tokenizer: Any
    name: str
    pretrained: str
    encoder: ImageEncoder

    def class_embeddings(self, classnames: Sequence[str], templates: Sequence[str],
                         device: torch.device | str | None = None) -> torch.Tensor:
        return class_embeddings(self.model, self.tokenizer, classnames, templates, device)


def _looks_like_path(pretrained: str) -> bool:
    return bool(pretrained) and (os.sep in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES)
                                 or Path(pretrained).exists())


def resolve_model_name(name: str, pretrained: str) -> str:
    """Check the name; OpenAI weights need open_clip's QuickGELU variant (3.x no longer switches)."""
    if name.startswith(HF_HUB_PREFIX):
        if pretrained:
            raise ConfigError(f"pretrained={pretrained!r}: an 'hf-hub:' model carries its own weights; leave pretrained ''")
        return name
    known = open_clip.list_models()
    if name not in known:
        close = [m for m in known if name.lower().split("-")[0] in m.lower()][:8] or known[:8]
        raise ConfigError(f"model={name!r}: unknown open_clip model; valid are open_clip.list_models() "
                          f"(e.g. {', '.join(close)}) or 'hf-hub:org/name'")
    if pretrained == "openai" and not name.endswith("-quickgelu") and f"{name}-quickgelu" in known:
        return f"{name}-quickgelu"
    return name


def check_pretrained(name: str, pretrained: str) -> None:
    """Fail fast on a tag the model does not have, or a checkpoint file that is missing."""
    if not pretrained or name.startswith(HF_HUB_PREFIX):
        return
    base = name.removesuffix("-quickgelu")
    if name == TINY_MODEL and pretrained == TINY_TAG:
        return
    if _looks_like_path(pretrained):
        if Path(pretrained).is_dir():
            raise ConfigError(f"pretrained={pretrained!r}: is a folder; give the checkpoint file in it")
        if not Path(pretrained).is_file():
            raise ConfigError(f"pretrained={pretrained!r}: checkpoint file not found")
        return
    tags = set(open_clip.list_pretrained_tags_by_model(name)) | set(open_clip.list_pretrained_tags_by_model(base))
    if pretrained not in tags:
        valid = sorted(tags) + ([TINY_TAG] if name == TINY_MODEL else [])
        raise ConfigError(f"pretrained={pretrained!r}: not a pretrained tag of {name!r} (valid: "
                          f"{', '.join(valid) or 'none'}), and no such checkpoint file exists")


def hub_caches(cache_dir: str | Path | None = None) -> list[Path]:
    """The Hugging Face hub caches searched for weights, in order: lorekit's cache_dir, then the hub's own
    (HF_HUB_CACHE, i.e. $HF_HOME/hub, by default ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    caches = [Path(cache_dir).expanduser()] if cache_dir else []
    return list(dict.fromkeys([*caches, Path(constants.HF_HUB_CACHE)]))


def _hub_files(name: str, pretrained: str) -> tuple[str, list[list[str]]] | None:
    """(repo, [alternative file names, ...]) that open_clip fetches from the hub for name + pretrained, or None
    when it fetches nothing (random init, a local file, the embedded model)."""
    weights = [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]  # open_clip takes the safetensors file when there is one
    if name.startswith(HF_HUB_PREFIX):
        return name.removeprefix(HF_HUB_PREFIX), [[HF_CONFIG_NAME], weights]
    if not pretrained or _looks_like_path(pretrained) or (name == TINY_MODEL and pretrained == TINY_TAG):
        return None
    source = open_clip.get_pretrained_cfg(name, pretrained)
    if not source.get("hf_hub"):
        raise ConfigError(f"pretrained={pretrained!r}: open_clip has {name!r}'s weights only at the URL "
                          f"{source.get('url')}; nothing is downloaded here: fetch that file and pass "
                          "--pretrained /path/to/file")
    repo, filename = os.path.split(source["hf_hub"])  # 'org/repo/' names the default weights file
    if not filename or filename == HF_WEIGHTS_NAME:
        return repo, [weights]
    if filename.endswith((".bin", ".pth")):
        return repo, [[filename[:-4] + ".safetensors", filename]]
    return repo, [[filename]]


def weights_cache(name: str, pretrained: str = "", cache_dir: str | Path | None = None) -> str | None:
    """The local hub cache that holds every file `load_clip(name, pretrained)` needs from the hub.

    None when nothing comes from the hub. When a file is in no cache this fails at once, without touching the
    network, saying which file to put where.
    """
    from huggingface_hub import try_to_load_from_cache

    needed = _hub_files(name, pretrained)
    if needed is None:
        return str(cache_dir) if cache_dir else None
    repo, files = needed
    caches = hub_caches(cache_dir)
    for cache in caches:
        if all(any(isinstance(try_to_load_from_cache(repo, f, cache_dir=cache), str) for f in alternatives)
               for alternatives in files):
            return str(cache)
    what = " and ".join(" (or ".join(alternatives) + ")" * (len(alternatives) - 1) for alternatives in files)
    field = f"model={name!r}" if name.startswith(HF_HUB_PREFIX) else f"pretrained={pretrained!r}"
    where = " or ".join(f"{c} (lorekit's cache_dir)" if c != caches[-1] else
                        f"{c} (the Hugging Face cache: $HF_HUB_CACHE, else $HF_HOME/hub)" for c in caches)
    raise ConfigError(
        f"{field}: the weights are not in a local cache, and nothing is downloaded here. Needed: {what} of the "
        f"Hugging Face repo {repo!r}, laid out as the hub does (models--{repo.replace('/', '--')}/snapshots/"
        f"<commit>/<file> plus refs/main holding <commit>) under {where}. On a machine with network, "
        f"`hf download {repo} --cache-dir DIR` writes that layout into DIR; copy it into one of those folders. "
        "Or give an open_clip model name with --pretrained /path/to/checkpoint.pt")


@contextmanager
def hub_offline() -> Iterator[None]:
    """huggingface_hub's offline mode inside the block: a file missing from the cache fails at once."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    constants.HF_HUB_OFFLINE, os.environ["HF_HUB_OFFLINE"] = True, "1"  # the env var for transformers' tokenizers
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved[0]
        if saved[1] is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved[1]


def weights_id(name: str, pretrained: str = "", cache_dir: str | Path | None = None) -> str:
    """A short identity of the weights `load_clip(name, pretrained)` would load, without loading them.

    Runs record it, so a finished run is not reused (nor a checkpoint resumed) once the name resolves to
    other weights: the embedded model re-pretrained with new settings, a checkpoint file replaced.
    """
    resolved = resolve_model_name(name, pretrained)
    if resolved == TINY_MODEL and pretrained == TINY_TAG:
        return f"{resolved}@{tiny_checkpoint_path(cache_dir).name}"  # pretraining is deterministic
    if pretrained and _looks_like_path(pretrained) and Path(pretrained).is_file():
        stat = Path(pretrained).stat()
        return f"{resolved}@{Path(pretrained).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return f"{resolved}@{pretrained or 'random-init'}"


def load_clip(name: str, pretrained: str = "", *, image_encoder: str | Path | None = None,
              cache_dir: str | Path | None = None, device: torch.device | str = "cpu") -> LoadedCLIP:
    """Load an open_clip model by name + pretrained tag, 'hf-hub:org/name', or a local checkpoint.

    `pretrained='digits'` with `name='lorekit-tiny'` pretrains the embedded model on first use and
    caches it. `image_encoder` optionally swaps in fine-tuned image-tower weights (a run's encoder.pt).
    """
    resolved = resolve_model_name(name, pretrained)
    if resolved != name:
        print(f"lorekit: OpenAI weights use QuickGELU; loading {resolved!r} instead of {name!r}")
    check_pretrained(resolved, pretrained)
    cache = weights_cache(resolved, pretrained, cache_dir)
    if resolved == TINY_MODEL and pretrained == TINY_TAG:
        pretrained = str(pretrained_tiny_checkpoint(cache_dir))
    with hub_offline():
        try:
            model = open_clip.create_model(resolved, pretrained=pretrained or None, cache_dir=cache)
        except Exception as e:  # open_clip raises many types for unreadable or mismatched weights
            what = (f"pretrained={pretrained!r}: not a readable open_clip checkpoint for {resolved!r}"
                    if _looks_like_path(pretrained) else f"model={name!r}, pretrained={pretrained!r}: open_clip "
                    f"cannot load it from {cache}")
            raise ConfigError(f"{what} ({describe(e)})") from None
        try:
            tokenizer = open_clip.get_tokenizer(resolved, cache_dir=cache)
        except Exception as e:  # a Hugging Face tokenizer that is not in the cache
            raise ConfigError(f"model={name!r}: its tokenizer is not in the local cache ({describe(e)}); put its "
                              f"files in {hub_caches(cache_dir)[-1]}") from None
    model = model.to(device).eval()
    pp = model.visual.preprocess_cfg if hasattr(model.visual, "preprocess_cfg") else {}
    encoder = ImageEncoder(model.visual, model.visual.image_size,
                           pp.get("mean", open_clip.OPENAI_DATASET_MEAN),
                           pp.get("std", open_clip.OPENAI_DATASET_STD)).to(device)
    if image_encoder is not None:
        load_encoder_weights(encoder, image_encoder)
    return LoadedCLIP(model, tokenizer, resolved, pretrained, encoder)


def load_encoder_weights(encoder: nn.Module, path: str | Path) -> None:
    """Load a state dict written by the trainer (encoder.pt) into `encoder`, with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"image_encoder={str(path)!r}: file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        encoder.load_state_dict(state)
    except Exception as e:
        raise ConfigError(f"image_encoder={str(path)!r}: not a state dict for this encoder "
                          f"({describe(e)})") from None
    check_finite(state, path)


def check_finite(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Refuse weights holding NaN or inf (a diverged run): whatever they evaluate to would be nonsense."""
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise ConfigError(f"{path}: the weights hold NaN or inf ({bad}): the run diverged; there is nothing "
                          "meaningful to evaluate or export")


def differentiable_class_embeddings(model: nn.Module, tokenizer: Any, classnames: Sequence[str],
                                    templates: Sequence[str], device: torch.device | str | None = None, *,
                                    max_prompts: int = 1024) -> torch.Tensor:
    """[C, D] zero-shot weights: per class, the mean of normalised template embeddings, renormalised.

    Carries gradient to the text tower, for methods that train it (AdvCLIP-LoRA); `class_embeddings` is
    the same computation without gradient. The text tower sees whole classes, at most `max_prompts`
    prompts per call.
    """
    device = device or next(model.parameters()).device
    per_call = max(1, max_prompts // len(templates))
    out = []
    for start in range(0, len(classnames), per_call):
        names = classnames[start:start + per_call]
        tokens = tokenizer([t.format(c=name) for name in names for t in templates]).to(device)
        emb = F.normalize(model.encode_text(tokens).float(), dim=-1).view(len(names), len(templates), -1).mean(1)
        out.append(F.normalize(emb, dim=-1))
    return torch.cat(out)


@torch.no_grad()
def class_embeddings(model: nn.Module, tokenizer: Any, classnames: Sequence[str], templates: Sequence[str],
                     device: torch.device | str | None = None) -> torch.Tensor:
    """`differentiable_class_embeddings` without gradient: a fixed zero-shot head."""
    return differentiable_class_embeddings(model, tokenizer, classnames, templates, device)


def zero_shot_logits(image_embeddings: torch.Tensor, class_weights: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """scale · cos(φ(x), w_c) for raw image embeddings and unit-norm class weights [C, D]."""
    return scale * F.normalize(image_embeddings.float(), dim=-1) @ class_weights.T


class ZeroShotClassifier(nn.Module):
    """logits = scale · cos(φ(x), w_c): the CLIP zero-shot head over fixed class embeddings."""

    def __init__(self, encoder: nn.Module, class_embeddings: torch.Tensor, scale: float = 100.0) -> None:
        super().__init__()
        self.encoder = encoder
        self.register_buffer("weights", F.normalize(class_embeddings.float(), dim=-1), persistent=False)
        self.scale = scale

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return zero_shot_logits(self.encoder(images), self.weights, self.scale)
