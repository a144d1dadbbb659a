"""Activation patching: `Patch` against hand-built replacements, the clean and corrupted runs as
the two ends of the scale, batched sweeps against one forward per variant, generation under a
patch, and the patching analysis's refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from probe import registry
from probe.analyses import patching
from probe.analysis import ParamError
from probe.capture import Patch, Replace, capture, intervene, uncached
from probe.cli import main
from probe.data import ImageSet
from probe.data.shapes import COLOURS, counterfactual, iter_split
from probe.types import ProbeError

FAMILIES = ("blip", "vit-gpt2", "git", "prefix-vlm", "mmca")


@pytest.fixture(scope="module")
def zoo():
    return {n: registry.load_model(n, weights="demo") for n in FAMILIES}


@pytest.fixture(scope="module")
def pair_inputs():
    sample = next(iter_split("test", 1))
    twin = counterfactual(sample, 0, "colour")
    return sample, twin


def _run(a, sample, twin):
    px = a.preprocess([sample.image, twin.image])["pixel_values"]
    caps = a.caption_pixels(px[:1])
    ids, mask = a.teacher_ids(caps["ids"], caps["tokens"])
    return px, ids, mask


def test_counterfactual_changes_only_that_object():
    sample = next(iter_split("test", 1))
    for attr in ("colour", "shape"):
        twin = counterfactual(sample, 0, attr)
        diff = np.any(np.asarray(sample.image) != np.asarray(twin.image), -1)
        assert diff.any() and not (diff & ~(sample.masks[0] | twin.masks[0])).any()
        assert getattr(twin.objects[0], attr) != getattr(sample.objects[0], attr)
        assert twin.objects[1:] == sample.objects[1:] and twin.caption != sample.caption
    assert counterfactual(sample, 0, "colour").objects[0].colour == list(COLOURS)[
        (list(COLOURS).index(sample.objects[0].colour) + 1) % len(COLOURS)]


@pytest.mark.parametrize("name", FAMILIES)
def test_patching_everything_gives_the_clean_run_and_nothing_the_corrupt_run(name, zoo, pair_inputs):
    a = zoo[name]
    px, ids, mask = _run(a, *pair_inputs)
    hooks = [s.name for s in a.hook_specs() if s.name.endswith(".resid_post")]
    with torch.no_grad(), capture(a, hooks) as cache:
        clean = a.token_logprobs(px[:1], ids, mask)
    with torch.no_grad():
        corrupt = a.token_logprobs(px[1:], ids, mask)
        assert (clean - corrupt).abs().max() > 1e-3  # the pair differs at all
        with intervene(a, [Patch(h, cache[h]) for h in hooks]):
            assert torch.equal(a.token_logprobs(px[1:], ids, mask), clean)
        for h in [h for h in hooks if h.startswith("vision.")]:  # the vision stack is all the text reads
            with intervene(a, [Patch(h, cache[h])]):
                assert torch.equal(a.token_logprobs(px[1:], ids, mask), clean), h
        last = max((h for h in hooks if h.startswith("text.")), key=lambda h: int(h.split(".")[2]))
        with intervene(a, [Patch(last, cache[last])]):
            assert torch.equal(a.token_logprobs(px[1:], ids, mask), clean)
        nothing = torch.zeros(1, cache[last].shape[1], dtype=torch.bool)
        with intervene(a, [Patch(h, cache[h], tokens=nothing) for h in hooks]):
            assert torch.equal(a.token_logprobs(px[1:], ids, mask), corrupt)


@pytest.mark.parametrize("name", ["blip", "git"])
def test_patch_equals_a_hand_built_replacement(name, zoo, pair_inputs):
    a = zoo[name]
    px, ids, mask = _run(a, *pair_inputs)
    z = "text.blocks.1.xattn.z" if name == "blip" else "text.blocks.1.attn.z"
    r = "vision.blocks.1.resid_post"
    with torch.no_grad(), capture(a, [z, r]) as clean:
        a.token_logprobs(px[:1], ids, mask)
    with torch.no_grad(), capture(a, [z, r]) as corrupt:
        a.token_logprobs(px[1:], ids, mask)
    n_heads = next(s.n_heads for s in a.hook_specs() if s.name == z)
    d = clean[z].shape[-1] // n_heads
    # head 2 at positions 1 and 3, by hand
    want = corrupt[z].clone()
    want[:, [1, 3], 2 * d : 3 * d] = clean[z][:, [1, 3], 2 * d : 3 * d]
    pos = [1, 5, 9]
    want_r = corrupt[r].clone()
    want_r[:, pos] = clean[r][:, pos]
    with torch.no_grad():
        with intervene(a, [Replace(z, want)]):
            ref = a.token_logprobs(px[1:], ids, mask)
        with intervene(a, [Patch(z, clean[z], tokens=[1, 3], heads=[2])]):
            got = a.token_logprobs(px[1:], ids, mask)
        assert torch.equal(got, ref)
        with intervene(a, [Replace(r, want_r)]):
            ref = a.token_logprobs(px[1:], ids, mask)
        with intervene(a, [Patch(r, clean[r], tokens=pos)]):
            got = a.token_logprobs(px[1:], ids, mask)
        assert torch.equal(got, ref)
        # per-row masks: row 0 patches head 2 at 1 and 3, row 1 nothing
        tokens = torch.zeros(2, clean[z].shape[1], dtype=torch.bool)
        tokens[0, [1, 3]] = True
        heads = torch.zeros(2, n_heads, dtype=torch.bool)
        heads[0, 2] = True
        with intervene(a, [Patch(z, clean[z], tokens=tokens, heads=heads)]):
            both = a.token_logprobs(px[1:].expand(2, -1, -1, -1), ids.expand(2, -1), mask.expand(2, -1))
        with intervene(a, [Replace(z, want)]):
            ref = a.token_logprobs(px[1:], ids, mask)
        plain = a.token_logprobs(px[1:], ids, mask)
        torch.testing.assert_close(both, torch.cat([ref, plain]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["blip", "git", "vit-gpt2"])
def test_generation_under_a_text_patch_runs_uncached_and_equals_the_stepwise_reference(name, zoo, pair_inputs):
    """HF caches the decoder's keys and values, so a later step's call sees one new position;
    under a position-indexed Patch generation runs without that cache, and every step is patched
    at the same absolute positions as a teacher-forced forward over the whole prefix."""
    a = zoo[name]
    px, ids, mask = _run(a, *pair_inputs)
    h = "text.blocks.0.resid_post"
    with torch.no_grad(), capture(a, h) as cache:
        a.forward({"pixel_values": px[:1], "input_ids": ids})
    iv = Patch(h, cache[h], tokens=list(range(a.text_offset() + 2, a.text_offset() + 4)))
    n = 8
    with torch.no_grad(), intervene(a, [iv]):
        assert uncached(a.model)
        got = a.caption_pixels(px[1:], n)["ids"][0].tolist()
        seq = torch.tensor([[a.specials.start]])
        ref = []
        for _ in range(n):  # greedy, one full teacher-forced forward per step
            nxt = int(a.forward({"pixel_values": px[1:], "input_ids": seq})[0, -1].argmax())
            ref.append(nxt)
            if nxt == a.specials.eos:
                break
            seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
    assert not uncached(a.model)
    assert got[: len(ref)] == ref


@pytest.mark.parametrize("name", ["blip", "git"])
def test_patching_the_encoder_acts_on_every_generation_step(name, zoo, pair_inputs):
    a = zoo[name]
    px, _, _ = _run(a, *pair_inputs)
    h = "vision.blocks.0.resid_post"
    with torch.no_grad(), capture(a, h) as cache:
        a.forward({"pixel_values": px[:1]})
    clean = a.caption_pixels(px[:1])["text"]
    assert a.caption_pixels(px[1:])["text"] != clean
    with intervene(a, [Patch(h, cache[h])]):
        assert a.caption_pixels(px[1:])["text"] == clean


def test_patch_refusals(zoo):
    a = zoo["blip"]
    src = torch.zeros(1, 65, 64)
    with pytest.raises(ValueError, match="names one hook"), intervene(a, [Patch("vision.blocks.*.resid_post", src)]):
        pass
    with pytest.raises(ValueError, match="per-head hook"), intervene(a, [Patch("vision.blocks.0.resid_post", src,
                                                                               heads=[0])]):
        pass
    with pytest.raises(ValueError, match="out of range"), intervene(a, [Patch("vision.blocks.0.resid_post", src,
                                                                              tokens=[70])]):
        pass
    px = a.preprocess([Image.new("RGB", (64, 64))])["pixel_values"]
    with pytest.raises(ValueError, match="does not fit"), intervene(a, [Patch("vision.blocks.0.resid_post",
                                                                              torch.zeros(1, 65, 8))]):
        a.forward({"pixel_values": px})


# ----------------------------------------------------------------------------- the analysis
def _shapes(n: int) -> ImageSet:
    return ImageSet.shapes(n)


@pytest.mark.parametrize("name", ["blip", "mmca", "git"])
def test_batched_sweep_equals_one_forward_per_variant(name, zoo):
    a = zoo[name]
    run = patching.Patching()
    batched = run(a, _shapes(2), batch_size=7)
    looped = run(a, _shapes(2), loop=True)
    np.testing.assert_allclose(batched.arrays["pairs.recovery"].numpy(), looped.arrays["pairs.recovery"].numpy(),
                               atol=2e-4, rtol=0)
    grid = batched.arrays["recovery.vision"].numpy()
    cols = batched.grids["recovery.vision"]["cols"]
    assert np.all(grid[:, cols.index("all")] == 1.0)  # the whole vision state is the clean run
    text = batched.arrays["recovery.text"].numpy()
    assert text[-1, batched.grids["recovery.text"]["cols"].index("all")] == 1.0
    if name == "mmca":  # its one out_proj serves both streams: no per-head patching
        assert "recovery.heads" not in batched.arrays
    else:
        assert batched.arrays["recovery.heads"].shape[1] == 4


def test_noise_corruption_touches_only_the_object_patches(zoo):
    a = zoo["blip"]
    images = _shapes(1)
    pair = patching.shapes_pairs(images, "noise")[0]
    px = a.preprocess([pair.clean])["pixel_values"]
    steps = [1]
    lay = patching._layout(a, pair.region, steps, 4, np.random.default_rng(0))
    ivs = patching._noise(a, px, lay, sigma=0.5, scale=3.0, seed=0)
    with torch.no_grad(), capture(a, patching.NOISE_HOOK) as clean:
        a.forward({"pixel_values": px})
    with torch.no_grad(), intervene(a, ivs), capture(a, patching.NOISE_HOOK) as noisy:
        a.forward({"pixel_values": px})
    delta = (noisy[patching.NOISE_HOOK] - clean[patching.NOISE_HOOK])[0]
    changed = sorted(torch.nonzero(delta.abs().sum(-1)).flatten().tolist())
    assert changed == lay.vision["object"] and changed
    assert 1.2 < float(delta[changed].std()) < 1.8  # 3 * 0.5


def test_cli_runs_and_stores_labelled_grids(store_root, capsys):
    assert main(["run", "patching", "--model", "blip", "--shapes", "2", "--corruption", "noise"]) == 0
    out = capsys.readouterr().out
    assert "noise corruption" in out and "pairs used" in out
    (run,) = list(store_root.iterdir())
    from probe.runs.store import RunStore

    res = RunStore(store_root).load(run.name).result
    assert res.kind == "patching" and res.corruption == "noise"
    for name, g in res.grids.items():
        assert tuple(res.arrays[name].shape) == (len(g["rows"]), len(g["cols"]))


def test_refusals_name_what_exists(zoo, store_root, capsys, tmp_path):
    a = zoo["blip"]
    run = patching.Patching()
    with pytest.raises(ParamError, match="blip has vision layers 0-2 and text layers 0-2"):
        run(a, _shapes(1), layers="7")
    with pytest.raises(ParamError, match="no such token group.*text: prefix, last, word, all"):
        run(a, _shapes(1), stack="text", groups="cls")
    with pytest.raises(ParamError, match="unknown"):
        run(a, _shapes(1), groups="nose")
    with pytest.raises(ProbeError, match="64x64 but the corrupted one is 32x32"):
        patching.Pair(Image.new("RGB", (64, 64)), Image.new("RGB", (32, 32)), np.ones((64, 64), bool), "red")
    Image.new("RGB", (64, 64)).save(tmp_path / "x.png")
    assert main(["run", "patching", "--model", "blip", "--images", str(tmp_path / "x.png")]) != 0
    assert main(["run", "patching", "--model", "vit-standard"]) != 0
    assert main(["run", "patching", "--model", "blip", "--layers", "9"]) != 0
    err = capsys.readouterr().err
    assert "layers 0-2" in err and "caption" in err and "probe-shapes" in err
    assert not store_root.exists() or not any(store_root.iterdir())


def _table_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "patching_table.py"
    spec = importlib.util.spec_from_file_location("patching_table", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_patching_table_is_generated_from_a_current_results_file():
    """The README block is rendered from bench/results/patching.json, and that file's BLIP colour
    row is what the analysis computes today on the bundled weights (so neither can go stale)."""
    import json

    table = _table_module()
    data = json.loads(table.OUT.read_text())
    assert table.readme_block(table.README.read_text()) == table.render(data), (
        "README patching table is stale: python bench/patching_table.py --readme-only")
    entry = next(e for e in data["entries"] if e["model"] == "blip" and e["corruption"] == "colour")
    fresh = table.run_model("blip", "colour", data["shapes"])
    assert fresh["sha256"] == entry["sha256"], "the zoo BLIP changed: python bench/patching_table.py"
    assert fresh["used"] == entry["used"]
    for name, g in entry["grids"].items():
        got = np.array(fresh["grids"][name]["values"], dtype=float)
        np.testing.assert_allclose(got, np.array(g["values"], dtype=float), atol=2e-3, equal_nan=True)
    v = entry["grids"]["recovery.vision"]
    first = dict(zip(v["cols"], v["values"][0], strict=True))
    assert first["object"] >= 0.8 and first["others"] < 0.2  # the bar, on the numbers the README shows


def test_trace_on_your_own_pairs_matches_the_shapes_route(zoo):
    a = zoo["mmca"]
    images = _shapes(2)
    route = patching.Patching()(a, images, stack="vision", heads=False)
    own = []
    for i, sample in enumerate(images.samples):  # the same pairs, built by hand as a user would
        k = i % len(sample.objects)
        twin = counterfactual(sample, k, "colour")
        region = sample.masks[k] | np.any(np.asarray(sample.image) != np.asarray(twin.image), -1)
        own.append(patching.Pair(sample.image, twin.image, region, sample.objects[k].colour,
                                 nth=[o.colour for o in sample.objects[:k]].count(sample.objects[k].colour)))
    mine = patching.trace(a, own, stack="vision", heads=False)
    np.testing.assert_array_equal(mine.arrays["recovery.vision"].numpy(), route.arrays["recovery.vision"].numpy())
    with pytest.raises(ProbeError, match="not a captioner"):
        patching.trace(registry.load_model("vit-standard", weights="demo"), own)
    with pytest.raises(ProbeError, match="noise=True"):
        patching.trace(a, own, corruption="noise")


# ----------------------------------------------------------------------------- review findings
@pytest.mark.parametrize("name", ["blip", "vit-gpt2", "git", "prefix-vlm", "mmca"])
def test_patching_the_vision_output_model_output_gives_the_clean_run(name, zoo, pair_inputs):
    """`vision.output` is a transformers ModelOutput in four families: the patched field is
    replaced inside it, the forward still runs, and everything patched is the clean run."""
    a = zoo[name]
    px, ids, mask = _run(a, *pair_inputs)
    with torch.no_grad(), capture(a, "vision.output") as cache:
        clean = a.token_logprobs(px[:1], ids, mask)
    with torch.no_grad(), intervene(a, [Patch("vision.output", cache["vision.output"])]):
        assert torch.equal(a.token_logprobs(px[1:], ids, mask), clean)


def test_a_patch_on_a_hook_that_runs_twice_per_forward_is_refused(zoo):
    a = zoo["mmca"]
    with pytest.raises(ValueError, match="runs 2 times per forward"), \
            intervene(a, [Patch("text.blocks.0.attn.z", torch.zeros(1, 4, 96))]):
        pass


def test_uncached_belongs_to_the_thread_that_holds_the_patch(zoo, pair_inputs):
    import threading

    a = zoo["blip"]
    px, ids, _ = _run(a, *pair_inputs)
    with torch.no_grad(), capture(a, "text.blocks.0.resid_post") as cache:
        a.forward({"pixel_values": px[:1], "input_ids": ids})
    seen = []
    with intervene(a, [Patch("text.blocks.0.resid_post", cache["text.blocks.0.resid_post"], tokens=[1])]):
        t = threading.Thread(target=lambda: seen.append(uncached(a.model)))
        t.start()
        t.join()
        assert uncached(a.model)
    assert seen == [False]


def test_mmca_text_all_is_the_whole_decoder_state(zoo):
    """MMCA's decoder layers carry a visual stream beside the text: `all` patches both, so every
    layer's `all` is the clean run, and the image groups of the text stack patch that stream."""
    res = patching.Patching()(zoo["mmca"], _shapes(2), stack="text", heads=False)
    g = res.grids["recovery.text"]
    arr = res.arrays["recovery.text"].numpy()
    assert g["cols"] == ["object", "others", "cls", "prefix", "last", "word", "all"]
    assert np.all(arr[:, g["cols"].index("all")] == 1.0)
    assert all("text.blocks.0.vresid_post" in v["hooks"] for v in res.variants if v["group"] in ("object", "all")
               and v["layer"] == 0)


