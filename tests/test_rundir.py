"""Run directories (lorekit.rundir): atomic files, names, the one policy for existing runs, reading back."""

from dataclasses import replace

import pytest
import torch

from lorekit.config import ConfigError
from lorekit.rundir import (EXISTING, atomic_write, atomic_write_json, config_hash, finished_and_current, load_run,
                            prepare, read_json, with_run_dir)
from lorekit.trainer import train


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "x.json"
    atomic_write_json(path, {"a": 1})

    def broken(p):
        p.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert read_json(path) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["x.json"]
    with pytest.raises(ConfigError, match="missing.json: cannot read JSON"):
        read_json(tmp_path / "missing.json")


def test_run_dirs_depend_on_the_config_not_on_where_it_runs(tiny_cfg, tmp_path):
    cfg = with_run_dir(tiny_cfg, tmp_path / "out")
    assert cfg.run_dir.startswith(str(tmp_path / "out" / "lore-eps4-seed0-rho0.1-K2-"))
    assert config_hash(replace(cfg, device="cpu", run_dir="elsewhere")) == config_hash(cfg)
    assert with_run_dir(replace(tiny_cfg, rho=0.2), tmp_path / "out").run_dir != cfg.run_dir


def test_existing_runs_are_reused_resumed_or_retrained(tiny_cfg, tmp_path, one_thread):
    cfg = with_run_dir(replace(tiny_cfg, steps=2, eval_every=0), tmp_path)
    seen = []
    first = train(cfg, callback=seen.append, progress=False)
    assert [r["kind"] for r in seen] == ["train", "train", "eval"] and finished_and_current(cfg)
    encoder = cfg.run_path / "encoder.pt"
    stamp = encoder.stat().st_mtime_ns
    replayed = []
    again = train(cfg, existing="reuse", callback=replayed.append, progress=False)
    assert again == first and encoder.stat().st_mtime_ns == stamp  # read back, not retrained
    assert [r["step"] for r in replayed] == [r["step"] for r in seen]
    fresh = train(cfg, existing="overwrite", progress=False)  # trained again from scratch
    assert fresh["final"] == pytest.approx(first["final"]) and encoder.stat().st_mtime_ns != stamp
    # an unfinished run with a checkpoint is resumed under 'reuse'
    (cfg.run_path / "summary.json").unlink()
    resumed, reused = prepare(cfg, "reuse")
    assert resumed.resume and reused is None
    stranger = tmp_path / "not-a-run"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep me")
    for existing in ("reuse", "overwrite"):
        with pytest.raises(ConfigError, match="not a lorekit run"):
            train(replace(cfg, run_dir=str(stranger)), existing=existing, progress=False)
    assert (stranger / "notes.txt").exists()
    with pytest.raises(ConfigError, match="existing='keep': must be one of " + ", ".join(EXISTING)):
        prepare(cfg, "keep")


def test_load_run_gives_the_tuned_and_the_original_encoder(tiny_cfg, one_thread):
    cfg = replace(tiny_cfg, steps=2, eval_every=0)
    train(cfg, progress=False)
    run = load_run(cfg.run_dir)
    assert run.cfg == cfg.validate()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(run.clip.encoder(x), run.original(x))
    assert not any(p.requires_grad for p in run.original.parameters())
    with pytest.raises(ConfigError, match="not a run directory"):
        load_run(cfg.run_path.parent)
