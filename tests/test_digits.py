"""`probe data digits`: scikit-learn's digits exported in the class-per-folder layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from probe.cli import main
from probe.data import load_labelled
from probe.data.digits import MANIFEST, load_digits_arrays, stratified_split, to_uint8, write_digits
from probe.io import OutputExistsError


@pytest.fixture(scope="module")
def digits():
    return load_digits_arrays()


def test_split_hand_computed_case():
    # classes of 5, 3, 2 items, 4 to test: exact shares 2, 1.2, 0.8 -> floors 2, 1, 0; the one left
    # goes to the largest fractional part (class 2)
    labels = np.array([0] * 5 + [1] * 3 + [2] * 2)
    train, test = stratified_split(labels, 4, seed=3)
    assert np.bincount(labels[test]).tolist() == [2, 1, 1]
    assert np.bincount(labels[train]).tolist() == [3, 2, 1]
    assert sorted([*train, *test]) == list(range(10)) and list(test) == sorted(test)


def test_split_sizes_stratification_and_determinism(digits):
    _, y = digits
    train, test = stratified_split(y, 397, seed=0)
    assert (len(train), len(test)) == (1400, 397) and not set(train) & set(test)
    counts = np.bincount(y)
    got = np.bincount(y[test], minlength=10)
    share = counts * 397 / len(y)
    assert np.all((got == np.floor(share)) | (got == np.ceil(share))), (got, share)
    a, b = stratified_split(y, 397, seed=0), stratified_split(y, 397, seed=0)
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0])
    other = stratified_split(y, 397, seed=1)[1]
    assert not np.array_equal(other, test) and np.array_equal(np.bincount(y[other]), got)


def test_split_refuses_sizes_that_empty_a_class():
    labels = np.repeat(np.arange(10), 5)
    for n_test in (0, 5, 46, 50):  # 5 -> five classes get no test item; 46 -> six keep no train item
        with pytest.raises(ValueError, match="test"):
            stratified_split(labels, n_test)


def test_intensity_and_resampling():
    img = np.zeros((1, 8, 8))
    img[0, 0, 0], img[0, 0, 1], img[0, 7, 7] = 16, 8, 1
    near = to_uint8(img, 32, "nearest")[0]
    assert near.shape == (32, 32) and near.dtype == np.uint8
    assert (near[:4, :4] == 255).all() and (near[:4, 4:8] == 128).all() and (near[28:, 28:] == 16).all()
    assert near.sum() == 16 * (255 + 128 + 16)
    grey = to_uint8(img, 8)[0]
    cubic = np.asarray(Image.fromarray(grey, "L").resize((32, 32), Image.Resampling.BICUBIC))
    assert np.array_equal(to_uint8(img, 32)[0], cubic)  # bicubic is the default
    with pytest.raises(ValueError, match="resampling"):
        to_uint8(img, 32, "lanczos")


def test_export_layout_read_back_and_manifest(tmp_path, digits):
    x, y = digits
    out = write_digits(tmp_path / "d", size=16, seed=2)
    for split, n in (("train", 1400), ("test", 397)):
        assert sorted(p.name for p in (out / split).iterdir()) == [str(c) for c in range(10)]
        ds = load_labelled(out, split, 16)
        assert ds.images.shape == (n, 16, 16, 3) and ds.classes == [str(c) for c in range(10)]
    train_idx, test_idx = stratified_split(y, 397, seed=2)
    files = sorted(out.glob("test/*/*.png"))
    assert sorted(int(p.stem) for p in files) == test_idx.tolist()
    pixels = to_uint8(x, 16)
    for p in files[::40]:  # each file is its load_digits row, in the folder of its digit
        i = int(p.stem)
        assert p.parent.name == str(y[i]) and np.array_equal(np.asarray(Image.open(p)), pixels[i])
    m = json.loads((out / MANIFEST).read_text())
    assert (m["n_train"], m["n_test"], m["image_size"], m["resample"], m["seed"]) == (1400, 397, 16, "bicubic", 2)
    assert m["test_indices"] == test_idx.tolist()
    assert m["counts"]["train"] == {str(c): int(n) for c, n in enumerate(np.bincount(y[train_idx]))}


def test_export_at_8_read_at_32_equals_export_at_32(tmp_path):
    small, big = write_digits(tmp_path / "s", size=8), write_digits(tmp_path / "b", size=32)
    a, b = load_labelled(small, "test", 32), load_labelled(big, "test", 32)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)


def test_cli_refuses_an_existing_out_and_force_replaces(tmp_path, capsys):
    out = tmp_path / "digits"
    assert main(["data", "digits", "--out", str(out), "--size", "8", "--test", "100", "--seed", "1"]) == 0
    assert "wrote the digits" in capsys.readouterr().out
    assert len(list(out.glob("test/*/*.png"))) == 100 and len(list(out.glob("train/*/*.png"))) == 1697
    before = sorted(p.name for p in out.glob("test/*/*.png"))
    assert main(["data", "digits", "--out", str(out), "--size", "8", "--test", "200"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--force" in err
    assert sorted(p.name for p in out.glob("test/*/*.png")) == before  # untouched
    assert main(["data", "digits", "--out", str(out), "--size", "8", "--test", "200", "--force"]) == 0
    assert len(list(out.glob("test/*/*.png"))) == 200
    user = tmp_path / "mine"
    user.mkdir()
    (user / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="not written by probe"):
        write_digits(user, size=8, force=True)
    for argv, says in ((["--test", "5"], "no test or no train"), (["--size", "4"], "--size 4"),
                       (["--resample", "box"], "invalid choice")):
        assert main(["data", "digits", "--out", str(tmp_path / "bad"), *argv]) == 2
        assert says in capsys.readouterr().err
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".incomplete-*"))


def test_a_short_vit_run_on_digits_beats_chance(tmp_path, capsys):
    """`probe data digits` then `probe train vit` on it: 80 steps of a tiny standard ViT (about 2 s)
    reach well above the 10% of chance (0.49-0.61 over seeds 0-3 when written)."""
    data = tmp_path / "digits"
    assert main(["data", "digits", "--out", str(data), "--size", "16", "--test", "200"]) == 0
    ckpt = tmp_path / "ckpt"
    assert main(["train", "vit", "--data", str(data), "--out", str(ckpt), "--epochs", "3", "--max-steps", "80",
                 "--batch-size", "32", "--dim", "32", "--depth", "1", "--heads", "2", "--image-size", "16",
                 "--lr", "3e-3", "--warmup", "0.1", "--clip", "1"]) == 0
    card = json.loads((ckpt / "config.json").read_text())
    assert card["train"]["steps"] == 80 and (card["train"]["warmup"], card["train"]["clip"]) == (0.1, 1.0)
    assert card["metrics"]["test_n"] == 200 and card["metrics"]["test_top1"] > 0.3, card["metrics"]
    for flag, says in ((["--warmup", "1"], "--warmup 1.0"), (["--clip", "-1"], "--clip -1.0"),
                       (["--clip", "nan"], "--clip nan")):
        assert main(["train", "vit", "--data", str(data), "--out", str(tmp_path / "no"), *flag]) == 2
        assert says in capsys.readouterr().err and not (tmp_path / "no").exists()
