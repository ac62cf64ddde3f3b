"""The config validates itself; the CLI reports bad input clearly, before any work, writing nothing."""

import subprocess
import sys
from dataclasses import fields

import pytest

from lorekit.config import ConfigError, TrainConfig, field_docs


def test_every_field_has_a_docstring():
    docs = field_docs()
    assert {f.name for f in fields(TrainConfig)} == set(docs)
    assert all(len(d) > 10 for d in docs.values())


def test_papermill_style_strings_and_numpy_scalars_are_cast():
    import numpy as np

    cfg = TrainConfig(eps="4/255", rho=np.float32(0.2), steps=np.int64(3), resume="false").validate()
    assert cfg.eps == pytest.approx(4 / 255) and type(cfg.rho) is float and cfg.rho == pytest.approx(0.2)
    assert type(cfg.steps) is int and cfg.resume is False


@pytest.mark.parametrize("field,value,needle", [
    ("rho", -0.1, "rho=-0.1: must be a non-negative"),
    ("rho", "abc", "rho='abc': must be a finite number"),
    ("eps", 0.0, "eps=0.0: must lie in \\(0, 1\\]"),
    ("eps", 8.0, "eps=8.0: must lie in \\(0, 1\\]"),
    ("primal_steps", -1, "primal_steps=-1: K must be an integer >= 1, or 0 for the method's default"),
    ("method", "fair", "method='fair': must be one of fare, fare-reg, lore, tecoa"),
    ("batch_size", 0, "batch_size=0: must be an integer >= 1"),
    ("steps", 2.5, "steps=2.5: must be an integer"),
    ("dual", "deep", "dual='deep': must be one of mlp, linear, scalar"),
])
def test_bad_values_name_the_field(field, value, needle):
    with pytest.raises(ConfigError, match=needle):
        TrainConfig(**{field: value}).validate()


def test_unknown_field_is_rejected():
    with pytest.raises(ConfigError, match="unknown config field.*'rhoo'"):
        TrainConfig.from_dict({"rhoo": 0.1})


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "lorekit", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_cli_help_shows_field_docs(tmp_path):
    out = _cli("train", "--help", cwd=tmp_path).stdout
    assert "--rho" in out and "LORE constraint level" in out and "--primal-steps" in out


@pytest.mark.parametrize("args,needle", [
    (["--rho", "-1"], "rho=-1.0"),
    (["--eps", "1.5"], "eps=1.5"),
    (["--primal-steps", "-1"], "primal_steps=-1"),
    (["--method", "nope"], "method='nope'"),
    (["--batch-size", "0"], "batch_size=0"),
    (["--model", "ViT-Nope"], "model='ViT-Nope'"),
    (["--pretrained", "missing.pt"], "pretrained='missing.pt'"),
    (["--dataset", "no_such_folder"], "dataset='no_such_folder'"),
    (["--eps", "4/0"], "eps='4/0': must be a finite number"),
    (["--dataset", ""], "dataset='': not a known data set name"),
    (["--steps", "abc"], "steps='abc': must be an integer"),
    (["--device", "gpu"], "device='gpu': must be one of auto, cpu, cuda"),
    (["--model", "hf-hub:org/x", "--pretrained", "openai"], "an 'hf-hub:' model carries its own weights"),
    (["--recipe", "nope"], "recipe='nope': unknown"),
])
def test_cli_errors_before_any_work_and_writes_nothing(tmp_path, monkeypatch, capsys, args, needle):
    from lorekit.__main__ import main

    monkeypatch.chdir(tmp_path)
    assert main(["train", "--run-dir", "out", *args]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("text", ["4/0", "0/0", "1/0.0", "4/255/2", "4/", "/255"])
def test_unparsable_fractions_name_the_field(text):
    with pytest.raises(ConfigError, match=f"eps='{text}': must be a finite number"):
        TrainConfig(eps=text).validate()


def test_an_hf_hub_model_does_not_inherit_the_embedded_models_tag():
    assert TrainConfig(model="hf-hub:chs20/fare4-clip").validate().pretrained == ""
    assert TrainConfig(model="hf-hub:org/x", pretrained="openai").validate().pretrained == "openai"  # refused later
    assert TrainConfig().validate().pretrained == "digits"
