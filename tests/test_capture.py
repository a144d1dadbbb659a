"""The capture engine on the from-scratch ViT: selection, interventions, hook hygiene."""

from __future__ import annotations

import pytest
import torch

from probe.capture import MaskTokens, Replace, ZeroHeads, capture, intervene, sites
from probe.registry import load_model
from probe.types import select


@pytest.fixture
def vit():
    return load_model("vit-standard", weights="random", config={"image_size": 32, "patch_size": 8, "dim": 32, "depth": 2})


def test_unknown_hook_lists_available(vit):
    with pytest.raises(KeyError, match="vision.blocks.0.attn.pattern"):
        select(vit.hook_specs(), "text.*")


def test_resid_and_patterns_captured_with_dtype_and_meta(vit, rgb_images):
    batch = vit.preprocess(rgb_images)
    with torch.no_grad(), capture(vit, ["vision.blocks.*.resid_post", "vision.blocks.1.attn.pattern"],
                                  dtype=torch.float16) as cache:
        vit.forward(batch)
    assert cache["vision.blocks.0.resid_post"].shape == (3, 17, 32)
    assert cache["vision.blocks.1.attn.pattern"].dtype == torch.float16
    meta = vit.input_meta(batch)
    assert meta.spans == {"cls": (0, 1), "image": (1, 17)} and meta.grid == (4, 4)


def test_repeated_forwards_are_kept_in_order(vit, rgb_images):
    batch = vit.preprocess(rgb_images)
    with torch.no_grad(), capture(vit, "vision.blocks.0.resid_post") as cache:
        vit.forward(batch)
        vit.forward(batch)
    assert len(cache.calls("vision.blocks.0.resid_post")) == 2
    with pytest.raises(ValueError, match="captured 2 times"):
        cache["vision.blocks.0.resid_post"]
    assert set(cache.to_arrays()) == {"vision.blocks.0.resid_post@0", "vision.blocks.0.resid_post@1"}


def test_zero_heads_per_batch_element(vit, rgb_images):
    """A (batch, heads) mask zeroes different heads per element, equal to one forward per variant."""
    batch = vit.preprocess(rgb_images)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[1, 2] = True
    mask[2, [0, 3]] = True
    with torch.no_grad(), intervene(vit, [ZeroHeads("vision.blocks.0.attn.z", mask)]):
        batched = vit.forward(batch)
    for i, heads in enumerate([[], [2], [0, 3]]):
        with torch.no_grad(), intervene(vit, [ZeroHeads("vision.blocks.0.attn.z", heads)]):
            single = vit.forward({"pixel_values": batch["pixel_values"][i : i + 1]})
        torch.testing.assert_close(batched[i : i + 1], single, atol=1e-5, rtol=1e-5)


def test_replace_resid_changes_output_and_restores(vit, rgb_images):
    batch = vit.preprocess(rgb_images)
    with torch.no_grad():
        before = vit.forward(batch)
        with intervene(vit, [Replace("vision.blocks.1.resid_post", torch.zeros_like)]):
            replaced = vit.forward(batch)
        after = vit.forward(batch)
    assert torch.equal(before, after)
    # zeroed final residual -> logits are the head's bias through LayerNorm(0) = beta
    expected = vit.model.head(vit.model.norm.bias.expand(3, -1))
    torch.testing.assert_close(replaced, expected)


def test_intervention_errors_are_clear(vit, rgb_images):
    batch = vit.preprocess(rgb_images)
    with pytest.raises(ValueError, match="out of range"):
        with intervene(vit, [ZeroHeads("vision.blocks.0.attn.z", [9])]):
            vit.forward(batch)
    with pytest.raises(ValueError, match="derived"):
        with intervene(vit, [Replace("vision.blocks.0.attn.pattern", torch.zeros(1))]):
            pass
    with pytest.raises(ValueError, match="per-head"):
        with intervene(vit, [ZeroHeads("vision.blocks.0.resid_post", [0])]):
            vit.forward(batch)
    with pytest.raises(ValueError, match=r"MaskTokens mask must be \(batch=3, keys<=17\)"):
        with intervene(vit, [MaskTokens(torch.zeros(3, 18, dtype=torch.bool))]):
            vit.forward(batch)
    assert sites.active_site_count() == 0
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in vit.model.modules())


def test_run_with_cache_sets_meta(vit, rgb_images):
    out, cache = vit.run_with_cache(rgb_images, "vision.blocks.0.attn.pattern", rows=[0])
    assert out.shape == (3, 10)
    assert cache.meta.grid == (4, 4) and cache.meta.spans["cls"] == (0, 1)
    assert cache["vision.blocks.0.attn.pattern"].shape == (3, 4, 1, 17)
    assert cache.selection["rows"] == [0]


