"""The shared-prefix ablation sweep (`Captioner.text_run`): each image's cross-attention keys and
values computed once, the blocks below a variant's first ablated layer shared with the unablated
forward; it must equal one whole forward per variant (the loop), with and without captions, and
leave nothing installed on the model."""

from __future__ import annotations

import pytest
import torch

from probe.adapter import Captioner
from probe.analyses import ablation
from probe.capture import sites
from probe.capture.engine import standing_in
from probe.data.shapes import iter_split
from probe.models.blip import BlipAdapter
from probe.models.git import GitAdapter
from probe.models.vit_gpt2 import ViTGPT2Adapter

TINY = {
    "blip": lambda: BlipAdapter.tiny(seed=1, image_size=64),
    "vit-gpt2": lambda: ViTGPT2Adapter.tiny(seed=1, image_size=64),
}
# the cross-attention output projections (xattn.z -> residual), scaled up so that a tiny random
# model's captions depend on what it reads from the image (BLIP's barely do at initialisation)
XATTN_OUT = {"blip": "crossattention.output.dense.weight", "vit-gpt2": "crossattention.c_proj.weight"}
# per family: the text blocks and the modules that compute the image keys/values
STACK = {
    "blip": ("text_decoder.bert.encoder.layer.{i}", ("crossattention.self.key", "crossattention.self.value")),
    "vit-gpt2": ("decoder.transformer.h.{i}", ("crossattention.c_attn",)),
}


@pytest.fixture(scope="module")
def adapters():
    out = {}
    for n, f in TINY.items():
        a = out[n] = f()
        with torch.no_grad():
            for pname, p in a.model.named_parameters():
                if pname.endswith(XATTN_OUT[n]):
                    p.mul_(4)
    return out


@pytest.fixture(scope="module")
def inputs(adapters):
    """Per family: three probe-shapes images of different content, their pixels and reference captions."""
    images = [s.image for s in iter_split("test", 3)]
    return {n: ablation.reference(a, images, max_new_tokens=6) for n, a in adapters.items()}


def layer_head_sweep(a, n_images):
    """``none``, every layer, every head: the full layer x head sweep."""
    vs = ablation.build_variants(a, "all", n_images, k=1, span=(1, a.n_image_tokens), attended=None, objects=None)
    return [v for v in vs if v.kind in ("none", "layer", "head")]


def no_hooks_left(model) -> None:
    for name, m in model.named_modules():
        assert not (m._forward_hooks or m._forward_pre_hooks or m._forward_hooks_with_kwargs
                    or m._forward_pre_hooks_with_kwargs), f"hook left on {name or 'the model'}"
    assert sites.active_site_count() == 0
    assert standing_in(model) == []


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("batch_size", [64, 7])
def test_shared_prefix_sweep_equals_one_forward_per_variant_exactly(name, batch_size, adapters, inputs):
    """Same log-probs to the last bit: each row's arithmetic is the loop's (rows are independent in
    every op; the keys/values, the states below the entry layer and the head outputs at it are the
    very tensors the unablated forward computed on the same images). Batch size 7 splits rows of
    different entry layers across chunks."""
    a = adapters[name]
    px, ref, ids, mask = inputs[name]
    assert not torch.equal(px[0], px[1]) and not torch.equal(px[1], px[2])  # three different images
    variants = layer_head_sweep(a, 3)
    assert len(variants) == 1 + 2 + 2 * 4  # tiny models: 2 text layers of 4 heads
    batched, _, _ = ablation.evaluate_variants(a, variants, px, ids, mask, batch_size=batch_size, generate=False)
    loop, _, _ = ablation.evaluate_variants(a, variants, px, ids, mask, loop=True, generate=False)
    assert torch.equal(batched, loop)
    assert (batched[1:] != batched[0]).any(1).all()  # every ablation changes something
    assert (batched[:, 0] != batched[:, 1]).all()  # and the images differ
    no_hooks_left(a.model)


@pytest.mark.parametrize("name", list(TINY))
def test_shared_prefix_sweep_with_captions_equals_the_loop(name, adapters, inputs):
    a = adapters[name]
    px, ref, ids, mask = inputs[name]
    variants = layer_head_sweep(a, 3)
    lb, tb, kb = ablation.evaluate_variants(a, variants, px, ids, mask, batch_size=10, generate=True, max_new_tokens=6)
    ll, tl, kl = ablation.evaluate_variants(a, variants, px, ids, mask, loop=True, generate=True, max_new_tokens=6)
    assert torch.equal(lb, ll)
    assert tb == tl and kb == kl
    assert tb[0] == ref["text"]  # "none" captions are the reference
    assert any(tb[j] != tb[0] for j in range(1, len(variants)))  # some ablation changes a caption
    no_hooks_left(a.model)


