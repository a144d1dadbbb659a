"""Faithfulness scores: coverage, pointing game, energy, their random baselines, deletion and
insertion curves, the model-facing removal scorers, cascading randomisation, Spearman."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from probe import registry
from probe.analyses import grounding
from probe.analyses.ablation import patches_under, vision_outputs
from probe.capture import Precomputed, capture, intervene
from probe.data.shapes import iter_split
from probe.models.blip import BlipAdapter
from probe.models.git import GitAdapter
from probe.types import VISION_OUTPUT


@pytest.fixture(scope="module")
def samples():
    return list(iter_split("test", 3))


@pytest.fixture(scope="module")
def short(samples):
    """Samples whose captions fit a character captioner's 64 positions."""
    return [s for s in iter_split("test", 12) if len(s.caption) < 50][:2]


@pytest.fixture(scope="module")
def mmca():
    return registry.load_model("mmca")  # the zoo checkpoint (trained), else random


@pytest.fixture(scope="module")
def vit():
    return registry.load_model("vit-standard")


# ----------------------------------------------------------------------------- coverage
def test_patch_coverage_by_hand():
    mask = np.zeros((8, 8), dtype=bool)
    mask[0:2, 0:2] = True  # patch (0, 0) of a 4x4 grid of 2-px patches, whole
    mask[2, 2:4] = True  # half of patch (1, 1)
    mask[7, 7] = True  # a quarter of patch (3, 3)
    want = np.zeros((4, 4))
    want[0, 0], want[1, 1], want[3, 3] = 1, 0.5, 0.25
    np.testing.assert_allclose(grounding.patch_coverage(mask, (4, 4)).reshape(4, 4), want)


def test_patch_coverage_splits_straddling_pixels_by_area():
    # 5 px on a 2x2 grid: the boundary is at 2.5, so pixel row/column 2 is half in each patch
    mask = np.zeros((5, 5), dtype=bool)
    mask[2, 2] = True
    np.testing.assert_allclose(grounding.patch_coverage(mask, (2, 2)), [0.25 / 6.25] * 4)
    np.testing.assert_allclose(grounding.patch_coverage(np.ones((5, 7), bool), (2, 3)), 1.0)
    rng = np.random.default_rng(0)
    for h, w, grid in ((13, 11, (4, 3)), (64, 64, (7, 7)), (10, 10, (3, 4))):
        m = rng.random((h, w)) < 0.05
        cov = grounding.patch_coverage(m, grid)
        assert ((cov > 0) == patches_under(m, grid)).all()  # same tiling as the ablation's
        # area is conserved: the coverage-weighted patch area is the mask's pixel count
        assert cov.sum() * (h / grid[0]) * (w / grid[1]) == pytest.approx(m.sum())


# ----------------------------------------------------------------------------- pointing and energy
def aligned_mask() -> np.ndarray:
    mask = np.zeros((16, 16), dtype=bool)
    mask[4:8, 8:16] = True  # patches (1, 2) and (1, 3) of a 4x4 grid
    return mask


def test_a_map_equal_to_the_coverage_points_and_holds_all_energy():
    cov = grounding.patch_coverage(aligned_mask(), (4, 4))
    assert grounding.pointing_game(cov, cov) == 1.0
    assert grounding.energy(cov, cov) == pytest.approx(1.0)
    off = np.roll(cov, 5)  # elsewhere
    assert grounding.pointing_game(off, cov) == 0.0 and grounding.energy(off, cov) == 0.0


def test_uniform_map_energy_is_the_area_fraction_and_its_pointing_is_a_tie():
    mask = aligned_mask()
    cov = grounding.patch_coverage(mask, (4, 4))
    flat = np.ones(16)
    assert grounding.energy(flat, cov) == pytest.approx(mask.mean())
    assert grounding.pointing_game(flat, cov) == 0.0  # tie over inside and outside patches
    everywhere = grounding.patch_coverage(np.ones((16, 16), bool), (4, 4))
    assert grounding.pointing_game(flat, everywhere) == 1.0
    # zero map: all tie, so a miss; no mass, so no energy (NaN), left out of the mean and counted
    assert grounding.pointing_game(np.zeros(16), cov) == 0.0
    assert np.isnan(grounding.energy(np.zeros(16), cov))