def test_threads_see_only_their_own_hooks_and_interventions(vit, rgb_images):
    """Issue 17.8: interventions in one thread changed plain forwards in another, and concurrent
    captures recorded several calls. Everything attached belongs to the thread that attached it."""
    import threading

    batch = vit.preprocess(rgb_images)
    with torch.no_grad():
        plain = vit.forward(batch)
    start, errors, plain_outs, calls = threading.Barrier(2), [], [], []

    def intervening():
        try:
            with intervene(vit, [ZeroHeads("vision.blocks.0.attn.z", [0, 1]), MaskTokens([1, 2, 3])]):
                start.wait()
                for _ in range(20):
                    with torch.no_grad():
                        vit.forward(batch)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    def plain_and_capturing():
        try:
            start.wait()
            for _ in range(20):
                with torch.no_grad(), capture(vit, "vision.blocks.1.attn.pattern") as cache:
                    plain_outs.append(vit.forward(batch))
                calls.append(len(cache.calls("vision.blocks.1.attn.pattern")))
        except Exception as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=intervening), threading.Thread(target=plain_and_capturing)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert calls == [1] * 20
    for out in plain_outs:
        torch.testing.assert_close(out, plain)
    assert sites.active_site_count() == 0


def test_float_token_masks_and_out_of_range_rows_are_refused(vit, rgb_images):
    batch = vit.preprocess(rgb_images[:1])
    with pytest.raises(ValueError, match="must be a bool tensor"), intervene(vit, [MaskTokens(torch.full((1, 5), 0.3))]):
        vit.forward(batch)
    with pytest.raises(ValueError, match="rows=\\[500\\] select outside"):
        with capture(vit, "vision.blocks.0.attn.pattern", rows=[500]):
            vit.forward(batch)
    assert sites.active_site_count() == 0


def test_precomputed_stands_in_for_a_module_and_restores_it(vit, rgb_images):
    from probe.capture import Precomputed, record_outputs, select_batch

    block = vit.module("blocks.1")
    batch = vit.preprocess(rgb_images)
    with torch.no_grad(), record_outputs(vit, "vision.blocks.1.resid_post") as outs:
        want = vit.forward(batch)
    calls = []
    with torch.no_grad(), intervene(vit, [Precomputed("vision.blocks.1.resid_post",
                                                       lambda x: calls.append(1) or outs[0])]):
        got = vit.forward(batch)
    torch.testing.assert_close(got, want)
    assert calls == [1] and vit.module("blocks.1") is block
    rows = select_batch(outs[0], torch.tensor([2, 0]), 3)
    torch.testing.assert_close(rows, outs[0][[2, 0]])


def test_precomputed_and_bridges_are_safe_across_threads():
    """Two threads stand in for the same vision tower with different outputs and leave at
    different times, while a third runs the real model and captures BLIP's self-computed
    attention: each sees its own, nothing stays installed."""
    import threading

    from probe.capture import Precomputed, record_outputs

    a = load_model("blip", weights="demo")
    from PIL import Image

    imgs = [Image.new("RGB", (64, 64), c) for c in ((200, 30, 30), (30, 30, 200))]
    batch = a.preprocess(imgs, ["a red circle"] * 2)
    with torch.no_grad(), record_outputs(a, "vision.output") as outs:
        want = a.forward(batch)
    swapped = outs[0].__class__(**{k: v.flip(0) for k, v in outs[0].items()})  # each row reads the other image
    with torch.no_grad():
        want_swapped = a.forward({k: v.flip(0) for k, v in batch.items()})  # same caption: rows read swapped images
    tower = a.module("vision_model")
    gate, later, errors, got = threading.Barrier(3), threading.Barrier(2), [], {}

    def stand_in(key, out, hold):
        try:
            with torch.no_grad(), intervene(a, [Precomputed("vision.output", out)]):
                gate.wait()
                got[key] = a.forward(batch)
                if hold:  # leave after the other stand-in has left
                    later.wait()
        except Exception as e:  # pragma: no cover
            errors.append(e)

    def plain():
        try:
            gate.wait()
            with torch.no_grad(), capture(a, "text.blocks.0.attn.pattern") as cache:
                got["plain"] = a.forward(batch)
            got["calls"] = len(cache.calls("text.blocks.0.attn.pattern"))
            later.wait()
        except Exception as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=stand_in, args=("same", outs[0], True)),
               threading.Thread(target=stand_in, args=("swapped", swapped, False)),
               threading.Thread(target=plain)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    torch.testing.assert_close(got["same"], want)
    torch.testing.assert_close(got["swapped"], want_swapped, atol=1e-5, rtol=0)
    torch.testing.assert_close(got["plain"], want)
    assert got["calls"] == 1
    assert a.module("vision_model") is tower and sites.active_site_count() == 0


def test_saving_while_a_stand_in_is_active_is_refused(tmp_path):
    from probe.capture import Precomputed
    from probe.types import ProbeError

    a = load_model("mmca", weights="demo")
    with intervene(a, [Precomputed("vision.output", torch.zeros(1))]):
        with pytest.raises(ProbeError, match="cannot save while a Precomputed"):
            a.save(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    a.save(tmp_path / "ckpt")  # after the block the whole model is back
    assert load_model("mmca", weights=str(tmp_path / "ckpt")).weights.source == "local"
