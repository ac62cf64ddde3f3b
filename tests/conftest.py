"""Shared fixtures. The embedded model is pretrained once per cache ($LOREKIT_CACHE, set by .ci/run)."""

import os
from pathlib import Path

import pytest
import torch

collect_ignore = ["fixtures/sweep_toy.ipynb"]

torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_clip():
    from lorekit.models import load_clip

    return load_clip("lorekit-tiny", "digits")


@pytest.fixture(scope="session")
def digits_bundle():
    from lorekit.data import digits

    return digits()


@pytest.fixture
def tiny_cfg(tmp_path: Path):
    """A config small enough for a smoke run on 2 cores (seconds, not minutes)."""
    from lorekit.config import TrainConfig

    return TrainConfig(steps=4, batch_size=16, attack_steps=2, primal_steps=2, eval_every=2, eval_samples=32,
                       checkpoint_every=2, lr=1e-4, run_dir=str(tmp_path / "run"))


@pytest.fixture
def one_thread():
    """Training tests on one torch thread: two threads on a busy 2-core machine can be many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch):
    """A Hugging Face hub cache in tmp_path/hub, laid out as huggingface_hub writes it, made the hub's cache
    (HF_HUB_CACHE). `hub_cache(repo, {file name: write(path)})` adds a repo's files; returns the cache folder."""
    import huggingface_hub.constants

    root = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))

    def add(repo: str, files: dict) -> Path:
        repo_dir = root / f"models--{repo.replace('/', '--')}"
        snapshot = repo_dir / "snapshots" / ("0" * 40)
        snapshot.mkdir(parents=True, exist_ok=True)
        for name, write in files.items():
            write(snapshot / name)
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / "main").write_text("0" * 40)
        return root

    return add


@pytest.fixture
def tiny_hub_repo(hub_cache):
    """`tiny_hub_repo(repo)`: a hub repo in `hub_cache` holding lorekit-tiny's weights and, unless config=False,
    its open_clip_config.json (what an 'hf-hub:' name needs; a pretrained tag needs the weights only)."""
    import json

    import open_clip

    from lorekit.pretrain import TINY_MODEL

    def add(repo: str, config: bool = True) -> Path:
        files = {"open_clip_pytorch_model.bin": lambda p: torch.save(open_clip.create_model(TINY_MODEL).state_dict(), p)}
        if config:
            cfg = {"model_cfg": open_clip.get_model_config(TINY_MODEL), "preprocess_cfg": {}}
            files["open_clip_config.json"] = lambda p: p.write_text(json.dumps(cfg))
        return hub_cache(repo, files)

    return add
