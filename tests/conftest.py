"""Shared fixtures. The embedded model is pretrained once per cache ($LOREKIT_CACHE, set by .ci/run)."""

import os
from pathlib import Path

import pytest
import torch

collect_ignore = ["fixtures/sweep_toy.ipynb"]

torch.set_num_threads(min(2, os.cpu_count() or 1))


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
