"""The full-size path on the CPU: a real open_clip architecture (ViT-B-32 at 224 px) fine-tuned with FARE and LORE
on an image folder, evaluated and exported, so the parts the embedded 32-px model never reaches are exercised in
CI: resizing non-square images, normalisation, class embeddings from folder names, checkpoints, export.

The weights are random (nothing is downloaded), drawn once and saved as a checkpoint file that the runs name as
`pretrained`: a run from `pretrained=''` could not be exported (its text tower was never saved), and the export
must ship the text tower the run was trained against. The model is built once per module; every step is as
small as it can be (batch 2, PGD-1, K = 2, 3 test images).
"""

import copy
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import to_tensor

from lorekit.config import TrainConfig
from lorekit.export import export
from lorekit.rundir import CHECKPOINT, ENCODER, read_metrics
from lorekit.trainer import Trainer
from lorekit.workbench import setup

CLASSES = ("blue_stripes", "green_disc", "red_square")  # sorted, as ImageFolder orders them
SIZE = (160, 200)  # H × W: non-square and not 224, so both resize paths crop


def _image(kind: str, rng: np.random.Generator) -> Image.Image:
    yy, xx = np.mgrid[:SIZE[0], :SIZE[1]]
    a = np.zeros((*SIZE, 3), np.int64)
    if kind == "red_square":
        a[40:120, 60:140] = (220, 30, 30)
    elif kind == "green_disc":
        a[(yy - 80) ** 2 + (xx - 100) ** 2 < 50 ** 2] = (30, 200, 60)
    else:
        a[(xx // 16) % 2 == 0] = (40, 60, 220)
    return Image.fromarray(np.clip(a + rng.integers(-20, 20, a.shape), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """(workbench, {method: run dir}, scratch folder): the image folder, the random base weights, one FARE and one
    LORE run. The scratch folder (~3 GB: weights, checkpoints, an export) is deleted at the end."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine two OpenMP threads stall each other (measured: 4× slower)
    root = tmp_path_factory.mktemp("full_size")
    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("test", 1)):
        for kind in CLASSES:
            (root / "images" / split / kind).mkdir(parents=True)
            for i in range(n):
                _image(kind, rng).save(root / "images" / split / kind / f"{i}.png")
    torch.save(open_clip.create_model("ViT-B-32").state_dict(), root / "random-vit-b-32.pt")
    cfg = TrainConfig(model="ViT-B-32", pretrained=str(root / "random-vit-b-32.pt"), dataset=str(root / "images"),
                      steps=2, batch_size=2, attack_steps=1, eval_every=0, eval_samples=3,
                      checkpoint_every=2, lr=1e-4, device="cpu")
    wb = setup(cfg)
    runs = {}
    try:
        for method in ("fare", "lore"):
            run_cfg = replace(cfg, method=method, primal_steps=2 if method == "lore" else 1,
                              run_dir=str(root / "runs" / method))
            # No eval set: the final evaluation is the workbench's, below, not the trainer's.
            Trainer(run_cfg, copy.deepcopy(wb.clip.encoder), wb.data.train, class_embeddings=wb.class_embeddings,
                    reference=wb.original, base_weights=wb.base_weights).fit(progress=False)
            runs[method] = run_cfg.run_path
        yield wb, runs, root
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(root, ignore_errors=True)


def test_the_folder_is_read_at_the_model_size_with_its_class_names(bench):
    wb, _, _ = bench
    assert wb.data.classnames == ["blue stripes", "green disc", "red square"]
    assert wb.clip.encoder.image_size == (224, 224)
    assert wb.images.shape == (3, 3, 224, 224) and 0 <= wb.images.min() and wb.images.max() <= 1
    assert wb.labels.tolist() == [0, 1, 2]
    w = wb.class_embeddings
    assert w.shape == (3, 512) and torch.allclose(w.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert (w @ w.T - torch.eye(3)).abs().max() < 1 - 1e-4  # three different class names, three embeddings


@pytest.mark.parametrize("method,updates,update_images", [("fare", 2, 2 * 2), ("lore", 2 * 2, 2 * 2 * 2 * 2)])
def test_fare_and_lore_train_and_checkpoint_the_full_size_encoder(bench, method, updates, update_images):
    wb, runs, _ = bench
    run = runs[method]
    records = [r for r in read_metrics(run) if r["kind"] == "train"]
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["loss"]) for r in records)
    last = records[-1]
    assert last["updates"] == updates and last["passes_fwd_update"] == update_images  # K = 2, LORE on [x+δ; x]
    assert last["passes_fwd_attack"] == last["passes_bwd_attack"] == 2 * 2  # PGD-1, batch 2, two steps
    state = torch.load(run / CHECKPOINT, map_location="cpu", weights_only=True)
    encoder = torch.load(run / ENCODER, map_location="cpu", weights_only=True)
    assert state["step"] == 2 and state["base_weights"] == wb.base_weights
    assert all(torch.equal(state["encoder"][k], v) for k, v in encoder.items())
    assert not torch.equal(encoder["visual.proj"], wb.original.state_dict()["visual.proj"])


def test_the_fine_tuned_encoder_evaluates(bench):
    wb, runs, _ = bench
    result = wb.evaluate(wb.encoder_of(runs["lore"]), [4 / 255], steps=1, rho=0.1)
    assert set(result) == {"clean_acc", "robust_acc@4", "cosine", "fidelity", "satisfied"}
    assert 0 <= result["robust_acc@4"] <= result["clean_acc"] <= 1
    assert result["cosine"] < 1 - 1e-4 and result["fidelity"] > 0


def test_the_export_loads_in_open_clip_and_matches_with_open_clips_own_preprocessing(bench):
    wb, runs, root = bench
    folder = export(runs["lore"], root / "lore-vit-b-32", formats=("safetensors",))
    model, _, preprocess = open_clip.create_model_and_transforms(
        "ViT-B-32", pretrained=str(folder / "open_clip_model.safetensors"))
    model.eval()
    state, trained = model.state_dict(), torch.load(runs["lore"] / ENCODER, weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in trained.items())  # ImageEncoder's "visual." keys, unchanged
    base = wb.clip.model.state_dict()  # the workbench's model: base text tower and logit scale
    assert all(torch.equal(state[k], v) for k, v in base.items() if not k.startswith("visual."))
    # The same PNGs through open_clip's PIL preprocessing and through lorekit's ImageEncoder (resize, crop and
    # normalise inside forward): the same embeddings, up to PIL's 8-bit resampling.
    images = [Image.open(p).convert("RGB") for p in sorted(Path(wb.cfg.dataset).glob("test/*/*.png"))]
    tuned = wb.encoder_of(runs["lore"])
    with torch.no_grad():
        theirs = model.encode_image(torch.stack([preprocess(im) for im in images]))
        ours = tuned(torch.stack([to_tensor(im) for im in images]))  # 160 × 200: resized inside the encoder
    assert ours.shape == theirs.shape == (3, 512)
    relative = ((ours - theirs).norm(dim=-1) / theirs.norm(dim=-1)).max()
    between_images = ((theirs - theirs.roll(1, 0)).norm(dim=-1) / theirs.norm(dim=-1)).min()
    assert relative < 1e-2 < between_images, (relative, between_images)
