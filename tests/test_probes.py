"""Linear probes: control labels, the grouped split against leakage, memorisation of the control
task, baseline and CI by hand (and on small data), memory bounds (bootstrap, one-hot, kept rows
only), the zoo-ViT colour result and its README table, refusals."""

from __future__ import annotations

import importlib.util
import json
import tracemalloc

import numpy as np
import pytest
import torch

import probe  # noqa: F401  (registers models and analyses)
from probe import registry
from probe.analyses import probes as P
from probe.analyses.activations import capture_set
from probe.cli import main
from probe.pipeline import RunSpec, execute


def test_control_labels_are_fixed_per_type_and_follow_the_label_distribution():
    rng = np.random.default_rng(0)
    types = rng.integers(0, 2000, 50_000)
    labels = rng.choice(4, 50_000, p=[0.55, 0.25, 0.15, 0.05])
    c = P.control_labels(types, labels, seed=3)
    for t in np.unique(types)[:200]:
        assert len(np.unique(c[types == t])) == 1  # one label per type
    per_type = np.array([c[types == t][0] for t in np.unique(types)])
    freq = np.bincount(per_type, minlength=4) / len(per_type)
    np.testing.assert_allclose(freq, [0.55, 0.25, 0.15, 0.05], atol=0.035)  # drawn from the empirical distribution
    assert (P.control_labels(types, labels, seed=3) == c).all() and not (P.control_labels(types, labels, 4) == c).all()


def test_the_grouped_split_stops_leakage_across_images():
    """Each image has a random label and its rows share an image-specific vector: a row split lets
    the probe recognise images seen in training (accuracy near 1), a grouped split cannot (chance)."""
    from sklearn.model_selection import KFold, cross_val_predict

    rng = np.random.default_rng(0)
    n_img, per, dim = 200, 6, 256  # more dimensions than images: random image labels are linearly separable
    label = rng.integers(0, 2, n_img)
    centre = rng.normal(size=(n_img, dim)) * 3
    images = np.repeat(np.arange(n_img), per)
    x = centre[images] + rng.normal(size=(n_img * per, dim)) * 0.5
    y = label[images]
    leaky = (cross_val_predict(P.make_probe(), x, y, cv=KFold(5, shuffle=True, random_state=0)) == y).mean()
    grouped = P.probe_layer(x, y, images, images, folds=5)
    assert leaky > 0.95
    assert abs(grouped["accuracy"] - 0.5) < 0.08, grouped["accuracy"]
    assert grouped["ci"][0] < 0.5 < grouped["ci"][1]


def test_the_control_task_is_learnable_by_memorisation():
    rng = np.random.default_rng(1)
    types = rng.integers(0, 64, 4000)  # e.g. patch positions
    images = np.arange(4000) // 4
    y = rng.integers(0, 4, 4000)
    ctrl = P.control_labels(types, y, seed=0)
    assert P.control_ceiling(types, ctrl, images) > 0.99  # a one-hot of the type reaches it
    noise = rng.normal(size=(4000, 16))  # a representation that knows nothing of the type stays near chance
    s = P.probe_layer(noise, y, images, types, control=ctrl)
    assert s["control"] < 0.45 and abs(s["selectivity"]) < 0.1


def test_baseline_and_confidence_interval_by_hand():
    y = np.array([0] * 70 + [1] * 30)
    images = np.arange(100)
    x = np.zeros((100, 2))  # nothing to learn: the probe predicts a majority
    s = P.probe_layer(x, y, images, images, folds=5)
    assert s["baseline"] == pytest.approx(0.7)
    lo, hi = P.image_bootstrap_ci(np.ones(50, bool), np.arange(50))
    assert lo == hi == 1.0
    correct = np.array([True] * 60 + [False] * 40)
    lo, hi = P.image_bootstrap_ci(correct, np.arange(100), n_boot=4000)
    se = np.sqrt(0.6 * 0.4 / 100)  # independent images: the binomial interval
    assert lo == pytest.approx(0.6 - 1.96 * se, abs=0.02) and hi == pytest.approx(0.6 + 1.96 * se, abs=0.02)
    # rows of one image are one draw: 10 images of 10 identical rows is as wide as 10 rows
    wide = P.image_bootstrap_ci(np.repeat(correct[::10], 10), np.repeat(np.arange(10), 10))
    assert wide[1] - wide[0] > 2 * (hi - lo)


def test_the_majority_baseline_is_the_majority_on_small_data():
    """Folds stratified by the label: a held-out fold's majority is the training majority, so the
    out-of-fold baseline no longer falls below chance (unstratified GroupKFold gave 0.0 here)."""
    y = np.array([0, 0, 1, 1, 2, 2, 0, 1, 2, 0, 1, 2])
    for seed in range(3):
        s = P.probe_layer(np.zeros((12, 2)), y, np.arange(12), np.arange(12), folds=5, seed=seed, n_boot=20)
        assert s["baseline"] == pytest.approx(1 / 3) and s["majority"] == pytest.approx(1 / 3)
    folds = P.grouped_folds(np.repeat(np.arange(40), 2), np.repeat(np.arange(40) % 4, 2), 5)
    for _, test in folds:  # grouped (an image's two rows together) and stratified (10 images of each class)
        assert np.bincount(np.repeat(np.arange(40) % 4, 2)[test], minlength=4).tolist() == [4, 4, 4, 4]


