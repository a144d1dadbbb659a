"""Chefer et al.'s relevancy and gradient rollout: the rules on a hand-built case, per-target
gradients independent of batching, every family end to end, and the CLI."""

from __future__ import annotations

import pytest
import torch

from probe.analyses import relevancy as rel
from probe.analyses.explain import Target, hook_names
from probe.capture import capture
from probe.cli import main
from probe.data import ImageSet
from probe.registry import load_model
from probe.runs.store import RunStore


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)[None]


def test_normalise_subtracts_identity_divides_rows_and_keeps_zero_rows():
    r = _t([[3.0, 1.0, 0.0], [0.0, 1.0, 0.0], [2.0, 2.0, 2.0]])
    # R - I = [[2,1,0],[0,0,0],[2,2,1]] -> rows / sums (3, 0 -> stays 0, 5) + I
    want = _t([[2 / 3 + 1, 1 / 3, 0], [0, 1, 0], [0.4, 0.4, 0.2 + 1]])
    assert torch.allclose(rel.normalise(r), want)


def test_grad_weighted_is_positive_part_of_product_mean_over_heads_per_element():
    a = torch.tensor([[[[0.5, 0.5]], [[1.0, 0.0]]], [[[0.2, 0.8]], [[0.6, 0.4]]]], dtype=torch.float64)
    g = torch.tensor([[[[2.0, -1.0]], [[-3.0, 4.0]]], [[[1.0, 1.0]], [[0.0, -1.0]]]], dtype=torch.float64)
    want = torch.tensor([[[0.5, 0.0]], [[0.1, 0.4]]], dtype=torch.float64)  # head means of (g*a)^+
    assert torch.allclose(rel.grad_weighted(a, g), want)


def test_encoder_decoder_rules_by_hand():
    vision = [_t([[0.5, 0.5], [0.0, 1.0]])]
    a_tt = [_t([[1.0, 0.0], [0.5, 0.5]])]
    a_ti = [_t([[1.0, 0.0], [0.25, 0.75]])]
    r_ii = rel.encoder_relevancy(vision)
    assert torch.allclose(r_ii, _t([[1.5, 0.5], [0.0, 2.0]]))
    # R^tt = [[2,0],[.5,1.5]], R̄^tt the same (rows of R - I sum to 1); R̄^ii = R^ii likewise;
    # R^ti = (R̄^tt)^T A^ti R̄^ii = [[2,.5],[0,1.5]] @ [[1.5,.5],[.375,1.625]]
    r_ti = rel.decoder_relevancy(r_ii, a_tt, a_ti)
    assert torch.allclose(r_ti, _t([[3.1875, 1.8125], [0.5625, 2.4375]]))
    # a second text block: self rules on the running R^ti, then eq. 10 again
    r_tt1 = _t([[2.0, 0.0], [0.5, 1.5]])
    r_ti1 = _t([[3.1875, 1.8125], [0.5625, 2.4375]])
    r_tt2 = r_tt1 + a_tt[0] @ r_tt1
    r_ti2 = r_ti1 + a_tt[0] @ r_ti1
    r_ti2 = r_ti2 + rel.normalise(r_tt2).transpose(-1, -2) @ a_ti[0] @ rel.normalise(r_ii)
    assert torch.allclose(rel.decoder_relevancy(r_ii, a_tt * 2, a_ti * 2), r_ti2)


def test_grad_rollout_pairs_each_layer_with_its_own_gradient():
    gen = torch.Generator().manual_seed(0)
    fused = [torch.rand(2, 4, 4, generator=gen, dtype=torch.float64) for _ in range(3)]
    want = None
    for f in fused:  # layer order, rows renormalised with the residual
        a = f + torch.eye(4, dtype=torch.float64)
        a = a / a.sum(-1, keepdim=True)
        want = a if want is None else a @ want
    assert torch.allclose(rel.grad_rollout(fused), want)


@pytest.fixture(scope="module")
def shapes2() -> ImageSet:
    return ImageSet.shapes(2)


def _target(adapter, images) -> Target:
    px = adapter.preprocess(images)["pixel_values"]
    if hasattr(adapter, "token_logprobs"):
        with torch.no_grad():
            cap = adapter.caption_pixels(px, max_new_tokens=5)
        ids, mask = adapter.teacher_ids(cap["ids"], cap["tokens"])
        return Target(px, ids, mask)
    with torch.no_grad():
        return Target(px, labels=adapter.forward({"pixel_values": px}).argmax(-1))


@pytest.mark.parametrize("name", ["vit-standard", "vit-gpt2", "blip", "git", "mmca", "prefix-vlm"])
def test_every_family_and_batching_does_not_mix_targets(name, shapes2):
    adapter = load_model(name)
    target = _target(adapter, shapes2.images)
    for method in rel.METHODS:
        together = rel.relevancy_maps(adapter, target, method=method, chunk=16)
        one_by_one = rel.relevancy_maps(adapter, target, method=method, chunk=1)
        assert together.shape == (2, target.n_steps, 64)
        assert torch.allclose(together, one_by_one, rtol=1e-4, atol=1e-9)
        assert bool((together >= 0).all()) and float(together.abs().sum()) > 0
        mask = target.step_mask()
        assert float(together[~mask].abs().sum()) == 0  # steps past a caption's end stay 0


