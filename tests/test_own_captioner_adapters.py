"""prefix-vlm and mmca through the adapter interface: checkpoints, captions, hooks, image masking."""

from __future__ import annotations

import pytest
import torch

from probe import registry
from probe.capture import Precomputed, capture, intervene, record_outputs
from probe.data.shapes import iter_split
from probe.registry import load_model
from probe.weights import CheckpointError, WeightsNotFound
from tests.helpers import SMALL_OWN_CAPTIONERS as SMALL


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
    assert cache.meta.spans["text"] == (off, off + steps)  # the generated tokens
    for n in full.names():
        if n not in cache.stepwise:  # image-query patterns (MMCA's visual stream): whole, every step
            for call in cache.calls(n):
                torch.testing.assert_close(call, full[n], atol=1e-5, rtol=0)
            continue
        rows = cache.stack_calls(n)
        torch.testing.assert_close(rows, full[n][:, :, off : off + steps, : rows.shape[-1]], atol=1e-5, rtol=0)



def test_default_caption_length_fits_the_longest_captions():
    """The default generation length comes from the decoder (max_len - 1): the bundled models'
    3-object captions end with <eos> instead of being cut at a fixed 32 characters."""
    samples = [s for s in iter_split("test", 40, seed=0, image_size=64) if len(s.objects) == 3][:4]
    for name in ("prefix-vlm", "mmca"):
        a = load_model(name, weights="demo")
        assert a.max_new_tokens == a.model.cfg.max_len - 1
        caps = a.caption([s.image for s in samples])
        assert all(t[-1] == "<eos>" for t in caps["tokens"]), caps["text"]
        assert max(len(t) for t in caps["text"]) > 32


@pytest.mark.parametrize("name", list(registry.models(task="caption")))
def test_vision_output_can_be_precomputed(name, rgb_images):
    """`vision.output` is the module the captioner calls with the pixels: recorded once, it stands in
    for the vision tower (which then does not run) and the text side reads the same."""
    a = load_model(name, weights="demo")
    batch = a.preprocess(rgb_images, ["a red circle"] * len(rgb_images))
    with torch.no_grad(), record_outputs(a, "vision.output") as outs:
        want = a.forward(batch)
        caps = a.caption(rgb_images, max_new_tokens=8)
    (spec,) = [s for s in a.hook_specs() if s.name == "vision.blocks.0.resid_post"]
    ran = []
    handle = a.module(spec.module).register_forward_hook(lambda *_: ran.append(1))
    try:
        with torch.no_grad(), intervene(a, [Precomputed("vision.output", outs[0])]):
            got = a.forward(batch)
            again = a.caption_pixels(batch["pixel_values"], max_new_tokens=8)
    finally:
        handle.remove()
    assert not ran, "the vision tower ran"
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert torch.equal(again["ids"], caps["ids"])


def test_meta_builds_every_model_without_weights():
    for name, entry in registry.models().items():
        a = load_model(name, weights="meta")
        assert a.weights.source == "meta" and a.device.type == "meta" and a.hook_specs(), name
        if entry.capabilities.published and "caption" in entry.capabilities.tasks:
            assert sum(p.numel() for p in a.model.parameters()) > 50e6, name  # the published size


def test_checkpoint_errors_name_the_folder(adapter, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = adapter.save(tmp_path / "ckpt")
    state = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in state.items() if not k.startswith("proj.")}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"{folder}.*missing 2 \\(proj.bias, proj.weight\\)") as err:
        load_model(adapter.name, weights=str(folder))
    assert "\n" not in str(err.value)
    with pytest.raises(WeightsNotFound, match="no published weights"):
        load_model("mmca", weights="pretrained")


@pytest.mark.parametrize("name", list(registry.models(task="caption")))
def test_word_steps_align_caption_words_with_generation_steps(name):
    """Issue 17.9: each word of a caption with the steps that produced it (a word per step for
    word tokenizers, a letter per step for our char models), and padded steps zeroed in stacks."""
    samples = [s for s in iter_split("test", 12, seed=0, image_size=64)][:3]
    a = load_model(name, weights="demo")
    caps, cache = a.generate_with_cache([s.image for s in samples], a.flow_hook.format(i=0), reduce="mean")
    for i, text in enumerate(caps["text"]):
        words = a.word_steps(caps["ids"][i].tolist())
        assert [w for w, _ in words] == text.split()
        tokens = caps["tokens"][i]
        for w, steps in words:
            assert steps == sorted(steps) and steps
            joined = "".join(tokens[k] for k in steps).replace("##", "").replace("Ġ", "")
            assert joined.replace(" ", "") == w, (w, [tokens[k] for k in steps])
        if a.capabilities.family in ("prefix-vlm", "mmca"):
            assert all(len(steps) == len(w) for w, steps in words)
        else:
            assert all(len(steps) == 1 for w, steps in words)
    rows = cache.stack_calls(a.flow_hook.format(i=0))  # (b, 1, steps, keys)
    for i, toks in enumerate(caps["tokens"]):
        assert rows[i, :, len(toks):].abs().max() == 0 if rows.shape[2] > len(toks) else True
        assert rows[i, :, : len(toks)].sum() > 0
    assert cache.meta.spans["text"][1] - cache.meta.spans["text"][0] == caps["ids"].shape[1]