@pytest.mark.parametrize("name", list(TINY))
def test_every_kind_of_variant_equals_the_loop_exactly(name, adapters, inputs):
    """Blind, top-k, random-k and object regions (tokens removed from every layer: resumed at block
    0 under per-row key masks, batched apart from the rest) with the layers and heads, in chunks of
    5 rows: log-probs and captions as one forward per variant gives them."""
    a = adapters[name]
    px, _, ids, mask = inputs[name]
    samples = list(iter_split("test", 3))
    n_patch = a.n_image_tokens - 1
    attended = torch.linspace(0, 1, 3 * n_patch).reshape(3, n_patch)
    variants = ablation.build_variants(a, "all", 3, k=5, span=(1, a.n_image_tokens), attended=attended,
                                       objects=[s.masks for s in samples])
    assert {v.kind for v in variants} >= {"blind", "region", "object", "object-random", "layer", "head"}
    lb, tb, _ = ablation.evaluate_variants(a, variants, px, ids, mask, batch_size=5, generate=True, max_new_tokens=6)
    ll, tl, _ = ablation.evaluate_variants(a, variants, px, ids, mask, loop=True, generate=True, max_new_tokens=6)
    assert torch.equal(lb, ll)
    assert tb == tl
    no_hooks_left(a.model)


@pytest.mark.parametrize("name", list(TINY))
def test_sweep_in_image_chunks_equals_the_loop_exactly(name, adapters, inputs, monkeypatch):
    """More images than `IMAGE_CHUNK` (the bound on what the shared path keeps per image): the
    images go in chunks, each variant's removed tokens sliced with them; same numbers and captions."""
    monkeypatch.setattr(ablation, "IMAGE_CHUNK", 2)
    a = adapters[name]
    px, _, ids, mask = inputs[name]
    n_patch = a.n_image_tokens - 1
    attended = torch.linspace(0, 1, 3 * n_patch).reshape(3, n_patch)
    variants = ablation.build_variants(a, "all", 3, k=5, span=(1, a.n_image_tokens), attended=attended,
                                       objects=[s.masks for s in iter_split("test", 3)])
    lb, tb, _ = ablation.evaluate_variants(a, variants, px, ids, mask, batch_size=4, generate=True, max_new_tokens=6)
    ll, tl, _ = ablation.evaluate_variants(a, variants, px, ids, mask, loop=True, generate=True, max_new_tokens=6)
    assert torch.equal(lb, ll)
    assert tb == tl


@pytest.mark.parametrize("name", list(TINY))
def test_keys_values_once_per_image_and_blocks_below_the_entry_layer_not_rerun(name, adapters, inputs):
    """Rows each module processes in one batched sweep: the image key/value projections only the
    unablated forward's (one row per image), also while captions are generated; without captions,
    block 0 only the unablated rows (every variant of the sweep enters at its layer's
    cross-attention heads) and block 1 also the rows of the variants that entered at layer 0."""
    a = adapters[name]
    px, ref, ids, mask = inputs[name]
    variants = layer_head_sweep(a, 3)
    blocks, kv = STACK[name]
    seen: dict[str, int] = {}
    handles = []
    paths = [blocks.format(i=i) for i in range(2)] + [f"{blocks.format(i=i)}.{m}" for i in range(2) for m in kv]
    for p in paths:
        handles.append(a.module(p).register_forward_hook(
            lambda _m, args, _o, p=p: seen.__setitem__(p, seen.get(p, 0) + args[0].shape[0])))
    try:
        ablation.evaluate_variants(a, variants, px, ids, mask, batch_size=64, generate=True, max_new_tokens=6)
    finally:
        for h in handles:
            h.remove()
    for i in range(2):
        for m in kv:
            assert seen[f"{blocks.format(i=i)}.{m}"] == 3
    seen.clear()
    handles = [a.module(p).register_forward_hook(
        lambda _m, args, _o, p=p: seen.__setitem__(p, seen.get(p, 0) + args[0].shape[0])) for p in paths]
    try:
        ablation.evaluate_variants(a, variants, px, ids, mask, batch_size=64, generate=False)
    finally:
        for h in handles:
            h.remove()
    n_layer0 = sum(1 for v in variants if ablation.entry_point(v, [0, 1]) == (0, True))
    assert n_layer0 == 1 + 4  # layer:0 and its 4 heads
    assert seen[blocks.format(i=0)] == 3
    assert seen[blocks.format(i=1)] == 3 + n_layer0 * 3
    assert all(seen[f"{blocks.format(i=i)}.{m}"] == 3 for i in range(2) for m in kv)


