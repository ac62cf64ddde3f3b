"""LoRA through peft on open_clip towers: exact attention swap, frozen base, reference, save, merge, errors."""

import copy
from pathlib import Path

import open_clip
import pytest
from open_clip.utils import freeze_batch_norm_2d
import torch
from torch import nn

import lorekit.models  # noqa: F401  (registers the lorekit-tiny config)
from lorekit.adapters import SplitAttentionPool2d, SplitQKVAttention, add_lora
from lorekit.config import ConfigError
from lorekit.models import parameter_counts

CONTEXT = 16
# The embedded lorekit-tiny has a ResNet image tower (one attention layer: its pool); tiny-vit, a test-only config
# of the same size with a ViT image tower, covers transformer blocks in both towers.
open_clip.add_model_config(Path(__file__).parent / "fixtures" / "model_configs")
ARCHS = ("lorekit-tiny", "tiny-vit")


def _tiny(arch: str = "tiny-vit") -> nn.Module:
    """A random-weight tiny CLIP; a ResNet tower's BatchNorm frozen, as lorekit.models.ImageEncoder does."""
    torch.manual_seed(0)
    model = open_clip.create_model(arch).eval()
    freeze_batch_norm_2d(model.visual)
    return model


def _adapted_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """(in, out) features of every projection peft wrapped."""
    return [(m.base_layer.in_features, m.base_layer.out_features) for m in model.modules() if hasattr(m, "lora_A")]


