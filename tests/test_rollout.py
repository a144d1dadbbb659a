"""Attention rollout (Abnar & Zuidema 2020): the formula by hand and against a direct loop
implementation, per-row discard that never drops the diagonal or CLS, row-stochastic results on
every zoo ViT kind (Linformer's and Nyströmformer's signed effective matrices included), captioner
maps against a manual composition, and the CLI end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probe.analyses import rollout as ro
from probe.cli import main
from probe.data import ImageSet
from probe.registry import load_model
from probe.runs.store import RunStore
from probe.types import InputMeta, layer_of

ZOO_VITS = ["vit-standard", "vit-linformer", "vit-performer", "vit-nystrom", "vit-hybrid", "vit-merged-qkv"]
VISION = "vision.blocks.*.attn.pattern"


@pytest.fixture(scope="module")
def shapes2() -> ImageSet:
    return ImageSet.shapes(2)


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# ------------------------------------------------------------------------------ the formula
def test_hand_computed_three_tokens_two_layers():
    # layer 1, two heads (permutations):  h1 = [[1,0,0],[0,0,1],[0,1,0]], h2 = [[0,1,0],[0,0,1],[1,0,0]]
    #   mean  = [[.5,.5,0],[0,0,1],[.5,.5,0]];  Â1 = (mean + I) / 2 = [[.75,.25,0],[0,.5,.5],[.25,.25,.5]]
    # layer 2, both heads [[0,0,1],[1,0,0],[0,1,0]];  Â2 = [[.5,0,.5],[.5,.5,0],[0,.5,.5]]
    # J = Â2 · Â1:  row 0 = .5·[.75,.25,0] + .5·[.25,.25,.5] = [.5,.25,.25]
    #               row 1 = .5·[.75,.25,0] + .5·[0,.5,.5]    = [.375,.375,.25]
    #               row 2 = .5·[0,.5,.5]   + .5·[.25,.25,.5] = [.125,.375,.5]
    # (the reversed order Â1 · Â2, vit-explain #6, gives row 0 = [.5,.125,.375])
    h1, h2 = _t([[1, 0, 0], [0, 0, 1], [0, 1, 0]]), _t([[0, 1, 0], [0, 0, 1], [1, 0, 0]])
    p2 = _t([[0, 0, 1], [1, 0, 0], [0, 1, 0]])
    layers = [torch.stack([h1, h2])[None], torch.stack([p2, p2])[None]]
    want = _t([[0.5, 0.25, 0.25], [0.375, 0.375, 0.25], [0.125, 0.375, 0.5]])
    torch.testing.assert_close(ro.rollout(layers, fusion="mean")[0].double(), want, atol=1e-7, rtol=0)
    # start_layer=1: layer 1 alone, Â2
    torch.testing.assert_close(ro.rollout(layers, start_layer=1)[0].double(),
                               _t([[0.5, 0, 0.5], [0.5, 0.5, 0], [0, 0.5, 0.5]]), atol=1e-7, rtol=0)
    # min fusion of layer 1: min(h1, h2) = [[0,0,0],[0,0,1],[0,0,0]]; + I = [[1,0,0],[0,1,1],[0,0,1]],
    # row sums 1, 2, 1 -> [[1,0,0],[0,.5,.5],[0,0,1]]. vit-explain #16 (a / a.sum(-1), no keepdim)
    # divides column j by row j's sum instead: [[1,0,0],[0,.5,1],[0,0,1]], rows no longer sum to 1.
    torch.testing.assert_close(ro.rollout(layers[:1], fusion="min")[0].double(),
                               _t([[1, 0, 0], [0, 0.5, 0.5], [0, 0, 1]]), atol=1e-7, rtol=0)


def _reference(patterns, fusion, ratio, start, keep):
    """Abnar & Zuidema rollout, written as loops over batch elements and rows with numpy."""
    b, _, n, _ = patterns[0].shape
    out = np.zeros((b, n, n))
    for e in range(b):
        joint = None
        for layer in range(start, len(patterns)):
            heads = patterns[layer][e].numpy().astype(np.float64)
            a = {"mean": heads.mean(0), "max": heads.max(0), "min": heads.min(0)}[fusion].copy()
            for i in range(n):
                candidates = [j for j in range(n) if j != i and j not in keep]
                k = int(np.floor(ratio * len(candidates)))
                for j in sorted(candidates, key=lambda j, i=i: a[i, j])[:k]:
                    a[i, j] = 0.0
            m = a + np.eye(n)
            for i in range(n):
                m[i] = m[i] / m[i].sum()
            joint = m if joint is None else m @ joint
        out[e] = joint
    return out


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("ratio,start,keep", [(0.0, 0, [0]), (0.3, 0, [0]), (0.3, 1, [3]), (0.3, 0, [])])
def test_matches_a_direct_implementation(fusion, ratio, start, keep):
    g = torch.Generator().manual_seed(7)
    patterns = [torch.randn(2, 3, 9, 9, generator=g).mul(2).softmax(-1) for _ in range(3)]
    got = ro.rollout(patterns, fusion=fusion, discard_ratio=ratio, start_layer=start, keep=keep)
    want = _reference(patterns, fusion, ratio, start, keep)
    np.testing.assert_allclose(got.double().numpy(), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 9), atol=1e-6, rtol=0)


def test_discard_never_drops_the_diagonal_or_cls_and_works_per_batch_element():
    n, cls = 5, 2  # CLS deliberately not at 0: the caller says where it is
    g = torch.Generator().manual_seed(1)
    a = 0.1 + torch.rand(2, n, n, generator=g)
    a[:, torch.arange(n), torch.arange(n)] = 0.001  # the diagonal: the smallest of every row
    a[:, :, cls] = 0.002                            # the CLS column: the next smallest
    a[1] = a[1].flip(-1)                            # item 1's order differs from item 0's
    a[1, torch.arange(n), torch.arange(n)] = 0.001
    a[1, :, cls] = 0.002
    out = ro.discard_smallest(a, 0.5, keep=[cls])
    for e in range(2):
        assert bool((out[e].diagonal() > 0).all()) and bool((out[e][:, cls] > 0).all())
        for i in range(n):
            eligible = [j for j in range(n) if j not in (i, cls)]
            k = int(np.floor(0.5 * len(eligible)))  # 1 of 3 eligible, 2 of 4 in the CLS row
            smallest = sorted(eligible, key=lambda j, e=e, i=i: float(a[e, i, j]))[:k]
            assert [j for j in range(n) if out[e, i, j] == 0] == sorted(smallest), (e, i)
    assert not torch.equal(out[0] == 0, out[1] == 0), "each batch element ranks its own rows"
    # through rollout (one layer, one head): discarded entries stay 0, the protected ones do not
    r = ro.rollout([a[:, None]], discard_ratio=0.5, keep=[cls])
    assert torch.equal(r == 0, out == 0)
    torch.testing.assert_close(r.sum(-1), torch.ones(2, n))


def test_signed_rows_positive_part_or_refusal():
    p = torch.tensor([[[[0.8, -0.4, 0.6], [0.2, 0.2, 0.2], [-0.1, -0.2, -0.3]]]], dtype=torch.float64)
    s = ro.stochastic_rows(p, "positive")
    torch.testing.assert_close(s[0, 0], _t([[4 / 7, 0, 3 / 7], [1 / 3, 1 / 3, 1 / 3], [0, 0, 0]]))
    r = ro.rollout([p], signed="positive")
    assert float(r.min()) >= 0 and float(r[0, 2, 2]) == 1.0  # no positive entry: the token keeps itself
    with pytest.raises(ro.SignedPatternError, match="not a distribution per row") as e:
        ro.rollout([p], signed="refuse")
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------ every zoo ViT kind
@pytest.mark.parametrize("name", ZOO_VITS)
def test_zoo_vit_kinds_give_row_stochastic_rollouts(name, shapes2):
    adapter = load_model(name, weights="demo")
    res = ro.Rollout()(adapter, shapes2)
    r = res.arrays["rollout"]
    n = adapter.n_image_tokens
    assert r.shape == (2, n, n) and res.depth == len(res.layers) == 4
    torch.testing.assert_close(r.sum(-1), torch.ones(2, n), atol=1e-5, rtol=0)
    assert float(r.min()) >= 0 and float(r.max()) <= 1
    meta = InputMeta.from_dict(res.meta)
    c, (lo, hi) = meta.spans["cls"][0], meta.spans["image"]
    torch.testing.assert_close(res.arrays["rollout.cls_map"], r[:, c, lo:hi].reshape(2, *meta.grid))
    assert res.approximate == (adapter.capabilities.attention_weights == "effective")
    signed = any(s["negative"] > 0 for s in res.pattern_stats)
    assert signed == (name in ("vit-linformer", "vit-nystrom")), res.pattern_stats
    if name in ("vit-linformer", "vit-nystrom"):
        assert any("positive part, rows renormalised" in line for line in ro.Rollout().summary_lines(res))
        with pytest.raises(ro.SignedPatternError) as e:
            ro.Rollout()(adapter, shapes2, signed="refuse")
        assert "\n" not in str(e.value) and "--signed positive" in str(e.value)
    else:  # rows already distributions: refuse accepts them, and positive changed nothing
        again = ro.Rollout()(adapter, shapes2, signed="refuse").arrays["rollout"]
        torch.testing.assert_close(again, r, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------ captioners
@pytest.mark.parametrize("name", ["blip", "git"])
def test_captioner_maps_equal_a_manual_composition(name, shapes2):
    adapter = load_model(name, weights="demo")
    res = ro.Rollout()(adapter, shapes2, max_new_tokens=6)
    hook = adapter.flow_hook
    caps, cache = adapter.generate_with_cache(shapes2.images, [hook.format(i="*"), VISION], max_new_tokens=6)
    assert res.captions == caps["text"] and res.tokens == caps["tokens"]
    spans = cache.meta.spans
    lo, hi = spans["cls"][0], spans["image"][1]  # [CLS, patches] are the keys 0 .. n_image_tokens
    assert (lo, hi) == (0, adapter.n_image_tokens)
    names = sorted((n for n in cache.names() if n.startswith("vision.")), key=layer_of)
    vision = ro.rollout([cache[n] for n in names], keep=[spans["cls"][0]])
    text = sorted((n for n in cache.names() if n.startswith("text.")), key=layer_of)
    rows = torch.stack([cache.stack_calls(n)[..., lo:hi].mean(1) for n in text]).mean(0)  # (b, steps, image)
    manual = torch.einsum("bsj,bjk->bsk", rows.double(), vision.double()).float()
    got = res.arrays["rollout"]
    assert got.shape == (2, 6, adapter.n_image_tokens)
    torch.testing.assert_close(got, manual, atol=1e-6, rtol=0)
    torch.testing.assert_close(res.arrays["rollout.vision"], vision)
    # not renormalised: each map sums to the token's layer-mean image mass (CLS + patches)
    mass = rows.sum(-1)
    torch.testing.assert_close(got.sum(-1), mass, atol=1e-5, rtol=0)
    for i, toks in enumerate(res.tokens):
        k = len(toks)
        if adapter.capabilities.joint_attention:  # the rest of the joint row is on the text
            assert bool((mass[i, :k] < 1).all()) and bool((mass[i, :k] > 0).all())
        else:  # a separate cross-attention reads only image tokens
            torch.testing.assert_close(mass[i, :k], torch.ones(k), atol=1e-5, rtol=0)
        assert bool((got[i, k:] == 0).all()), "steps after the end token are 0"
    assert res.token_maps(0).shape == (len(res.tokens[0]), *res.meta["grid"])
    assert "rollout_tokens" in ro.Rollout().render(res)


def test_captioner_whose_text_reads_other_tokens_is_refused(shapes2, monkeypatch):
    adapter = load_model("blip", weights="demo")
    meta = adapter._meta

    def fewer(n_text, tokens):  # as if the text read 32 query tokens instead of the tower's 65
        m = meta(n_text, tokens)
        return InputMeta(spans={**m.spans, "image": (1, 32)}, grid=(1, 31), image_size=m.image_size,
                         tokens=m.tokens, flow_hook=m.flow_hook, joint=m.joint)

    monkeypatch.setattr(adapter, "_meta", fewer)
    with pytest.raises(ro.ProbeError, match="reads 32 image tokens but its vision tower has 65") as e:
        ro.Rollout()(adapter, shapes2, max_new_tokens=3)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------ the CLI
def test_cli_end_to_end_and_one_line_errors(store_root, capsys):
    assert main(["run", "rollout", "--model", "vit-standard", "--shapes", "2"]) == 0
    out = capsys.readouterr().out
    assert "CLS keeps" in out and "saved run" in out
    store = RunStore(store_root)
    (info,) = store.list()
    run = store.load(info.id)
    assert run.result.kind == "rollout" and run.result.arrays["rollout"].shape == (2, 65, 65)
    assert {f.name for f in run.figures} == {"rollout_cls.png"}
    assert main(["run", "rollout", "--model", "blip", "--weights", "demo", "--shapes", "1",
                 "--max-new-tokens", "3", "--fusion", "max", "--discard-ratio", "0.2"]) == 0
    capsys.readouterr()
    cap = next(r for r in (store.load(i.id) for i in store.list()) if r.result.captioner)
    assert cap.result.arrays["rollout"].shape == (1, 3, 65) and cap.result.fusion == "max"
    for argv, needle in [
        (["--model", "vit-standard", "--start-layer", "99"], "--start-layer 99: vit-standard has 4 vision layers"),
        (["--model", "vit-standard", "--discard-ratio", "1"], "--discard-ratio 1.0: must be < 1"),
        (["--model", "vit-standard", "--max-new-tokens", "4"], "--max-new-tokens: vit-standard does not caption"),
        (["--model", "vit-linformer", "--signed", "refuse"], "use signed='positive' (--signed positive)"),
    ]:
        assert main(["run", "rollout", *argv, "--shapes", "1"]) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
    assert len(store.list()) == 2, "refused runs save nothing"


@pytest.mark.parametrize("name", ["blip", "git", "vit-standard"])
def test_teacher_forced_method_equals_the_generation_time_rollout(name, shapes2):
    from probe.analyses.explain import METHODS, Target

    adapter = load_model(name)
    analysis = ro.Rollout()
    result = analysis.run(adapter, shapes2, analysis.Params())
    px = adapter.preprocess(shapes2.images)["pixel_values"]
    if result.captioner:
        with torch.no_grad():
            cap = adapter.caption_pixels(px)
        ids, mask = adapter.teacher_ids(cap["ids"], cap["tokens"])
        maps = METHODS["rollout"].fn(adapter, Target(px, ids, mask))
        lo, hi = result.meta["spans"]["image"]
        want = result.arrays["rollout"][..., lo:hi]
        assert torch.allclose(maps[:, : want.shape[1]], want, atol=1e-5)
    else:
        maps = METHODS["rollout"].fn(adapter, Target(px, labels=torch.zeros(2, dtype=torch.long)))
        assert torch.allclose(maps[:, 0], result.arrays["rollout.cls_map"].flatten(1), atol=1e-6)


def test_rows_only_equal_the_full_rollout():
    gen = torch.Generator().manual_seed(3)
    pats = [torch.softmax(torch.randn(2, 3, 7, 7, generator=gen), -1) for _ in range(4)]
    full = ro.rollout(pats, discard_ratio=0.3, keep=[0], start_layer=1)
    part = ro.rollout(pats, discard_ratio=0.3, keep=[0], start_layer=1, rows=[0, 4])
    assert torch.allclose(part, full[:, [0, 4]], atol=1e-6)
    full = ro.rollout(pats, start_layer=1)  # the fast path: mean fusion, no discard
    for exact in (False, True):
        assert torch.allclose(ro.rollout(pats, start_layer=1, rows=[0, 4], exact=exact), full[:, [0, 4]], atol=1e-6)
    signed = [p - 0.05 for p in pats]  # rows neither positive nor summing to 1
    assert torch.allclose(ro.rollout(signed, rows=[2]), ro.rollout(signed)[:, [2]], atol=1e-6)
    dead = [p.clone() for p in pats]
    dead[2][:, :, 3] = -1.0  # a row with no positive entry: zero after the positive part
    assert torch.allclose(ro.rollout(dead, rows=[0, 3]), ro.rollout(dead)[:, [0, 3]], atol=1e-6)
    with pytest.raises(ValueError, match="rows is empty"):
        ro.rollout(pats, rows=[])