def test_the_cli_checks_layers_against_the_checkpoint_that_runs(store_root, capsys):
    # the zoo MMCA has 3 text layers where the default config has 2: layer 2 exists
    assert main(["run", "patching", "--model", "mmca", "--shapes", "1", "--stack", "text", "--layers", "2",
                 "--no-heads"]) == 0
    assert main(["run", "patching", "--model", "blip", "--shapes", "1", "--stack", "vision", "--layers", "5"]) != 0
    err = capsys.readouterr().err
    assert "blip has vision layers 0-2" in err and "--stack" not in err.split("blip has")[1]


def test_runs_that_can_score_or_patch_nothing_are_refused(zoo):
    run = patching.Patching()
    with pytest.raises(ProbeError, match="no pair could be scored.*does not name"):
        run(zoo["blip"], _shapes(1), max_new_tokens=1)
    with pytest.raises(ProbeError, match="nothing was patched"):
        run(zoo["blip"], _shapes(1), stack="text", groups="word", heads=False)
    with pytest.raises(ParamError, match="twice"):
        run(zoo["blip"], _shapes(1), layers="1,1")


def test_generation_capture_keeps_the_newest_position_of_text_outputs(zoo, pair_inputs):
    for name in ("git", "blip", "mmca"):
        a = zoo[name]
        caps, cache = a.generate_with_cache([pair_inputs[0].image], "text.blocks.0.resid_post", max_new_tokens=4)
        calls = cache.calls("text.blocks.0.resid_post")
        assert len(calls) == 4 and all(c.shape[:2] == (1, 1) for c in calls), name
        # call k is the state at the position that predicted token k: equal to teacher forcing's
        ids = torch.cat([torch.tensor([[a.specials.start]]), caps["ids"][:, :3]], 1)
        with torch.no_grad(), capture(a, "text.blocks.0.resid_post") as tf:
            a.forward({"pixel_values": a.preprocess([pair_inputs[0].image])["pixel_values"], "input_ids": ids})
        full = tf["text.blocks.0.resid_post"][:, a.text_offset():]
        torch.testing.assert_close(torch.cat(calls, 1), full, atol=1e-5, rtol=1e-4)
