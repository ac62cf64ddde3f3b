"""bench/bench_gpu.py cannot rot: its smoke mode runs the whole script on the tiny model (the CPU will do), the full
benchmark refuses to run without CUDA, GPU names find their peaks, and bench/report.py renders the result file."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_gpu():
    return _bench_module("bench_gpu")


def test_smoke_mode_runs_every_part_and_the_report_renders_it(bench_gpu, tmp_path, one_thread):
    out = tmp_path / "gpu_smoke.json"
    assert bench_gpu.main(["--smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["K"] == {"fare": 1, "lore": 5} and result["settings"]["attack_steps"] == 10
    model = result["models"][0]
    rows = {r["method"]: r for r in model["rows"]}
    assert set(rows) == {"fare", "lore", "fare-reference"}
    f = model["pass_flops"]
    assert 0 < f["forward"] < f["backward_params"] and f["backward_input"] > 0
    b = model["batch_size"]
    # ledger passes × FLOPs per pass: reference forward, PGD-10 (forward + backward to the input), K updates
    assert rows["fare"]["flops_per_step"] == pytest.approx(b * (12 * f["forward"] + 10 * f["backward_input"]
                                                                + f["backward_params"]))
    assert rows["lore"]["flops_per_step"] == pytest.approx(b * (11 * f["forward"] + 10 * f["backward_input"])
                                                           + 5 * 2 * b * (f["forward"] + f["backward_params"]))
    assert rows["fare-reference"]["flops_per_step"] == rows["fare"]["flops_per_step"]
    assert rows["fare"]["speedup_vs_reference"] == pytest.approx(
        rows["fare"]["images_per_s"] / rows["fare-reference"]["images_per_s"])
    assert all(r["images_per_s"] > 0 and r["mfu"] is None for r in rows.values())  # no peak for a CPU
    assert {r["variant"] for r in result["apgd"]["rows"]} == {"lorekit", "pyautoattack", "lorekit-nocompact"}
    text = "\n".join(_bench_module("report")._gpu(result))
    assert "| lorekit-tiny | fp32 | FARE (reference code) | 1 | 4 |" in text and "| 4/255 |" in text


def test_without_cuda_the_benchmark_refuses(bench_gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device is visible.*--smoke"):
        bench_gpu.main([])


@pytest.mark.parametrize("name,kind", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"), ("NVIDIA H200 NVL", "H200 NVL"), ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA A100 80GB PCIe", "A100"), ("NVIDIA GeForce RTX 4090", None),
])
def test_gpu_names_find_their_peaks(bench_gpu, name, kind):
    assert bench_gpu.gpu_kind(name) == kind
    if kind:
        peaks = bench_gpu.PEAK_TFLOPS[kind]
        assert peaks["fp32"] < peaks["tf32"] < peaks["bf16"]
