"""The cross-modal flow analysis: values against the captured rows, masses that add up, store
round trip and the CLI end to end, on tiny models of each family saved with save_pretrained."""

from __future__ import annotations

import pytest
import torch

from probe.analyses import flow
from probe.cli import main
from probe.models.blip import BlipAdapter
from probe.models.git import GitAdapter
from probe.models.vit_gpt2 import ViTGPT2Adapter
from probe.registry import load_model
from probe.runs.store import RunStore

FAMILIES = {"vit-gpt2": ViTGPT2Adapter, "blip": BlipAdapter, "git": GitAdapter}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    return {n: c.tiny(seed=5).save(root / n) for n, c in FAMILIES.items()}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_flow_values_match_captured_rows(name, folders, rgb_images):
    adapter = load_model(name, weights=str(folders[name]))
    res = flow.Flow()(adapter, rgb_images, max_new_tokens=5, batch_size=2)
    assert res.captions == adapter.caption(rgb_images, max_new_tokens=5)["text"]
    hook = adapter.flow_hook
    # the last image ran alone in a second batch: recapture it and compare every layer's rows
    _, cache = adapter.generate_with_cache(rgb_images[2:], hook.format(i="*"), max_new_tokens=5, reduce="mean")
    n = len(res.tokens[2])
    for li, layer in enumerate(res.layers):
        want = cache.stack_calls(hook.format(i=layer))[0, 0, :n]
        torch.testing.assert_close(res.arrays["flow.rows"][2, li, :n, : want.shape[-1]], want)
    lo, hi = res.meta["spans"]["image"]
    img = res.arrays["flow.image_mass"]
    cls = res.arrays["flow.cls_mass"]
    for i, toks in enumerate(res.tokens):
        k = len(toks)
        total = img[i, :k] + cls[i, :k] + (res.arrays["flow.text_mass"][i, :k] if res.joint else 0)
        torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)
        assert torch.all(img[i, k:] == 0), "steps after the end token are zeroed"
    assert res.joint == (name == "git")
    assert res.patch_maps(0).shape == (len(res.tokens[0]), *res.meta["grid"])
    assert all(len(t) == min(5, hi - lo) for t in res.top_patches[0])


def test_flow_on_own_captioner(rgb_images):
    adapter = load_model("mmca", weights="random", config={"dim": 32, "depth": 2, "heads": 2, "vision": {
        "image_size": 32, "patch_size": 8, "dim": 32, "depth": 1, "heads": 2}})
    res = flow.Flow()(adapter, rgb_images[:2], max_new_tokens=4)
    assert not res.joint and res.arrays["flow.rows"].shape[:3] == (2, 2, 4)


def test_flow_refuses_a_classifier_before_loading(store_root, capsys):
    assert main(["run", "flow", "--model", "vit-standard"]) == 2
    err = capsys.readouterr().err
    assert "flow needs a model that can caption" in err and len(err.strip().splitlines()) == 1
    assert RunStore(store_root).list() == []


def test_cli_flow_end_to_end_and_store_round_trip(folders, store_root, tmp_path, rgb_images, capsys):
    paths = []
    for i, im in enumerate(rgb_images[:2]):
        paths.append(tmp_path / f"im{i}.png")
        im.save(paths[-1])
    assert main(["run", "flow", "--model", "git", "--weights", str(folders["git"]), "--images", *map(str, paths),
                 "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "image mass (joint attention" in out and "saved run" in out
    run = RunStore(store_root).load(RunStore(store_root).list()[0].id)
    assert run.manifest["weights"]["source"] == "local" and run.manifest["model"]["name"] == "git"
    assert {f.name for f in run.figures} == {"flow_tokens.png", "flow_mass.png"}
    res = run.result
    assert res.kind == "flow" and res.image_names == ["im0.png", "im1.png"]
    assert res.arrays["flow.rows"].shape[:2] == (2, 2)