def _inputs(batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.rand(batch, 3, 32, 32, generator=g)
    # The text tower pools at the argmax token; placing it mid-sequence makes the causal mask matter.
    text = torch.randint(1, 1000, (batch, CONTEXT), generator=g)
    text[:, 5] = 49407
    return images, text


def _embed(model: nn.Module, images: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return model.encode_image(images), model.encode_text(text)


def _train(model: nn.Module, steps: int = 2) -> None:
    """A few AdamW steps pulling both embeddings towards random targets."""
    images, text = _inputs()
    g = torch.Generator().manual_seed(2)
    targets = torch.randn(len(images), 64, generator=g), torch.randn(len(text), 64, generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        img, txt = _embed(model, images, text)
        loss = (img - targets[0]).pow(2).mean() + (txt - targets[1]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _assert_close(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> None:
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", ["none", "causal", "bool", "per-head"])
def test_split_attention_matches_multihead_attention(batch_first, mask):
    torch.manual_seed(0)
    b, n, d, h = 3, 7, 32, 4
    mha = nn.MultiheadAttention(d, h, batch_first=batch_first)
    nn.init.normal_(mha.in_proj_bias)
    nn.init.normal_(mha.out_proj.bias)
    split = SplitQKVAttention.from_mha(mha)
    x = torch.randn((b, n, d) if batch_first else (n, b, d))
    causal = torch.full((n, n), float("-inf")).triu(1)
    attn_mask = {"none": None, "causal": causal, "bool": torch.ones(n, n, dtype=torch.bool).triu(1),
                 "per-head": causal + torch.randn(b * h, n, n)}[mask]
    expected = mha(x, x, x, need_weights=False, attn_mask=attn_mask)[0]
    torch.testing.assert_close(split(x, x, x, need_weights=False, attn_mask=attn_mask)[0], expected)
    memory = torch.randn_like(x)  # cross-attention: keys and values from another sequence
    torch.testing.assert_close(split(x, memory, memory)[0], mha(x, memory, memory, need_weights=False)[0])
    fused = split.to_mha()
    assert fused.state_dict().keys() == mha.state_dict().keys()
    assert all(torch.equal(fused.state_dict()[k], v) for k, v in mha.state_dict().items())


@pytest.mark.parametrize("arch", ARCHS)
def test_swapped_tiny_towers_match_the_original_including_the_causal_text_mask(arch):
    model = _tiny(arch)
    original = copy.deepcopy(model)
    images, text = _inputs()
    add_lora(model, rank=2, towers="both")
    assert isinstance(model.transformer.resblocks[0].attn, SplitQKVAttention)
    if arch == "tiny-vit":
        assert isinstance(model.visual.transformer.resblocks[0].attn, SplitQKVAttention)
    else:
        assert isinstance(model.visual.attnpool, SplitAttentionPool2d)
    _assert_close(_embed(model, images, text), _embed(original, images, text))
    # Guard: the pooled token sits mid-sequence, so ignoring the causal mask would change the embedding.
    with torch.no_grad():
        x = original.token_embedding(text) + original.positional_embedding
        masked = original.transformer(x, attn_mask=original.attn_mask)
        assert not torch.allclose(original.transformer(x)[:, 5], masked[:, 5])


def test_swapped_vit_b32_matches_the_original():
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32").eval()
    images = torch.rand(2, 3, 224, 224)
    text = torch.randint(1, 49407, (2, 77))
    text[:, 9] = 49407
    with torch.no_grad():
        original = _embed(model, images, text)
        add_lora(model, rank=8, towers="both")
        _assert_close(_embed(model, images, text), original)


@pytest.mark.parametrize("arch,blocks", [("lorekit-tiny", 1 + 2), ("tiny-vit", 3 + 2)])
def test_only_adapter_weights_train(arch, blocks):
    model = _tiny(arch)
    original = copy.deepcopy(model)
    lora = add_lora(model, rank=2, targets=("q", "k", "v", "o"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 4 * blocks  # A and B × 4 projections × (image + text attention blocks)
    n_adapter = sum(v.numel() for v in lora.adapter_state_dict().values())
    assert n_adapter == sum(2 * (i + o) for i, o in _adapted_shapes(model))  # A: r×in, B: out×r
    assert parameter_counts(model) == (n_adapter, parameter_counts(original)[1] + n_adapter)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


@pytest.mark.parametrize("arch", ARCHS)
def test_disabled_adapters_give_the_original_outputs_before_and_after_training(arch):
    model = _tiny(arch)
    original = copy.deepcopy(model)
    lora = add_lora(model, rank=4, alpha=8)
    images, text = _inputs()
    with torch.no_grad(), lora.disabled():
        reference = _embed(model, images, text)
    _assert_close(reference, _embed(original, images, text))
    _train(model)
    with torch.no_grad():
        adapted = _embed(model, images, text)
        with lora.disabled() as frozen:
            assert not any(p.requires_grad for p in frozen.parameters())
            after = _embed(frozen, images, text)
    assert all(torch.equal(a, r) for a, r in zip(after, reference))
    assert not torch.allclose(adapted[0], reference[0], atol=1e-3)
    assert any(p.requires_grad for p in model.parameters())  # leaving the context makes adapters trainable again


def test_adapter_dropout_is_active_in_train_mode_only():
    model = _tiny()  # in eval mode; peft's new dropout modules start in train mode unless add_lora syncs them
    add_lora(model, rank=4, dropout=0.5, towers="image")
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            nn.init.normal_(p)
    images, _ = _inputs()
    assert torch.equal(model.encode_image(images), model.encode_image(images))
    model.train()
    assert not torch.equal(model.encode_image(images), model.encode_image(images))


def test_text_tower_adapters_leave_the_image_tower_alone():
    model = _tiny()
    original = copy.deepcopy(model)
    # With 'o', suffix matching of module names would also catch the image tower's MultiheadAttention out_proj.
    add_lora(model, towers="text", targets=("q", "k", "v", "o"))
    assert all(not n.startswith("visual.") for n, p in model.named_parameters() if p.requires_grad)
    assert not isinstance(model.visual.transformer.resblocks[0].attn, SplitQKVAttention)
    _train(model)
    images, _ = _inputs()
    assert torch.equal(model.encode_image(images), original.encode_image(images))


@pytest.mark.parametrize("arch", ARCHS)
def test_q_v_targets_leave_the_k_slice_of_the_merged_weights_unchanged(arch):
    model = _tiny(arch)
    original = copy.deepcopy(model)
    lora = add_lora(model, rank=2, alpha=4, targets=("q", "v"))
    _train(model)
    merged = lora.merge()
    for name, before in original.state_dict().items():
        after = merged.state_dict()[name]
        if name.endswith("attn.in_proj_weight"):  # transformer blocks: q, k, v fused
            q, k, v = zip(after.chunk(3), before.chunk(3))
            assert torch.equal(*k), name
            assert not torch.equal(*q) and not torch.equal(*v), name
        elif name.startswith("visual.attnpool.") and name.split(".")[2] in ("q_proj", "v_proj"):  # the ResNet pool
            assert name.endswith(".bias") or not torch.equal(after, before), name
        else:
            assert torch.equal(after, before), name


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_export_loads_through_open_clip_with_the_adapted_embeddings(arch, tmp_path):
    model = _tiny(arch)
    fresh_keys = freeze_batch_norm_2d(open_clip.create_model(arch)).state_dict().keys()
    lora = add_lora(model, rank=2, alpha=4, targets=("q", "k", "v", "o"))
    _train(model)
    images, text = _inputs()
    with torch.no_grad():
        adapted = _embed(model, images, text)
    merged = lora.merge()
    assert merged.state_dict().keys() == fresh_keys
    assert all(p.requires_grad for p in merged.parameters())  # as open_clip built it
    path = tmp_path / "merged.pt"
    torch.save(merged.state_dict(), path)
    loaded = open_clip.create_model(arch, pretrained=str(path)).eval()
    assert not any(isinstance(m, (SplitQKVAttention, SplitAttentionPool2d)) for m in loaded.modules())
    assert not any(isinstance(m, (SplitQKVAttention, SplitAttentionPool2d)) for m in merged.modules())
    with torch.no_grad():
        _assert_close(_embed(loaded, images, text), adapted)
    with pytest.raises(RuntimeError, match="merged"):
        lora.adapter_state_dict()


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_state_dict_round_trips(arch, tmp_path):
    base = _tiny(arch)
    model = copy.deepcopy(base)
    lora = add_lora(model, rank=2, targets=("q", "v"))
    _train(model)
    state = lora.adapter_state_dict()
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)
    path = tmp_path / "adapter.pt"
    torch.save(state, path)
    assert path.stat().st_size < 50_000  # the base model is ~28 MB

    other = add_lora(copy.deepcopy(base), rank=2, targets=("q", "v"))
    other.load_adapter_state_dict(torch.load(path, weights_only=True))
    images, text = _inputs()
    with torch.no_grad():
        _assert_close(_embed(other.model, images, text), _embed(model, images, text))

    with pytest.raises(ConfigError, match="missing"):
        add_lora(copy.deepcopy(base), rank=2, targets=("q", "k", "v")).load_adapter_state_dict(state)
    with pytest.raises(ConfigError, match="wrongly shaped"):
        add_lora(copy.deepcopy(base), rank=4, targets=("q", "v")).load_adapter_state_dict(state)


@pytest.mark.parametrize("kwargs,needle", [
    ({"rank": 0}, "rank=0: must be an integer >= 1"),
    ({"rank": 2.5}, "rank=2.5"),
    ({"alpha": 0}, "alpha=0: must be > 0"),
    ({"dropout": 1.0}, r"dropout=1.0: must lie in \[0, 1\)"),
    ({"dropout": -0.1}, "dropout=-0.1"),
    ({"targets": ("q", "x")}, "'x' is not one of q, k, v, o"),
    ({"targets": ()}, "targets=\\(\\): must be a non-empty sequence"),
    ({"targets": "qv"}, "targets='qv': must be a non-empty sequence"),
    ({"towers": "audio"}, "towers='audio': must be one of image, text, both"),
])
def test_bad_settings_are_refused_before_the_model_changes(kwargs, needle):
    model = _tiny()
    with pytest.raises(ConfigError, match=needle):
        add_lora(model, **kwargs)
    assert isinstance(model.visual.transformer.resblocks[0].attn, nn.MultiheadAttention)
    assert all(p.requires_grad for p in model.parameters())


def test_models_without_open_clip_attention_blocks_are_refused():
    with pytest.raises(ConfigError, match="no open_clip attention block in its image tower"):
        add_lora(nn.Sequential(nn.Linear(4, 4)), towers="image")
    text_only = _tiny().transformer  # a text transformer: no .visual
    with pytest.raises(ConfigError, match="towers='image'.*image tower"):
        add_lora(text_only, towers="image")
    model = _tiny()
    add_lora(model, towers="image")
    with pytest.raises(ConfigError, match="SplitQKVAttention.*already adapted"):
        add_lora(model, towers="both")
    odd = _tiny()
    odd.visual.transformer.resblocks[1].attn = nn.MultiheadAttention(96, 3, batch_first=True, add_bias_kv=True)
    with pytest.raises(ConfigError, match=r"visual\.transformer\.resblocks\.1\.attn is a MultiheadAttention"):
        add_lora(odd, towers="image")


# ------------------------------------------------------------------------- adapters in the training loop
def test_lore_on_lora_trains_only_adapters_against_the_same_model_with_them_off(tmp_path, one_thread):
    import lorekit
    from lorekit.rundir import load_run
    from lorekit.trainer import build

    cfg = lorekit.recipe("tiny", "lore", adapter="lora", lora_rank=4, lora_alpha=8.0, steps=3, batch_size=8,
                         attack_steps=1, eval_samples=16, checkpoint_every=2, run_dir=str(tmp_path / "run"))
    trainer = build(cfg)
    encoder = trainer.encoder
    frozen = {n: p.detach().clone() for n, p in encoder.named_parameters() if not p.requires_grad}
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        before = trainer.reference(x)
    summary = trainer.fit(progress=False)
    with torch.no_grad():
        torch.testing.assert_close(trainer.reference(x), before, rtol=0, atol=0)  # φθ0 untouched by training
        assert not torch.allclose(encoder(x), before)  # the adapted encoder moved
    assert all(torch.equal(p, frozen[n]) for n, p in encoder.named_parameters() if n in frozen)
    assert summary["ledger"]["passes_fwd_reference"] == 3 * 8  # the reference runs the encoder: counted once
    trainable, total = summary["parameters"]["trainable"], summary["parameters"]["total"]
    assert 0 < trainable < total / 20 and all("lora_" in n for n, p in encoder.named_parameters() if p.requires_grad)
    # only adapter weights are saved, in the checkpoint and as the run's result
    run = cfg.run_path
    assert (run / "adapter.pt").is_file() and not (run / "encoder.pt").exists()
    saved = torch.load(run / "checkpoint.pt", weights_only=True)["encoder"]
    assert saved.keys() == torch.load(run / "adapter.pt", weights_only=True).keys()
    assert sum(t.numel() for t in saved.values()) == trainable
    # the finished run, merged back into a plain open_clip model, computes the adapted encoder's embeddings
    loaded = load_run(run)
    assert not any("lora" in k for k in loaded.clip.model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded.clip.encoder(x), encoder.eval()(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loaded.original(x), before, rtol=1e-5, atol=1e-6)
    bench = lorekit.setup(cfg)
    with torch.no_grad():
        torch.testing.assert_close(bench.encoder_of(run)(x), loaded.clip.encoder(x), rtol=1e-5, atol=1e-6)
