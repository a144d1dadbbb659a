"""The modality gap (Liang et al. 2022) by hand, linear separability, the representations analysis
per family, and one small UMAP fit (coordinates are never asserted: UMAP is not reproducible)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import probe  # noqa: F401  (registers models and analyses)
from probe.analyses import representations as R
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


def test_representations_per_family_without_umap():
    torch.set_num_threads(1)
    out = execute(RunSpec(analysis="representations", model="git", weights="demo", save=False,
                          params={"data": "shapes:24", "umap": False}))
    res = out.result
    assert res.joint and [p["name"] for p in res.pairs] == ["t0", "t1", "t2"]
    assert all(p["image_hook"] == p["text_hook"] for p in res.pairs)  # image and text tokens of one decoder layer
    assert torch.isfinite(res.arrays["gap"]).all() and (res.arrays["gap"] > 0).all()
    assert set(out.figures) == {"modality_gap"}
    mmca = execute(RunSpec(analysis="representations", model="mmca", weights="demo", save=False,
                           params={"data": "shapes:8", "umap": False})).result
    assert all("widths differ" in p["skipped"] for p in mmca.pairs)  # 64-wide vision, 96-wide text: no common space
    blip = execute(RunSpec(analysis="representations", model="blip", weights="demo", save=False,
                           params={"data": "shapes:8", "umap": False})).result
    assert [(p["image_hook"], p["text_hook"]) for p in blip.pairs][0] == ("vision.blocks.0.resid_post",
                                                                            "text.blocks.0.resid_post")


@pytest.mark.slow
def test_one_small_umap_fit_and_its_figure(tmp_path, monkeypatch, caplog):
    """The only UMAP fit of the suite (numba compiles on it); coordinates are not asserted."""
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba"))
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(40, 8)), rng.normal(size=(40, 8)) + 5])
    with caplog.at_level("INFO", logger="probe.analyses.representations"):
        xy = R.umap_2d(x, seed=0, n_neighbors=10)
    assert xy.shape == (80, 2) and np.isfinite(xy).all()
    assert R.numba_cache_dir() == str(tmp_path / "numba")
    res = R.RepresentationsResult(
        arrays={"gap": torch.tensor([0.5]), "separability": torch.tensor([0.9]), "umap.0": torch.from_numpy(xy),
                "umap_modality.0": torch.tensor([0] * 40 + [1] * 40), "umap_label.0": torch.tensor([0, 1, -1, 2] * 20)},
        model="m", label="colour", pairs=[{"name": "t0", "gap": 0.5, "separability": 0.9}])
    assert set(R.render_representations(res)) == {"modality_gap", "umap"}


def test_refusals(capsys, store_root):
    for argv, needle in [
        (["--model", "vit-standard"], "needs a model that can caption"),
        (["--model", "git", "--data", "shapes:0"], "shapes:N"),
    ]:
        assert main(["run", "representations", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