def test_classifier_relevancy_equals_a_manual_chefer_loop(shapes2):
    adapter = load_model("vit-standard")
    target = _target(adapter, shapes2.images[:1])
    names = hook_names(adapter, "vision.blocks.{i}.attn.pattern")
    px = target.pixel_values.clone().requires_grad_()
    with capture(adapter, names, grad=True) as cache:
        y = adapter.forward({"pixel_values": px})[0, int(target.labels[0])]
        grads = torch.autograd.grad(y, [cache[n] for n in names])
        pats = [cache[n].detach().double() for n in names]
    r = torch.eye(65, dtype=torch.float64)
    for a, g in zip(pats, grads, strict=True):
        abar = (g.double() * a).clamp(min=0).mean(1)[0]
        r = r + abar @ r
    got = rel.relevancy_maps(adapter, target)
    assert torch.allclose(got[0, 0].double(), r[0, 1:], rtol=1e-4)


def test_cli_relevancy(store_root, capsys):
    assert main(["run", "relevancy", "--model", "mmca", "--shapes", "1", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "method chefer" in out
    (info,) = RunStore(store_root).list()
    run = RunStore(store_root).load(info.id)
    assert run.result.arrays["relevancy"].shape == (1, 4, 64)
    assert main(["run", "relevancy", "--model", "vit-standard", "--shapes", "1", "--method", "nope"]) == 2
    err = capsys.readouterr().err
    assert "chefer" in err and "grad-rollout" in err


@pytest.mark.parametrize("name", ["blip", "git"])
def test_vectorised_per_target_gradients_equal_one_backward_per_target(name, shapes2):
    adapter = load_model(name)
    target = _target(adapter, shapes2.images)
    hooks = hook_names(adapter, "vision.blocks.{i}.attn.pattern") + hook_names(adapter, "text.blocks.{i}.attn.pattern")
    got = {}
    for part, _, grads in rel.pattern_gradients(adapter, target, hooks, chunk=3):
        for j, pair in enumerate(part):
            got[pair] = {n: g[j] for n, g in grads.items()}
    assert len(got) == int(target.step_mask().sum())
    for i, k in [(0, 0), (1, 2), (0, 3)]:
        px = target.pixel_values[i : i + 1].clone().requires_grad_()
        with capture(adapter, hooks, grad=True) as cache:
            y = adapter.token_logprobs(px, target.ids[i : i + 1], target.mask[i : i + 1])[0, k]
            want = torch.autograd.grad(y, [cache[n] for n in hooks])
        for n, w in zip(hooks, want, strict=True):
            assert torch.allclose(got[(i, k)][n], w[0].double(), rtol=1e-4, atol=1e-10), (n, i, k)


def test_shared_vision_equals_per_token_for_a_single_target(shapes2):
    adapter = load_model("vit-gpt2")
    t = _target(adapter, shapes2.images)
    one = Target(t.pixel_values, t.ids, t.mask, steps=[[2], [1]])
    for method in rel.METHODS:
        a = rel.relevancy_maps(adapter, one, method=method, vision="per-token")
        b = rel.relevancy_maps(adapter, one, method=method, vision="shared")
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-12)
    many = rel.relevancy_maps(adapter, t, vision="shared")
    assert many.shape == (2, t.n_steps, 64) and float(many.sum()) > 0


def test_one_image_saves_and_a_headless_classifier_is_refused(store_root, capsys, tmp_path):
    assert main(["run", "relevancy", "--model", "vit-standard", "--shapes", "1"]) == 0
    assert main(["run", "rollout", "--model", "vit-standard", "--shapes", "1"]) == 0  # views of one array
    capsys.readouterr()
    assert len(RunStore(store_root).list()) == 2
    from probe.analyses.explain import check_target

    bare = load_model("hf-vit", weights="random", config={"image_size": 32, "patch_size": 8, "hidden_size": 32,
                                                          "num_hidden_layers": 1, "num_attention_heads": 2,
                                                          "intermediate_size": 64})
    with pytest.raises(Exception, match="no classification head"):
        check_target(bare, Target(torch.zeros(1, 3, 32, 32), labels=torch.tensor([0])))


def test_logit_target_is_the_raw_logit_of_the_token(shapes2):
    adapter = load_model("blip")
    t = _target(adapter, shapes2.images[:1])
    logits = adapter._logits(t.pixel_values, t.ids, t.mask)
    want = logits[0, :-1].gather(-1, t.ids[0, 1:, None])[:, 0]
    assert torch.allclose(adapter.token_logits(t.pixel_values, t.ids, t.mask)[0], want)
    a = rel.relevancy_maps(adapter, t, score="logit")
    b = rel.relevancy_maps(adapter, t, score="logprob")
    assert a.shape == b.shape and not torch.allclose(a, b)  # a different target, a different map


def test_a_decoder_visual_stream_updates_image_relevancy_after_each_block():
    r_ii = _t([[1.5, 0.5], [0.0, 2.0]])
    a_tt = [_t([[1.0, 0.0], [0.5, 0.5]])] * 2
    a_ti = [_t([[1.0, 0.0], [0.25, 0.75]])] * 2
    a_vv = [_t([[0.2, 0.8], [0.6, 0.4]])] * 2
    # block 0 reads R^ii as it entered; then R^ii += A_vv R^ii; block 1 reads the updated one
    r_tt = torch.eye(2, dtype=torch.float64)[None]
    r_ti = torch.zeros(1, 2, 2, dtype=torch.float64)
    ii = r_ii
    for k in range(2):
        r_tt = r_tt + a_tt[k] @ r_tt
        r_ti = r_ti + a_tt[k] @ r_ti
        r_ti = r_ti + rel.normalise(r_tt).transpose(-1, -2) @ a_ti[k] @ rel.normalise(ii)
        ii = ii + a_vv[k] @ ii
    assert torch.allclose(rel.decoder_relevancy(r_ii, a_tt, a_ti, a_vv), r_ti)
    assert not torch.allclose(rel.decoder_relevancy(r_ii, a_tt, a_ti), r_ti)  # the stream matters
