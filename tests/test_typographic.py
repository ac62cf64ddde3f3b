"""Typographic attacks and typo-po: the renderer is seeded per sample and draws inside the image, the written
class is never the true one, DPO/IPO/KL on hand-checkable cases, a smoke run on the embedded default, the
evaluation keys, and refusals."""

import json
import math

import pytest
import torch

import lorekit
from lorekit.config import ConfigError, TrainConfig
from lorekit.evaluate import evaluate_encoder
from lorekit.methods import get
from lorekit.methods.typo_po import kl_to_reference, preference_loss, preference_margin
from lorekit.render import text_masks
from lorekit.typographic import (STYLES, draw_attack, sample_seeds, sample_style, style_for, typographic_accuracy,
                                 typographic_images, wrong_labels)

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n, size, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 0.3


def test_the_attack_is_a_pure_function_of_the_seed_and_the_sample_position():
    x, y = _images(12, 32), torch.arange(12) % 10
    a, wa = typographic_images(x, y, NAMES, seed=3)
    b, wb = typographic_images(x, y, NAMES, seed=3)
    assert torch.equal(a, b) and torch.equal(wa, wb)
    c, _ = typographic_images(x, y, NAMES, seed=4)
    assert not torch.equal(a, c)
    # sample i's attack does not depend on the batch it sits in: the second half alone, at offset 6
    d, wd = typographic_images(x[6:], y[6:], NAMES, seed=3, offset=6)
    assert torch.equal(d, a[6:]) and torch.equal(wd, wa[6:])
    assert torch.equal(x, _images(12, 32))  # the input is left alone


def test_the_written_class_is_never_the_true_one_and_every_other_class_occurs():
    labels = torch.arange(2000) % 10
    written = wrong_labels(labels, 10, sample_seeds(0, 2000))
    assert not (written == labels).any()
    for c in range(10):
        assert set(written[labels == c].tolist()) == set(range(10)) - {c}


@pytest.mark.parametrize("size,style", [(32, "label"), (32, "paper"), (224, "paper"), (224, "label"), (57, "label")])
def test_the_text_and_its_label_lie_inside_the_image(size, style):
    spec = STYLES[style]
    pad = 1 if spec.label else 0
    for seed in sample_seeds(1, 40):
        for text in ("seven", "one", "horizontal stripes"):
            st = sample_style(text, size, size, seed, spec)
            h, w = text_masks(text, st.font, st.size, st.stroke_width)[0].shape
            x, y = st.xy
            assert pad <= x and x + w + pad <= size and pad <= y and y + h + pad <= size
    x = torch.zeros(4, 3, size, size)
    attacked = draw_attack(x, ["seven"] * 4, sample_seeds(0, 4), spec)
    assert attacked.shape == x.shape and 0 <= attacked.min() and attacked.max() <= 1
    assert all((attacked[i] != 0).any() for i in range(4))  # something was drawn on every image


def test_real_resolution_uses_the_papers_font_sizes_on_the_image():
    assert style_for("auto", 224) == STYLES["paper"] and style_for("auto", 32) == STYLES["label"]
    sizes = {sample_style("four", 224, 224, s, STYLES["paper"]).size for s in sample_seeds(0, 60)}
    assert min(sizes) >= 20 and max(sizes) <= 40 and len(sizes) > 5  # 9-18 % of 224 px: the papers' 20-40
    x, y = _images(3, 224), torch.tensor([0, 4, 9])
    attacked, written = typographic_images(x, y, NAMES, seed=0)
    changed = (attacked != x).any(1)
    assert all(changed[i].any() for i in range(3)) and (written != y).all()
    assert changed.float().mean() < 0.2  # the paper's style writes a word, it does not cover the image


