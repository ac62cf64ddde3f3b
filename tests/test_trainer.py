"""Smoke runs of every method on the embedded default, run directories, resume, errors."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lorekit.config import ConfigError, TrainConfig
from lorekit.models import weights_id
from lorekit.rundir import finished_and_current, read_metrics
from lorekit.trainer import Trainer, train


@pytest.mark.parametrize("method", ["fare", "fare-reg", "lore", "tecoa"])
def test_every_method_trains_and_writes_a_run(tiny_cfg, method):
    cfg = replace(tiny_cfg, method=method)
    summary = train(cfg, progress=False)
    run = cfg.run_path
    assert {p.name for p in run.iterdir()} >= {"config.json", "metrics.jsonl", "checkpoint.pt", "encoder.pt",
                                              "summary.json"}
    records = read_metrics(run)
    train_recs = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4]
    for key in ("loss", "loss_robust", "clean_cosine", "rel_dist", "violation", "lr", "step_time", "images_per_s"):
        assert all(key in r for r in train_recs), key
    if method == "lore":
        assert all(r["lambda_mean"] > 0 and r["lambda_q10"] <= r["lambda_q90"] for r in train_recs)
        assert "loss_penalty" in train_recs[0]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    assert 0 <= summary["final"]["robust_acc"] <= summary["final"]["clean_acc"] <= 1
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4 and ("dual" in state["method"]) == (method == "lore")
    assert summary["ledger"]["updates"] == 4 * 2 and train_recs[-1]["updates"] == 8  # K = 2 for every method
    # the encoder moved away from the original
    assert summary["final"]["fidelity"] > 0


def test_lore_tracks_the_constraint_where_fare_drifts(tiny_cfg):
    # The same budget for both; LORE's clean embedding must stay closer to the original. ρ lies below
    # FARE's drift in 12 steps (a relative distance of about 0.005 on the embedded model).
    base = replace(tiny_cfg, steps=12, lr=3e-4, eval_every=0, rho=0.002, primal_steps=2, batch_size=32)
    fare = train(replace(base, method="fare", run_dir=base.run_dir + "-fare"), progress=False)
    lore = train(replace(base, method="lore", run_dir=base.run_dir + "-lore", dual_lr=0.05), progress=False)
    assert lore["final"]["fidelity"] < fare["final"]["fidelity"]


def test_any_nn_module_encoder_can_be_trained(tmp_path):
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    data = TensorDataset(torch.rand(40, 3, 12, 12), torch.zeros(40, dtype=torch.long))
    cfg = TrainConfig(method="lore", steps=3, batch_size=8, attack_steps=2, primal_steps=2, eval_every=0,
                      lr=1e-2, run_dir=str(tmp_path / "generic"))
    before = [p.detach().clone() for p in encoder.parameters()]
    summary = Trainer(cfg, encoder, data, eval_images=torch.rand(8, 3, 12, 12)).fit(progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(before, encoder.parameters()))
    assert "clean_acc" not in summary["final"] and summary["final"]["cosine"] < 1


def test_existing_run_dir_is_refused_unless_resuming(tiny_cfg):
    train(replace(tiny_cfg, steps=2, eval_every=0), progress=False)
    with pytest.raises(ConfigError, match="already holds this run; pass resume=True"):
        train(replace(tiny_cfg, steps=2, eval_every=0), progress=False)
    with pytest.raises(ConfigError, match="different config \\(rho: saved 0.1 vs 0.3"):
        train(replace(tiny_cfg, steps=2, eval_every=0, rho=0.3, resume=True), progress=False)


def test_resume_without_or_with_a_corrupt_checkpoint_is_a_clear_error(tiny_cfg):
    with pytest.raises(ConfigError, match="holds no run"):
        train(replace(tiny_cfg, resume=True), progress=False)
    cfg = replace(tiny_cfg, steps=2, eval_every=0)
    train(cfg, progress=False)
    (cfg.run_path / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="checkpoint.pt: missing or corrupt checkpoint"):
        train(replace(cfg, resume=True), progress=False)


def test_runs_record_their_base_weights_and_stale_runs_are_not_reused_or_resumed(tiny_cfg):
    # A run fine-tuned from an earlier pretraining of the embedded model (or a replaced checkpoint file) must
    # be neither read back as finished nor resumed: its encoder would be paired with another text tower.
    cfg = replace(tiny_cfg, steps=2, eval_every=0)
    summary = train(cfg, progress=False)
    current = weights_id(cfg.model, cfg.pretrained, cfg.cache_dir)
    assert summary["base_weights"] == current and current.startswith("lorekit-tiny@lorekit-tiny-suite-")
    assert torch.load(cfg.run_path / "checkpoint.pt", weights_only=True)["base_weights"] == current
    assert finished_and_current(cfg)
    assert not finished_and_current(replace(cfg, rho=0.3))
    (cfg.run_path / "summary.json").write_text(json.dumps({**summary, "base_weights": "lorekit-tiny@old.pt"}))
    assert not finished_and_current(cfg)

    state = torch.load(cfg.run_path / "checkpoint.pt", weights_only=True)
    torch.save({**state, "base_weights": "lorekit-tiny@old.pt"}, cfg.run_path / "checkpoint.pt")
    with pytest.raises(ConfigError, match=r"fine-tuned from lorekit-tiny@old\.pt, but .*now resolves to "):
        train(replace(cfg, resume=True), progress=False)


def test_weights_id_follows_the_file_behind_a_checkpoint_path(tiny_clip, tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save(tiny_clip.model.state_dict(), path)
    first = weights_id("lorekit-tiny", str(path))
    assert str(path) in first and weights_id("lorekit-tiny", str(path)) == first
    time.sleep(0.01)
    torch.save({k: v + 1 for k, v in tiny_clip.model.state_dict().items() if v.is_floating_point()}, path)
    assert weights_id("lorekit-tiny", str(path)) != first
    assert weights_id("ViT-B-32", "openai") == "ViT-B-32-quickgelu@openai"
    assert weights_id("lorekit-tiny") == "lorekit-tiny@random-init"


def test_batch_larger_than_data_is_refused(tmp_path):
    data = TensorDataset(torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ConfigError, match="batch_size=8: larger than the training set"):
        Trainer(TrainConfig(batch_size=8, run_dir=str(tmp_path)), nn.Flatten(), data)


def _train_cli(run_dir, cwd, *extra):
    return [sys.executable, "-m", "lorekit", "train", "--method", "lore", "--steps", "8", "--batch-size", "16",
            "--attack-steps", "2", "--primal-steps", "2", "--eval-every", "4", "--eval-samples", "32",
            "--checkpoint-every", "2", "--lr", "1e-4", "--run-dir", str(run_dir), *extra]


def test_resume_after_a_kill_matches_the_uninterrupted_run(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same thread count in both runs: bitwise-equal sums
    full = tmp_path / "full"
    subprocess.run(_train_cli(full, tmp_path), env=env, check=True, capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cli(killed, tmp_path), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill it mid-run, after its second checkpoint
        lines = (killed / "metrics.jsonl").read_text().splitlines() if (killed / "metrics.jsonl").exists() else []
        if sum('"train"' in line for line in lines) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists()
    subprocess.run(_train_cli(killed, tmp_path, "--resume"), env=env, check=True, capture_output=True, timeout=600)

    timings = ("step_time", "images_per_s", "wall_time_s")
    strip = lambda recs: [{k: v for k, v in r.items() if k not in timings} for r in recs]
    assert strip(read_metrics(killed)) == strip(read_metrics(full))
    a = torch.load(full / "encoder.pt", weights_only=True)
    b = torch.load(killed / "encoder.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((killed / "summary.json").read_text())["final"] == json.loads(
        (full / "summary.json").read_text())["final"]
