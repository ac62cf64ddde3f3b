"""lorekit.export: a finished run as an open_clip model folder, loaded back by open_clip and by lorekit."""

import json
import shutil

import open_clip
import pytest
import torch

import lorekit
from lorekit import export as export_mod
from lorekit.__main__ import main
from lorekit.config import ConfigError
from lorekit.export import MANIFEST, export
from lorekit.rundir import ENCODER, SUMMARY, load_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg = lorekit.recipe("tiny", "fare", steps=2, batch_size=8, attack_steps=1, eval_samples=16,
                         run_dir=str(tmp_path_factory.mktemp("runs") / "fare"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # training on a busy 2-core machine: one thread is steadier
    try:
        lorekit.train(cfg, progress=False)
    finally:
        torch.set_num_threads(threads)
    return cfg.run_path


@pytest.fixture(scope="module")
def loaded(run):
    """The run read back, with the base model it started from (its text tower and logit scale)."""
    out = load_run(run)
    return out, lorekit.load_clip(out.cfg.model, out.cfg.pretrained)


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    return export(run, tmp_path_factory.mktemp("exports") / "fare-tiny")


def _images() -> torch.Tensor:
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _assert_same_model(model: torch.nn.Module, loaded) -> None:
    """Image embeddings are the run's fine-tuned encoder's, text embeddings the base model's."""
    x = _images()
    loaded, base = loaded
    tokens = base.tokenizer(["a photo of the number seven.", "zero"])
    model.eval()
    with torch.no_grad():
        tuned_image = loaded.clip.encoder(x)
        original_image = loaded.original(x)
        image = model.encode_image((x - loaded.clip.encoder.mean) / loaded.clip.encoder.std)
        text, base_text = model.encode_text(tokens), base.model.encode_text(tokens)
    assert not torch.allclose(tuned_image, original_image, atol=1e-4), "the run did not change the encoder"
    # atol 1e-5: a loaded model's BatchNorm computes the affine map that lorekit's FrozenBatchNorm2d does,
    # in another order (the embedded model is a ResNet)
    torch.testing.assert_close(image, tuned_image, rtol=0, atol=1e-5)
    torch.testing.assert_close(text, base_text, rtol=0, atol=0)
    torch.testing.assert_close(model.logit_scale, base.model.logit_scale, rtol=0, atol=0)


def test_export_writes_a_hub_style_folder_with_a_model_card(exported, run):
    names = {p.name for p in exported.iterdir()}
    assert names == {"open_clip_config.json", "open_clip_model.safetensors", "open_clip_pytorch_model.bin",
                     "README.md", MANIFEST}
    config = json.loads((exported / "open_clip_config.json").read_text())
    assert config["model_cfg"] == open_clip.get_model_config("lorekit-tiny")
    assert config["preprocess_cfg"]["mean"] == list(open_clip.OPENAI_DATASET_MEAN)
    card = (exported / "README.md").read_text()
    summary = json.loads((run / SUMMARY).read_text())
    for needle in ("library_name: open_clip", "FARE", "ε = 4/255", "ρ:** 0.02", summary["base_weights"],
                   f"clean_acc: {summary['final']['clean_acc']:.4g}",
                   f"training_passes: {summary['ledger']['training_passes']}", "lr: 0.001"):
        assert needle in card, needle
    manifest = json.loads((exported / MANIFEST).read_text())
    assert manifest["summary"] == summary and manifest["config"]["method"] == "fare"
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".")], "temporary folders left behind"


