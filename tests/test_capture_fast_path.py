"""Full-map capture computes attention once: `sites.output_from_pattern` and the shared pattern.

Inside `output_from_pattern()`, a ``probe_capture`` layer whose every head and query row is listened
to computes ``P @ V`` from the captured pattern instead of also running SDPA. The output then equals
transformers' eager attention, and SDPA's up to float rounding; the captured patterns still equal
eager ``output_attentions``. Partial listening, gradients, dropout and masks keep the kernel.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import transformers.integrations.sdpa_attention as hf_sdpa
from PIL import Image
from torch import nn
from transformers import ViTConfig, ViTModel

from probe.capture import MaskTokens, capture, hf_attention, intervene, sites
from probe.capture.sites import PatternSource
from probe.models.hf_vit import HFViTAdapter

TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
            image_size=32, patch_size=8)
PATTERNS = "vision.blocks.*.attn.pattern"


@pytest.fixture(scope="module")
def vit():
    """The tiny random ViT on probe_capture, and an eager copy with the same weights."""
    torch.manual_seed(0)
    adapter = HFViTAdapter.load(weights="random", config=TINY)
    eager = ViTModel._from_config(copy.deepcopy(ViTConfig(**TINY)), attn_implementation="eager").eval()
    eager.load_state_dict(adapter.model.state_dict())
    return adapter, eager


@pytest.fixture
def pixels():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def kernel_calls(monkeypatch):
    """Count the calls of transformers' SDPA attention function (the fast kernel)."""
    calls = []
    original = hf_sdpa.sdpa_attention_forward

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(hf_sdpa, "sdpa_attention_forward", counted)
    return calls


def readout(hidden):
    """A scalar of the CLS output that depends on every feature (a plain sum of a LayerNorm output
    with unit weight and zero bias is constant)."""
    r = torch.linspace(-1, 1, hidden.shape[-1])
    return (hidden[:, 0] * r).sum()


def eager_reference(eager, pixels, **kwargs):
    with torch.no_grad():
        out = eager(pixel_values=pixels, output_attentions=True, **kwargs)
    return out.last_hidden_state, out.attentions


def test_full_capture_computes_attention_once_and_matches_eager_and_sdpa(vit, pixels, kernel_calls):
    adapter, eager = vit
    with torch.no_grad():
        bare = adapter.model(pixel_values=pixels).last_hidden_state
        assert len(kernel_calls) == 3
        kernel_calls.clear()
        with sites.output_from_pattern(), capture(adapter, PATTERNS) as cache:
            fast = adapter.model(pixel_values=pixels).last_hidden_state
    assert not kernel_calls, "SDPA ran although every head and row was captured"
    ref, attentions = eager_reference(eager, pixels)
    # the output is eager attention's (same operations); SDPA's differs only by float rounding
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fast, bare, atol=1e-5, rtol=1e-5)
    for i, a in enumerate(attentions):
        got = cache[f"vision.blocks.{i}.attn.pattern"]
        assert got.shape == (3, 4, 17, 17) and got.dtype == torch.float32
        torch.testing.assert_close(got, a, atol=1e-6, rtol=0)
        torch.testing.assert_close(got.sum(-1), torch.ones(3, 4, 17), atol=1e-6, rtol=0)


def test_without_the_policy_the_output_is_sdpa_bit_for_bit(vit, pixels, kernel_calls):
    adapter, eager = vit
    with torch.no_grad():
        bare = adapter.model(pixel_values=pixels).last_hidden_state
        with capture(adapter, PATTERNS) as cache:
            out = adapter.model(pixel_values=pixels).last_hidden_state
    assert torch.equal(out, bare) and len(kernel_calls) == 6
    _, attentions = eager_reference(eager, pixels)
    for i, a in enumerate(attentions):
        torch.testing.assert_close(cache[f"vision.blocks.{i}.attn.pattern"], a, atol=1e-6, rtol=0)


@pytest.mark.parametrize("selection", [dict(heads=[1, 3]), dict(rows=[0]), dict(rows=[0], reduce="mean"),
                                       dict(heads=[0], rows=slice(2, 9))])