def test_dpo_ipo_and_kl_on_a_hand_checkable_case():
    # π = (3/4, 1/4, ·) against π_ref uniform over the first two; class 2 carries no mass in either
    logits = torch.tensor([[math.log(3), 0.0, -1e4]])
    ref = torch.tensor([[0.0, 0.0, -1e4]])
    margin = preference_margin(logits, ref, torch.tensor([0]), torch.tensor([1]))
    # h_raw = [log(3/4) − log(1/2)] − [log(1/4) − log(1/2)] = log 3
    assert margin.item() == pytest.approx(math.log(3))
    # DPO at β = 1/2: −log σ(½ log 3) = −log(√3 / (√3 + 1))
    assert preference_loss(margin, 0.5, "dpo").item() == pytest.approx(-math.log(math.sqrt(3) / (math.sqrt(3) + 1)))
    # IPO at β = 1/2: (log 3 − 1/(2·½))² = (log 3 − 1)²
    assert preference_loss(margin, 0.5, "ipo").item() == pytest.approx((math.log(3) - 1) ** 2)
    # swapped preference: the margin changes sign
    assert preference_margin(logits, ref, torch.tensor([1]), torch.tensor([0])).item() == pytest.approx(-math.log(3))
    # KL(π_ref ‖ π) = ½ log(½ / ¾) + ½ log(½ / ¼) = ½ log(4/3)
    assert kl_to_reference(logits, ref).item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)


def test_at_the_reference_the_margin_and_kl_vanish_and_the_losses_take_their_starting_values():
    logits = torch.randn(5, 10, generator=torch.Generator().manual_seed(0)) * 10
    preferred, rejected = torch.arange(5), (torch.arange(5) + 3) % 10
    margin = preference_margin(logits, logits, preferred, rejected)
    assert torch.equal(margin, torch.zeros(5))
    assert kl_to_reference(logits, logits).abs().max() < 1e-6
    assert preference_loss(margin, 0.1, "dpo") == pytest.approx(torch.full((5,), math.log(2)))
    assert preference_loss(margin, 0.1, "ipo") == pytest.approx(torch.full((5,), 1 / (4 * 0.1 ** 2)))


