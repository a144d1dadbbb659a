"""The modality gap (Liang et al. 2022) by hand, linear separability, the representations analysis
per family (the gap only where image and text share one space), unlabelled data, the weights check,
numba's cache folder, and one small UMAP fit (coordinates are never asserted: UMAP is not
reproducible)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import probe  # noqa: F401  (registers models and analyses)
from probe import registry
from probe.analyses import representations as R
from probe.analyses.activations import capture_set
from probe.cli import main
from probe.pipeline import RunSpec, execute
from probe.types import ProbeError


def test_gap_of_identical_sets_is_zero_and_of_orthogonal_ones_is_sqrt2():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8))
    assert R.modality_gap(x, x.copy()) == pytest.approx(0.0, abs=1e-12)
    e1, e2 = np.eye(4)[[0] * 5], 3.0 * np.eye(4)[[1] * 7]
    assert R.modality_gap(e1, e2) == pytest.approx(math.sqrt(2))
    assert R.modality_gap(x, 5 * x) == pytest.approx(0.0, abs=1e-12)  # normalised first: scale does not matter
    with pytest.raises(ProbeError, match="width"):
        R.modality_gap(x, x[:, :4])


def test_gap_of_two_gaussian_clouds_is_the_distance_of_their_normalised_means():
    rng = np.random.default_rng(1)
    mu_a, mu_b = np.array([4.0, 1.0, 0.0, 0.0]), np.array([0.0, 3.0, 2.0, 0.0])
    a = mu_a + 0.01 * rng.normal(size=(400, 4))
    b = mu_b + 0.01 * rng.normal(size=(300, 4))
    by_hand = np.linalg.norm(sum(r / np.linalg.norm(r) for r in a) / len(a) - sum(r / np.linalg.norm(r) for r in b)
                             / len(b))
    assert R.modality_gap(a, b) == pytest.approx(by_hand, rel=1e-12)
    want = np.linalg.norm(mu_a / np.linalg.norm(mu_a) - mu_b / np.linalg.norm(mu_b))
    assert R.modality_gap(a, b) == pytest.approx(want, abs=1e-3)


def test_separability_is_chance_for_one_cloud_and_one_for_two():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(600, 8)), rng.normal(size=(600, 8))
    ids = np.arange(600) // 3
    assert abs(R.separability(a, b, ids, ids) - 0.5) < 0.08
    assert R.separability(a + 4, b - 4, ids, ids) == 1.0


def test_the_gap_is_measured_only_where_image_and_text_share_one_space(tmp_path):
    """GIT (image tokens in the decoder stream): a rotation of that one stream leaves every gap as
    it is. BLIP and ViT-GPT2 (cross-attention) and MMCA: vision layer i and text layer i are two
    spaces, where a rotation of one side would change the gap, so every pair is skipped with the
    reason, before anything is captured."""
    torch.set_num_threads(1)
    git = registry.load_model("git", weights="demo")
    ds = capture_set(git, "shapes:12", tmp_path / "git", groups=["patches", "text"], progress=False)
    params = R.RepresentationsParams(umap=False, folds=3)
    res = R.represent(ds, params, "git")
    assert res.joint and [p["name"] for p in res.pairs] == ["t0", "t1", "t2"]
    assert all(p["image_hook"] == p["text_hook"] for p in res.pairs)  # image and text tokens of one decoder layer
    assert torch.isfinite(res.arrays["gap"]).all() and (res.arrays["gap"] > 0).all()
    q = np.linalg.qr(np.random.default_rng(0).normal(size=(ds.index["dims"]["text.blocks.0.resid_post/text"],) * 2))[0]
    real = ds.load
    ds.load = lambda hook, group, rows=None: real(hook, group, rows) @ q  # type: ignore[method-assign]
    rotated = R.represent(ds, params, "git")
    np.testing.assert_allclose(rotated.arrays["gap"].numpy(), res.arrays["gap"].numpy(), rtol=1e-5)
    for model, why in (("blip", "only cross-attends"), ("vit-gpt2", "only cross-attends"), ("mmca", "visual stream")):
        out = execute(RunSpec(analysis="representations", model=model, weights="demo", save=False,
                              params={"data": "shapes:8", "umap": False}))
        assert [p["skipped"] for p in out.result.pairs] != [] and all(why in p["skipped"] for p in out.result.pairs)
        assert torch.isnan(out.result.arrays["gap"]).all() and set(out.figures) == {"modality_gap"}
        assert any(why in line for line in out.lines)


def test_unlabelled_data_gives_the_gap_and_a_umap_by_modality_only(tmp_path, monkeypatch, store_root, capsys):
    torch.set_num_threads(1)
    from probe.data.shapes import iter_split

    plain = tmp_path / "plain"
    plain.mkdir()
    for s in iter_split("test", 5):
        s.image.save(plain / f"{s.index}.png")
    monkeypatch.setattr(R, "umap_2d", lambda x, seed=0: np.random.default_rng(seed).normal(size=(len(x), 2))
                        .astype(np.float32))  # the real fit is in the slow test below
    out = execute(RunSpec(analysis="representations", model="git", weights="demo", save=False,
                          params={"data": str(plain), "folds": 2, "max_points": 20}))
    res = out.result
    assert torch.isfinite(res.arrays["gap"]).all() and torch.isfinite(res.arrays["separability"]).all()
    assert "umap.0" in res.arrays and "umap_modality.0" in res.arrays and "umap_label.0" not in res.arrays
    assert any("no labels" in n for n in res.notes) and any("no labels" in line for line in out.lines)
    assert set(out.figures) == {"modality_gap", "umap"} and res.activations == ""
    labelled = R.RepresentationsResult(  # with labels: a second row by label
        arrays={**res.arrays, **{f"umap_label.{k}": torch.zeros(len(res.arrays[f"umap.{k}"]), dtype=torch.int64)
                                 for k in range(len(res.pairs))}},
        model="git", label="colour", pairs=res.pairs)
    assert len(R.render_representations(labelled)["umap"].axes) == 2 * len(out.figures["umap"].axes)
    # a stored set captured from other weights is refused, as probes does
    acts = tmp_path / "acts"
    capture_set(registry.load_model("git", weights="demo"), str(plain), acts, groups=["patches", "text"],
                progress=False)
    assert main(["run", "representations", "--model", "git", "--weights", "random", "--data", str(acts),
                 "--no-umap"]) == 2
    assert "captured from other weights of git" in capsys.readouterr().err
    assert not store_root.exists() or not any(store_root.iterdir())


def test_numba_cache_folder_and_umap_refusals(tmp_path, monkeypatch):
    import numba

    monkeypatch.setenv("NUMBA_CACHE_DIR", "x")  # so that monkeypatch restores the variable numba_cache_dir sets
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "")  # empty: ignored (the XDG spec), never the working folder
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")  # numba was imported before the variable was set
    want = str(tmp_path / "home" / ".cache" / "probe" / "numba")
    assert R.numba_cache_dir() == want and Path(want).is_dir() and os.environ["NUMBA_CACHE_DIR"] == want
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]
    # numba binds a cached function to its folder when the function is decorated (for umap: on import)
    (tmp_path / "nbmod").mkdir()
    (tmp_path / "nbmod" / "probe_nb_probe.py").write_text("import numba\n\n\n@numba.njit(cache=True)\n"
                                                          "def f(x):\n    return 2 * x + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path / "nbmod"))
    monkeypatch.delitem(sys.modules, "probe_nb_probe", raising=False)
    import probe_nb_probe

    assert probe_nb_probe.f(2) == 5
    assert list(Path(want).rglob("probe_nb_probe.f-*.nbi")) and not list((tmp_path / "nbmod").rglob("*.nbi"))
    with pytest.raises(ProbeError, match="at least 4 points"):
        R.umap_2d(np.zeros((3, 4)))


UMAP_CHILD = """
import json, sys
import numba  # imported first: numba has read its environment before probe picks the cache folder
import numpy as np
from numba.core.dispatcher import Dispatcher
from probe.analyses import representations as R
x = np.concatenate([np.random.default_rng(0).normal(size=(40, 8)), np.random.default_rng(1).normal(size=(40, 8)) + 5])
xy = R.umap_2d(x, seed=0, n_neighbors=10)
paths = sorted({v._cache._cache_path for name, m in list(sys.modules.items()) if name.split(".")[0] in ("umap", "pynndescent")
                for v in vars(m).values() if isinstance(v, Dispatcher) and hasattr(v._cache, "_cache_path")})