def test_partial_listening_keeps_the_kernel_and_matches(vit, pixels, kernel_calls, selection):
    adapter, eager = vit
    with torch.no_grad():
        bare = adapter.model(pixel_values=pixels).last_hidden_state
        kernel_calls.clear()
        with sites.output_from_pattern(), capture(adapter, PATTERNS, **selection) as cache:
            out = adapter.model(pixel_values=pixels).last_hidden_state
    assert len(kernel_calls) == 3 and torch.equal(out, bare)
    _, attentions = eager_reference(eager, pixels)
    heads, rows = selection.get("heads", slice(None)), selection.get("rows", slice(None))
    for i, a in enumerate(attentions):
        want = a[:, heads][:, :, rows]
        if selection.get("reduce") == "mean":
            want = want.mean(1, keepdim=True)
        torch.testing.assert_close(cache[f"vision.blocks.{i}.attn.pattern"], want, atol=1e-6, rtol=0)


def test_only_the_listened_layers_skip_the_kernel(vit, pixels, kernel_calls):
    adapter, _ = vit
    with torch.no_grad(), sites.output_from_pattern(), capture(adapter, "vision.blocks.1.attn.pattern") as cache:
        adapter.model(pixel_values=pixels)
    assert len(kernel_calls) == 2 and cache.names() == ["vision.blocks.1.attn.pattern"]


def test_full_and_partial_listeners_share_one_computation(vit, pixels):
    adapter, eager = vit
    with torch.no_grad(), sites.output_from_pattern(), capture(adapter, PATTERNS) as full, \
            capture(adapter, PATTERNS, heads=slice(0, 2)) as part:
        adapter.model(pixel_values=pixels)
    _, attentions = eager_reference(eager, pixels)
    for i, a in enumerate(attentions):
        name = f"vision.blocks.{i}.attn.pattern"
        assert torch.equal(part[name], full[name][:, :2])
        # the selection is its own tensor: it does not keep the full pattern alive
        assert part[name].untyped_storage().data_ptr() != full[name].untyped_storage().data_ptr()
        torch.testing.assert_close(full[name], a, atol=1e-6, rtol=0)


def test_masked_tokens_are_respected_on_the_fast_path(vit, pixels, kernel_calls):
    adapter, _ = vit
    with torch.no_grad():
        with intervene(adapter, [MaskTokens([1, 5])]), capture(adapter, PATTERNS) as slow:
            ref = adapter.model(pixel_values=pixels).last_hidden_state
        kernel_calls.clear()
        with sites.output_from_pattern(), intervene(adapter, [MaskTokens([1, 5])]), \
                capture(adapter, PATTERNS) as fast:
            out = adapter.model(pixel_values=pixels).last_hidden_state
    assert not kernel_calls
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for i in range(3):
        name = f"vision.blocks.{i}.attn.pattern"
        assert (fast[name][..., [1, 5]] == 0).all()
        torch.testing.assert_close(fast[name], slow[name], atol=1e-6, rtol=0)


def test_gradient_capture_under_the_policy_still_reaches_the_pattern(vit, pixels, kernel_calls):
    adapter, eager = vit
    hook = "vision.blocks.1.attn.pattern"
    with sites.output_from_pattern(), capture(adapter, hook, grad=True) as cache:
        out = adapter.model(pixel_values=pixels).last_hidden_state
        (g,) = torch.autograd.grad(readout(out), cache[hook])
    assert len(kernel_calls) == 3  # gradient listeners keep the kernel path (sites.attend)
    assert g.shape == (3, 4, 17, 17) and g.abs().amax() > 1e-3
    _, attentions = eager_reference(eager, pixels)
    torch.testing.assert_close(cache[hook], attentions[1], atol=1e-6, rtol=0)


