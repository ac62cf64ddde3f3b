"""torchrun data parallelism on the CPU (gloo): two processes train the one-process run, a killed two-process
run resumes (with two processes or one), and SIGTERM stops every rank at one step boundary."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from lorekit.rundir import read_metrics

# The same global batch and seed everywhere. Two ranks average two half-batch gradients where one process
# takes one full-batch mean: the same numbers up to floating-point summation order. AdamW's first steps move
# every weight by about ±lr whatever its gradient's size, so rounding in near-zero gradients becomes ±lr moves:
# at the tiny recipe's lr 1e-3 the runs drift apart by 1-2 % within four steps, at lr 1e-5 (used here) they
# agree to 2e-5 relative, while seed 1 instead of seed 0 moves the losses by 5-20 % (measured). Final
# accuracies agree to one evaluation image.
RTOL = 1e-4
TRAIN = ["--recipe", "tiny", "--method", "lore", "--steps", "6", "--batch-size", "16", "--attack-steps", "2",
         "--primal-steps", "2", "--lr", "1e-5", "--eval-every", "3", "--eval-samples", "32",
         "--checkpoint-every", "2", "--device", "cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _train(run_dir, *extra, processes=1, wait=True):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                 "-m", "lorekit"] if processes > 1 else [sys.executable, "-m", "lorekit"])
    cmd = [*launcher, "train", *TRAIN, "--run-dir", str(run_dir), *extra]
    if not wait:
        return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)


def _train_records(run):
    return [r for r in read_metrics(run) if r["kind"] == "train"]


def _assert_same_run(a, b):
    ra, rb = _train_records(a), _train_records(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        for key in ("loss", "loss_robust", "loss_penalty", "lambda_mean", "rel_dist"):
            # abs: rel_dist, a distance between nearly equal embeddings, carries more relative rounding
            assert x[key] == pytest.approx(y[key], rel=RTOL, abs=1e-6), (x["step"], key)
        assert x["passes"] == y["passes"] and x["updates"] == y["updates"]  # the ledger counts global work
    fa, fb = (json.loads((r / "summary.json").read_text())["final"] for r in (a, b))
    for key in ("clean_acc", "robust_acc"):
        assert abs(fa[key] - fb[key]) <= 1 / 32 + 1e-9, key
    assert fa["fidelity"] == pytest.approx(fb["fidelity"], rel=RTOL)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    run = tmp_path_factory.mktemp("ddp") / "single"
    out = _train(run)
    assert out.returncode == 0, out.stderr
    return run


def test_two_processes_train_the_one_process_run(single, tmp_path):
    out = _train(tmp_path / "two", processes=2)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2
    _assert_same_run(tmp_path / "two", single)


def _wait_for_step(run, step, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists() and len(_train_records_safe(run)) >= step:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise TimeoutError(f"{run} never reached step {step}")


def _train_records_safe(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [line for line in lines if '"train"' in line]


def test_a_killed_two_process_run_resumes_with_two_or_with_one(single, tmp_path):
    run = tmp_path / "killed"
    proc = _train(run, processes=2, wait=False)
    _wait_for_step(run, 3, proc)  # past the checkpoint at step 2
    os.killpg(proc.pid, signal.SIGKILL)  # every rank and the launcher, no warning
    proc.wait()
    assert not (run / "summary.json").exists()
    shutil.copytree(run, tmp_path / "killed-1")
    out = _train(run, "--resume", processes=2)
    assert out.returncode == 0, out.stderr
    _assert_same_run(run, single)
    out = _train(tmp_path / "killed-1", "--resume")  # another world size: batches and noise do not depend on it
    assert out.returncode == 0, out.stderr
    _assert_same_run(tmp_path / "killed-1", single)


def test_sigterm_stops_every_rank_at_one_step_boundary_with_a_checkpoint(single, tmp_path):
    import psutil

    run = tmp_path / "preempted"
    proc = _train(run, processes=2, wait=False)
    _wait_for_step(run, 1, proc)
    ranks = [c for c in psutil.Process(proc.pid).children(recursive=True) if "lorekit" in " ".join(c.cmdline())]
    assert len(ranks) == 2
    for rank in ranks:  # as SLURM does: every process of the job step gets the signal
        rank.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert err.count("stopped: SIGTERM at step") == 2 and "exitcode  : 75" in err  # both ranks, exit code 75
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    stopped = state["step"]
    assert 1 <= stopped < 6 and _train_records(run)[-1]["step"] == stopped  # checkpointed where it stopped
    out = _train(run, "--resume", processes=2)
    assert out.returncode == 0, out.stderr
    _assert_same_run(run, single)
