"""The nnsight bridge (`adapter.nnsight()`): canonical envoys for every family, equal to probe's
own capture and interventions, and the README's nnsight code run as written."""

from __future__ import annotations

import functools
import linecache
import re
import subprocess
import sys
import warnings
from pathlib import Path

import nnsight
import pytest
import torch

import probe
from probe.capture import MaskTokens, Patch, ZeroHeads, envoys
from probe.docs import readme_block
from probe.types import ProbeError, layer_of

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "probe" / "assets" / "zoo"
FAMILIES = list(probe.models())  # registry order, as the README table lists them
TINY = {"hf-vit": {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2,
                   "num_attention_heads": 2, "intermediate_size": 64}}
CAPTION = "a small red circle left of a blue square"


@functools.cache
def _loaded(name: str):
    weights = "demo" if (ZOO / name).is_dir() else "random"
    adapter = probe.load_model(name, weights=weights, config=TINY.get(name) if weights == "random" else None)
    return adapter, adapter.nnsight()


@functools.cache
def _images():
    return probe.load_images([ROOT / "probe" / "assets" / "images"])[0]


def _batch(adapter, rows: slice = slice(0, 2)):
    images = _images()[rows]
    if "caption" in adapter.capabilities.tasks:
        return adapter.preprocess(images, [CAPTION] * len(images))
    return adapter.preprocess(images)


def _out(x):
    return x if isinstance(x, torch.Tensor) else x.last_hidden_state


def _calls(adapter, module, batch) -> int:
    n = [0]
    handle = module.register_forward_hook(lambda *_: n.__setitem__(0, n[0] + 1))
    try:
        with torch.no_grad():
            adapter.forward(batch)
    finally:
        handle.remove()
    return n[0]


# ------------------------------------------------------------------ structure
@pytest.mark.parametrize("name", FAMILIES)
def test_canonical_envoys_are_the_modules_the_hook_specs_name(name):
    adapter, m = _loaded(name)
    specs = adapter.hook_specs()
    for block in adapter.blocks():
        stack = getattr(m, block.stack)
        assert len(stack.blocks) == block.depth
        for i in range(block.depth):
            env = stack.blocks[i]
            native = block.path.format(i=i)
            assert env._module is adapter.module(native)
            assert m.model.get(envoys._envoy_path(native, envoys._served(type(env)))) is env  # one envoy, two names
    for s in specs:
        i, stack = layer_of(s.name), s.name.split(".")[0]
        if i is None:
            continue
        block = getattr(m, stack).blocks[i]
        rest = s.name.split(".", 3)[3]
        if rest == "resid_post":
            assert block._module is adapter.module(s.module), s.name
        group, _, kind = rest.rpartition(".")
        if kind == "z" and hasattr(block, group):
            assert getattr(block, group).o_proj._module is adapter.module(s.module), s.name
        if kind == "pattern" and hasattr(block, group):  # the alias holds the pattern's module
            container = getattr(block, group)._module
            assert any(mod is adapter.module(s.module) for mod in container.modules()), s.name
    # every alias names exactly what the templates say, and nothing else was renamed
    for canon, native in envoys.aliases(m).items():
        assert m.get(canon)._module is adapter.module(native), canon
    with_z = {s.name.rsplit(".", 1)[0] for s in specs if s.name.endswith(".z")}
    aliased = {c for c in envoys.aliases(m) if c.count(".") == 3}
    assert aliased == with_z, "an attention with a per-head z hook must have its alias, and only those"


EXPECTED = {  # (stack, attn, attn.o_proj, xattn, xattn.o_proj) relative to the block; pins the README table
    "hf-vit": [("vision", "attention", "attention.o_proj", None, None)],
    "vit-gpt2": [("vision", "attention", "attention.o_proj", None, None),
                 ("text", "attn", "attn.c_proj", "crossattention", "crossattention.c_proj")],
    "blip": [("vision", "self_attn", "self_attn.projection", None, None),
             ("text", "attention", "attention.output.dense", "crossattention", "crossattention.output.dense")],
    "git": [("vision", "self_attn", "self_attn.out_proj", None, None),
            ("text", "attention", "attention.output.dense", None, None)],
    "prefix-vlm": [("vision", "attention", "attention.o_proj", None, None), ("text", "attn", "attn.out_proj", None, None)],
    "mmca": [("vision", "attn", "attn.out_proj", None, None), ("text", "attn", "attn.out_proj", None, None)],
    "xattn-cond": [("vision", None, None, None, None)],
    **{n: [("vision", "attn", "attn.out_proj", None, None)] for n in FAMILIES if n.startswith("vit-") and n != "vit-gpt2"},
}


def test_alias_table_per_family_and_readme_copy_is_current():
    assert set(EXPECTED) == set(FAMILIES), "a new family: add its expected aliases here"
    adapters = {n: probe.load_model(n, weights="meta") for n in FAMILIES}
    for name, adapter in adapters.items():
        got = []
        for block in adapter.blocks():
            a = envoys.block_aliases(block)
            got.append((block.stack, *(a.get(k) for k in ("attn", "attn.o_proj", "xattn", "xattn.o_proj"))))
        assert got == EXPECTED[name], name
    block = readme_block((ROOT / "README.md").read_text(), "<!-- nnsight-table:start -->", "<!-- nnsight-table:end -->")
    assert block == envoys.aliases_markdown(adapters).strip(), \
        "README nnsight table is stale: paste probe.capture.envoys.aliases_markdown(...) (see this test)"


