"""Parameter accounting from adapter-declared groups, against the reference counts of the
published architectures (built on the meta device, nothing downloaded): ../shared/REFERENCES.md."""

from __future__ import annotations

import pytest

from probe.analyses.ca_params import count_parameters
from probe.models.blip import BlipAdapter
from probe.models.git import GitAdapter
from probe.models.vit_gpt2 import ViTGPT2Adapter

# REFERENCES.md: BLIP base 223.97M unique (247.44M with the tied LM head twice), 28.37M in
# cross-attention; ViT-GPT2 239.20M, 28.37M cross-attention; GIT base 176.62M, none.
REFERENCE_M = {
    "blip": (BlipAdapter, 223.97, 247.44, 28.37),
    "vit-gpt2": (ViTGPT2Adapter, 239.20, None, 28.37),
    "git": (GitAdapter, 176.62, None, 0.0),
}


@pytest.mark.parametrize("name", list(REFERENCE_M))
def test_full_size_counts_equal_references(name):
    cls, total_m, tied_m, xattn_m = REFERENCE_M[name]
    c = count_parameters(cls.on_meta())
    assert round(c["total"] / 1e6, 2) == total_m
    assert round(c["groups"]["cross_attention"] / 1e6, 2) == xattn_m
    if tied_m is not None:
        assert round(c["total_with_tied"] / 1e6, 2) == tied_m
    assert sum(c["groups"].values()) == c["total"]


def test_cross_attention_count_by_hand():
    """One cross-attention layer at width 768: q, k, v and output (768*768 + 768 each) plus a
    LayerNorm (2*768); 12 layers. BLIP and ViT-GPT2 have exactly that."""
    per_layer = 4 * (768 * 768 + 768) + 2 * 768
    for cls in (BlipAdapter, ViTGPT2Adapter):
        assert count_parameters(cls.on_meta())["groups"]["cross_attention"] == 12 * per_layer


@pytest.mark.parametrize("cls", [BlipAdapter, ViTGPT2Adapter, GitAdapter])
def test_every_parameter_is_in_exactly_one_group_on_tiny_models(cls):
    a = cls.tiny()
    c = count_parameters(a)
    assert c["total"] == sum(p.numel() for p in a.model.parameters())


def test_a_parameter_outside_every_group_is_an_error(monkeypatch):
    a = GitAdapter.tiny()
    groups = a.param_groups()
    groups["head"] = []
    monkeypatch.setattr(a, "param_groups", lambda: groups)
    with pytest.raises(ValueError, match="in no declared group"):
        count_parameters(a)
