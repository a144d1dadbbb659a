"""Parameter accounting from adapter-declared groups, against the reference counts of the
published architectures (built on the meta device, nothing downloaded): ../shared/REFERENCES.md."""

from __future__ import annotations

import pytest

from probe import registry
from probe.analyses.ca_params import count_flops, count_parameters

# REFERENCES.md: BLIP base 223.97M unique (247.44M with the tied LM head twice), 28.37M in
# cross-attention; ViT-GPT2 239.20M, 28.37M cross-attention; GIT base 176.62M, none.
REFERENCE_M = {
    "blip": (223.97, 247.44, 28.37),
    "vit-gpt2": (239.20, None, 28.37),
    "git": (176.62, None, 0.0),
}


def meta(name: str):
    """The published architecture on the meta device: no weights, no download."""
    return registry.load_model(name, weights="meta")


def tiny(name: str):
    """A small random config of the family's real classes (the test and zoo size)."""
    return registry.load_model(name, weights="random", config={})


@pytest.mark.parametrize("name", list(REFERENCE_M))
def test_full_size_counts_equal_references(name):
    total_m, tied_m, xattn_m = REFERENCE_M[name]
    c = count_parameters(meta(name))
    assert round(c["total"] / 1e6, 2) == total_m
    assert round(c["groups"]["cross_attention"] / 1e6, 2) == xattn_m
    if tied_m is not None:
        assert round(c["total_with_tied"] / 1e6, 2) == tied_m
    assert sum(c["groups"].values()) == c["total"]


def test_cross_attention_count_by_hand():
    """One cross-attention layer at width 768: q, k, v and output (768*768 + 768 each) plus a
    LayerNorm (2*768); 12 layers. BLIP and ViT-GPT2 have exactly that."""
    per_layer = 4 * (768 * 768 + 768) + 2 * 768
    for name in ("blip", "vit-gpt2"):
        assert count_parameters(meta(name))["groups"]["cross_attention"] == 12 * per_layer


@pytest.mark.parametrize("name", ["blip", "vit-gpt2", "git"])
def test_every_parameter_is_in_exactly_one_group_on_tiny_models(name):
    a = tiny(name)
    c = count_parameters(a)
    assert c["total"] == sum(p.numel() for p in a.model.parameters())


def test_a_parameter_outside_every_group_is_an_error(monkeypatch):
    a = tiny("git")
    groups = a.param_groups()
    groups["head"] = []
    monkeypatch.setattr(a, "param_groups", lambda: groups)
    with pytest.raises(ValueError, match="in no declared group"):
        count_parameters(a)


@pytest.mark.parametrize(("name", "n_image"), [("vit-gpt2", 197), ("blip", 577)])
def test_cross_attention_flops_equal_the_formula(name, n_image):
    """Per layer at width d with T text queries and N image keys: q and output projections
    2*T*d^2 each, k and v projections of the image tokens 2*N*d^2 each, scores and weighted sum
    2*T*N*d each; 12 layers. (ViT-B/16 at 224 px: N = 197; BLIP at 384 px: N = 577.)"""
    t, d = 20, 768
    f = count_flops(meta(name), text_tokens=t)
    assert f["groups"]["cross_attention"] == 12 * (2 * d * d * (2 * t + 2 * n_image) + 4 * t * n_image * d)
    assert sum(f["groups"].values()) == f["total"]
    assert 0 < f["cross_attention_share"] < 1


def test_git_spends_no_flops_in_cross_attention():
    f = count_flops(meta("git"))
    assert f["groups"]["cross_attention"] == 0 and f["total"] > 0


@pytest.mark.parametrize("name", ["prefix-vlm", "mmca"])
def test_own_captioners_declare_every_parameter(name):
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