# ------------------------------------------------------------------ equality with probe's hooks
@pytest.mark.parametrize("name", FAMILIES)
def test_every_block_output_equals_capture_resid_post(name):
    adapter, m = _loaded(name)
    batch = _batch(adapter)
    names = [s.name for s in adapter.hook_specs() if s.name.endswith(".resid_post")]
    with torch.no_grad(), probe.capture(adapter, "*.resid_post") as cache:
        want = _out(adapter.forward(batch))
    got = {}
    with torch.no_grad(), m.trace(**batch):
        for n in names:  # in execution order: vision blocks, then text blocks
            stack, _, i, _ = n.split(".")
            got[n] = nnsight.save(envoys.resid(getattr(m, stack).blocks[int(i)].output, m.specs[n]))
        out = nnsight.save(m.output)
    assert names and set(got) == set(names)
    for n in names:
        torch.testing.assert_close(got[n], cache[n], rtol=0, atol=1e-6, msg=n)
    torch.testing.assert_close(_out(out), want, rtol=0, atol=1e-6)


def test_block_outputs_are_tensors_but_mmca_text_blocks():
    """What the README says `.output` is, per family (transformers 5.23)."""
    for name in FAMILIES:
        adapter, m = _loaded(name)
        kinds = {}
        with torch.no_grad(), m.trace(**_batch(adapter, slice(0, 1))):
            for stack in m._module.depth:
                kinds[stack] = nnsight.save(type(getattr(m, stack).blocks[0].output).__name__)
        want = {s: ("tuple" if (name, s) == ("mmca", "text") else "Tensor") for s in kinds}
        assert kinds == want, name


@pytest.mark.parametrize("name", FAMILIES)
def test_zeroing_a_head_at_o_proj_equals_zero_heads(name):
    adapter, m = _loaded(name)
    batch = _batch(adapter)
    zs = [s for s in adapter.hook_specs() if s.name.endswith(".z")]
    if not zs:  # xattn-cond: its one block has no per-head hook, and so no o_proj alias
        assert not any(c.endswith("o_proj") for c in envoys.aliases(m))
        return
    with torch.no_grad():
        plain = _out(adapter.forward(batch))
    # the last block of each stack and group: self- and cross-attention, vision and text
    last = {}
    for s in zs:
        last[(s.name.split(".")[0], s.name.rsplit(".", 2)[-2])] = s
    for (stack, group), spec in last.items():
        head = min(1, spec.n_heads - 1)
        with torch.no_grad(), probe.intervene(adapter, [ZeroHeads(spec.name, [head])]):
            want = _out(adapter.forward(batch))
        o_proj = getattr(getattr(m, stack).blocks[layer_of(spec.name)], group).o_proj
        visits = _calls(adapter, o_proj._module, batch)  # MMCA's decoder: visual, then text stream
        with torch.no_grad(), m.trace(**batch) as tracer:
            for _ in tracer.iter[:visits]:
                z = o_proj.input
                d = z.shape[-1] // spec.n_heads
                z[..., head * d : (head + 1) * d] = 0
            out = nnsight.save(m.output)
        torch.testing.assert_close(_out(out), want, rtol=0, atol=1e-6, msg=spec.name)
        assert not torch.allclose(want, plain, atol=1e-4), f"{spec.name}: zeroing head {head} changed nothing"


@pytest.mark.parametrize("name", ["blip", "git", "mmca"])
def test_patching_a_block_output_equals_probe_patch(name):
    adapter, m = _loaded(name)
    a, b = _batch(adapter, slice(0, 2)), _batch(adapter, slice(2, 4))
    hook = "text.blocks.1.resid_post"
    spec = m.specs[hook]
    with torch.no_grad():
        plain_b = adapter.forward(b)
    with torch.no_grad(), m.trace(**a):
        source = nnsight.save(envoys.resid(m.text.blocks[1].output, spec).clone())
    with torch.no_grad(), probe.capture(adapter, hook) as cache:
        adapter.forward(a)
    torch.testing.assert_close(source, cache[hook], rtol=0, atol=1e-6)
    n = source.shape[1]
    for tokens in (None, [n - 3, n - 1]):
        with torch.no_grad(), probe.intervene(adapter, [Patch(hook, source, tokens=tokens)]):
            want = adapter.forward(b)
        at = slice(None) if tokens is None else tokens
        with torch.no_grad(), m.trace(**b):
            envoys.resid(m.text.blocks[1].output, spec)[:, at] = source[:, at]
            got = nnsight.save(m.output)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        assert not torch.allclose(want, plain_b, atol=1e-3), f"patching {tokens} changed nothing"
    # nnsight's own idiom: two invokes, one batched forward, a barrier hands the source over
    with torch.no_grad(), m.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke(**a):
            clean = envoys.resid(m.text.blocks[1].output, spec)
            barrier()
        with tracer.invoke(**b):
            barrier()
            envoys.resid(m.text.blocks[1].output, spec)[:] = clean
            batched = nnsight.save(m.output)
    with torch.no_grad(), probe.intervene(adapter, [Patch(hook, source)]):
        want = adapter.forward(b)
    torch.testing.assert_close(batched, want, rtol=0, atol=1e-4)  # a batch of 4 against batches of 2