@pytest.mark.parametrize("fields,message", [
    ({"po_loss": "kto"}, "po_loss='kto': must be one of dpo, ipo"),
    ({"po_beta": 0.0}, "po_beta=0.0: must be > 0"),
    ({"po_beta": -1}, "po_beta=-1.0: must be > 0"),
    ({"po_kl": -0.5}, "po_kl=-0.5: must be a non-negative number"),
    ({"typo_style": "huge"}, "typo_style='huge': must be one of auto, paper, label"),
])
def test_bad_settings_are_refused_naming_the_field(fields, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        TrainConfig(method="typo-po", **fields).validate()


def test_bad_inputs_to_the_generator_and_losses_are_refused():
    x = _images(2, 32)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        typographic_images(x, torch.tensor([0, 10]), NAMES, seed=0)
    with pytest.raises(ConfigError, match="at least 2 classes"):
        typographic_images(x, torch.tensor([0, 0]), ("only",), seed=0)
    with pytest.raises(ValueError, match="2 images for 3 labels"):
        typographic_images(x, torch.tensor([0, 1, 2]), NAMES, seed=0)
    with pytest.raises(ValueError, match=r"images must be \[B, 3, H, W\]"):
        draw_attack(x[:, :1], ["one", "two"], [0, 1], STYLES["label"])
    with pytest.raises(ConfigError, match="typo_style='big'"):
        style_for("big", 32)
    with pytest.raises(ConfigError, match="po_loss='kto'"):
        preference_loss(torch.zeros(1), 0.1, "kto")
    with pytest.raises(ConfigError, match="po_beta=0"):
        preference_loss(torch.zeros(1), 0, "dpo")


def test_the_evaluation_reports_typographic_accuracy_next_to_the_existing_keys(tiny_clip, digits_bundle):
    from lorekit.data import stack

    x, y = stack(digits_bundle.test, list(range(40)))
    weights = tiny_clip.class_embeddings(digits_bundle.classnames, digits_bundle.templates)
    out = evaluate_encoder(tiny_clip.encoder, tiny_clip.encoder, weights, x, y, [4 / 255], steps=1,
                           attacks=("fgsm", "typographic"), classnames=digits_bundle.classnames)
    assert {"clean_acc", "fgsm_acc@4", "typo_acc", "typo_written", "cosine", "fidelity"} <= set(out)
    direct = typographic_accuracy(lorekit.models.ZeroShotClassifier(tiny_clip.encoder, weights), x, y,
                                  digits_bundle.classnames)
    assert out["typo_acc"] == direct["typo_acc"] and out["typo_written"] == direct["typo_written"]
    assert out["typo_acc"] < out["clean_acc"]
    with pytest.raises(ConfigError, match="attack 'typographic' writes class names"):
        evaluate_encoder(tiny_clip.encoder, tiny_clip.encoder, weights, x, y, [4 / 255], attacks=("typographic",))


@pytest.mark.parametrize("loss", ["dpo", "ipo"])
def test_a_typo_po_run_on_the_embedded_default_trains_the_image_tower_only(tmp_path, loss):
    cfg = lorekit.recipe("tiny-typo-po", po_loss=loss, po_beta=0.1 if loss == "dpo" else 0.01, steps=3,
                         batch_size=16, eval_every=0, eval_samples=32, run_dir=str(tmp_path / loss))
    seen = {}

    def snapshot(trainer):
        seen["encoder"] = {n: p.detach().clone() for n, p in trainer.encoder.named_parameters()}
        seen["text"] = {n: p.detach().clone() for n, p in trainer.clip.model.named_parameters()
                        if not n.startswith("visual.")}
        seen["trainer"] = trainer

    summary = lorekit.train(cfg, progress=False, on_build=snapshot)
    trainer = seen["trainer"]
    records = [json.loads(line) for line in (cfg.run_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 3 and all(math.isfinite(r["loss"]) for r in train)
    first = train[0]  # the first update starts at the reference: h_raw = 0 and KL = 0
    assert first["loss_pref"] == pytest.approx(math.log(2) if loss == "dpo" else 1 / (4 * 0.01 ** 2), rel=1e-4)
    assert first["loss_kl"] == pytest.approx(0.0, abs=1e-5) and first["margin_mean"] == pytest.approx(0, abs=1e-3)
    assert {"pref_acc", "typo_batch_acc", "typo_batch_written", "margin_q50"} <= set(first)
    final = summary["final"]
    assert 0 <= final["typo_acc"] <= 1 and 0 <= final["typo_written"] <= 1 and "clean_acc" in final
    moved = [n for n, p in trainer.encoder.named_parameters() if not torch.equal(p, seen["encoder"][n])]
    assert moved  # the image tower trained
    text = dict(trainer.clip.model.named_parameters())
    assert all(torch.equal(text[n], p) for n, p in seen["text"].items())  # the text tower did not
    assert summary["ledger"]["training_passes"] == 3 * get("typo-po").passes_per_step(cfg)
    assert summary["ledger"]["passes_bwd_attack"] == 0  # no PGD: the attack is rendered


def test_the_cli_reports_typographic_accuracy(capsys):
    from lorekit.__main__ import main

    assert main(["eval", "--attack", "typographic", "--samples", "24", "--device", "cpu", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"clean_acc", "typo_acc", "typo_written"} <= set(out) and not any(k.startswith("robust_acc") for k in out)
    assert main(["eval", "--attack", "typo", "--samples", "24", "--quiet"]) == 2
    assert "choose one or more of pgd, fgsm, apgd, typographic" in capsys.readouterr().err


def test_the_notebooks_figures_draw_their_inputs():
    from lorekit import plots

    x, y = _images(3, 32), torch.tensor([0, 1, 2])
    x_t, written = typographic_images(x, y, NAMES, seed=0)
    fig = plots.typographic_examples(x, x_t, y, written, {"original": written, "DPO": y}, NAMES)
    assert [t.type for t in fig.data] == ["image"] * 6
    assert f"writes '{NAMES[int(written[0])]}'<br>original: {NAMES[int(written[0])]}<br>DPO: zero" in [
        a.text for a in fig.layout.annotations]
    rows = [{"label": "original", "method": "original", "clean_acc": 0.9, "typo_acc": 0.2, "typo_written": 0.3}]
    assert [list(t.y) for t in plots.typographic_bars(rows).data] == [[0.9], [0.2], [0.3]]
    records = [{"kind": "train", "step": s, "loss_pref": 0.7, "loss_kl": 0.0, "margin_mean": s} for s in (1, 2)]
    fig = plots.preference_curves({"DPO": records + [{"kind": "eval", "step": 2, "typo_acc": 0.4}]})
    assert len(fig.data) == 4 and list(fig.data[3].y) == [0.4] and fig.layout.yaxis.type == "log"
