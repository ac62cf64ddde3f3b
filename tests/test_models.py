"""Model loading through the one load_clip function, the pixel-space wrapper, the zero-shot head."""

import json
import os

import open_clip
import pytest
import torch

from lorekit.config import ConfigError
from lorekit.models import ImageEncoder, ZeroShotClassifier, class_embeddings, load_clip, resolve_model_name


def _output_projection(model) -> tuple[str, torch.Tensor]:
    """The image tower's last parameter (its output projection), whatever the architecture."""
    return list(model.visual.named_parameters())[-1]


def test_local_checkpoint_loads_through_the_pretrained_argument(tmp_path):
    model = open_clip.create_model("lorekit-tiny").eval()
    name, proj = _output_projection(model)
    torch.nn.init.normal_(proj, std=0.5)
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    loaded = load_clip("lorekit-tiny", str(path))
    assert torch.equal(dict(loaded.model.visual.named_parameters())[name], proj)
    x = torch.rand(2, 3, 32, 32)
    ref = model.visual((x - loaded.encoder.mean) / loaded.encoder.std)
    assert torch.allclose(loaded.encoder(x), ref, atol=1e-5)


def test_hf_hub_name_loads_from_a_local_hub_cache(tmp_path, monkeypatch):
    # The real hf-hub code path of open_clip, offline: a hub cache laid out as huggingface_hub
    # writes it, and HF_HUB_OFFLINE so nothing is fetched.
    model = open_clip.create_model("lorekit-tiny")
    snap = tmp_path / "hub" / "models--lorekit--tiny-test" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    cfg = json.loads(open(os.path.join(os.path.dirname(__import__("lorekit").__file__),
                                       "model_configs", "lorekit-tiny.json")).read())
    (snap / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    torch.save(model.state_dict(), snap / "open_clip_pytorch_model.bin")
    refs = tmp_path / "hub" / "models--lorekit--tiny-test" / "refs"
    refs.mkdir()
    (refs / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    loaded = load_clip("hf-hub:lorekit/tiny-test", cache_dir=str(tmp_path / "hub"))
    name, proj = _output_projection(model)
    assert torch.equal(dict(loaded.model.visual.named_parameters())[name], proj)


def test_openai_weights_get_quickgelu():
    assert resolve_model_name("ViT-B-32", "openai") == "ViT-B-32-quickgelu"
    assert resolve_model_name("ViT-B-32", "laion2b_s34b_b79k") == "ViT-B-32"


@pytest.mark.parametrize("name,pretrained,needle", [
    ("ViT-Nope-99", "", "model='ViT-Nope-99'"),
    ("lorekit-tiny", "no/such/file.pt", "checkpoint file not found"),
    ("ViT-B-32", "not-a-tag", "not a pretrained tag"),
    ("hf-hub:org/x", "openai", "hf-hub"),
])
def test_bad_model_inputs_name_the_field(name, pretrained, needle):
    with pytest.raises(ConfigError, match=needle):
        load_clip(name, pretrained)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ConfigError, match="broken.pt.*not a readable open_clip checkpoint"):
        load_clip("lorekit-tiny", str(bad))


def test_a_checkpoint_of_another_architecture_names_the_problem_without_cutting_a_word(tmp_path):
    other = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(3, 3).state_dict(), other)
    with pytest.raises(ConfigError, match=r"other\.pt.*not a readable open_clip checkpoint.*Missing key\(s\)") as err:
        load_clip("lorekit-tiny", str(other))
    assert str(err.value).endswith(" …)") and "\n" not in str(err.value)


def test_wrapper_resizes_and_normalises_inside_forward():
    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen["x"] = x
            return x.flatten(1)[:, :4]

    enc = ImageEncoder(Probe(), 8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    enc(torch.full((1, 3, 16, 24), 0.75))  # non-square: short side to 8, centre crop
    assert seen["x"].shape == (1, 3, 8, 8)
    assert torch.allclose(seen["x"], torch.full_like(seen["x"], 1.0), atol=1e-5)  # (0.75 − 0.5)/0.25


def test_zero_shot_head_is_scaled_cosine_and_templates_are_averaged(tiny_clip):
    weights = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    enc = torch.nn.Identity()
    logits = ZeroShotClassifier(enc, weights)(torch.tensor([[3.0, 4.0]]))
    assert torch.allclose(logits, torch.tensor([[60.0, 80.0]]))
    w = class_embeddings(tiny_clip.model, tiny_clip.tokenizer, ["one"], ["a {c}.", "the {c}!"])
    tok = tiny_clip.tokenizer(["a one.", "the one!"])
    with torch.no_grad():
        e = torch.nn.functional.normalize(tiny_clip.model.encode_text(tok), dim=-1).mean(0)
    assert torch.allclose(w[0], e / e.norm(), atol=1e-6)


def test_embedded_default_is_a_good_zero_shot_classifier(tiny_clip, digits_bundle):
    x, y = digits_bundle.test.tensors
    clf = ZeroShotClassifier(tiny_clip.encoder, tiny_clip.class_embeddings(digits_bundle.classnames,
                                                                           digits_bundle.templates))
    with torch.no_grad():
        acc = (clf(x).argmax(1) == y).float().mean().item()
    assert acc >= 0.90


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test on any attempt to resolve a host name or open a connection."""
    import socket

    def refuse(*args, **kwargs):
        pytest.fail(f"network access attempted: {args[1:] or args}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize("name,pretrained,repo,files", [
    ("ViT-B-32", "openai", "timm/vit_base_patch32_clip_224.openai", "open_clip_pytorch_model.bin"),
    ("hf-hub:lorekit/not-cached", "", "lorekit/not-cached", "open_clip_config.json and open_clip_model.safetensors"),
])
def test_uncached_weights_fail_at_once_saying_where_to_put_them(name, pretrained, repo, files, hub_cache, tmp_path,
                                                                 no_network):
    hub = hub_cache("someone/else", {})  # a hub cache that exists, without these files
    with pytest.raises(ConfigError) as err:
        load_clip(name, pretrained, cache_dir=tmp_path / "lorekit-cache")
    message = str(err.value)
    assert f"repo {repo!r}" in message and files in message
    assert f"models--{repo.replace('/', '--')}/snapshots/<commit>/" in message
    assert str(hub) in message and str(tmp_path / "lorekit-cache") in message and "HF_HOME" in message


def test_cached_hub_weights_load_without_the_network(tiny_hub_repo, tmp_path, no_network):
    tiny_hub_repo("lorekit/tiny-cached")
    loaded = load_clip("hf-hub:lorekit/tiny-cached", cache_dir=tmp_path / "lorekit-cache")
    assert loaded.encoder(torch.rand(1, 3, 32, 32)).shape == (1, 64)


def test_batchnorm_is_frozen_so_the_encoder_is_one_function(tiny_clip):
    # The embedded model is a ResNet: its BatchNorm must not use batch statistics while fine-tuning.
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    enc = tiny_clip.encoder
    try:
        enc.train()
        with torch.no_grad():
            train_out, alone = enc(x), enc(x[:1])
    finally:
        enc.eval()
    with torch.no_grad():
        assert torch.allclose(train_out, enc(x), atol=1e-5) and torch.allclose(alone, train_out[:1], atol=1e-5)