def test_generation_iter_equals_intervene_around_caption():
    adapter, m = _loaded("blip")
    px = _batch(adapter, slice(0, 3))["pixel_values"]
    spec = m.specs["text.blocks.1.attn.z"]
    n = 5
    with torch.no_grad(), m.generate(pixel_values=px, max_new_tokens=n, min_new_tokens=n) as tracer:
        for _ in tracer.iter[:n]:
            z = m.text.blocks[1].attn.o_proj.input
            z[..., : z.shape[-1] // spec.n_heads] = 0
        got = nnsight.save(tracer.result)
    with probe.intervene(adapter, [ZeroHeads(spec.name, [0])]):
        want = adapter.caption_pixels(px, n, min_new_tokens=n)
    assert torch.equal(got["ids"], want["ids"]) and got["text"] == want["text"]
    assert got["ids"].shape == (3, n)


@pytest.mark.parametrize("name", ["blip", "vit-gpt2"])
def test_mask_tokens_on_cross_attention_under_nnsight_equals_without(name):
    """Once `adapter.nnsight()` has wrapped the modules, probe's own interventions still route key
    masks through the transformers attention modules (it once bound the wrapper's signature)."""
    adapter, _ = _loaded(name)
    batch = _batch(adapter)
    plain = probe.load_model(name, weights="demo")
    xattn = next(s.name for s in adapter.hook_specs() if s.name.endswith("xattn.pattern"))
    mask = [MaskTokens([1, 2, 3], attention=xattn)]
    with torch.no_grad():
        with probe.intervene(adapter, mask):
            got = _out(adapter.forward(batch))
        with probe.intervene(plain, mask):
            want = _out(plain.forward(batch))
        free = _out(plain.forward(batch))
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert not torch.equal(got, free)


# ------------------------------------------------------------------ errors and side effects
def test_errors_name_the_problem_and_the_fix():
    adapter, m = _loaded("blip")
    with pytest.raises(IndexError, match=r"text.blocks\[7\]: this model has 3 text blocks \(0 .. 2\)"):
        m.text.blocks[7]
    assert m.text.blocks[-1] is m.text.blocks[2]
    vit, mv = _loaded("vit-standard")
    with pytest.raises(AttributeError, match="vit-standard has no text stack; it has vision"):
        _ = mv.text
    with pytest.raises(ProbeError, match="batch as keywords"):
        with mv.trace(input_ids=torch.zeros(1, 3, dtype=torch.long)):
            pass
    with pytest.raises(Exception, match="does not generate"):
        with mv.generate(pixel_values=_batch(vit)["pixel_values"]):
            pass
    a = adapter.preprocess(_images()[:1], ["a red circle"])
    b = adapter.preprocess(_images()[1:2], ["a red circle left of a large blue square"])
    with pytest.raises(Exception, match="preprocess the images"):
        with m.trace() as tracer:
            with tracer.invoke(**a):
                pass
            with tracer.invoke(**b):
                pass


def test_probe_hooks_still_work_and_nothing_is_left_behind():
    adapter, m = _loaded("mmca")
    batch = _batch(adapter)
    with torch.no_grad():
        before = adapter.forward(batch)
    with torch.no_grad(), m.trace(**batch):
        m.text.blocks[0].output[1][:] = 0
    with torch.no_grad():
        assert torch.equal(adapter.forward(batch), before)  # the edit lived in the trace only
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in adapter.model.modules())
    with torch.no_grad(), probe.capture(adapter, "text.blocks.0.resid_post") as cache:
        adapter.forward(batch)
    assert cache["text.blocks.0.resid_post"].shape[0] == 2


def test_import_probe_does_not_import_nnsight():
    code = "import sys, probe; assert 'nnsight' not in sys.modules, 'nnsight imported by probe'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]


# ------------------------------------------------------------------ the README, as written
def test_readme_nnsight_code_runs_as_written(monkeypatch):
    block = readme_block((ROOT / "README.md").read_text(), "<!-- nnsight-example:start -->",
                         "<!-- nnsight-example:end -->")
    codes = re.findall(r"```python\n(.*?)```", block, re.S)
    assert len(codes) == 2
    monkeypatch.chdir(ROOT)
    namespace: dict = {"__name__": "readme_nnsight"}
    for k, code in enumerate(codes):
        # nnsight reads a trace's source through linecache, as it does for notebook cells
        filename = f"<README.md nnsight block {k}>"
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*never reached")  # a tracer.iter loop cut short
            exec(compile(code, filename, "exec"), namespace)
    assert namespace["captions"]["ids"].shape == (2, 6)
