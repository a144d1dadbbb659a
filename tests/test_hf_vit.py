"""hf-vit: patterns captured under the SDPA kernel equal eager output_attentions."""

from __future__ import annotations

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification, ViTModel

from probe.capture import MaskTokens, ZeroHeads, capture, intervene, sites
from probe.models.hf_vit import HFViTAdapter
from probe.weights import CheckpointError, WeightsNotFound
from tests.helpers import hostile_copy

TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
            image_size=32, patch_size=8, num_labels=5)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hfvit")
    ViTForImageClassification(ViTConfig(**TINY)).save_pretrained(folder)
    return folder


@pytest.fixture
def adapter(tiny_folder):
    return HFViTAdapter.load(weights=str(tiny_folder))


def eager_attentions(folder, pixels):
    eager = ViTForImageClassification.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        out = eager(pixel_values=pixels, output_attentions=True)
    return out.logits, out.attentions


def test_loads_on_the_capturing_kernel(adapter, tiny_folder):
    assert adapter.model.config._attn_implementation == "probe_capture"
    assert adapter.weights.source == "local" and len(adapter.weights.sha256) == 64
    assert type(adapter.model).__name__ == "ViTForImageClassification"


def test_patterns_equal_eager_on_every_layer(adapter, tiny_folder, rgb_images):
    batch = adapter.preprocess(rgb_images)
    with torch.no_grad():
        bare = adapter.forward(batch)
    with torch.no_grad(), capture(adapter, "vision.blocks.*.attn.pattern") as cache:
        logits = adapter.forward(batch)
    assert torch.equal(bare, logits), "capture changed the model output"
    eager_logits, eager_att = eager_attentions(tiny_folder, batch["pixel_values"])
    torch.testing.assert_close(logits, eager_logits, atol=1e-5, rtol=1e-5)
    assert len(eager_att) == 3
    for i, ref in enumerate(eager_att):
        got = cache[f"vision.blocks.{i}.attn.pattern"]
        assert got.shape == (3, 4, 17, 17)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_reduced_capture_equals_slice_of_full(adapter, rgb_images):
    batch = adapter.preprocess(rgb_images)
    with torch.no_grad(), capture(adapter, "vision.blocks.1.attn.pattern") as full:
        adapter.forward(batch)
    with torch.no_grad(), capture(adapter, "vision.blocks.1.attn.pattern", rows=[0], heads=[1, 3], reduce="mean") as red:
        adapter.forward(batch)
    ref = full["vision.blocks.1.attn.pattern"][:, [1, 3]][:, :, [0]].mean(1, keepdim=True)
    torch.testing.assert_close(red["vision.blocks.1.attn.pattern"], ref, atol=1e-7, rtol=1e-6)


def test_no_hook_remains_also_after_an_exception(adapter, rgb_images):
    batch = adapter.preprocess(rgb_images)
    with pytest.raises(RuntimeError, match="boom"):
        with capture(adapter, "*"), intervene(adapter, [ZeroHeads("vision.blocks.0.attn.z", [1]), MaskTokens([3])]):
            adapter.forward(batch)
            raise RuntimeError("boom")
    assert sites.active_site_count() == 0
    for m in adapter.model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_zero_heads_matches_eager_reference(adapter, tiny_folder, rgb_images):
    """Zeroing head 2 of layer 1 through our hook equals zeroing its o_proj input columns by hand."""
    batch = adapter.preprocess(rgb_images)
    with torch.no_grad(), intervene(adapter, [ZeroHeads("vision.blocks.1.attn.z", [2])]):
        ours = adapter.forward(batch)
    ref_model = ViTForImageClassification.from_pretrained(tiny_folder, attn_implementation="eager").eval()
    with torch.no_grad():
        w = ref_model.vit.layers[1].attention.o_proj.weight
        w[:, 16:24] = 0  # head 2 of 4, head_dim 8
        ref = ref_model(pixel_values=batch["pixel_values"]).logits
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_masked_token_gets_zero_attention(adapter, rgb_images):
    batch = adapter.preprocess(rgb_images)
    with torch.no_grad(), intervene(adapter, [MaskTokens([1, 5])]), capture(adapter, "*.attn.pattern") as cache:
        adapter.forward(batch)
    for i in range(3):
        assert (cache[f"vision.blocks.{i}.attn.pattern"][..., [1, 5]] == 0).all()


def test_vitmodel_base_paths_and_random_weights():
    a = HFViTAdapter.load(weights="random", config=TINY)
    assert isinstance(a.model, ViTModel)
    names = [s.module for s in a.hook_specs()]
    assert "layers.0.attention" in names
    assert a.weights.source == "random"


def test_missing_folder_and_offline_hub_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(WeightsNotFound, match="does not exist"):
        HFViTAdapter.load(weights=str(tmp_path / "nope"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(WeightsNotFound, match="HF_HUB_OFFLINE"):
        HFViTAdapter.load(weights="pretrained")


def test_folder_naming_remote_code_is_refused(tiny_folder, tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(CheckpointError, match="auto_map") as err:
        HFViTAdapter.load(weights=str(hostile_copy(tiny_folder, tmp_path / "hostile", marker)))
    assert "\n" not in str(err.value) and not marker.exists()
