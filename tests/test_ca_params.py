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


@pytest.mark.parametrize(("cls", "n_image"), [(ViTGPT2Adapter, 197), (BlipAdapter, 577)])
def test_cross_attention_flops_equal_the_formula(cls, n_image):
    """Per layer at width d with T text queries and N image keys: q and output projections
    2*T*d^2 each, k and v projections of the image tokens 2*N*d^2 each, scores and weighted sum
    2*T*N*d each; 12 layers. (ViT-B/16 at 224 px: N = 197; BLIP at 384 px: N = 577.)"""
    from probe.analyses.ca_params import count_flops

    t, d = 20, 768
    f = count_flops(cls.on_meta(), text_tokens=t)
    assert f["groups"]["cross_attention"] == 12 * (2 * d * d * (2 * t + 2 * n_image) + 4 * t * n_image * d)
    assert sum(f["groups"].values()) == f["total"]
    assert 0 < f["cross_attention_share"] < 1


def test_git_spends_no_flops_in_cross_attention():
    from probe.analyses.ca_params import count_flops

    f = count_flops(GitAdapter.on_meta())
    assert f["groups"]["cross_attention"] == 0 and f["total"] > 0


@pytest.mark.parametrize("name", ["prefix-vlm", "mmca"])
def test_own_captioners_declare_every_parameter(name):
    from probe import registry

    a = registry.load_model(name, weights="random")
    c = count_parameters(a)
    assert c["total"] == sum(p.numel() for p in a.model.parameters())
    assert c["groups"]["cross_attention"] == 0  # joint attention / shared MMCA projections
    assert c["groups"]["fusion"] == sum(p.numel() for p in a.model.proj.parameters())


def test_cli_ca_params_saves_a_run(store_root, capsys):
    from probe.cli import main

    assert main(["run", "ca-params", "--model", "git,mmca", "--weights", "random"]) == 0
    out = capsys.readouterr().out
    assert "x-attn % FLOPs" in out and "git" in out and "mmca" in out
    assert len(list(store_root.iterdir())) == 1
    assert main(["run", "ca-params", "--model", "vit-standard"]) == 2
