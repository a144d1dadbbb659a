"""The key/value cache of our character decoders (prefix-vlm, mmca): the same captions, logits and
captured values as re-running the prefix every step, under interventions too; `uncached` respected."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from probe.capture import MaskTokens, Patch, Precomputed, ZeroHeads, capture, intervene, record_outputs
from probe.data.shapes import iter_split
from probe.models.prefix_vlm import joint_mask
from probe.models.text import CharTokenizer, DecoderCache, greedy_decode
from probe.registry import load_model
from tests.helpers import SMALL_OWN_CAPTIONERS as SMALL

FAMILIES = ("prefix-vlm", "mmca")
_ZOO: dict = {}


def zoo(name):
    if name not in _ZOO:
        a = load_model(name, weights="demo")
        samples = list(iter_split("test", 6, seed=0, image_size=a.image_size))
        # captions of 19 to 48 characters (one, two and three objects): rows end at different steps
        _ZOO[name] = a, a.preprocess([samples[i].image for i in (1, 3, 4, 5)])["pixel_values"]
    return _ZOO[name]


def tiny(name, seed=0):
    return load_model(name, weights="random", seed=seed, **SMALL[name])


@contextmanager
def positions_seen(adapter):
    """Text-stream positions decoder block 0 is given per call (prefix-vlm: prefix + text)."""
    seen: list[int] = []
    idx = 1 if adapter.name == "mmca" else 0
    h = adapter.model.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[idx].shape[1]))
    try:
        yield seen
    finally:
        h.remove()


def both(model, px, n, **kw):
    """(ids, logits) cached and uncached."""
    return model.generate_logits(px, n, use_cache=True, **kw), model.generate_logits(px, n, use_cache=False, **kw)


@pytest.mark.parametrize("name", FAMILIES)
def test_zoo_captions_and_logits_equal_uncached(name):
    a, px = zoo(name)
    (ids, logits), (ref_ids, ref_logits) = both(a.model, px, a.max_new_tokens)
    assert torch.equal(ids, ref_ids)
    assert logits.shape == (px.shape[0], ids.shape[1] - 1, len(a.tokenizer))
    # float32 over 3 layers, one query row against many: rounding only (logits reach ~15)
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=0)
    assert (ids == CharTokenizer.eos_id).any(1).all()  # real captions, ended by <eos>
    assert a.caption_pixels(px)["text"] == a.caption_pixels(px, use_cache=False)["text"]


@pytest.mark.parametrize("name", FAMILIES)
def test_tiny_random_float64_logits_equal_uncached_exactly(name):
    """In float64 the cached and uncached computations agree to 1e-10: the same function, not an
    approximation of it; forced to the full length (no <eos>), batch of 3."""
    a = tiny(name)
    a.model.double()
    px = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    n = 14
    (ids, logits), (ref_ids, ref_logits) = both(a.model, px, n, min_new_tokens=n)
    assert ids.shape == (3, n + 1) and torch.equal(ids, ref_ids)
    torch.testing.assert_close(logits, ref_logits, atol=1e-10, rtol=0)
    assert not torch.allclose(logits[0], logits[1], atol=1e-3)  # the image matters


@pytest.mark.parametrize("name", FAMILIES)
def test_ragged_eos_rows_equal_their_captions_alone(name):
    a, px = zoo(name)
    ids = a.model.generate(px, a.max_new_tokens)
    ends = [row.index(CharTokenizer.eos_id) for row in ids.tolist()]
    assert len(set(ends)) >= 3, ends  # rows finish at different steps
    for i, end in enumerate(ends):
        assert (ids[i, end + 1 :] == CharTokenizer.pad_id).all()
        alone = a.model.generate(px[i : i + 1], a.max_new_tokens)
        assert alone.shape[1] == end + 1 and torch.equal(alone[0], ids[i, : end + 1])
        assert torch.equal(alone, a.model.generate(px[i : i + 1], a.max_new_tokens, use_cache=False))


@pytest.mark.parametrize("name", FAMILIES)
def test_decoder_sees_one_new_position_per_step_and_the_image_once(name):
    a = tiny(name)
    px = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    n, first = 9, (a.n_image_tokens if name == "prefix-vlm" else 0) + 1
    vision = []
    h = a.model.vision.register_forward_hook(lambda *_: vision.append(1))
    try:
        with positions_seen(a) as cached:
            a.model.generate(px, n, n)
        with positions_seen(a) as full:
            a.model.generate(px, n, n, use_cache=False)
    finally:
        h.remove()
    assert cached == [first] + [1] * (n - 1)  # linear: the prefix once, then the newest token
    assert full == [first + k for k in range(n)]  # quadratic: the whole prefix every step
    assert len(vision) == 2  # one vision forward per generate call


@pytest.mark.parametrize("name", FAMILIES)
def test_text_patch_makes_generation_uncached(name):
    """A Patch on a text hook (`probe.capture.uncached`): every step re-runs the prefix, so the patch
    lands at the same absolute positions as teacher forcing; a vision-side Precomputed keeps the cache."""
    a = tiny(name)
    px = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    n, first = 7, (a.n_image_tokens if name == "prefix-vlm" else 0) + 1
    hook = "text.blocks.0.resid_post"
    src = torch.randn(1, first + n, a.model.cfg.d_model if name == "prefix-vlm" else a.model.cfg.dim)
    patch = Patch(hook, src, tokens=[first - 1 + 2])  # the third text position only
    plain = a.model.generate(px, n, n)
    with intervene(a, [patch]), positions_seen(a) as seen:
        got = a.model.generate(px, n, n)
    assert seen == [first + k for k in range(n)]
    assert torch.equal(got[:, :3], plain[:, :3]) and not torch.equal(got, plain)  # patched from step 2 on
    with intervene(a, [patch]):
        assert torch.equal(got, a.model.generate(px, n, n, use_cache=False))
    with torch.no_grad(), record_outputs(a, "vision.output") as outs:
        a.model.encode_image(px)
    with intervene(a, [Precomputed("vision.output", outs[0])]), positions_seen(a) as seen:
        assert torch.equal(a.model.generate(px, n, n), plain)
    assert seen == [first] + [1] * (n - 1)


@pytest.mark.parametrize("name", FAMILIES)
def test_zero_heads_and_mask_tokens_give_the_same_captions_cached(name):
    a, px = zoo(name)
    b = px.shape[0]
    removed = torch.zeros(b, a.n_image_tokens, dtype=torch.bool)
    removed[:, 1 : a.n_image_tokens // 2] = True  # the upper half of the patches
    removed[0, :] = True  # row 0: blind
    cases = {"zero": [ZeroHeads("text.blocks.1.attn.z", [0, 2])], "mask": a.mask_image_tokens(removed),
             "both": [ZeroHeads("text.blocks.0.attn.z", torch.eye(b, 4, dtype=torch.bool)), *a.mask_image_tokens(removed)]}
    plain = a.model.generate(px, a.max_new_tokens)
    for case, ivs in cases.items():
        with intervene(a, ivs):
            with positions_seen(a) as seen:
                ids, logits = a.model.generate_logits(px, a.max_new_tokens)
            ref_ids, ref_logits = a.model.generate_logits(px, a.max_new_tokens, use_cache=False)
        assert seen[1:] == [1] * (len(seen) - 1), case  # the cache was used
        assert torch.equal(ids, ref_ids), case
        torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=0, msg=case)
        assert not torch.equal(ids, plain), f"{case} changed no caption"


@pytest.mark.parametrize("name", FAMILIES)
def test_key_mask_counted_from_the_end_refills_the_cache(name):
    """MaskTokens([-1]) on text keys removes a different key at every step (the newest): cached rows
    computed under the old mask are stale, so the cache starts over (each such step runs like the
    uncached one)."""
    a = tiny(name)
    a.model.double()
    px = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    n = 8
    with intervene(a, [MaskTokens([-1], attention="text.blocks.*.attn.pattern")]):
        image = a.model.encode_image(px)
        cache = DecoderCache(a.model.cfg.depth)
        ids, logits = greedy_decode(lambda t: a.model.decode(image, t, cache), 2, n, px.device, n)
        ref_ids, ref_logits = a.model.generate_logits(px, n, n, use_cache=False)
    assert cache.refills == n - 1  # the mask moved at every step after the first
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(logits, ref_logits, atol=1e-10, rtol=0)
    # an absolute position keeps the cache
    with intervene(a, [MaskTokens([0], attention="text.blocks.*.attn.pattern")]):
        cache = DecoderCache(a.model.cfg.depth)
        ids, logits = greedy_decode(lambda t: a.model.decode(image, t, cache), 2, n, px.device, n)
        ref_ids, ref_logits = a.model.generate_logits(px, n, n, use_cache=False)
    assert cache.refills == 0 and torch.equal(ids, ref_ids)
    torch.testing.assert_close(logits, ref_logits, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_capture_during_generation_is_unchanged(name):
    """Every hook (patterns, attn.z, resid_post, MMCA's visual stream vattn/vresid_post, vision)
    captured while generating: the same calls, shapes and values cached as uncached."""
    a = tiny(name)
    images = [img for img in _images(3)]
    n = 6
    caps, cache = a.generate_with_cache(images, "*", max_new_tokens=n, min_new_tokens=n)
    with positions_seen(a) as seen:
        again, _ = a.generate_with_cache(images, "*", max_new_tokens=n, min_new_tokens=n)
    ref_caps, ref = a.generate_with_cache(images, "*", max_new_tokens=n, min_new_tokens=n, use_cache=False)
    assert seen[1:] == [1] * (n - 1)  # cached even with every hook listened to
    assert caps["text"] == ref_caps["text"] == again["text"]
    assert set(cache.names()) == set(ref.names()) and any("vattn" in k for k in ref.names()) == (name == "mmca")
    for k in ref.names():
        got, want = cache.calls(k), ref.calls(k)
        assert len(got) == len(want), k
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape, k
            torch.testing.assert_close(g, w, atol=1e-5, rtol=0, msg=k)


@pytest.mark.parametrize("name", FAMILIES)
def test_plain_capture_of_a_cached_step_holds_the_newest_query_row(name):
    """Outside `capture_generation`, a pattern call of a cached step is the newest query row only
    (as with the HF captioners' caches): row -1 of the uncached call."""
    a = tiny(name)
    px = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    n = 4
    hook = "text.blocks.1.attn.pattern"
    with capture(a, hook) as cached:
        a.model.generate(px, n, n)
    with capture(a, hook) as full:
        a.model.generate(px, n, n, use_cache=False)
    for k, (c, f) in enumerate(zip(cached.calls(hook), full.calls(hook), strict=True)):
        assert c.shape[2] == (f.shape[2] if k == 0 else 1)
        torch.testing.assert_close(c[:, :, -1], f[:, :, -1], atol=1e-6, rtol=0)


def test_cache_refuses_calls_that_do_not_extend_it():
    a = tiny("mmca")
    image = a.model.encode_image(torch.rand(1, 3, 32, 32))
    cache = DecoderCache(a.model.cfg.depth)
    ids = torch.tensor([[1, 5, 6]])
    with torch.no_grad():
        full = a.model.decode(image, ids)
        torch.testing.assert_close(a.model.decode(image, ids[:, :2], cache), full[:, :2], atol=1e-6, rtol=0)
        torch.testing.assert_close(a.model.decode(image, ids, cache), full[:, 2:], atol=1e-6, rtol=0)
        with pytest.raises(ValueError, match="does not extend"):
            a.model.decode(image, torch.tensor([[1, 7, 6, 4]]), cache)
        with pytest.raises(ValueError, match="other image tokens"):
            a.model.decode(image.clone(), torch.tensor([[1, 5, 6, 4]]), cache)


def test_joint_mask_rows_from_a_first_row():
    full = joint_mask(3, 4)
    for first in range(7):
        assert torch.equal(joint_mask(3, 4, first_row=first), full[first:])
    assert full[4].tolist() == [True] * 3 + [True, True, False, False]


def _images(n):
    from PIL import Image

    g = torch.Generator().manual_seed(5)
    return [Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(n)]


def test_nnsight_generation_sees_the_same_module_calls_cached_and_uncached():
    """The cached step still calls the attention modules as modules: prefix-vlm's `attn` envoy sees
    every step, and MMCA's shared out_proj (hook calls=2) is called for both streams every step
    when nnsight instruments it (its wrapper is on the instance, not a torch hook)."""
    import nnsight

    a = load_model("prefix-vlm", weights="demo")  # not the shared one: nnsight instruments in place
    m = a.nnsight()
    px = a.preprocess(_images(2))["pixel_values"]
    seen = {}
    for kw in ({"use_cache": False}, {}):
        with torch.no_grad(), m.generate(pixel_values=px, max_new_tokens=4, min_new_tokens=4, **kw) as tracer:
            shapes = nnsight.save([])
            for _ in tracer.iter[:4]:
                shapes.append(m.text.blocks[0].attn.output.shape[1])
        seen["cached" if not kw else "uncached"] = list(shapes)
    assert seen["uncached"] == [66, 67, 68, 69] and seen["cached"] == [66, 1, 1, 1]
    b = load_model("mmca", weights="demo")
    mm = b.nnsight()
    px = b.preprocess(_images(1))["pixel_values"]
    for kw, text_rows in (({"use_cache": False}, [1, 2, 3, 4]), ({}, [1, 1, 1, 1])):
        with torch.no_grad(), mm.generate(pixel_values=px, max_new_tokens=4, min_new_tokens=4, **kw) as tracer:
            rows = nnsight.save([])
            for _ in tracer.iter[:]:
                rows.append(mm.text.blocks[1].attn.o_proj.input.shape[1])
        n_vis = b.model.vision.cfg.seq_len
        assert list(rows) == [x for t in text_rows for x in (n_vis, t)], kw
