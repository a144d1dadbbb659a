"""Ablation suite: real removal for every family, batched variants equal the per-variant loop,
layer and head ablations hit exactly what they name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probe import registry
from probe.analyses import ablation
from probe.capture import capture, intervene
from probe.data import ImageSet
from probe.data.metrics import caption_metrics
from probe.data.shapes import iter_split
from probe.models.blip import BlipAdapter
from probe.models.git import GitAdapter
from probe.models.vit_gpt2 import ViTGPT2Adapter

TINY = {
    "vit-gpt2": lambda: ViTGPT2Adapter.tiny(seed=1, image_size=64),
    "blip": lambda: BlipAdapter.tiny(seed=1, image_size=64),
    "git": lambda: GitAdapter.tiny(seed=1, image_size=64),
    "prefix-vlm": lambda: registry.load_model("prefix-vlm", weights="random", seed=1),
    "mmca": lambda: registry.load_model("mmca", weights="random", seed=1),
}


@pytest.fixture(scope="module")
def adapters():
    return {n: f() for n, f in TINY.items()}


@pytest.fixture(scope="module")
def samples():
    return list(iter_split("test", 3))


ABLATION = ablation.Ablation()


def shapes_set(samples) -> ImageSet:
    names = [f"s{s.index}" for s in samples]
    return ImageSet([s.image for s in samples], names, names, masks=[s.masks for s in samples], samples=samples)


def image_span(a, images) -> tuple[int, int]:
    return a.input_meta(a.preprocess(images[:1])).spans["image"]


def test_patches_under_by_hand():
    mask = np.zeros((8, 8), dtype=bool)
    mask[0:2, 5] = True  # top row of patches, third column of a 4x4 grid of 2-px patches
    mask[7, 0] = True  # bottom-left patch
    got = ablation.patches_under(mask, (4, 4)).reshape(4, 4)
    want = np.zeros((4, 4), dtype=bool)
    want[0, 2] = want[3, 0] = True
    assert (got == want).all()


@pytest.mark.parametrize("name", list(TINY))
def test_region_variant_gives_removed_tokens_zero_attention_in_every_layer(name, adapters, samples):
    a = adapters[name]
    images = [s.image for s in samples]
    variants = ablation.build_variants(a, "region", len(images), k=5, span=image_span(a, images), attended=None,
                                       objects=[s.masks for s in samples])
    v = next(v for v in variants if v.name == "object:0")
    rows = [(v, i) for i in range(len(images))]
    batch = a.preprocess(images, [s.objects[0].phrase for s in samples])
    with intervene(a, ablation.interventions_for(a, rows)), capture(a, a.flow_hook.format(i="*")) as cache:
        a.forward(batch)
    names = cache.names()
    assert len(names) == len(ablation._flow_layers(a)) > 0
    removed = v.removed
    assert removed.any(1).all()  # every image has an object 0 with patches under it
    for n in names:
        p = cache[n]  # (b, heads, queries, keys)
        for i in range(len(images)):
            assert p[i][..., : removed.shape[1]][..., removed[i]].abs().max() == 0
            assert p[i][..., : removed.shape[1]][..., ~removed[i]].sum() > 0


@pytest.mark.parametrize("name", list(TINY))
def test_blind_variant_makes_images_indistinguishable(name, adapters, samples):
    a = adapters[name]
    images = [samples[0].image, samples[1].image]
    blind = ablation.Variant("blind", "blind", torch.ones(2, a.n_image_tokens, dtype=torch.bool))
    batch = a.preprocess(images, [samples[0].objects[0].phrase] * 2)
    with intervene(a, ablation.interventions_for(a, [(blind, 0), (blind, 1)])):
        out = a.forward(batch)
    torch.testing.assert_close(out[0], out[1], atol=1e-5, rtol=0)
    plain = a.forward(batch)
    assert (plain[0] - plain[1]).abs().max() > 1e-4  # the images do differ without the ablation


@pytest.mark.parametrize("name", list(TINY))
def test_batched_sweep_equals_one_forward_per_variant(name, adapters, samples):
    a = adapters[name]
    batched = ABLATION(a, shapes_set(samples), batch_size=16, max_new_tokens=6)
    loop = ABLATION(a, shapes_set(samples), loop=True, max_new_tokens=6)
    assert [v["name"] for v in batched.variants] == [v["name"] for v in loop.variants]
    kinds = {v["kind"] for v in batched.variants}
    assert {"none", "blind", "region", "object", "object-random", "layer", "head"} <= kinds
    torch.testing.assert_close(batched.arrays["ablation.logprob"], loop.arrays["ablation.logprob"], atol=1e-5, rtol=0)
    assert batched.captions == loop.captions
    assert batched.arrays["ablation.drop"][0].abs().max() == 0  # "none" is the reference
    assert batched.captions[0] == batched.reference


@pytest.mark.parametrize("name", ["git", "prefix-vlm"])
def test_layer_variant_masks_the_image_span_of_that_joint_layer_only(name, adapters, samples):
    a = adapters[name]
    v = ablation.Variant("layer:0", "layer", layer=0)
    batch = a.preprocess([samples[0].image], [samples[0].objects[0].phrase])
    with intervene(a, ablation.interventions_for(a, [(v, 0)])), capture(a, "text.blocks.*.attn.pattern") as cache:
        a.forward(batch)
    t0, n_img = a.text_offset(), a.n_image_tokens
    text_rows = lambda i: cache[f"text.blocks.{i}.attn.pattern"][0, :, t0:, :n_img]  # noqa: E731
    assert text_rows(0).abs().max() == 0
    assert text_rows(1).sum() > 0


@pytest.mark.parametrize("name", ["vit-gpt2", "blip"])
def test_head_variant_zeroes_that_cross_attention_head_per_row(name, adapters, samples):
    from probe.capture import ZeroHeads

    a = adapters[name]
    images = [samples[0].image, samples[0].image]
    batch = a.preprocess(images, [samples[0].objects[0].phrase] * 2)
    rows = [(ablation.Variant("head:1.2", "head", head=(1, 2)), 0), (ablation.Variant("none", "none"), 1)]
    with intervene(a, ablation.interventions_for(a, rows)):
        mixed = a.forward(batch)
    with intervene(a, [ZeroHeads("text.blocks.1.xattn.z", [2])]):
        alone = a.forward({k: v[:1] for k, v in batch.items()})
    torch.testing.assert_close(mixed[0], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1], a.forward({k: v[1:] for k, v in batch.items()})[0], atol=1e-5, rtol=0)
    assert (mixed[0] - mixed[1]).abs().max() > 1e-6


def test_result_round_trips_through_the_store(adapters, samples, store_root):
    from probe.runs.store import RunStore

    r = ABLATION(adapters["blip"], [s.image for s in samples], kind="layers", generate=False)
    run = RunStore(store_root).save({"analysis": "ablation", "model": {"name": "blip"}}, r, ABLATION.render(r))
    back = RunStore(store_root).load(run.id).result
    assert back.variants == r.variants
    torch.testing.assert_close(back.arrays["ablation.logprob"], r.arrays["ablation.logprob"])


def test_unknown_kind_and_classifier_are_refused(adapters, samples):
    with pytest.raises(ValueError, match="--kind 'everything': choose one of"):
        ABLATION(adapters["git"], [samples[0].image], kind="everything")
    assert "caption" in ABLATION.check("vit-standard", registry.model_entry("vit-standard").capabilities)


def test_cli_runs_the_default_suite_on_probe_shapes(tmp_path, store_root, capsys):
    from probe.cli import main

    folder = BlipAdapter.tiny(seed=2, image_size=64).save(tmp_path / "blip")
    rc = main(["run", "ablation", "--model", "blip", "--weights", str(folder), "--shapes", "3",
               "--max-new-tokens", "5"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "blind" in out and "object:0" in out and "head sweep" in out
    run_dir = next(store_root.iterdir())
    assert {p.name for p in (run_dir / "figures").iterdir()} >= {"ablation_heads.png", "ablation_drop.png"}



@pytest.mark.parametrize("name", ["blip"])
def test_on_the_zoo_captioner_blind_falls_to_the_prior_and_objects_matter(name):
    """Bundled probe-shapes captioner, 48 test images: blind captions are one image-independent
    caption (so accuracy is that of a text-only guess), and removing an object's patches loses its
    colour+shape words more often than removing as many random patches."""
    a = registry.load_model(name, weights="demo")
    samples = list(iter_split("test", 48))
    r = ABLATION(a, shapes_set(samples), kind="region")
    names = [v["name"] for v in r.variants]
    blind = ABLATION(a, shapes_set(samples), kind="blind")
    blind_caps = blind.captions[[v["name"] for v in blind.variants].index("blind")]
    assert len(set(blind_caps)) == 1
    best_constant = max(caption_metrics([c] * len(samples), samples)["exact"] for c in {s.caption for s in samples})
    assert blind.accuracy["blind"]["exact"] <= best_constant
    assert r.accuracy["none"]["exact"] > 0.5
    lost = r.object_words
    assert lost["object:0"] > lost["object-random:0"] + 0.2, lost
    assert names[0] == "none"


def test_result_stores_which_tokens_each_variant_removed(adapters, samples):
    """`ablation.removed` is what the app draws: each object variant removes exactly the patches
    under that object's mask (CLS kept), counts agree with the variants, layer variants remove none."""
    a = adapters["blip"]
    r = ABLATION(a, shapes_set(samples), kind="all", generate=False)
    removed = r.arrays["ablation.removed"]
    assert removed.shape == (len(r.variants), len(samples), a.n_image_tokens)
    for j, v in enumerate(r.variants):
        if v["removed_tokens"] is None:
            assert not removed[j].any()
        else:
            assert removed[j].sum(1).tolist() == v["removed_tokens"]
        if v["name"].startswith("object:"):
            k = int(v["name"].split(":")[1])
            for i, s in enumerate(samples):
                want = ablation.patches_under(s.masks[k], a.grid) if k < len(s.masks) else np.zeros(64, bool)
                assert removed[j, i, 0].item() is False
                assert removed[j, i, 1:].numpy().tolist() == want.tolist()
    assert r.arrays["input.image"].shape == (len(samples), a.image_size, a.image_size, 3)