def test_bootstrap_and_control_ceiling_memory_stay_bounded():
    rng = np.random.default_rng(0)
    correct, images = rng.random(20_000) < 0.7, np.arange(20_000)
    tracemalloc.start()
    lo, hi = P.image_bootstrap_ci(correct, images, n_boot=500)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 40e6, peak  # (n_boot x images) at once was 160 MB
    assert lo < correct.mean() < hi and (lo, hi) == P.image_bootstrap_ci(correct, images, n_boot=500)
    small = P.image_bootstrap_ci(correct, images, n_boot=500, chunk=20_000 * 7)  # other chunks: same interval
    assert small == pytest.approx((lo, hi), abs=0.003)
    types = rng.integers(0, 1000, 2000)  # e.g. token ids: a dense one-hot grows with rows x vocabulary
    ctrl = P.control_labels(types, rng.integers(0, 4, 2000))
    P.control_ceiling(types[:40], ctrl[:40], np.arange(40))  # imports first: they are not the one-hot's
    tracemalloc.start()
    ceiling = P.control_ceiling(types, ctrl, np.arange(2000))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8e6, peak  # dense: 2000 x 1000, scaled in float64, ~30 MB
    assert 0.5 < ceiling <= 1  # types seen in training are memorised (about 1 - e^-1.6 of them)


def test_only_the_kept_rows_of_a_layer_are_read(tmp_path, monkeypatch):
    vit = registry.load_model("vit-standard", weights="demo")
    ds = capture_set(vit, "shapes:60", tmp_path / "set", groups=["cls"], shard_size=16, progress=False)
    real, shapes = ds.load, []

    def load(hook, group, rows=None):
        x = real(hook, group, rows=rows)
        shapes.append(x.shape[0])
        return x

    monkeypatch.setattr(ds, "load", load)
    res = P.probe_set(ds, "colour", "cls", P.ProbesParams(target="colour", tokens="cls", max_rows=30, n_boot=20))
    assert res.scores[0]["rows"] < 40 and shapes == [res.scores[0]["rows"]] * 4  # whole images subsampled, then read
    assert res.activations == str((tmp_path / "set").resolve()) and res.data == "shapes:60:train"


def _table():
    spec = importlib.util.spec_from_file_location("probes_table", P.__file__.replace("analyses/probes.py",
                                                                                      "bench/probes_table.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_zoo_vits_encode_the_colour_of_the_largest_object_and_the_readme_table_is_current():
    table = _table()
    data = json.loads(table.OUT.read_text())
    assert table.readme_block(table.README.read_text()) == table.render(data), \
        "README probe table is stale: python bench/probes_table.py --readme-only"
    assert {e["model"] for e in data["entries"]} == set(table.MODELS)
    for e in data["entries"]:
        assert registry.load_model(e["model"], weights="demo").weights.sha256 == e["sha256"], \
            f"{e['model']}'s zoo weights changed: rerun python bench/probes_table.py"
        b = table.best(e)
        assert b["accuracy"] >= 0.9 and b["selectivity"] >= 0.2, e["model"]  # the bar, per kind
        assert e["control_ceiling"] > 0.9
    fresh = table.run_model("vit-standard", data["n"])  # the file is what the code gives now
    assert fresh["layers"] == data["entries"][0]["layers"]


def test_per_patch_probe_gives_a_heat_map_over_the_grid():
    torch.set_num_threads(1)
    out = execute(RunSpec(analysis="probes", model="vit-standard", weights="demo", save=False,
                          params={"target": "shape", "tokens": "patches", "data": "shapes:150", "n_boot": 50}))
    res = out.result
    maps = res.arrays["patch_accuracy"]
    assert maps.shape == (4, 8, 8) and res.grid == [8, 8]
    assert torch.isfinite(maps).any() and ((maps[torch.isfinite(maps)] >= 0) & (maps[torch.isfinite(maps)] <= 1)).all()
    assert res.type == "the patch position"
    assert max(s["accuracy"] for s in res.scores) > max(s["baseline"] for s in res.scores) + 0.2
    assert set(out.figures) == {"probes", "patch_accuracy"}


def test_text_tokens_of_a_captioner_are_probed_with_token_types(tmp_path):
    blip = registry.load_model("blip", weights="demo")
    ds = capture_set(blip, "shapes:120", tmp_path / "set", groups=["text"], progress=False)
    res = P.probe_set(ds, "colour", "text", P.ProbesParams(target="colour", tokens="text", n_boot=50))
    assert res.layers == [f"text.blocks.{i}.resid_post" for i in range(3)]
    assert res.type == "the token id"
    assert res.best()["accuracy"] > 0.8


def test_refusals_name_the_cause_in_one_line_before_any_work(tmp_path, capsys, store_root):
    vit = registry.load_model("vit-standard", weights="demo")
    acts = tmp_path / "vit-acts"
    capture_set(vit, "shapes:8", acts, groups=["cls"], progress=False)
    plain = tmp_path / "plain"
    plain.mkdir()
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 10, 10)).save(plain / "a.png")
    unlabelled = tmp_path / "unlabelled"
    capture_set(vit, str(plain), unlabelled, groups=["cls"], progress=False)
    cases = [
        (["--model", "vit-standard", "--tokens", "text"], "has no text stack"),
        (["--model", "blip", "--data", str(acts)], "captured from vit-standard, not blip"),
        (["--model", "vit-standard", "--data", str(acts), "--tokens", "object"], "not 'object'"),
        (["--model", "vit-standard", "--target", "count", "--data", str(plain)], "without annotations"),
        (["--model", "vit-standard", "--target", "count", "--data", str(unlabelled)], "no labels"),
        (["--model", "vit-standard", "--data", "shapes:x"], "shapes:N"),
        (["--model", "vit-standard", "--data", "shapes:6"], "has 6 images; 5 folds grouped by image need at least 10"),
    ]
    for argv, needle in cases:
        assert main(["run", "probes", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
        assert not store_root.exists() or not any(store_root.iterdir())  # nothing ran, nothing saved
