"""Model adapters. Importing this package registers every model family (each module registers
itself when imported; the import order below is the order `probe models` lists them)."""

from probe.models import vit, hf_vit, vit_gpt2, blip, git, prefix_vlm, mmca, xattn_cond  # noqa: F401, I001