def test_ties_at_the_maximum_miss_unless_all_inside():
    cov = np.zeros(6)
    cov[[1, 2]] = [1.0, 0.3]
    two_in = np.array([0, 5, 5, 1, 1, 1.0])
    in_and_out = np.array([0, 5, 1, 1, 5, 1.0])
    out = grounding.pointing_game(np.stack([two_in, in_and_out]), cov)
    np.testing.assert_array_equal(out, [1.0, 0.0])
    # batched shapes broadcast: (2, 3, P) maps with (3, P) coverage
    maps = torch.rand(2, 3, 6)
    assert grounding.pointing_game(maps, np.broadcast_to(cov, (3, 6))).shape == (2, 3)


def test_refusals_and_the_signed_option():
    cov = grounding.patch_coverage(aligned_mask(), (4, 4))
    with pytest.raises(ValueError, match="empty mask"):
        grounding.pointing_game(np.ones(16), np.zeros(16))
    with pytest.raises(ValueError, match="empty mask"):
        grounding.energy(np.ones(16), np.zeros(16))
    nan = np.ones(16)
    nan[3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        grounding.pointing_game(nan, cov)
    signed = cov - 0.5  # inside +0.5, outside -0.5
    with pytest.raises(ValueError, match="negative"):
        grounding.energy(signed, cov)
    assert grounding.energy(signed, cov, signed="positive") == pytest.approx(1.0)
    assert np.isnan(grounding.energy(-np.ones(16), cov, signed="positive"))
    mean, n = grounding.nan_mean([0.5, np.nan, 1.0])
    assert (mean, n) == (0.75, 2)


def test_random_baselines_match_monte_carlo(samples):
    cov = grounding.object_coverage(samples[0].masks, (8, 8))  # (objects, 64)
    rng = np.random.default_rng(0)
    maps = rng.random((20000, 1, 64))
    point = grounding.pointing_game(maps, cov).mean(0)
    en = grounding.energy(maps, cov).mean(0)
    want_p, want_e = grounding.random_pointing(cov), grounding.random_energy(cov)
    assert (np.abs(point - want_p) < 4 * np.sqrt(want_p * (1 - want_p) / 20000)).all()  # 4 standard errors
    np.testing.assert_allclose(en, want_e, atol=2e-3)
    np.testing.assert_allclose(want_p, (cov > 0).mean(-1))
    # energy's baseline is the object's area fraction (the grid tiles the 64 px image evenly)
    np.testing.assert_allclose(want_e, samples[0].masks.reshape(len(cov), -1).mean(-1))


# ----------------------------------------------------------------------------- deletion and insertion
def test_orders_put_the_most_relevant_first_and_break_ties_by_index():
    order = grounding.perturbation_orders(torch.tensor([[0.1, 0.9, 0.5, 0.9, 0.5]]))
    assert order.dtype == torch.long
    assert order.tolist() == [[1, 3, 2, 4, 0]]


def test_removal_masks_by_hand():
    order = torch.tensor([[2, 0, 3, 1]])
    dele = grounding.removal_masks(order, [0, 0.25, 0.5, 1.0], "deletion")[0]
    ins = grounding.removal_masks(order, [0, 0.25, 0.5, 1.0], "insertion")[0]
    assert dele.tolist() == [[False] * 4, [False, False, True, False], [True, False, True, False], [True] * 4]
    assert (ins == ~dele).all()
    assert grounding.removal_counts([0, 0.3, 1], 10).tolist() == [0, 3, 10]
    with pytest.raises(ValueError, match="increasing"):
        grounding.removal_masks(order, [0.5, 0.2])


def test_curve_auc_of_known_curves():
    f = np.linspace(0, 1, 11)
    assert grounding.curve_auc(f, f) == pytest.approx(0.5)
    assert grounding.curve_auc(np.ones((2, 3, 11)), f).shape == (2, 3)
    assert grounding.curve_auc([1.0, 0.0, 0.0], [0, 0.5, 1]) == pytest.approx(0.25)
    # normalised to unit width: a constant curve over [0.2, 0.6] has area = its height
    assert grounding.curve_auc([3.0, 3.0, 3.0], [0.2, 0.4, 0.6]) == pytest.approx(3.0)
    fine = np.linspace(0, 1, 1001)
    assert grounding.curve_auc(fine**2, fine) == pytest.approx(1 / 3, abs=1e-5)


def test_the_true_order_beats_random_orders_on_a_hand_built_scorer():
    g = torch.Generator().manual_seed(0)
    weights = torch.rand(4, 16, generator=g) ** 3  # a few patches matter
    calls = []

    def kept_weight(removed: torch.Tensor) -> torch.Tensor:
        calls.append(removed.shape)
        return (weights[:, None, :] * ~removed).sum(-1)

    f = np.linspace(0, 1, 17)
    dele = grounding.perturbation_curves(kept_weight, weights, f, "deletion", random_orders=16)
    ins = grounding.perturbation_curves(kept_weight, weights, f, "insertion", random_orders=16)
    assert calls == [(4, 17 * 17, 16)] * 2  # one call per mode, the map's K first then the random ones
    assert dele.curve.shape == dele.random.shape == (4, 17) and dele.random_runs.shape == (16, 4, 17)
    assert (grounding.curve_auc(dele.curve, f) < grounding.curve_auc(dele.random, f)).all()
    assert (grounding.curve_auc(ins.curve, f) > grounding.curve_auc(ins.random, f)).all()
    torch.testing.assert_close(dele.curve[:, 0], weights.sum(1))  # nothing removed yet
    torch.testing.assert_close(ins.curve[:, 0], torch.zeros(4))  # everything removed
    worst = grounding.perturbation_curves(kept_weight, -weights, f, "deletion", random_orders=4)
    assert (grounding.curve_auc(worst.curve, f) > grounding.curve_auc(dele.random, f)).all()
    again = grounding.perturbation_curves(kept_weight, weights, f, "deletion", random_orders=16,
                                          generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again.random, dele.random)  # seeded


# ----------------------------------------------------------------------------- model-facing scorers
def test_caption_scorer_is_token_logprobs_and_removal_is_real(mmca, short):
    batch = mmca.preprocess([s.image for s in short], [s.caption for s in short])
    px, ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
    steps = mask[:, 1:].bool().clone()
    steps[1, 3:] = False  # not every step of image 1
    score = grounding.caption_removal_scorer(mmca, px, ids, mask, steps, chunk=5)
    n, p = int(steps.sum()), 64
    with torch.no_grad():
        ref = mmca.token_logprobs(px, ids, mask)[steps]
    g = torch.Generator().manual_seed(0)
    some = torch.rand(n, p, generator=g) < 0.5
    removed = torch.stack([torch.zeros(n, p, dtype=torch.bool), torch.ones(n, p, dtype=torch.bool), some], 1)
    got = score(removed)
    assert got.shape == (n, 3)
    torch.testing.assert_close(got[:, 0], ref, atol=1e-5, rtol=1e-5)
    assert (got[:, 1] - ref).abs().max() > 1e-3  # the caption read the image
    # partial removal equals a plain forward under the same interventions (the vision tower run once is exact)
    pairs = steps.nonzero()
    img, step = pairs[:, 0], pairs[:, 1]
    with torch.no_grad(), intervene(mmca, grounding.remove_patches(mmca, some)):
        direct = mmca.token_logprobs(px[img], ids[img], mask[img])[torch.arange(n), step]
    torch.testing.assert_close(got[:, 2], direct, atol=1e-5, rtol=1e-5)
    # the same targets given as pairs, and a different chunk size, agree
    again = grounding.caption_removal_scorer(mmca, px, ids, mask, pairs.tolist(), chunk=64)(removed)
    torch.testing.assert_close(again, got, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not a real caption step"):
        grounding.caption_removal_scorer(mmca, px, ids, mask, [(0, ids.shape[1] - 1)])


def test_class_scorer_is_log_softmax_and_a_removed_patch_gets_no_attention(vit, samples):
    px = vit.preprocess([s.image for s in samples])["pixel_values"]
    labels = torch.tensor([0, 3, 7])
    score = grounding.class_removal_scorer(vit, px, labels, chunk=4)
    g = torch.Generator().manual_seed(1)
    some = torch.rand(3, 64, generator=g) < 0.3
    removed = torch.stack([torch.zeros(3, 64, dtype=torch.bool), some, torch.ones(3, 64, dtype=torch.bool)], 1)
    got = score(removed)
    with torch.no_grad():
        ref = torch.log_softmax(vit.forward({"pixel_values": px}), -1)[torch.arange(3), labels]
    torch.testing.assert_close(got[:, 0], ref, atol=1e-5, rtol=1e-5)
    assert (got[:, 1] - ref).abs().max() > 1e-4 and (got[:, 2] - ref).abs().max() > 1e-4
    with torch.no_grad(), intervene(vit, grounding.remove_patches(vit, some)), \
            capture(vit, grounding.VISION_ATTENTION) as cache:
        logits = vit.forward({"pixel_values": px})
    torch.testing.assert_close(got[:, 1], torch.log_softmax(logits, -1)[torch.arange(3), labels],
                               atol=1e-5, rtol=1e-5)
    assert len(cache.names()) == 4
    for name in cache.names():
        pattern = cache[name]  # (b, heads, queries, keys): keys 1.. are the patches
        cols = pattern[:, :, :, 1:].permute(0, 3, 1, 2)  # (b, patches, heads, queries)
        assert (cols[some] == 0).all(), name
        assert (cols[~some].sum((-1, -2)) > 0).all()  # and the kept ones still receive attention


VIT_KINDS = ["vit-standard", "vit-merged-qkv", "vit-linformer", "vit-performer", "vit-hybrid", "vit-nystrom"]


@pytest.mark.parametrize("name", VIT_KINDS)
def test_a_removed_patch_content_never_reaches_the_class(name, samples):
    vit = registry.load_model(name)
    px = vit.preprocess([s.image for s in samples[:2]])["pixel_values"]
    some = torch.rand(2, 64, generator=torch.Generator().manual_seed(0)) < 0.3
    other = px.clone()  # new pixels in the removed patches only (patch embeddings see one patch each)
    ps = vit.patch_size
    for i, p in some.nonzero().tolist():
        r, c = divmod(p, vit.grid[1])
        other[i, :, r * ps : (r + 1) * ps, c * ps : (c + 1) * ps] = torch.randn(3, ps, ps)
    removed = some[:, None]
    a = grounding.class_removal_scorer(vit, px, torch.tensor([1, 2]))(removed)
    b = grounding.class_removal_scorer(vit, other, torch.tensor([1, 2]))(removed)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    keep = grounding.class_removal_scorer(vit, other, torch.tensor([1, 2]))(torch.zeros_like(removed))
    assert (keep - a).abs().max() > 1e-3  # those pixels do matter when their patches are kept


def _perturbed(value, removed: torch.Tensor):
    """The vision tower's output with the removed patch tokens' features replaced by noise."""
    if isinstance(value, torch.Tensor):
        value = value.clone()
        tokens = torch.zeros(value.shape[:2], dtype=torch.bool)
        tokens[:, 1 : 1 + removed.shape[1]] = removed
        value[tokens] = torch.randn_like(value[tokens]) * 5
        return value
    if hasattr(value, "keys"):
        first = next(iter(value.keys()))
        return type(value)(**{k: _perturbed(v, removed) if k == first else v for k, v in value.items()})
    return type(value)((_perturbed(value[0], removed), *value[1:]))


CAPTIONERS = {
    "blip": lambda: BlipAdapter.tiny(seed=1, image_size=64),
    "git": lambda: GitAdapter.tiny(seed=1, image_size=64),
    "prefix-vlm": lambda: registry.load_model("prefix-vlm"),
    "mmca": lambda: registry.load_model("mmca"),
}


@pytest.mark.parametrize("name", list(CAPTIONERS))
def test_removed_image_tokens_never_reach_the_caption(name, short):
    """Removal from the text's reads is real: the removed tokens' features can be anything."""
    adapter = CAPTIONERS[name]()
    batch = adapter.preprocess([s.image for s in short], [s.caption for s in short])
    px, ids, mask = batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
    some = torch.rand(2, 64, generator=torch.Generator().manual_seed(0)) < 0.5
    vision = vision_outputs(adapter, px, ids, mask)
    out = []
    for value, removal in ((vision, True), (_perturbed(vision, some), True), (_perturbed(vision, some), False)):
        ivs = [Precomputed(VISION_OUTPUT, value), *(grounding.remove_patches(adapter, some) if removal else [])]
        with torch.no_grad(), intervene(adapter, ivs):
            out.append(adapter.token_logprobs(px, ids, mask))
    assert (out[0] - out[2]).abs().max() > 1e-3  # the noise matters when the tokens are read
    torch.testing.assert_close(out[0], out[1], atol=1e-5, rtol=1e-5)


def test_scorers_refuse_the_wrong_task(mmca, vit):
    px = torch.zeros(1, 3, 64, 64)
    with pytest.raises(ValueError, match="does not classify"):
        grounding.class_removal_scorer(mmca, px, torch.tensor([0]))
    with pytest.raises(ValueError, match="does not caption"):
        grounding.caption_removal_scorer(vit, px, torch.zeros(1, 2, dtype=torch.long), None, [(0, 0)])
    with pytest.raises(ValueError, match=r"bool \(N=1, K, P=64\)"):
        grounding.class_removal_scorer(vit, px, torch.tensor([0]))(torch.zeros(1, 2, 64))


# ----------------------------------------------------------------------------- randomisation
def snapshot(adapter) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in adapter.model.state_dict().items()}


def assert_identical(adapter, before: dict[str, torch.Tensor]) -> None:
    after = adapter.model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


@pytest.mark.parametrize("part", ["encoder", "decoder"])
def test_cascading_randomisation_goes_top_down_and_restores(mmca, short, part):
    batch = mmca.preprocess([s.image for s in short[:1]], [s.caption for s in short[:1]])
    before = snapshot(mmca)
    with torch.no_grad():
        out0 = mmca.forward(batch)
    layers = grounding.part_layers(mmca, part)
    stack = {"encoder": "vision", "decoder": "text"}[part]
    assert layers == [b.path.format(i=i) for b in mmca.blocks() if b.stack == stack for i in range(b.depth)]
    assert len(layers) >= 2
    seen = []
    with grounding.cascading_randomisation(mmca, part, seed=3) as steps:
        for layer, adapter in steps:
            seen.append(layer)
            assert adapter is mmca
            for i, path in enumerate(layers):
                for n, p in mmca.module(path).named_parameters():
                    orig = before[f"{path}.{n}"]
                    # a parameter with no spread (a fresh LayerNorm gain) has no structure to redraw
                    want = i >= layer and bool(orig.std(unbiased=False) > 0)
                    assert (not torch.equal(p, orig)) == want, (layer, path, n)
            with torch.no_grad():
                assert not torch.allclose(mmca.forward(batch), out0)
    assert seen == list(reversed(range(len(layers))))
    assert_identical(mmca, before)
    with torch.no_grad():
        assert torch.equal(mmca.forward(batch), out0)


def test_cascading_randomisation_restores_on_exceptions_and_refuses_missing_parts(vit):
    before = snapshot(vit)
    with pytest.raises(RuntimeError, match="boom"), grounding.cascading_randomisation(vit, "encoder") as steps:
        for layer, _ in steps:
            if layer == 1:
                raise RuntimeError("boom")
    assert_identical(vit, before)
    with pytest.raises(ValueError, match="has no decoder .* its parts: encoder"):
        grounding.cascading_randomisation(vit, "decoder").__enter__()
    # seeded: the same seed draws the same parameters
    draws = []
    for _ in range(2):
        with grounding.cascading_randomisation(vit, "encoder", seed=5) as steps:
            next(steps)
            draws.append(snapshot(vit))
    assert all(torch.equal(draws[0][k], draws[1][k]) for k in draws[0])


# ----------------------------------------------------------------------------- rank correlation
def test_rank_correlation_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, (6, 30)).astype(float)  # many ties
    b = a + rng.integers(0, 4, (6, 30))
    got = grounding.rank_correlation(a, b)
    want = [spearmanr(x, y).statistic for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(got, want, atol=1e-12)
    c = rng.normal(size=(2, 3, 50))
    d = c + rng.normal(size=(2, 3, 50))
    np.testing.assert_allclose(grounding.rank_correlation(torch.tensor(c), d)[1, 2],
                               spearmanr(c[1, 2], d[1, 2]).statistic, atol=1e-12)
    assert grounding.rank_correlation(c[0, 0], -c[0, 0]) == pytest.approx(-1.0)
    assert np.isnan(grounding.rank_correlation(np.ones(5), np.arange(5.0)))
