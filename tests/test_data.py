"""Images of any mode, clear errors, CIFAR-10 through a restricted unpickler, image folders."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

from probe.data.images import ImageLoadError, load_cifar10, load_image_folder, load_images, open_rgb


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "1", "LA"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    im = Image.new("RGB", (10, 6), (200, 30, 30)).convert(mode)
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    im.save(path)
    out = open_rgb(path)
    assert out.mode == "RGB" and out.size == (10, 6)


def test_corrupt_and_missing_images_are_named(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageLoadError, match="bad.jpg: cannot be read"):
        load_images([bad])
    with pytest.raises(ImageLoadError, match="no such file"):
        load_images([tmp_path / "missing.png"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageLoadError, match="holds no image"):
        load_images([empty])


def test_folder_expands_sorted(tmp_path):
    for n in ("b.png", "a.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / n)
    (tmp_path / "notes.txt").write_text("x")
    _, names = load_images([tmp_path])
    assert names == ["a.png", "b.png"]


def write_cifar(folder, n=6, seed=0):
    """A tiny file in the CIFAR-10 python format (a pickled dict with bytes keys, protocol 2)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    data = rng.integers(0, 255, (n, 3072), dtype=np.uint8)
    labels = [int(x) for x in rng.integers(0, 10, n)]
    for name in ("data_batch_1", "test_batch"):
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": b"x", b"labels": labels, b"data": data,
                         b"filenames": [b"f%d.png" % i for i in range(n)]}, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"c%d" % i for i in range(10)], b"num_vis": 3072}, f, protocol=2)
    return data, labels


def test_cifar_round_trip(tmp_path):
    data, labels = write_cifar(tmp_path / "cifar-10-batches-py")
    ds = load_cifar10(tmp_path, "train")
    assert ds.images.shape == (6, 32, 32, 3) and ds.labels.tolist() == labels
    # channel-first rows of 1024 red, then green, then blue
    assert ds.images[2, 0, 1, 0] == data[2, 1] and ds.images[2, 0, 1, 2] == data[2, 2048 + 1]
    assert ds.classes[3] == "c3"


def test_cifar_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned",))

    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(ValueError, match="not allowed"):
        load_cifar10(tmp_path, "train")


def test_image_folder(tmp_path):
    for c, col in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / c).mkdir()
        for i in range(2):
            Image.new("RGB", (20, 20), col).save(tmp_path / c / f"{i}.png")
    ds = load_image_folder(tmp_path, 8)
    assert ds.classes == ["cat", "dog"] and ds.images.shape == (4, 8, 8, 3) and ds.labels.tolist() == [0, 0, 1, 1]
