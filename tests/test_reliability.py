"""Runs cannot be silently lost or corrupted: divergence stops a run without saving it, signals stop it at a
step boundary after a checkpoint, one writer per run directory, runs that died early start again, torn
metrics lines are dropped; and the trainer's switches (TensorBoard, gradient checkpointing, torch.compile)."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import open_clip
import pytest
import torch

from lorekit.config import ConfigError
from lorekit.rundir import read_metrics
from lorekit.stopping import Diverged
from lorekit.trainer import train

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SMALL = ["--recipe", "tiny", "--steps", "8", "--batch-size", "16", "--attack-steps", "2", "--eval-samples", "32",
         "--checkpoint-every", "2", "--device", "cpu"]


def _cli(run, *extra, wait=True):
    cmd = [sys.executable, "-m", "lorekit", "train", *SMALL, "--run-dir", str(run), *extra]
    if not wait:
        return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)


def _wait_for(run, proc, steps, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run / "metrics.jsonl"
        if path.exists() and sum('"train"' in line for line in path.read_text().splitlines()) >= steps:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise TimeoutError


def _strip(records):
    return [{k: v for k, v in r.items() if k not in ("step_time", "images_per_s", "wall_time_s")} for r in records]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("reliability") / "full"
    out = _cli(run)
    assert out.returncode == 0, out.stderr
    return run


# ------------------------------------------------------------------------------------------ divergence
@pytest.mark.parametrize("method", ["fare", "lore"])
def test_a_diverging_run_stops_at_that_step_and_keeps_the_last_good_checkpoint(tmp_path, method):
    run = tmp_path / method
    out = _cli(run, "--method", method, "--lr", "1e3", "--checkpoint-every", "1")
    assert out.returncode == 3 and "Traceback" not in out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("lorekit train: stopped: diverged at step ") and (" is nan" in line or " is inf" in line)
    step = int(line.split("diverged at step ")[1].split(":")[0])
    assert not (run / "encoder.pt").exists() and not (run / "summary.json").exists()
    if step > 1:  # the checkpoint before the divergence is kept, and holds finite weights only
        state = torch.load(run / "checkpoint.pt", weights_only=True)
        assert state["step"] == step - 1 and f"(step {step - 1}) is kept" in line
        assert all(torch.isfinite(v).all() for v in state["encoder"].values() if v.is_floating_point())


def test_a_non_finite_multiplier_or_parameter_stops_the_run(tiny_cfg, monkeypatch, one_thread):
    from lorekit.methods import lore

    real = lore.LORE.update

    def poisoned(self, batch):  # force λ to NaN at the third step
        update = real(self, batch)
        if self.ctx.encoder.training and poisoned.calls == 2:
            update.stats["lambda"] = update.stats["lambda"] * float("nan")
        poisoned.calls += 1
        return update

    poisoned.calls = 0
    monkeypatch.setattr(lore.LORE, "update", poisoned)
    cfg = replace(tiny_cfg, eval_every=0, checkpoint_every=1)
    with pytest.raises(Diverged, match="diverged at step 3: lambda_mean is nan.*last good checkpoint \\(step 2\\)"):
        train(cfg, progress=False)
    monkeypatch.undo()
    with torch.no_grad():  # a parameter that overflowed is never saved
        from lorekit.trainer import build

        trainer = build(replace(cfg, run_dir=cfg.run_dir + "-param"))
        next(trainer.encoder.parameters()).fill_(float("inf"))
    with pytest.raises(Diverged, match="parameter"):
        trainer.save_checkpoint()


def test_evaluating_a_non_finite_encoder_is_refused(tmp_path, tiny_clip):
    from lorekit.models import load_encoder_weights

    state = {k: v.clone() for k, v in tiny_clip.encoder.state_dict().items()}
    next(v for v in state.values() if v.is_floating_point()).fill_(float("nan"))
    torch.save(state, tmp_path / "encoder.pt")
    with pytest.raises(ConfigError, match="NaN or inf .*diverged"):
        load_encoder_weights(tiny_clip.encoder, tmp_path / "encoder.pt")


# ------------------------------------------------------------------------------------------ signals
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 75), (signal.SIGUSR1, 75)])
def test_a_signal_checkpoints_at_the_next_step_boundary_and_resume_finishes_the_same_run(
        uninterrupted, tmp_path, sig, code):
    run = tmp_path / "stopped"
    proc = _cli(run, wait=False)
    _wait_for(run, proc, 1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"lorekit train: stopped: {signal.Signals(sig).name} at step ")
    stopped = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert [r["step"] for r in read_metrics(run) if r["kind"] == "train"][-1] == stopped < 8
    out = _cli(run, "--resume")
    assert out.returncode == 0, out.stderr
    assert _strip(read_metrics(run)) == _strip(read_metrics(uninterrupted))  # bit-identical on the CPU


# ------------------------------------------------------------------------------------------ run directories
def test_a_second_writer_is_refused_and_a_killed_writer_leaves_no_stale_lock(tmp_path):
    run = tmp_path / "run"
    first = _cli(run, "--steps", "200", wait=False)
    _wait_for(run, first, 1)
    second = _cli(run, "--steps", "200", "--resume")
    assert second.returncode == 2
    assert f"is in use by pid {first.pid} on " in second.stderr and "Traceback" not in second.stderr
    first.kill()
    first.wait()
    third = _cli(run, "--steps", "200", "--resume", wait=False)
    _wait_for(run, third, len([r for r in read_metrics(run) if r["kind"] == "train"]) + 1)  # it runs: no stale lock
    third.kill()
    third.wait()
    records = [r["step"] for r in read_metrics(run) if r["kind"] == "train"]
    assert records == sorted(set(records))  # never two writers' steps in one file


def test_a_run_that_died_before_its_first_checkpoint_starts_again(tmp_path, uninterrupted):
    killed = tmp_path / "killed"
    late = ("--checkpoint-every", "1000")  # no checkpoint before the kill
    proc = _cli(killed, *late, wait=False)
    _wait_for(killed, proc, 1)
    proc.kill()
    proc.wait()
    crashed = tmp_path / "crashed"  # as a crash while loading the data leaves it: a config and no records
    crashed.mkdir()
    (crashed / "config.json").write_text((uninterrupted / "config.json").read_text())
    (crashed / "metrics.jsonl").write_text("")
    for run, extra in ((killed, late), (crashed, ("--resume",))):  # nothing to resume, nothing to lose
        assert not (run / "checkpoint.pt").exists()
        out = _cli(run, *extra)
        assert out.returncode == 0 and "starting it over" in out.stdout, out.stderr
        assert _strip(read_metrics(run)) == _strip(read_metrics(uninterrupted))
    diverged = tmp_path / "diverged"  # died at once with lr 1e3: started again with a sane lr, no deleting by hand
    diverged.mkdir()
    (diverged / "config.json").write_text(json.dumps({**json.loads((uninterrupted / "config.json").read_text()),
                                                      "lr": 1000.0}))
    out = _cli(diverged)
    assert out.returncode == 0 and "starting it over with this config (lr changed)" in out.stdout, out.stderr
    assert _strip(read_metrics(diverged)) == _strip(read_metrics(uninterrupted))


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, uninterrupted):
    run = tmp_path / "torn"
    proc = _cli(run, wait=False)
    _wait_for(run, proc, 3)
    proc.kill()
    proc.wait()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 99, "loss": 1.')  # a write cut short
    assert read_metrics(run)[-1]["step"] != 99
    out = _cli(run, "--resume")
    assert out.returncode == 0, out.stderr
    assert _strip(read_metrics(run)) == _strip(read_metrics(uninterrupted))
    (run / "metrics.jsonl").write_text('{"kind": "tr\n{"kind": "train", "step": 1}\n')
    with pytest.raises(ConfigError, match="metrics.jsonl, line 1: not a JSON record"):
        read_metrics(run)


# ------------------------------------------------------------------------------------------ switches
def test_tensorboard_gets_the_same_scalars_as_metrics(tiny_cfg, one_thread):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = replace(tiny_cfg, report_to="tensorboard")
    train(cfg, progress=False)
    events = EventAccumulator(str(cfg.run_path / "tensorboard"))
    events.Reload()
    for record in read_metrics(cfg.run_path):
        for key in ("loss", "violation", "passes") if record["kind"] == "train" else ("clean_acc", "robust_acc"):
            scalars = {e.step: e.value for e in events.Scalars(f"{record['kind']}/{key}")}
            assert scalars[record["step"]] == pytest.approx(record[key], rel=1e-6)


def test_gradient_checkpointing_and_compile_change_memory_and_speed_not_results(tiny_cfg, monkeypatch, one_thread):
    from lorekit.attacks import embedding_attack_loss
    from lorekit.trainer import build

    # on a ViT (random weights, tests/fixtures/model_configs/tiny-vit.json): open_clip checkpoints transformer
    # blocks only, and the embedded lorekit-tiny is a ResNet
    open_clip.add_model_config(Path(__file__).parent / "fixtures" / "model_configs")
    base = replace(tiny_cfg, model="tiny-vit", pretrained="", steps=2, eval_every=0)
    plain, ckpt = build(replace(base, run_dir=base.run_dir + "-plain")), build(replace(base, grad_checkpointing=True))
    assert ckpt.encoder.visual.transformer.grad_checkpointing and not plain.encoder.visual.transformer.grad_checkpointing
    ckpt.encoder.load_state_dict(plain.encoder.state_dict())  # random weights: each build draws its own
    ckpt.reference.load_state_dict(plain.reference.state_dict())
    # The same gradients (compared directly: a few AdamW steps turn rounding in near-zero gradients into ±lr moves)
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    grads = []
    for trainer in (plain, ckpt):
        trainer.encoder.train()
        loss = embedding_attack_loss(trainer.encoder, trainer.reference(x).detach())(x + 0.01)
        grads.append(torch.autograd.grad(loss.sum(), [p for p in trainer.encoder.parameters() if p.requires_grad]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    trained = train(replace(base, run_dir=base.run_dir + "-plain"), progress=False)
    checkpointed = train(replace(base, grad_checkpointing=True), progress=False)
    assert checkpointed["ledger"]["passes"] == trained["ledger"]["passes"]  # recomputation is not counted as work
    # torch.compile with the inductor backend costs minutes of C++ compilation on 2 cores: the test runs the real
    # dynamo capture with its eager backend instead, which checks the wiring (the tower compiled in place, the
    # ledger's hooks and the state-dict keys intact) but not inductor's kernels.
    real = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: real(self, backend="eager"))
    compiled = train(replace(base, run_dir=base.run_dir + "-compiled", compile=True), progress=False)
    assert compiled["ledger"]["passes"] == trained["ledger"]["passes"]
    weights = [torch.load(base.run_path.parent / f"run-{name}" / "encoder.pt", weights_only=True)
               for name in ("plain", "compiled")]
    assert weights[0].keys() == weights[1].keys()
    for key, value in weights[0].items():  # the same ops in the same order: equal to rounding
        torch.testing.assert_close(weights[1][key], value, rtol=1e-4, atol=1e-6, msg=key)


def test_gradient_checkpointing_is_refused_for_a_tower_without_it(tmp_path):
    from torch import nn
    from torch.utils.data import TensorDataset

    from lorekit.config import TrainConfig
    from lorekit.models import load_clip
    from lorekit.trainer import Trainer

    data = TensorDataset(torch.rand(8, 3, 4, 4), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ConfigError, match="grad_checkpointing=True: Flatten cannot recompute"):
        Trainer(TrainConfig(batch_size=4, grad_checkpointing=True, run_dir=str(tmp_path)), nn.Flatten(), data)
    resnet = load_clip("lorekit-tiny", "digits").encoder  # its set_grad_checkpointing exists and does nothing
    with pytest.raises(ConfigError, match="grad_checkpointing=True: ModifiedResNet cannot recompute"):
        Trainer(TrainConfig(batch_size=4, grad_checkpointing=True, run_dir=str(tmp_path)), resnet, data)
    with pytest.raises(ConfigError, match="report_to='tensorbored': must be 'none' or a comma-separated list"):
        TrainConfig(report_to="tensorbored").validate()
