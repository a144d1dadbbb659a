"""The bundled probe-shapes zoo: every recipe is bundled, small, loads through the public API and
re-measures at its model card's metrics; training lowers the loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probe import registry, zoo
from probe.data.metrics import caption_metrics, largest_object
from probe.data.shapes import iter_split

MAX_BYTES = 25 * 1024 * 1024


def test_every_family_is_bundled_and_the_zoo_is_small():
    assert sorted(zoo.bundled()) == sorted(zoo.RECIPES)
    assert zoo.size_bytes() <= MAX_BYTES, f"bundled weights take {zoo.size_bytes() / 1e6:.1f} MB > 25 MiB"


@pytest.mark.parametrize("name", sorted(zoo.RECIPES))
def test_bundled_checkpoint_remeasures_at_its_card(name):
    card = zoo.card(name)
    a = registry.load_model(name, weights="demo")
    assert a.weights.source == "demo"
    check = card["check"]  # the card's metrics on its first test images (the full set takes minutes)
    got = zoo.measure(a, card["task"], n_test=check["n_test"], data_seed=card["data_seed"],
                      image_size=card["recipe"]["image_size"])
    for k, v in check["metrics"].items():
        assert abs(got[k] - v) <= 0.01, f"{name} {k}: card {v:.4f}, re-measured {got[k]:.4f}"


@pytest.mark.parametrize("name", sorted(zoo.RECIPES))
def test_quality_bar_is_met_or_the_card_says_why(name):
    """Classifiers >= 90% top-1; captioners name >= 90% of objects and are far above blind. A
    family that misses must say why in its card; every captioner must beat its blind baseline."""
    c = zoo.card(name)
    q = zoo.quality(c["task"], c["metrics"])
    assert c["quality_bar"]["met"] == q["met"]
    if not q["met"]:
        assert len(c["quality_bar"]["note"]) > 40, f"{name} misses the quality bar and its card does not say why"
    if c["task"] == "caption":
        assert c["metrics"]["exact"] >= c["metrics"]["blind_exact"] + 0.30
        assert c["metrics"]["objects"] >= c["metrics"]["blind_objects"] + 0.30


def test_auto_resolves_to_the_bundled_weights(caplog):
    a = registry.load_model("vit-standard", weights="auto")
    assert a.weights.source == "demo"


def test_largest_object_ignores_ties():
    from probe.data.shapes import ShapeObject

    objs = (ShapeObject("square", "red", "large", (0, 0, 3, 3)), ShapeObject("square", "blue", "large", (5, 5, 8, 8)))
    masks = np.zeros((2, 10, 10), dtype=bool)
    masks[0, :4, :4] = masks[1, 5:9, 5:9] = True
    assert largest_object(masks, objs) is None
    masks[1, 8, 8] = False
    assert largest_object(masks, objs) == 0 and (objs[0].colour, objs[0].shape) == ("red", "square")


def test_caption_metrics_by_hand():
    s = next(iter_split("test", 1))
    assert caption_metrics([s.caption], [s])["exact"] == 1.0
    first = s.objects[0]
    m = caption_metrics([f"a {first.size} {first.colour} {first.shape}"], [s])
    assert m["objects"] == pytest.approx(1 / len(s.objects))


@pytest.mark.parametrize("name", ["vit-standard", "git"])
def test_a_short_training_run_lowers_the_loss(name, monkeypatch, tmp_path):
    torch.manual_seed(0)
    seen: list[list[float]] = []
    real = zoo.fit

    def spy(*a, **k):
        losses = real(*a, **k)
        seen.append(losses)
        return losses

    monkeypatch.setattr(zoo, "fit", spy)
    _, info = zoo.train_family(name, tmp_path / name, steps=30, n_train=256, n_test=16, progress=False)
    losses = seen[0]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert (tmp_path / name / "card.json").is_file()
    again = registry.load_model(name, weights=str(tmp_path / name))
    assert again.weights.source == "local"


def test_readme_zoo_table_is_current():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start, end = "<!-- zoo-table:start -->", "<!-- zoo-table:end -->"
    block = readme.split(start, 1)[1].split(end, 1)[0].strip()
    assert block == zoo.markdown_table(), "README zoo table is stale: paste the output of `probe zoo list` (the table)"


def test_classification_samples_carry_masks_and_the_labelled_object():
    """Issue 17.9: the zoo's data helpers give the masks and the index of the labelled object."""
    data, samples, objects = zoo.classification_samples("test", 12)
    assert len(data) == len(samples) == len(objects) == 12
    for label, s, j in zip(data.labels, samples, objects, strict=True):
        assert largest_object(s.masks, s.objects) == j
        assert data.classes[label] == f"{s.objects[j].colour} {s.objects[j].shape}"
        assert s.masks[j].sum() == max(m.sum() for m in s.masks)
