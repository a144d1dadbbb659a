"""prefix-vlm and mmca through the adapter interface: checkpoints, captions, hooks, image masking."""

from __future__ import annotations

import pytest
import torch

from probe.capture import capture, intervene
from probe.registry import load_model

SMALL = {
    "prefix-vlm": {"decoder": {"d_model": 32, "depth": 2, "heads": 2},
                   "vision": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                              "intermediate_size": 64, "image_size": 32, "patch_size": 8}},
    "mmca": {"config": {"dim": 32, "depth": 2, "heads": 2,
                        "vision": {"image_size": 32, "patch_size": 8, "dim": 32, "depth": 1, "heads": 2}}},
}


@pytest.fixture(params=["prefix-vlm", "mmca"])
def adapter(request):
    return load_model(request.param, weights="random", **SMALL[request.param])


def test_save_load_gives_identical_captions(adapter, rgb_images, tmp_path):
    first = adapter.caption(rgb_images, max_new_tokens=6)
    assert len(first["text"]) == 3 and first["ids"].shape[0] == 3
    adapter.save(tmp_path / "ckpt")
    back = load_model(adapter.name, weights=str(tmp_path / "ckpt"))
    assert back.weights.source == "local"
    assert back.caption(rgb_images, max_new_tokens=6)["text"] == first["text"]
    assert torch.equal(back.caption(rgb_images, max_new_tokens=6)["ids"], first["ids"])


def test_blind_baseline_and_zero_attention_on_removed_tokens(adapter, rgb_images):
    batch = adapter.preprocess(rgb_images[:2], ["abc", "cab"])
    other = adapter.preprocess(rgb_images[1:], ["abc", "cab"])
    xname = "text.blocks.*.xattn.pattern" if adapter.capabilities.has_cross_attention else "text.blocks.*.attn.pattern"
    with torch.no_grad(), intervene(adapter, adapter.mask_image_tokens()):
        a = adapter.forward(batch)
        b = adapter.forward(other)
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # blind: the image makes no difference
    removed = torch.zeros(2, adapter.n_image_tokens, dtype=torch.bool)
    removed[:, [1, 4]] = True
    removed[1, 2] = True
    with torch.no_grad(), intervene(adapter, adapter.mask_image_tokens(removed)), capture(adapter, xname) as cache:
        adapter.forward(batch)
    meta = adapter.input_meta(batch)
    t0, t1 = meta.spans["text"]
    for name in cache:
        p = cache[name]
        if not adapter.capabilities.has_cross_attention:
            p = p[:, :, t0:t1]  # text query rows of the joint attention
        assert (p[0][..., [1, 4]] == 0).all() and (p[1][..., [1, 2, 4]] == 0).all(), name
        assert (p[0][..., 2] > 0).all()


def test_hooks_and_meta(adapter, rgb_images):
    batch = adapter.preprocess(rgb_images, ["ab", "b", "abc"])
    with torch.no_grad(), capture(adapter, ["fusion.proj", "text.blocks.1.*pattern", "vision.blocks.0.attn.pattern"]) as c:
        logits = adapter.forward(batch)
    meta = adapter.input_meta(batch)
    n_img = adapter.n_image_tokens
    assert logits.shape[:2] == (3, 5)
    assert meta.spans["image"] == (1, n_img) and meta.grid == (4, 4) and meta.tokens[1][:3] == ["<bos>", "b", "<eos>"]
    assert c["fusion.proj"].shape[:2] == (3, n_img)
    assert c["vision.blocks.0.attn.pattern"].shape[-1] == n_img
    if adapter.capabilities.has_cross_attention:
        assert c["text.blocks.1.xattn.pattern"].shape == (3, 2, 5, n_img)
        assert c["text.blocks.1.attn.pattern"].shape == (3, 2, 5, 5)
    else:
        assert c["text.blocks.1.attn.pattern"].shape == (3, 2, n_img + 5, n_img + 5)
        assert meta.spans["text"] == (n_img, n_img + 5)


def test_wrong_checkpoint_kind_is_named(tmp_path):
    load_model("mmca", weights="random", **SMALL["mmca"]).save(tmp_path / "m")
    with pytest.raises(ValueError, match="holds a 'mmca' checkpoint"):
        load_model("prefix-vlm", weights=str(tmp_path / "m"))


def test_conditioning_adapter_hooks_and_image_masking(rgb_images):
    a = load_model("xattn-cond", weights="random")
    batch = a.preprocess(rgb_images, ["red", "blue square", ""])
    with torch.no_grad(), capture(a, "*xattn*") as c:
        logits = a.forward(batch)
    p = c["vision.blocks.0.xattn.pattern"]
    assert logits.shape == (3, 2) and p.shape == (3, 2, 64, 13)
    assert (p[0][..., 5:] == 0).all() and (p[2][..., 2:] == 0).all()  # padding gets zero weight
    torch.testing.assert_close(p[1].sum(-1), torch.ones(2, 64))
    other = a.preprocess(rgb_images[1:] + rgb_images[:1], ["red", "blue square", ""])
    with torch.no_grad(), intervene(a, a.mask_image_tokens()):
        torch.testing.assert_close(a.forward(batch), a.forward(other), atol=0, rtol=0)


def test_generate_with_cache_rows_equal_teacher_forced_rows(adapter, rgb_images):
    caps = adapter.caption(rgb_images[:2], max_new_tokens=5)
    got, cache = adapter.generate_with_cache(rgb_images[:2], max_new_tokens=5)
    assert got["text"] == caps["text"] and cache.meta.tokens == caps["tokens"]
    steps = caps["ids"].shape[1]
    bos = torch.full((2, 1), adapter.tokenizer.bos_id)
    batch = {"pixel_values": adapter.preprocess(rgb_images[:2])["pixel_values"],
             "input_ids": torch.cat([bos, caps["ids"][:, :-1]], 1)}
    with torch.no_grad(), capture(adapter, "text.*.pattern") as full:
        adapter.forward(batch)
    off = adapter.text_offset()
    for n in full.names():
        rows = cache.stack_calls(n)
        torch.testing.assert_close(rows, full[n][:, :, off : off + steps, : rows.shape[-1]], atol=1e-5, rtol=0)
