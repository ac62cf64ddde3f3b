"""Export a finished run as an open_clip model: a Hugging Face Hub–style folder any open_clip user can load.

    DIR/open_clip_model.safetensors   the FULL CLIP state dict: the run's fine-tuned image tower, the text tower
    DIR/open_clip_pytorch_model.bin   (the run's when it trained one, else the base weights') and the base
                                      weights' logit scale (the same tensors, two formats)
    DIR/open_clip_config.json         {"model_cfg": ..., "preprocess_cfg": ...}, as open_clip's push_to_hf_hub writes it
    DIR/README.md                     model card: method, recipe, ε, ρ, base weights, final metrics, compute ledger
    DIR/lorekit_export.json           the run's config.json and summary.json, and where they came from

Loading it back (open_clip alone is enough):

    open_clip.create_model_and_transforms("local-dir:DIR")                        # the folder itself
    open_clip.create_model_and_transforms(name, pretrained="DIR/open_clip_model.safetensors")  # one weights file
    open_clip.create_model_and_transforms("hf-hub:org/name")   # once uploaded: hf upload org/name DIR
    lorekit.load_clip(name, "DIR/open_clip_model.safetensors"), lorekit.load_clip("hf-hub:org/name")

The library does the work where it can: open_clip's `save_config_for_hf` writes the config and its
`generate_readme` the card, safetensors and torch.save the weights. open_clip's `save_for_hf` is not
used because it calls `tokenizer.save_pretrained`, which the default CLIP tokenizer lacks
(`push_to_hf_hub` swaps in one downloaded from the Hub); an HF tokenizer's files are saved here the same way.

Every refusal (unfinished run, non-finite encoder, weights that moved, a destination in the way)
comes before anything is written, and the folder is written under a temporary name and renamed into
place, so a crash never leaves half an export behind.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import open_clip
import safetensors.torch
import torch
from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from open_clip.pretrained import download_pretrained_from_hf
from open_clip.push_to_hf_hub import generate_readme, save_config_for_hf

from . import __version__, rundir
from .config import ConfigError, TrainConfig
from .methods import label
from .models import LoadedCLIP, load_clip, weights_id

MANIFEST = "lorekit_export.json"
FORMATS = ("safetensors", "bin")
# Config fields that say where or how a run ran, not what was trained: left out of the card's recipe.
_NOT_RECIPE = ("cache_dir", "data_root", "run_dir", "resume", "device", "workers")


def export(run: str | Path, dest: str | Path, *, overwrite: bool = False,
           formats: Sequence[str] = FORMATS) -> Path:
    """Write finished run `run` as an open_clip model folder at `dest` (see the module docstring); return it.

    `overwrite` replaces a previous lorekit export at `dest` (never any other folder). `formats` picks
    the weight files: 'safetensors' (what open_clip's hf-hub loader prefers), 'bin', or both.
    """
    run, dest = Path(run), Path(dest)
    bad = sorted(set(formats) - set(FORMATS))
    if bad or not formats:
        raise ConfigError(f"formats={list(formats)!r}: choose one or more of {', '.join(FORMATS)}")
    _check_destination(dest, overwrite)
    cfg, summary = _finished_run(run)
    # the fine-tuned weights (a LoRA run's adapters folded in); non-finite weights are refused while loading
    tuned = rundir.tuned_model(run, load_clip(cfg.model, cfg.pretrained, cache_dir=cfg.cache_dir))
    model_cfg = _model_config(tuned.name, cfg.cache_dir)

    trash = dest.with_name(f".{dest.name}.old{os.getpid()}")

    def write(tmp: Path) -> None:
        tmp.mkdir()
        _write_folder(tmp, tuned, model_cfg, formats)
        _write_card(tmp, dest.name, tuned, cfg, summary)
        rundir.atomic_write_json(tmp / MANIFEST, {"lorekit": __version__, "run": str(run.resolve()),
                                                 "model_name": tuned.name, "config": cfg.to_dict(),
                                                 "summary": summary})
        if dest.exists():  # an empty folder, or the export being replaced: steps aside once the new one is whole
            os.replace(dest, trash)

    dest.parent.mkdir(parents=True, exist_ok=True)
    rundir.atomic_write(dest, write)
    shutil.rmtree(trash, ignore_errors=True)
    return dest


# ----------------------------------------------------------------------------- refusals, before any write
def _check_destination(dest: Path, overwrite: bool) -> None:
    if dest.exists() and not dest.is_dir():
        raise ConfigError(f"to={str(dest)!r}: is a file; export writes a folder")
    if dest.is_dir() and any(dest.iterdir()):
        if not overwrite:
            raise ConfigError(f"to={str(dest)!r}: exists and is not empty; choose another folder or pass "
                              "overwrite=True (--overwrite) to replace a previous export")
        if not (dest / MANIFEST).is_file():
            raise ConfigError(f"to={str(dest)!r}: holds something other than a lorekit export (no {MANIFEST}); "
                              "refusing to replace it")


def _finished_run(run: Path) -> tuple[TrainConfig, dict[str, Any]]:
    cfg = rundir.read_config(run, device="cpu")  # exported on the CPU, wherever it trained
    if not rundir.is_finished(run):
        raise ConfigError(f"run={str(run)!r}: not finished (no {rundir.SUMMARY}); finish it first "
                          "(python -m lorekit train --resume ...)")
    summary = rundir.read_json(run / rundir.SUMMARY)
    if not cfg.pretrained and not cfg.model.startswith("hf-hub:"):
        raise ConfigError(f"run={str(run)!r}: fine-tuned from random weights (pretrained=''), whose text tower was "
                          "never saved; an export would pair its image tower with an unrelated text tower")
    now = weights_id(cfg.model, cfg.pretrained, cfg.cache_dir)
    if summary.get("base_weights") != now:
        raise ConfigError(f"run={str(run)!r}: fine-tuned from {summary.get('base_weights') or 'unrecorded weights'}, "
                          f"but model={cfg.model!r} pretrained={cfg.pretrained!r} now resolves to {now}; the "
                          "exported text tower would not be the one the run was trained against")
    return cfg, summary


def _model_config(name: str, cache_dir: str) -> dict[str, Any]:
    """open_clip's model config of `name`; an 'hf-hub:' model's comes from its open_clip_config.json in the cache
    (open_clip.get_model_config would look in the default cache, not the run's)."""
    if name.startswith("hf-hub:"):
        path = download_pretrained_from_hf(name.removeprefix("hf-hub:"), filename=HF_CONFIG_NAME, cache_dir=cache_dir)
        return rundir.read_json(path)["model_cfg"]
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise ConfigError(f"model={name!r}: open_clip has no config for it; cannot write {HF_CONFIG_NAME}")
    return model_cfg


# ----------------------------------------------------------------------------- the files
def _write_folder(folder: Path, tuned: LoadedCLIP, model_cfg: dict[str, Any], formats: Sequence[str]) -> None:
    state = {k: v.contiguous() for k, v in tuned.model.state_dict().items()}
    if "safetensors" in formats:
        safetensors.torch.save_file(state, folder / HF_SAFE_WEIGHTS_NAME)
    if "bin" in formats:
        torch.save(state, folder / HF_WEIGHTS_NAME)
    save_config_for_hf(tuned.model, folder / HF_CONFIG_NAME, model_cfg)
    if hasattr(tuned.tokenizer, "save_pretrained"):  # HF tokenizers: 'local-dir:' loads them from the folder
        tuned.tokenizer.save_pretrained(folder)


def _fmt(value: Any) -> Any:
    return f"{value:.4g}" if isinstance(value, float) else value


def _write_card(folder: Path, title: str, tuned: LoadedCLIP, cfg: TrainConfig, summary: dict[str, Any]) -> None:
    eps, step = round(cfg.eps * 255, 3), round(cfg.step_size * 255, 3)
    final = ({k: _fmt(v) for k, v in summary["final"].items() if k not in ("kind", "step")}
             or "none (the run had no evaluation set)")
    weight_file = HF_SAFE_WEIGHTS_NAME if (folder / HF_SAFE_WEIGHTS_NAME).is_file() else HF_WEIGHTS_NAME
    text = ("The text tower was fine-tuned too (its LoRA adapters are folded in); the logit scale is the base "
            "weights'." if cfg.trains_text_tower else
            "The text tower and logit scale are the base weights', unchanged, so zero-shot heads built from them "
            "still apply.")
    card = {
        "tags": ("clip", "open_clip", "adversarial-robustness", "lorekit", cfg.method),
        "license": "other",
        "description": (
            f"The image tower of `{tuned.name}` ({cfg.pretrained or 'weights of the hub model'}) fine-tuned by "
            f"lorekit with {label(cfg.method)} for adversarial robustness: ℓ{'∞' if cfg.norm == 'linf' else '2'} "
            f"ε = {eps:g}/255, {summary['steps']} batches of {cfg.batch_size} from `{cfg.dataset}`. {text} "
            "License: that of the base weights."),
        "details": {
            "Method": f"{label(cfg.method)}, K = {cfg.updates_per_batch} encoder updates per adversarial batch",
            "Threat model (training)": f"ℓ{'∞' if cfg.norm == 'linf' else '2'}, ε = {eps:g}/255, "
                                       f"PGD-{cfg.attack_steps}, step {step:g}/255",
            "ρ": f"{cfg.rho:g} (LORE's constraint ‖φθ(x) − φθ0(x)‖² ≤ ρ‖φθ0(x)‖²; for other methods, the level "
                 "at which 'satisfied' below is measured)",
            "Base model": f"{tuned.name} (open_clip), pretrained={cfg.pretrained!r}",
            "Base weights": summary.get("base_weights"),
            "Recipe (lorekit TrainConfig)": {k: _fmt(v) for k, v in cfg.to_dict().items() if k not in _NOT_RECIPE},
            f"Final evaluation ({cfg.eval_samples} held-out images, PGD-{cfg.attack_steps} at the training ε)": final,
            "Compute ledger (encoder passes, images × passes)": {k: _fmt(v) for k, v in summary["ledger"].items()},
        },
        "usage": (
            "```python\nimport open_clip\n"
            f"model, _, preprocess = open_clip.create_model_and_transforms(\"local-dir:{title}\")  # this folder\n"
            "model.eval()  # open_clip returns it in train mode\n"
            + (f"# or: open_clip.create_model_and_transforms(\"{tuned.name}\", pretrained=\"{title}/{weight_file}\")\n"
               if not tuned.name.startswith("hf-hub:") else "")
            + "# or, once uploaded: open_clip.create_model_and_transforms(\"hf-hub:<org>/<name>\")\n```\n"),
    }
    rundir.atomic_write_text(folder / "README.md", generate_readme(card, title))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`python -m lorekit export RUN --to DIR [--overwrite] [--formats ...]`."""
    parser.add_argument("run", help="a finished run directory written by `lorekit train`")
    parser.add_argument("--to", required=True, help="the folder to write (created; must not exist or be empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous lorekit export at --to")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS), help="weight file formats")


def run(args: argparse.Namespace) -> int:
    out = export(args.run, args.to, overwrite=args.overwrite, formats=args.formats)
    print(f"exported {args.run} to {out} (load with open_clip.create_model_and_transforms('local-dir:{out}'))")
    return 0
