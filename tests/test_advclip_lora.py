"""AdvCLIP-LoRA: adapters of both towers train against a per-sample pixel-space attack, the class embeddings
follow the adapted text tower, runs are evaluated (and exported) with it; FGSM; few-shot splits; refusals."""

import functools
import json
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

import lorekit
from lorekit.__main__ import main
from lorekit.attacks import ce_attack_loss, fgsm
from lorekit.config import ConfigError, TrainConfig
from lorekit.data import DataBundle, few_shot, load_dataset
from lorekit.evaluate import fgsm_accuracy, robust_key
from lorekit.export import export
from lorekit.methods import Batch
from lorekit.models import eval_mode

RECIPE = "tiny-adversarial-lora"
pytestmark = pytest.mark.usefixtures("one_thread")  # a busy 2-core machine runs one thread many times faster


def _cfg(run_dir, **fields) -> TrainConfig:
    base = dict(shots=1, batch_size=10, steps=3, attack_steps=2, eval_samples=16, lr=0.05)
    return lorekit.recipe(RECIPE, "advclip-lora", **{**base, **fields}, run_dir=str(run_dir))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One AdvCLIP-LoRA run through lorekit.train, with what it looked like before training."""
    cfg = _cfg(tmp_path_factory.mktemp("runs") / "advclip")
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    seen = SimpleNamespace(x=x)

    def snapshot(trainer):
        model = trainer.trainable
        seen.trainer, seen.model = trainer, model
        seen.before = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad(), eval_mode(model):
            seen.reference = trainer.reference(x)
            seen.weights = trainer.method.class_embeddings()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seen.summary = lorekit.train(cfg, progress=False, on_build=snapshot)
    finally:
        torch.set_num_threads(threads)
    seen.cfg = cfg
    return seen


# ------------------------------------------------------------------------- training
def test_only_the_adapters_of_both_towers_change(trained):
    after = dict(trained.model.named_parameters())
    changed = {n for n, p in after.items() if not torch.equal(p, trained.before[n])}
    trainable = {n for n, p in after.items() if p.requires_grad}
    assert changed and changed <= trainable and all("lora_" in n for n in trainable)
    assert any(n.startswith("visual.") for n in changed)  # image-tower adapters moved
    assert any(not n.startswith("visual.") for n in changed)  # text-tower adapters moved
    adapters = sum(t.numel() for t in trained.trainer.adapters.adapter_state_dict().values())
    assert trained.summary["parameters"]["trainable"] == adapters  # both towers' adapters, all in the optimizer


def test_the_adapters_start_from_the_run_seed(tmp_path):
    from lorekit.trainer import build

    cfg = _cfg(tmp_path / "run")
    starts = []
    for noise in (1, 2):  # whatever drew from the global generator before
        torch.manual_seed(noise)
        starts.append(build(cfg).adapters.adapter_state_dict())
    assert all(torch.equal(a, starts[1][k]) for k, a in starts[0].items())


def test_the_reference_is_untouched_by_training(trained):
    with torch.no_grad():
        torch.testing.assert_close(trained.trainer.reference(trained.x), trained.reference, rtol=0, atol=0)
        assert not torch.allclose(trained.trainer.encoder.eval()(trained.x), trained.reference, atol=1e-4)


def test_class_embeddings_go_through_the_adapted_text_tower_with_gradient(trained):
    method, model = trained.trainer.method, trained.model
    model.zero_grad(set_to_none=True)
    weights = method.class_embeddings()
    assert weights.requires_grad and weights.shape == trained.weights.shape
    weights.pow(2).sum().backward()  # any function of the embeddings reaches the text adapters only
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if not n.startswith("visual."))
    assert all(g is None for n, g in grads.items() if n.startswith("visual."))
    model.zero_grad(set_to_none=True)
    with torch.no_grad(), eval_mode(model):  # adapter dropout off
        assert not torch.allclose(method.class_embeddings(), trained.weights, atol=1e-5)  # moved with training


def test_the_perturbation_is_per_sample_and_inside_the_pixel_ball(trained):
    trainer, eps = trained.trainer, trained.cfg.eps
    grey = torch.full((1, 3, 32, 32), 0.5)
    x = torch.cat([grey, grey, torch.zeros(1, 3, 32, 32), torch.ones(1, 3, 32, 32)])
    y = torch.tensor([3, 3, 0, 1])
    with torch.no_grad():
        batch = Batch(x, y, trainer.reference(x))
    x_adv = trainer.method.adversarial(batch, functools.partial(trainer._attack, batch))
    delta = x_adv - x
    assert delta.abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert delta.abs().amax() > 0.9 * eps  # ε is in pixel units, not scaled by the normaliser's std
    assert not torch.equal(delta[0], delta[1])  # one δ per image, even for identical images
    assert (delta[2] >= 0).all() and (delta[3] <= 0).all()  # the ball meets the [0,1] box in pixel space


# ------------------------------------------------------------------------- evaluation and export
def test_a_run_is_evaluated_with_its_own_text_tower(trained):
    run = trained.cfg.run_dir
    bench = lorekit.setup(trained.cfg)
    encoder, weights = bench.head_of(run)
    tuned = lorekit.load_run(run).clip
    own = tuned.class_embeddings(bench.data.classnames, bench.data.templates)
    torch.testing.assert_close(weights, own, rtol=0, atol=0)
    assert not torch.allclose(weights, bench.class_embeddings, atol=1e-5)
    with torch.no_grad(), eval_mode(trained.model):  # the adapters, unmerged, compute the same embeddings
        torch.testing.assert_close(trained.trainer.method.class_embeddings(), own, rtol=1e-4, atol=1e-5)
    results = bench.evaluate_run(run, [4 / 255], steps=2, attacks=("pgd", "fgsm"))
    assert set(results) >= {"clean_acc", robust_key(4 / 255), robust_key(4 / 255, "fgsm")}
    # the trainer's final evaluation already classified with the adapted text tower
    assert results["clean_acc"] == trained.summary["final"]["clean_acc"]


def test_cli_eval_of_the_run_with_each_attack(trained, capsys):
    code = main(["eval", "--run", trained.cfg.run_dir, "--eps", "4", "--attack", "pgd", "fgsm", "apgd",
                 "--steps", "2", "--samples", "16", "--device", "cpu"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and {"robust_acc@4", "fgsm_acc@4", "apgd_acc@4"} <= set(out)
    assert out["apgd_acc@4"] <= out["clean_acc"]
    assert main(["eval", "--run", trained.cfg.run_dir, "--attack", "cw"]) == 2
    assert "attack=['cw']: choose one or more of pgd, fgsm, apgd" in capsys.readouterr().err


def test_export_carries_the_adapted_text_tower(trained, tmp_path):
    dest = export(trained.cfg.run_dir, tmp_path / "out")
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{dest}")
    tuned = lorekit.load_run(trained.cfg.run_dir).clip
    base = lorekit.load_clip(trained.cfg.model, trained.cfg.pretrained)
    tokens = base.tokenizer(["a photo of the number seven.", "zero"])
    with torch.no_grad():
        text = model.eval().encode_text(tokens)
        torch.testing.assert_close(text, tuned.model.encode_text(tokens), rtol=0, atol=1e-6)
        assert not torch.allclose(text, base.model.encode_text(tokens), atol=1e-4)
    assert "text tower was fine-tuned too" in (dest / "README.md").read_text()


# ------------------------------------------------------------------------- FGSM
def test_fgsm_is_one_signed_step_of_size_eps_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x = torch.rand(5, 3, 2, 2)
    x[0, 0, 0, 0], x[1, 0, 0, 0] = 0.0, 1.0  # pixels at the box's edges
    y = torch.tensor([0, 1, 2, 0, 1])
    eps = 0.1
    # ∂CE/∂x = Wᵀ(softmax(Wx + b) − onehot(y)), per sample
    w, b = model[1].weight.detach(), model[1].bias.detach()
    p = F.softmax(x.flatten(1) @ w.T + b, dim=-1)
    grad = ((p - F.one_hot(y, 3)) @ w).view_as(x)
    expected = (x + eps * grad.sign()).clamp(0, 1)
    x_adv = fgsm(ce_attack_loss(model, y), x, eps)
    torch.testing.assert_close(x_adv, expected)
    correct = (model(expected).argmax(-1) == y).float().mean().item()
    assert fgsm_accuracy(model, x, y, eps) == pytest.approx(correct)
    assert all(p.grad is None for p in model.parameters())  # the attack leaves the model's gradients alone


# ------------------------------------------------------------------------- few-shot splits
def test_few_shot_splits_are_seeded_balanced_subsets(digits_bundle):
    a, b = few_shot(digits_bundle, 4, seed=0), few_shot(digits_bundle, 4, seed=0)
    c = few_shot(digits_bundle, 4, seed=1)
    xa, ya = a.train.tensors
    assert isinstance(a.train, TensorDataset) and torch.bincount(ya).tolist() == [4] * 10
    assert torch.equal(xa, b.train.tensors[0]) and not torch.equal(xa, c.train.tensors[0])
    full_x = digits_bundle.train.tensors[0]
    assert all((full_x == img).flatten(1).all(1).any() for img in xa)  # drawn from the training split
    assert a.test is digits_bundle.test  # the test split is untouched


def _folder(root, counts):
    rng = np.random.default_rng(0)
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / name / f"{i}.png")


def test_few_shot_reads_labels_of_image_folders_and_names_the_short_class(tmp_path):
    _folder(tmp_path / "set" / "train", {"red_square": 5, "blue_disc": 3})
    _folder(tmp_path / "set" / "test", {"red_square": 1, "blue_disc": 1})
    data = load_dataset(str(tmp_path / "set"), image_size=8)
    split = few_shot(data, 3, seed=0)
    assert sorted(int(split.train[i][1]) for i in range(len(split.train))) == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ConfigError, match="shots=4: class 'blue disc' has only 3 training images"):
        few_shot(data, 4, seed=0)
    flat = DataBundle("flat", torch.utils.data.Subset(data.train, [0, 1, 3, 4, 5, 6, 7]), data.test,
                      data.classnames, data.templates)  # a Subset (the split of folders without train/test)
    assert len(few_shot(flat, 2, seed=0).train) == 4


def test_few_shot_reads_labels_of_torchvision_sets(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, labels in (("train", np.arange(14) % 5), ("t10k", np.arange(5))):  # classes 0-3: 3 images, 4: 2
        images = np.zeros((len(labels), 28, 28), dtype=np.uint8)
        for name, array, magic in (("images-idx3", images, 0x0803), ("labels-idx1", labels, 0x0801)):
            with open(raw / f"{split}-{name}-ubyte", "wb") as f:
                f.write(np.array([magic, *array.shape], dtype=">i4").tobytes() + array.astype(np.uint8).tobytes())
    data = load_dataset("mnist", root=tmp_path, image_size=28)
    with pytest.raises(ConfigError, match="shots=3: class '5' has only 0 training images in 'mnist'"):
        few_shot(data, 3, seed=0)  # ten class names, five classes present: the first empty one is named
    five = DataBundle("mnist", data.train, data.test, data.classnames[:5], data.templates)
    assert sorted(int(five.train[i][1]) for i in few_shot(five, 2, seed=0).train.indices) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    with pytest.raises(ConfigError, match="shots=3: class '4' has only 2 training images"):
        few_shot(five, 3, seed=0)


# ------------------------------------------------------------------------- refusals before any work
@pytest.mark.parametrize("fields,needle", [
    ({"adapter": "none"}, "method='advclip-lora' trains LoRA adapters on the text tower.*adapter='none'"),
    ({"lora_towers": "image"}, "lora_towers='image'.*method='tecoa'"),
    ({"lora_rank": 0}, "lora_rank=0: must be an integer >= 1"),
    ({"lora_targets": "q,x"}, "lora_targets=.*'x' is not one of q, k, v, o"),
    ({"shots": -1}, "shots=-1: must be an integer >= 0"),
])
def test_bad_configs_are_refused(tmp_path, fields, needle):
    with pytest.raises(ConfigError, match=needle):
        _cfg(tmp_path / "run", **fields)


@pytest.mark.parametrize("fields,needle", [
    ({"shots": 200}, "shots=200: class '.*' has only \\d+ training images in 'digits'"),
    ({"shots": 1, "batch_size": 16}, "batch_size=16: larger than the training set \\(10 images, the 1-shot subset\\)"),
])
def test_data_dependent_refusals_come_before_any_training(tmp_path, fields, needle):
    cfg = _cfg(tmp_path / "run", **fields)
    with pytest.raises(ConfigError, match=needle):
        lorekit.train(cfg, progress=False)
    assert not (tmp_path / "run").exists()
