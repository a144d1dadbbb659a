"""The logit lens: the read-out on the last layer is the model, the per-layer statistics on hand-made
cases, the patch scoring against masks, and the analysis end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probe import registry
from probe.analyses import logit_lens as ll
from probe.analyses.grounding import patch_coverage
from probe.capture import capture
from probe.cli import main
from probe.data import ImageSet

CAPTIONERS = ("blip", "vit-gpt2", "git", "prefix-vlm", "mmca")


@pytest.fixture(scope="module")
def zoo():
    return {n: registry.load_model(n, weights="demo") for n in CAPTIONERS}


@pytest.mark.parametrize("name", CAPTIONERS)
def test_unembed_of_the_last_text_layer_is_the_model(name, zoo):
    a = zoo[name]
    images = ImageSet.shapes(2)
    batch = a.preprocess(images.images, ["a red circle", "a small blue square left of a triangle"])
    last = ll.text_layers(a)[-1]
    with torch.no_grad(), capture(a, last) as cache:
        logits = a.forward(batch)
    with torch.no_grad():
        assert torch.equal(a.unembed(cache[last][:, a.text_offset():]), logits)


def test_decided_layer_by_hand():
    agree = np.array([[1, 0, 0, 1],
                      [0, 1, 0, 1],
                      [1, 1, 0, 1]], dtype=bool)  # (layers, steps)
    np.testing.assert_array_equal(ll.decided_layer(agree), [2, 1, 3, 0])


def test_word_tokens_are_the_word_or_its_first_letter(zoo):
    for name in ("blip", "git", "vit-gpt2"):
        a = zoo[name]
        assert [a._tokens([t])[0].lstrip("Ġ") for t in ll.word_tokens(a, "red")] == ["red"]
    for name in ("prefix-vlm", "mmca"):
        assert [zoo[name]._tokens([t])[0] for t in ll.word_tokens(zoo[name], "circle")] == ["c"]


def test_patch_scoring_counts_object_and_background_patches(zoo):
    a = zoo["git"]
    images = ImageSet.shapes(1)
    sample = images.samples[0]
    cover = np.stack([patch_coverage(m, a.grid) > 0 for m in sample.masks])
    red = next(iter(ll.word_tokens(a, sample.objects[0].colour)))
    other = a._encode_text("of")[0]
    top = torch.full((1, cover.shape[1], 1), other)
    top[0, np.flatnonzero(cover[0]), 0] = red  # object 0's patches say its colour, nothing else does
    counts, totals = np.zeros((1, 4)), np.zeros((1, 4))
    ll._score_patches(a, top, images, 0, 0, counts, totals)
    background = (~cover.any(0)).sum()
    same = [k for k, o in enumerate(sample.objects) if o.colour == sample.objects[0].colour]
    assert counts[0, 0] == sum((cover[k] & cover[0]).sum() for k in same)
    assert totals[0, 0] == cover.sum() and totals[0, 1] == background * len(sample.objects)
    assert counts[0, 1] == 0 and counts[0, 2] == 0


def test_analysis_end_to_end(zoo, store_root, capsys):
    res = ll.LogitLens()(zoo["git"], ImageSet.shapes(3))
    t = res.arrays["lens.text"].numpy()
    assert t.shape == (3, 3) and t[-1, 0] == 1.0  # the last layer's lens is the model
    assert np.isclose(t[:, 1].sum(), 1.0)  # every step is decided at exactly one layer (the last at the latest)
    assert res.visual and res.arrays["lens.image"].shape == (3, 4)
    assert res.arrays["lens.image.top1"].shape == (3, 3, 64)
    for name, g in res.grids.items():
        assert tuple(res.arrays[name].shape) == (len(g["rows"]), len(g["cols"]))
    blip = ll.LogitLens()(zoo["blip"], ImageSet.shapes(2), batch_size=1)
    assert not blip.visual and "lens.image" not in blip.arrays
    assert main(["run", "logit-lens", "--model", "mmca", "--shapes", "2"]) == 0
    assert main(["run", "logit-lens", "--model", "vit-standard"]) != 0
    assert "caption" in capsys.readouterr().err
