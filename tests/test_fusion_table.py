"""The fusion table is generated from the adapters, and the README's copy is current."""

from __future__ import annotations

from pathlib import Path

from probe.docs import fusion_markdown, fusion_row, readme_block

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_fusion_table_is_current():
    assert readme_block(README.read_text()) == fusion_markdown(), (
        "README fusion table is stale: replace the block between the fusion-table markers with "
        "the output of `probe models --fusion`")


def test_rows_follow_the_code():
    blip = fusion_row("blip")
    # transformers drops BLIP's encoder_attention_mask; our ablation routes the mask itself
    assert "encoder_attention_mask" in blip["ablation"]
    assert blip["xattn_modules"] == "LayerNorm, Linear"  # no gate parameter anywhere
    git = fusion_row("git")
    assert git["cross_attention"] == "none" and git["xattn_params"] == 0
    assert fusion_row("vit-gpt2")["cross_attention"].startswith("12 of 12")
