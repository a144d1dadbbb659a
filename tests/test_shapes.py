"""probe-shapes: determinism, exact masks, captions that agree with annotations, disjoint splits."""

from __future__ import annotations

import re

import numpy as np
import pytest

from probe.cli import main
from probe.data.shapes import BACKGROUND, COLOURS, iter_split, read_dataset, relation, rle_decode, rle_encode

PHRASE = r"a (small|large) (red|green|blue|yellow) (circle|square|triangle)"
GRAMMAR = re.compile(rf"^{PHRASE}(?: (left of|right of|above|below) {PHRASE})?((?: and {PHRASE})*)$")


def test_same_seed_same_bytes_other_seed_differs():
    a = [s.image.tobytes() for s in iter_split("train", 20, seed=3)]
    b = [s.image.tobytes() for s in iter_split("train", 20, seed=3)]
    c = [s.image.tobytes() for s in iter_split("train", 20, seed=4)]
    assert a == b and a != c


def test_masks_cover_exactly_the_drawn_pixels():
    for s in iter_split("val", 40):
        px = np.asarray(s.image)
        union = s.masks.any(0)
        assert (px[~union] == BACKGROUND).all()
        for obj, m in zip(s.objects, s.masks, strict=True):
            assert m.any() and (px[m] == COLOURS[obj.colour]).all()
            ys, xs = np.nonzero(m)
            x0, y0, x1, y1 = obj.box
            assert xs.min() >= x0 and xs.max() <= x1 and ys.min() >= y0 and ys.max() <= y1
        assert (s.masks.sum(0) <= 1).all()  # objects never overlap


def test_captions_agree_with_annotations():
    counts = set()
    for s in iter_split("train", 200):
        m = GRAMMAR.match(s.caption)
        assert m, s.caption
        o0 = s.objects[0]
        assert m.group(1, 2, 3) == (o0.size, o0.colour, o0.shape)
        counts.add(len(s.objects))
        if len(s.objects) > 1:
            i, rel, j = s.relations[0]
            assert (i, j) == (0, 1) and rel == m.group(4) == relation(s.objects[0], s.objects[1])
            o1 = s.objects[1]
            assert m.group(5, 6, 7) == (o1.size, o1.colour, o1.shape)
            assert s.caption.count(" and ") == len(s.objects) - 2
    assert counts == {1, 2, 3}


def test_splits_do_not_overlap():
    keys = {}
    for split in ("train", "val", "test"):
        keys[split] = {s.image.tobytes() for s in iter_split(split, 150)}
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"] and not keys["val"] & keys["test"]


def test_rle_round_trip():
    rng = np.random.default_rng(0)
    for first in (True, False):
        m = rng.random((9, 7)) > 0.5
        m[0, 0] = first
        assert np.array_equal(rle_decode(rle_encode(m), m.shape), m)


def test_cli_writes_and_reader_reads_back(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert main(["data", "shapes", "--n", "16", "--out", str(out), "--seed", "5", "--size", "48"]) == 0
    back = read_dataset(out)
    assert len(back) == 16 + 2 + 2 and {s.split for s in back} == {"train", "val", "test"}
    fresh = list(iter_split("test", 2, seed=5, image_size=48))
    got = [s for s in back if s.split == "test"]
    for a, b in zip(got, fresh, strict=True):
        assert a.image.tobytes() == b.image.tobytes() and a.caption == b.caption
        assert np.array_equal(a.masks, b.masks) and a.objects == b.objects
    with pytest.raises(FileNotFoundError, match="probe data shapes"):
        read_dataset(tmp_path)


def test_objects_are_listed_in_reading_order():
    for s in iter_split("train", 200):
        xs = [o.centre for o in s.objects]
        assert xs == sorted(xs)


def test_bundled_images_are_probe_shapes_test_samples():
    import numpy as np

    from probe.data import open_rgb
    from probe.data.sets import BUNDLED_IMAGES

    paths = sorted(BUNDLED_IMAGES.glob("*.png"))
    samples = list(iter_split("test", len(paths)))
    assert [p.name for p in paths] == [f"shapes_test_{s.index:03d}.png" for s in samples]
    for p, s in zip(paths, samples, strict=True):
        assert np.array_equal(np.asarray(open_rgb(p)), np.asarray(s.image))
