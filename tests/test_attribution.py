"""captum attributions (analyses/attribution.py): IG completeness, occlusion against a patch removed
by hand, feature ablation with a patch mask equal to occlusion (two captum classes, one quantity),
object masks mapped to patches by coverage, the (b, S, patches) contract with zeros where nothing
was asked, hooks and parameter flags left as found, and the analysis end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import probe.analyses.attribution as at
from probe import registry
from probe.adapter import Captioner, Classifier
from probe.analyses.explain import METHODS, Target
from probe.analysis import ParamError
from probe.capture.sites import active_site_count
from probe.cli import main
from probe.data import ImageSet
from probe.registry import load_model
from probe.runs.store import RunStore
from probe.types import ProbeError


@pytest.fixture(scope="module")
def shapes2() -> ImageSet:
    return ImageSet.shapes(2)


@pytest.fixture(scope="module")
def classifier():
    return load_model("vit-standard", weights="demo")


@pytest.fixture(scope="module")
def captioner():
    return load_model("blip", weights="demo")


def _class_target(adapter, images) -> Target:
    px = adapter.preprocess(images)["pixel_values"]
    with torch.no_grad():
        return Target(px, labels=adapter.forward({"pixel_values": px}).argmax(-1))


def _caption_target(adapter, images, steps=None, n=3) -> Target:
    px = adapter.preprocess(images)["pixel_values"]
    caps = adapter.caption_pixels(px, n)
    ids, mask = adapter.teacher_ids(caps["ids"], caps["tokens"])
    return Target(px, ids=ids, mask=mask, steps=steps)


def _score(adapter, target: Target, px: torch.Tensor) -> torch.Tensor:
    """(b, S): the score of every target of `target` at pixels `px`, by hand."""
    with torch.no_grad():
        if target.ids is not None:
            return adapter.token_logprobs(px, target.ids, target.mask)
        return adapter.forward({"pixel_values": px}).gather(1, target.labels[:, None]).float()


def _hooks(module: torch.nn.Module) -> int:
    return len(module._forward_hooks) + len(module._forward_pre_hooks) + len(module._backward_hooks)


# ------------------------------------------------------------------------------ integrated gradients
def test_ig_completeness_and_the_maps_hold_every_unit_of_it(classifier, captioner, shapes2):
    t = _class_target(classifier, shapes2.images)
    ig = at.integrated_gradients(classifier, t, n_steps=128)
    gap = ig.f_in - ig.f_base
    assert ig.maps.shape == (2, 1, 64) and bool((gap.abs() > 1).all())
    assert bool((ig.delta.abs() < 0.01 * gap.abs()).all()), (ig.delta, gap)
    # CLS and positions are the same at input and baseline: the patches carry the whole difference
    torch.testing.assert_close(ig.maps.sum(-1), gap + ig.delta, atol=1e-4, rtol=1e-5)
    by_hand = _score(classifier, t, t.pixel_values) - _score(classifier, t, at.black_image(classifier).expand_as(
        t.pixel_values))
    torch.testing.assert_close(gap, by_hand, atol=1e-4, rtol=1e-5)

    c = _caption_target(captioner, shapes2.images, steps=[[0, 1], [1]])
    coarse, fine = (at.integrated_gradients(captioner, c, n_steps=n, batch_size=2) for n in (8, 128))
    asked = c.step_mask()
    assert fine.maps.shape == (2, c.n_steps, 64)
    assert bool((fine.maps[~asked] == 0).all()) and bool((fine.delta[~asked] == 0).all())
    torch.testing.assert_close(fine.maps.sum(-1), fine.f_in - fine.f_base + fine.delta, atol=1e-4, rtol=1e-5)
    rel = lambda r: (r.delta.abs() / (r.f_in - r.f_base).abs())[asked]  # noqa: E731
    assert float(rel(fine).median()) < 0.05 and float(rel(fine).median()) < float(rel(coarse).median())
    torch.testing.assert_close(fine.f_in[asked], _score(captioner, c, c.pixel_values)[asked])


# ------------------------------------------------------------------------------ perturbations
@pytest.mark.parametrize("which", ["classifier", "captioner"])
def test_occlusion_is_the_score_drop_when_one_patch_is_zeroed(which, request, shapes2):
    adapter = request.getfixturevalue(which)
    t = (_class_target(adapter, shapes2.images) if which == "classifier"
         else _caption_target(adapter, shapes2.images, steps=[[0, 2], [1]]))
    maps = at.occlusion(adapter, t, perturbations_per_eval=7)
    asked = t.step_mask()
    assert maps.shape == (2, t.n_steps, 64) and bool((maps[~asked] == 0).all())
    p = adapter.patch_size
    for r, c in [(2, 3), (7, 0)]:
        px = t.pixel_values.clone()
        px[:, :, r * p : (r + 1) * p, c * p : (c + 1) * p] = 0  # 0 after normalisation: the mean colour
        drop = _score(adapter, t, t.pixel_values) - _score(adapter, t, px)
        torch.testing.assert_close(maps[..., r * 8 + c][asked], drop[asked], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which", ["classifier", "captioner"])
def test_feature_ablation_with_a_patch_mask_equals_occlusion(which, request, shapes2):
    adapter = request.getfixturevalue(which)
    t = _class_target(adapter, shapes2.images) if which == "classifier" else _caption_target(adapter, shapes2.images)
    occ = at.occlusion(adapter, t, perturbations_per_eval=16)
    fa = at.feature_ablation(adapter, t, perturbations_per_eval=5)
    torch.testing.assert_close(fa, occ, atol=1e-5, rtol=1e-5)
    assert bool((occ[t.step_mask()] != 0).any())


def test_object_masks_map_to_patches_by_coverage(classifier, shapes2):
    t = _class_target(classifier, shapes2.images[:1])
    labels = np.zeros((32, 32), dtype=np.int64)  # half resolution: upsampled, the boundary lands at x = 36
    labels[:, 18:] = 7
    maps = at.feature_ablation(classifier, t, objects=[labels])
    left, right = t.pixel_values.clone(), t.pixel_values.clone()
    left[..., :36] = 0
    right[..., 36:] = 0
    base = _score(classifier, t, t.pixel_values)
    d_left, d_right = ((base - _score(classifier, t, x))[0, 0] for x in (left, right))
    grid = maps[0, 0].reshape(8, 8)
    torch.testing.assert_close(grid[:, :4], d_left.expand(8, 4), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grid[:, 5:], d_right.expand(8, 3), atol=1e-5, rtol=1e-5)
    # patch column 4 (x 32..39) is half in each segment: the coverage-weighted mean of both effects
    torch.testing.assert_close(grid[:, 4], (0.5 * d_left + 0.5 * d_right).expand(8), atol=1e-5, rtol=1e-5)
    # label maps from probe-shapes masks: background 0, object k at k + 1, later objects on top
    lab = at.object_labels([np.array([[[1, 1], [0, 0]], [[0, 1], [0, 1]]], dtype=bool)])[0]
    assert lab.tolist() == [[1, 2], [0, 2]]


# ------------------------------------------------------------------------------ the contract and hygiene
@pytest.mark.parametrize("name", list(registry.models()))
def test_every_patch_model_has_one_patch_embedding(name):
    adapter = load_model(name, weights="meta")
    if isinstance(adapter, Captioner | Classifier):
        conv = at.patch_embedding(adapter)
        assert conv.kernel_size == conv.stride == (adapter.patch_size,) * 2 and conv.in_channels == 3
    else:
        with pytest.raises(ProbeError, match="no patch size") as e:
            at.patch_embedding(adapter)
        assert "\n" not in str(e.value)


def test_gradient_shap_is_seeded_and_leaves_global_generators_alone(classifier, shapes2):
    t = _class_target(classifier, shapes2.images)
    np_state, torch_state = np.random.get_state()[1].copy(), torch.random.get_rng_state()
    a = at.gradient_shap(classifier, t, n_samples=6, seed=3)
    b = at.gradient_shap(classifier, t, n_samples=6, seed=3)
    torch.testing.assert_close(a, b)
    assert a.shape == (2, 1, 64) and bool(a.abs().sum() > 0)
    assert (np.random.get_state()[1] == np_state).all() and torch.equal(torch.random.get_rng_state(), torch_state)


def test_no_hooks_survive_and_flags_are_restored_even_after_an_error(classifier, shapes2, monkeypatch):
    conv = at.patch_embedding(classifier)
    assert conv is classifier.module("patch_embed")
    head = classifier.model.head
    head.weight.requires_grad_(False)  # a mix of flags, and a model left in train mode by its user
    classifier.model.train()
    try:
        t = _class_target(classifier, shapes2.images)
        for name in (at.IG, at.OCCLUSION, at.ABLATION, at.GRADIENT_SHAP):
            assert METHODS[name].fn(classifier, t).shape == (2, 1, 64)
        n = len(classifier.labels)
        with pytest.raises(ValueError, match=f"one class index per image .*, 0 to {n - 1}"):
            at.occlusion(classifier, Target(t.pixel_values, labels=torch.tensor([0, n])))
        forward, calls = classifier.forward, []

        def failing(batch):  # fails inside captum, while its hooks are on the patch embedding (IG)
            calls.append(_hooks(conv))
            if len(calls) == 4:
                raise RuntimeError("boom")
            return forward(batch)

        monkeypatch.setattr(classifier, "forward", failing)
        for fn in (at.integrated_gradients, at.gradient_shap, at.occlusion):
            calls.clear()
            with pytest.raises(RuntimeError, match="boom"):
                fn(classifier, t)
            assert fn is not at.integrated_gradients or calls[-1] == 1, calls
        monkeypatch.undo()
        assert active_site_count() == 0 and _hooks(conv) == 0
        assert all(_hooks(m) == 0 for m in classifier.model.modules())
        assert not head.weight.requires_grad and head.bias.requires_grad and conv.weight.requires_grad
        assert all(m.training for m in classifier.model.modules())
    finally:
        head.weight.requires_grad_(True)
        classifier.model.eval()


def test_gradient_methods_refuse_a_model_that_cuts_the_gradient(shapes2, monkeypatch):
    adapter = load_model("vit-standard", weights="demo")
    forward = adapter.forward
    monkeypatch.setattr(adapter, "forward", lambda batch: torch.no_grad()(forward)(batch))
    why = METHODS[at.IG].refusal(adapter)
    assert why and "does not depend differentiably" in why and "\n" not in why
    assert METHODS[at.OCCLUSION].refusal(adapter) is None and METHODS[at.IG].gradients
    with pytest.raises(ProbeError, match="does not depend differentiably"):
        at.integrated_gradients(adapter, _class_target(adapter, shapes2.images))
    with pytest.raises(ProbeError, match="--methods integrated-gradients: "):
        at.Attribution()(adapter, shapes2, methods="occlusion,integrated-gradients")


# ------------------------------------------------------------------------------ the analysis
def test_captioner_analysis_end_to_end(captioner, shapes2):
    res = at.Attribution()(captioner, shapes2, methods="integrated-gradients,occlusion,feature-ablation,gradient-shap",
                           max_new_tokens=3, n_steps=8, n_samples=4, batch_size=1)
    caps = captioner.caption(shapes2.images, max_new_tokens=3)
    assert res.captions == caps["text"] and res.tokens == caps["tokens"] and res.captioner
    s = max(len(t) for t in res.tokens)
    for m in (*res.methods, at.OBJECTS):  # probe-shapes masks: the object variant runs too
        a = res.maps(m)
        assert a.shape == (2, s, 64) and a.dtype == torch.float32
        for i, toks in enumerate(res.tokens):
            assert bool((a[i, len(toks) :] == 0).all()), "steps past the caption's end are 0"
    torch.testing.assert_close(res.maps(at.ABLATION), res.maps(at.OCCLUSION), atol=1e-5, rtol=1e-5)
    assert res.arrays[f"attribution.{at.IG}.delta"].shape == (2, s)
    assert res.token_maps(at.IG, 0).shape == (len(res.tokens[0]), 8, 8)
    figs = at.Attribution().render(res)
    assert {"attribution_integrated_gradients", "attribution_feature_ablation_objects"} <= set(figs)
    lines = at.Attribution().summary_lines(res)
    assert "completeness over" in lines[1] and "raise --n-steps" in "\n".join(lines)  # 8 steps: not converged


def test_cli_classifier_end_to_end_and_unknown_methods(store_root, capsys):
    assert main(["run", "attribution", "--model", "vit-standard", "--shapes", "2", "--methods",
                 "integrated-gradients,occlusion", "--n-steps", "128"]) == 0
    out = capsys.readouterr().out
    assert "completeness over 2 targets" in out and "raise --n-steps" not in out
    (info,) = RunStore(store_root).list()
    run = RunStore(store_root).load(info.id)
    assert run.result.kind == "attribution" and not run.result.captioner
    assert run.result.arrays["attribution.occlusion"].shape == (2, 1, 64)
    assert run.result.tokens == [[c] for c in run.result.captions] and len(run.result.labels) == 2
    assert {f.name for f in run.figures} == {"attribution_integrated_gradients.png", "attribution_occlusion.png"}
    assert main(["run", "attribution", "--model", "vit-standard", "--shapes", "1", "--methods", "occlusion,nope"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "'nope'" in err
    assert all(m in err for m in METHODS)
    with pytest.raises(ParamError, match="no method given"):
        at.Attribution.Params(methods=" , ")
    assert len(RunStore(store_root).list()) == 1, "refused runs save nothing"


def test_token_ablation_is_the_drop_when_one_patch_token_is_removed():
    from probe.analyses import grounding
    from probe.analyses.attribution import token_ablation
    from probe.analyses.explain import Target
    from probe.data import ImageSet
    from probe.registry import load_model

    adapter = load_model("mmca")
    px = adapter.preprocess(ImageSet.shapes(1).images)["pixel_values"]
    cap = adapter.caption_pixels(px, max_new_tokens=4)
    ids, mask = adapter.teacher_ids(cap["ids"], cap["tokens"])
    maps = token_ablation(adapter, Target(px, ids, mask, steps=[[2]]))
    score = grounding.caption_removal_scorer(adapter, px, ids, mask, [(0, 2)])
    removed = torch.zeros(1, 3, 64, dtype=torch.bool)
    removed[0, 1, 5] = True
    removed[0, 2, 40] = True
    s = score(removed)[0]
    assert float(maps[0, 2, 5]) == pytest.approx(float(s[0] - s[1]), abs=1e-5)
    assert float(maps[0, 2, 40]) == pytest.approx(float(s[0] - s[2]), abs=1e-5)
    assert float(maps[0, [0, 1, 3]].abs().sum()) == 0


def test_token_shapley_values_sum_to_all_minus_none():
    from probe.analyses import grounding
    from probe.analyses.attribution import token_shapley

    adapter = load_model("mmca")
    px = adapter.preprocess(ImageSet.shapes(1).images)["pixel_values"]
    cap = adapter.caption_pixels(px, max_new_tokens=3)
    ids, mask = adapter.teacher_ids(cap["ids"], cap["tokens"])
    maps = token_shapley(adapter, Target(px, ids, mask, steps=[[1]]), n_samples=2)
    score = grounding.caption_removal_scorer(adapter, px, ids, mask, [(0, 1)])
    removed = torch.zeros(1, 2, 64, dtype=torch.bool)
    removed[0, 1] = True
    s = score(removed)[0]
    assert float(maps[0, 1].sum()) == pytest.approx(float(s[0] - s[1]), abs=1e-4)  # efficiency, per permutation
    assert torch.equal(maps, token_shapley(adapter, Target(px, ids, mask, steps=[[1]]), n_samples=2))  # seeded