print(json.dumps({"shape": list(xy.shape), "finite": bool(np.isfinite(xy).all()), "folder": R.numba_cache_dir(),
                  "cache_paths": paths}))
"""


@pytest.mark.slow
def test_one_small_umap_fit_caches_numba_where_it_says(tmp_path):
    """The only UMAP fit of the suite (numba compiles on it; coordinates are not asserted), in a
    process of its own so that numba is imported before probe sets the folder."""
    import importlib.util

    # where numba's default locator would write: beside the sources (found without importing them)
    trees = [Path(importlib.util.find_spec(m).origin).parent / "__pycache__" for m in ("umap", "pynndescent")]
    before = {p: p.stat().st_mtime_ns for t in trees for p in t.glob("*.nb*")}
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    proc = subprocess.run([sys.executable, "-c", UMAP_CHILD], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    folder = tmp_path / "xdg" / "probe" / "numba"
    assert got["shape"] == [80, 2] and got["finite"] and got["folder"] == str(folder)
    assert got["cache_paths"] and all(Path(p).parent == folder for p in got["cache_paths"])  # every cached function
    cached = [p.relative_to(folder).parts[0] for p in folder.rglob("*.nbi")]
    assert any(d.startswith("umap") for d in cached) and any(d.startswith("pynndescent") for d in cached)
    assert {p: p.stat().st_mtime_ns for t in trees for p in t.glob("*.nb*")} == before  # nothing into site-packages


def test_refusals(capsys, store_root):
    for argv, needle in [
        (["--model", "vit-standard"], "needs a model that can caption"),
        (["--model", "git", "--data", "shapes:0"], "shapes:N"),
        (["--model", "git", "--data", "shapes:3"], "5 folds grouped by image need at least 5"),
    ]:
        assert main(["run", "representations", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
