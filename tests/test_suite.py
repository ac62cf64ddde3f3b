"""The embedded suite's domains and the text renderer: deterministic, well-formed, drawn inside the image."""

import open_clip
import pytest
import torch

import lorekit.models  # noqa: F401 (registers the lorekit-tiny config)
from lorekit.data import load_dataset
from lorekit.render import PALETTE, TextStyle, draw_text, random_styles, text_masks
from lorekit.suite import SUITE, load_domain


@pytest.fixture(scope="module")
def suite():
    return {name: load_domain(name) for name in SUITE}


@pytest.mark.parametrize("name", SUITE)
def test_domain_is_well_formed(suite, name):
    b = suite[name]
    assert b.name == name and len(b.classnames) == len(set(b.classnames)) == 10
    for split in (b.train, b.test):
        x, y = split.tensors
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32) and len(x) == len(y)
        assert x.min() >= 0 and x.max() <= 1
        counts = torch.bincount(y, minlength=10)
        assert len(counts) == 10 and counts.min() >= 0.9 * counts.max()  # every class, balanced
    assert len(b.train) >= 1000 and len(b.test) >= 390
    train_rows = {row.numpy().tobytes() for row in b.train.tensors[0]}
    assert not any(row.numpy().tobytes() in train_rows for row in b.test.tensors[0])  # disjoint splits


@pytest.mark.parametrize("name", SUITE)
def test_domain_is_the_same_bits_every_time(suite, name):
    again = load_domain(name)
    for a, b in ((suite[name].train, again.train), (suite[name].test, again.test)):
        assert all(torch.equal(s, t) for s, t in zip(a.tensors, b.tensors))


def test_procedural_domains_are_in_colour_where_digits_are_grey(suite):
    for name, b in suite.items():
        x = b.test.tensors[0]
        coloured = ((x - x.mean(1, keepdim=True)).abs().amax((1, 2, 3)) > 0.1).float().mean()
        assert coloured == 0 if name == "digits" else coloured > 0.7, name  # white or grey on dark: not coloured


def test_prompts_are_well_formed_and_fit_the_tiny_context(suite):
    tokenizer = open_clip.get_tokenizer("lorekit-tiny")
    context = open_clip.get_model_config("lorekit-tiny")["text_cfg"]["context_length"]
    for b in suite.values():
        assert len(b.templates) >= 3 and all("{c}" in t for t in b.templates)
        for t in b.templates:
            for c in b.classnames:
                assert len(tokenizer.encode(t.format(c=c))) + 2 <= context, t.format(c=c)  # + start, end


def test_load_dataset_resolves_suite_names():
    b = load_dataset("shapes", image_size=16)
    assert b.classnames[0] == "circle" and b.train.tensors[0].shape[1:] == (3, 16, 16)


@pytest.mark.parametrize("size", [32, 64, 224])
def test_text_is_drawn_inside_the_image(size):
    images = torch.rand(12, 3, size, size, generator=torch.Generator().manual_seed(0))
    texts = ["three", "a", "three hundred and seven"] * 4
    styles = random_styles(texts, size, size, seed=1, sizes=(size // 2, size))  # larger than fits: shrunk
    out = draw_text(images, texts, styles)
    for img, new, st, text in zip(images, out, styles, texts):
        changed = (img != new).any(0)
        assert changed.any(), text
        rows, cols = changed.nonzero().unbind(1)
        x, y = st.xy
        assert 0 <= x and 0 <= y and (st.size < size // 2 if len(text) > 5 else st.size >= 1)  # long: shrunk
        assert rows.max() < size and cols.max() < size
        box = torch.zeros_like(changed)
        h, w = text_masks(text, st.font, st.size, st.stroke_width)[0].shape
        assert x + w <= size and y + h <= size
        box[y:y + h, x:x + w] = True
        assert not (changed & ~box).any()  # nothing changes outside the text's box


def test_text_is_deterministic_for_a_seed_and_differs_for_another():
    images = torch.zeros(6, 3, 224, 224)
    a, b, c = (draw_text(images, "seven", seed=s) for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_fill_colour_position_and_stroke_are_honoured():
    images = torch.zeros(1, 3, 224, 224)
    red, white = PALETTE["red"], PALETTE["white"]
    plain = draw_text(images, "eight", [TextStyle("DejaVuSans-Bold.ttf", 40, red, white, 0, (10, 20))])
    assert torch.allclose(plain[0, :, plain[0, 0].argmax() // 224, plain[0, 0].argmax() % 224], torch.tensor(red))
    assert not (plain[0, :, :20] != 0).any() and not (plain[0, :, :, :10] != 0).any()  # starts at xy
    stroked = draw_text(images, "eight", [TextStyle("DejaVuSans-Bold.ttf", 40, red, white, 3, (10, 20))])
    assert (stroked != 0).any(0).sum() > (plain != 0).any(0).sum()
    assert (stroked[0] == 1).all(0).any()  # the white stroke shows
    moved = random_styles(["eight"], 224, 224, seed=0, positions=[(1000, -5)])[0]
    assert moved.xy[1] == 0 and moved.xy[0] > 100  # clamped inside


def test_text_that_cannot_fit_is_an_error():
    with pytest.raises(ValueError, match="does not fit"):
        random_styles(["x" * 400], 8, 8, seed=0)
    with pytest.raises(ValueError, match="does not fit"):
        draw_text(torch.zeros(1, 3, 32, 32), "three", [TextStyle("DejaVuSans.ttf", 12, PALETTE["red"],
                                                                  PALETTE["white"], 0, (20, 0))])