def test_a_plain_full_capture_beside_a_gradient_capture_leaves_gradients_intact(vit, pixels):
    """The plain capture's pattern (computed without autograd) is shared with later listeners, but
    never handed to the gradient path, whose pattern must stay in the graph of q and k."""
    adapter, _ = vit
    hook = "vision.blocks.1.attn.pattern"
    weight = adapter.model.layers[0].attention.q_proj.weight

    def grads(with_plain):
        with sites.output_from_pattern(), capture(adapter, hook, grad=True) as cache:
            if with_plain:
                with capture(adapter, hook) as plain:
                    out = adapter.model(pixel_values=pixels).last_hidden_state
                assert torch.equal(plain[hook], cache[hook].detach())
            else:
                out = adapter.model(pixel_values=pixels).last_hidden_state
            return torch.autograd.grad(readout(out), [cache[hook], weight])

    alone, together = grads(False), grads(True)
    assert alone[1].abs().amax() > 1e-3
    for a, b in zip(alone, together, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_autograd_through_the_model_keeps_the_kernel(vit, pixels, kernel_calls):
    """Parameters that require grad, a plain capture, no no_grad: the output must keep its graph,
    which a pattern computed without gradients cannot give, so the kernel runs."""
    adapter, _ = vit
    with sites.output_from_pattern(), capture(adapter, PATTERNS):
        out = adapter.model(pixel_values=pixels).last_hidden_state
    assert len(kernel_calls) == 3 and out.requires_grad
    readout(out).backward()
    assert adapter.model.layers[0].attention.q_proj.weight.grad.abs().amax() > 1e-3
    adapter.model.zero_grad(set_to_none=True)


def test_causal_padded_and_cross_attention_of_a_captioner(kernel_calls):
    """ViT-GPT2: a causal decoder with a padded (bool) mask and cross-attention, all on probe_capture."""
    from probe.models.vit_gpt2 import ViTGPT2Adapter

    adapter = ViTGPT2Adapter.tiny(seed=3)
    g = torch.Generator().manual_seed(2)
    images = [Image.fromarray((torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(2)]
    batch = adapter.preprocess(images, ["a red circle", "a blue square left of a small green triangle"])
    assert not batch["attention_mask"].all(), "the batch should be padded"
    with torch.no_grad():
        with capture(adapter, "*.pattern") as slow:
            ref = adapter.forward(batch)
        assert len(kernel_calls) == 6
        kernel_calls.clear()
        with sites.output_from_pattern(), capture(adapter, "*.pattern") as fast:
            out = adapter.forward(batch)
    assert not kernel_calls
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-5, rtol=1e-5)
    assert fast.names() == slow.names() and len(fast.names()) == 6
    for name in slow.names():
        torch.testing.assert_close(fast[name], slow[name], atol=1e-6, rtol=0, msg=name)


def test_policy_is_off_by_default_scoped_and_per_thread():
    assert not sites.output_from_pattern_enabled()
    seen = []
    with sites.output_from_pattern():
        assert sites.output_from_pattern_enabled()
        t = threading.Thread(target=lambda: seen.append(sites.output_from_pattern_enabled()))
        t.start()
        t.join()
        with sites.output_from_pattern(False):
            assert not sites.output_from_pattern_enabled()
        assert sites.output_from_pattern_enabled()
    assert seen == [False] and not sites.output_from_pattern_enabled()


# ---------------------------------------------------------------- the attention function, call by call

class FakeAttention(nn.Module):
    def __init__(self, causal: bool = False, groups: int = 1) -> None:
        super().__init__()
        self.is_causal = causal
        self.num_key_value_groups = groups


def eager_attention(q, k, v, mask, scale):
    """transformers' eager attention on an additive (or bool) mask: (weights, output (b, q, h, d))."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    s = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
        s = s + mask
    p = torch.softmax(s, -1, dtype=torch.float32)
    return p, (p @ v).transpose(1, 2)


def run(module, q, k, v, mask, *, policy, **kwargs):
    """Call capturing_attention with a full-pattern listener: (output, captured pattern, SDPA ran)."""
    got, ran = [], []
    original = hf_sdpa.sdpa_attention_forward

    def counted(*a, **kw):
        ran.append(1)
        return original(*a, **kw)

    handle = sites.add_pattern_listener(module, lambda src: got.append(src.compute()))
    hf_sdpa.sdpa_attention_forward = counted
    try:
        with torch.no_grad(), sites.output_from_pattern(policy):
            out, weights = hf_attention.capturing_attention(module, q, k, v, mask, scaling=0.125, **kwargs)
    finally:
        hf_sdpa.sdpa_attention_forward = original
        handle.remove()
    assert weights is None and len(got) == 1
    return out, got[0], bool(ran)


def qkv(b=2, h=4, kv_heads=4, n=7, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g)
    return q, torch.randn(b, kv_heads, n, d, generator=g), torch.randn(b, kv_heads, n, d, generator=g)


def bool_mask_with_a_dead_row(b=2, n=7):
    m = torch.rand(b, 1, n, n, generator=torch.Generator().manual_seed(3)) > 0.3
    m[..., torch.arange(n), torch.arange(n)] = True
    m[1, :, 4] = False  # query 4 of item 1 may attend to nothing
    return m


@pytest.mark.parametrize("case", ["none", "additive", "bool", "gqa", "causal"])
def test_fast_output_equals_sdpa_and_pattern_equals_eager(case):
    q, k, v = qkv(kv_heads=2 if case == "gqa" else 4)
    module = FakeAttention(causal=case == "causal", groups=2 if case == "gqa" else 1)
    mask = None
    if case == "additive":
        mask = torch.randn(2, 1, 7, 7, generator=torch.Generator().manual_seed(2))
    elif case == "bool":
        mask = bool_mask_with_a_dead_row()
    kernel_out, kernel_p, kernel_ran = run(module, q, k, v, mask, policy=False)
    fast_out, fast_p, fast_ran = run(module, q, k, v, mask, policy=True)
    assert kernel_ran and not fast_ran
    assert fast_out.shape == kernel_out.shape == (2, 7, 4, 16) and fast_out.is_contiguous()
    torch.testing.assert_close(fast_out, kernel_out, atol=1e-6, rtol=1e-5)
    ref_mask = torch.ones(7, 7, dtype=torch.bool).tril() if case == "causal" else mask
    ref_p, ref_out = eager_attention(q, k, v, ref_mask, 0.125)
    torch.testing.assert_close(fast_p, ref_p, atol=1e-7, rtol=0)
    torch.testing.assert_close(kernel_p, ref_p, atol=1e-7, rtol=0)
    if case == "bool":  # SDPA reads nothing in a row that keeps no key; so does the fast path
        assert (fast_out[1, 4] == 0).all() and (kernel_out[1, 4] == 0).all()
        ref_out[1, 4] = 0
    torch.testing.assert_close(fast_out, ref_out, atol=1e-6, rtol=1e-6)


def test_key_masks_with_a_query_left_nothing_read_zero_on_both_paths():
    q, k, v = qkv()
    module = FakeAttention()
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[0, [2, 3]] = False
    keep[1] = False  # item 1 attends to nothing at all
    handle = sites.add_key_mask(module, lambda b, n, dev: keep)
    try:
        kernel_out, kernel_p, _ = run(module, q, k, v, None, policy=False)
        fast_out, fast_p, fast_ran = run(module, q, k, v, None, policy=True)
    finally:
        handle.remove()
    assert not fast_ran
    assert (fast_out[1] == 0).all() and (fast_p[1] == 0).all() and (fast_p[0][..., [2, 3]] == 0).all()
    torch.testing.assert_close(fast_out, kernel_out, atol=1e-6, rtol=1e-5)
    assert torch.equal(fast_p, kernel_p)


@pytest.mark.parametrize("kwargs", [dict(dropout=0.5), dict(is_causal=True), dict(position_bias=torch.zeros(1, 4, 7, 7))])
def test_calls_the_pattern_cannot_reproduce_keep_the_kernel(kwargs):
    q, k, v = qkv()
    _, _, ran = run(FakeAttention(), q, k, v, None, policy=True, **kwargs)
    assert ran


def test_causal_prefill_with_more_keys_than_queries_keeps_the_kernel():
    q, k, v = qkv()
    _, _, ran = run(FakeAttention(causal=True), q[:, :, :3], k, v, None, policy=True)
    assert ran


# ---------------------------------------------------------------- PatternSource's blocked computation

def reference(q, k, scale, mask, zero_dead_rows=False):
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask.double()
    p = torch.softmax(s, -1)
    if zero_dead_rows and mask is not None:
        p = p * (mask > torch.finfo(mask.dtype).min / 2).any(-1, keepdim=True)
    return p


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mask_shape", [None, (2, 1, 1, 9), (1, 1, 5, 9), (2, 3, 5, 9), (5, 9)])
@pytest.mark.parametrize("scale", [0.25, 0.3])
def test_blocked_pattern_and_output_equal_the_formula(monkeypatch, dtype, mask_shape, scale):
    monkeypatch.setattr(sites, "_BLOCK_BYTES", 1)  # one head per block: blocks inside a batch element
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 3, 5, 8, generator=g, dtype=dtype), torch.randn(2, 3, 9, 8, generator=g, dtype=dtype)
    v = torch.randn(2, 3, 9, 6, generator=g, dtype=dtype)
    mask = None
    if mask_shape is not None:
        low = torch.finfo(dtype).min
        mask = torch.zeros(mask_shape, dtype=dtype).masked_fill_(torch.rand(mask_shape, generator=g) > 0.6, low)
        mask[..., 0] = 0  # every row keeps key 0 ...
        if mask_shape[0] == 2 and len(mask_shape) == 4:
            mask[1] = low  # ... except item 1's, which keep nothing: dead rows, zero
    with sites.output_from_pattern():
        src = PatternSource(q, k, scale, mask, zero_dead_rows=True, value=v)
        p = src.compute()
        out = sites.pattern_output(src)
    assert p.dtype == dtype and p.shape == (2, 3, 5, 9) and p.is_contiguous()
    ref = reference(q, k, scale, mask, zero_dead_rows=True)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(p.double(), ref, atol=tol, rtol=0)
    torch.testing.assert_close(out.double(), ref @ v.double(), atol=10 * tol, rtol=0)
    # the out-of-place formula that autograd uses gives the same pattern
    grad_q = q.clone().requires_grad_()
    torch.testing.assert_close(PatternSource(grad_q, k, scale, mask, zero_dead_rows=True).compute().detach(), p,
                               atol=tol, rtol=0)
    # a selection after the full pattern is a slice of it
    assert torch.equal(src.compute([2, 0], [4]), p[:, [2, 0]][:, :, [4]])


def test_power_of_two_scale_gives_eagers_scores_bit_for_bit():
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, 4, 11, 64, generator=g), torch.randn(2, 4, 11, 64, generator=g)
    eager = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * 0.125, -1, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(PatternSource(q, k, 0.125).compute(), eager)


def test_half_precision_inputs_take_the_unblocked_path_like_eager():
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=g).to(torch.bfloat16) for _ in range(3))
    mask = torch.zeros(1, 1, 6, 6, dtype=torch.float32)
    mask[..., 2] = torch.finfo(torch.float32).min
    with torch.no_grad(), sites.output_from_pattern():
        src = PatternSource(q, k, 0.25, mask, value=v)
        p = src.compute()
        out = sites.pattern_output(src)
    eager = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * 0.25 + mask, -1, dtype=torch.float32)
    assert p.dtype == torch.float32 and torch.equal(p, eager)
    assert out.dtype == torch.bfloat16 and torch.equal(out, eager.to(torch.bfloat16) @ v)


def test_pattern_output_is_none_unless_asked_and_computed():
    q, k, v = qkv()
    src = PatternSource(q, k, 0.125, value=v)
    with sites.output_from_pattern():
        assert sites.pattern_output(src) is None  # nobody computed the full pattern
        src.compute([0], None)
        assert sites.pattern_output(src) is None  # a selection is not the full pattern
    src.compute()
    assert sites.pattern_output(src) is None  # the policy is off
    approx = PatternSource(compute=lambda h, r: torch.ones(2, 4, 7, 7) / 7, approximate=True, n_heads=4)
    approx.compute()
    with sites.output_from_pattern():
        assert sites.pattern_output(approx, v) is None
        torch.testing.assert_close(sites.pattern_output(src), src.compute() @ v, atol=1e-6, rtol=1e-6)


def test_capture_output_pattern_is_the_switch_of_the_public_api(vit, pixels, kernel_calls):
    """`capture(..., output="pattern")` computes fully captured layers as P @ V (no kernel call,
    output equal to eager) for its block only; the default keeps the kernel; a bad value is refused."""
    adapter, eager = vit
    with torch.no_grad():
        bare = adapter.model(pixel_values=pixels).last_hidden_state
        ref = eager(pixel_values=pixels).last_hidden_state
        before = len(kernel_calls)
        with capture(adapter, PATTERNS, output="pattern"):
            assert sites.output_from_pattern_enabled()
            pv = adapter.model(pixel_values=pixels).last_hidden_state
        assert not sites.output_from_pattern_enabled() and len(kernel_calls) == before
        with capture(adapter, PATTERNS):
            kept = adapter.model(pixel_values=pixels).last_hidden_state
    assert len(kernel_calls) == before + TINY["num_hidden_layers"]
    assert torch.equal(kept, bare)
    torch.testing.assert_close(pv, ref, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="output='fast'"), capture(adapter, PATTERNS, output="fast"):
        pass


def test_a_kernel_capture_nested_in_a_pattern_capture_runs_every_kernel(vit, pixels, kernel_calls):
    """`output="kernel"` inside `output="pattern"`: exact kernel outputs in the inner block, the
    outer policy back afterwards; the default (None) inherits the enclosing choice."""
    adapter, _ = vit
    with torch.no_grad():
        bare = adapter.model(pixel_values=pixels).last_hidden_state
        with capture(adapter, "vision.blocks.0.attn.pattern", output="pattern"):
            before = len(kernel_calls)
            with capture(adapter, "vision.blocks.2.attn.pattern", output="kernel"):
                inner = adapter.model(pixel_values=pixels).last_hidden_state
            assert len(kernel_calls) == before + TINY["num_hidden_layers"]
            assert sites.output_from_pattern_enabled()
            with capture(adapter, "vision.blocks.2.attn.pattern"):
                assert sites.output_from_pattern_enabled()
    assert torch.equal(inner, bare)