def test_entry_points_by_hand():
    layers = [0, 1, 2]
    removed = torch.ones(2, 5, dtype=torch.bool)
    assert ablation.entry_point(ablation.Variant("none", "none"), layers) is None
    assert ablation.entry_point(ablation.Variant("blind", "blind", removed), layers) == (0, False)
    assert ablation.entry_point(ablation.Variant("layer:2", "layer", layer=2), layers) == (2, True)
    assert ablation.entry_point(ablation.Variant("head:1.3", "head", head=(1, 3)), layers) == (1, True)
    # several layers: the lowest; removed tokens need the whole block there
    assert ablation.entry_point(ablation.Variant("x", "x", layer=2, head=(1, 0)), layers) == (1, True)
    assert ablation.entry_point(ablation.Variant("x", "x", removed, layer=0), layers) == (0, False)


@pytest.mark.parametrize("name", list(TINY))
def test_text_run_resumed_block_by_block_is_the_whole_forward(name, adapters, inputs):
    """From the state entering block 0, re-running every block and the read-out gives the whole
    forward's logits bit for bit, on rows in any order and repeated; a block resumed at its
    cross-attention heads with no intervention is the block."""
    a = adapters[name]
    px, _, ids, mask = inputs[name]
    with torch.no_grad():
        run = a.text_run(px, ids, mask)
        torch.testing.assert_close(run.logits, a.forward({"pixel_values": px, "input_ids": ids,
                                                         "attention_mask": mask}), rtol=0, atol=0)
        images = torch.tensor([2, 0, 0, 1])
        h = run.hidden(0, images)
        for layer in range(run.depth):
            out = run.block(layer, h, images)
            assert torch.equal(run.finish_block(layer, images), run.block(layer, run.hidden(layer, images), images))
            h = out
        assert torch.equal(a.unembed(h), run.logits[images])
    no_hooks_left(a.model)


@pytest.mark.parametrize("name", list(TINY))
def test_recorded_block_arguments_gathered_per_row_only_when_batch_first(name, adapters, inputs):
    """A 1-D recorded argument whose length happens to equal the image count (a position vector
    such as `cache_position` when the caption is as long as the batch) is passed as recorded;
    tensors of two or more dims with one row per image are gathered for the rows."""
    a = adapters[name]
    px, _, ids, mask = inputs[name]
    with torch.no_grad():
        run = a.text_run(px, ids, mask)
    rows = torch.tensor([2, 2, 0, 1])
    positions = torch.arange(run.n)
    assert run._rows(positions, rows) is positions
    per_image = torch.arange(run.n * 5).view(run.n, 5)
    assert torch.equal(run._rows((per_image, None), rows)[0], per_image[rows])
    shared = torch.zeros(1, 5)
    assert run._rows(shared, rows) is shared


@pytest.mark.parametrize("name", list(TINY))
def test_shared_image_kv_refuses_a_batch_it_was_not_built_for(name, adapters, inputs):
    a = adapters[name]
    px, _, ids, mask = inputs[name]
    with torch.no_grad():
        run = a.text_run(px, ids, mask)
        with pytest.raises(RuntimeError, match="shared image keys/values are for 2 rows"), \
                run.shared_image_kv(torch.tensor([0, 1])):
            a.forward({"pixel_values": px, "input_ids": ids, "attention_mask": mask})
    no_hooks_left(a.model)


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("where", ["resumed block", "generation"])
def test_an_error_inside_the_sweep_leaves_nothing_installed(name, where, adapters, inputs):
    """An error raised inside block 1 while resumed rows run it (key/value stand-ins, per-row
    interventions in place), or during generation (vision and key/value stand-ins too)."""
    a = adapters[name]
    px, _, ids, mask = inputs[name]
    blocks, _ = STACK[name]

    def boom(_m, args, _out):
        x = args[0]
        if (where == "generation") == (x.shape[1] == 1) and x.shape[0] != 3:
            raise RuntimeError("boom")

    handle = a.module(blocks.format(i=1)).register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            ablation.evaluate_variants(a, layer_head_sweep(a, 3), px, ids, mask, generate=True, max_new_tokens=6)
    finally:
        handle.remove()
    no_hooks_left(a.model)


def test_families_without_a_resumable_text_stack_say_so_and_batch_whole_forwards():
    git = GitAdapter.tiny(seed=1, image_size=64)
    px, _, ids, mask = ablation.reference(git, [s.image for s in iter_split("test", 2)], max_new_tokens=4)
    with pytest.raises(NotImplementedError, match="git: no resumable text stack"):
        git.text_run(px, ids, mask)
    with pytest.raises(NotImplementedError, match="no resumable text stack"):
        Captioner.text_run(git, px, ids, mask)  # the base primitive: absent unless a family provides it
    variants = layer_head_sweep(git, 2)
    batched, _, _ = ablation.evaluate_variants(git, variants, px, ids, mask, generate=False)
    loop, _, _ = ablation.evaluate_variants(git, variants, px, ids, mask, loop=True, generate=False)
    torch.testing.assert_close(batched, loop, atol=1e-5, rtol=0)  # one batch of whole forwards
    no_hooks_left(git.model)