@pytest.mark.parametrize("weights", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
def test_open_clip_and_lorekit_load_the_checkpoint_file_unchanged(exported, loaded, weights):
    model, _, _ = open_clip.create_model_and_transforms("lorekit-tiny", pretrained=str(exported / weights))
    _assert_same_model(model, loaded)
    _assert_same_model(lorekit.load_clip("lorekit-tiny", str(exported / weights)).model, loaded)


@pytest.fixture
def hub(exported, tmp_path, monkeypatch):
    """A local hub cache holding the export as 'lorekit/fare-tiny', laid out as huggingface_hub writes it (see
    tests/test_models.py); HF_HUB_OFFLINE, so nothing is fetched."""
    repo = tmp_path / "hub" / "models--lorekit--fare-tiny"
    shutil.copytree(exported, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


def test_open_clip_and_lorekit_load_the_folder_from_a_local_hub_cache(exported, loaded, hub):
    model, _, _ = open_clip.create_model_and_transforms("hf-hub:lorekit/fare-tiny", cache_dir=str(hub))
    _assert_same_model(model, loaded)
    _assert_same_model(lorekit.load_clip("hf-hub:lorekit/fare-tiny", cache_dir=str(hub)).model, loaded)
    _assert_same_model(open_clip.create_model_and_transforms(f"local-dir:{exported}")[0], loaded)


def test_a_run_from_a_hub_model_exports_with_the_hub_models_config(exported, hub, tmp_path, one_thread):
    cfg = lorekit.recipe("tiny", "fare", model="hf-hub:lorekit/fare-tiny", pretrained="", cache_dir=str(hub),
                         steps=1, batch_size=8, attack_steps=1, eval_samples=8, run_dir=str(tmp_path / "again"))
    lorekit.train(cfg, progress=False)
    again = export(cfg.run_path, tmp_path / "again-export", formats=("bin",))
    config = json.loads((again / "open_clip_config.json").read_text())
    assert config == json.loads((exported / "open_clip_config.json").read_text())
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{again}")
    model.eval()  # BatchNorm: the embedded model is a ResNet
    tuned = load_run(cfg.run_path).clip.encoder
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image((x - tuned.mean) / tuned.std), tuned(x), rtol=0, atol=1e-5)


def test_cli_exports_and_replaces_only_a_previous_export(run, tmp_path, capsys):
    dest = tmp_path / "out"
    assert main(["export", str(run), "--to", str(dest), "--formats", "safetensors"]) == 0
    assert not (dest / "open_clip_pytorch_model.bin").exists()
    assert main(["export", str(run), "--to", str(dest)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["export", str(run), "--to", str(dest), "--overwrite"]) == 0
    assert (dest / "open_clip_pytorch_model.bin").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _copy_run(run, tmp_path, name="run"):
    return shutil.copytree(run, tmp_path / name)


def _edit_json(path, **fields):
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.mark.parametrize("damage,needle", [
    (lambda r: (r / SUMMARY).unlink(), "not finished"),
    (lambda r: torch.save({k: v.fill_(float("nan")) if k.endswith("attnpool.c_proj.weight") else v
                           for k, v in torch.load(r / ENCODER, weights_only=True).items()}, r / ENCODER),
     "NaN or inf \\(.*attnpool.c_proj.weight\\).*diverged"),
    (lambda r: _edit_json(r / "config.json", pretrained=""), "random weights"),
    (lambda r: _edit_json(r / SUMMARY, base_weights="lorekit-tiny@another-pretraining.pt"), "now resolves to"),
    (lambda r: (r / "config.json").unlink(), "not a run directory"),
])
def test_bad_runs_are_refused_before_anything_is_written(run, tmp_path, damage, needle):
    bad = _copy_run(run, tmp_path)
    damage(bad)
    with pytest.raises(ConfigError, match=needle):
        export(bad, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_bad_destinations_are_refused(run, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        export(run, tmp_path / "file")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        export(run, tmp_path / "notes")
    with pytest.raises(ConfigError, match="something other than a lorekit export"):
        export(run, tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="formats"):
        export(run, tmp_path / "out", formats=("onnx",))
    (tmp_path / "empty").mkdir()
    assert (export(run, tmp_path / "empty", formats=("bin",)) / "open_clip_pytorch_model.bin").is_file()


def test_a_crash_mid_write_leaves_no_half_export_and_keeps_the_previous_one(run, tmp_path, monkeypatch):
    dest = export(run, tmp_path / "out", formats=("bin",))
    before = (dest / "open_clip_pytorch_model.bin").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_mod, "_write_card", crash)  # after the weights are written
    with pytest.raises(OSError, match="disk full"):
        export(run, tmp_path / "out", overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        export(run, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (dest / "open_clip_pytorch_model.bin").read_bytes() == before
    assert not (dest / "open_clip_model.safetensors").exists()


def test_a_lora_run_exports_with_its_adapters_folded_in(tmp_path, one_thread):
    cfg = lorekit.recipe("tiny", "lore", adapter="lora", lora_rank=2, steps=2, batch_size=8, attack_steps=1,
                         eval_samples=16, run_dir=str(tmp_path / "lora"))
    lorekit.train(cfg, progress=False)
    dest = export(cfg.run_dir, tmp_path / "out")
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{dest}")
    model.eval()
    tuned = lorekit.load_run(cfg.run_dir).clip
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image((_images() - tuned.encoder.mean) / tuned.encoder.std),
                                   tuned.encoder(_images()), rtol=1e-5, atol=1e-6)
