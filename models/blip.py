"""``blip``: transformers' `BlipForConditionalGeneration` (``Salesforce/blip-image-captioning-base``).

BLIP's vision and text stacks compute their attention themselves and return the probabilities, so
forward hooks read them (no recomputation, no second kernel). Its text blocks are BERT layers with
a cross-attention between self-attention and feed-forward: plain softmax attention with a residual
and LayerNorm, no learnable gate. transformers 5.23 drops the cross-attention mask
(`BlipTextSelfAttention` reads an ``encoder_attention_mask`` that is never passed), so the hook
spec routes key masks into that argument: removed image tokens get exactly zero weight.
"""

from __future__ import annotations

from typing import Any

import torch

from probe.adapter import Specials
from probe.models.hf_captioners import ZOO_CONFIG, HFCaptioner, TextStack
from probe.registry import register_model
from probe.types import VISION_OUTPUT, Block, Capabilities, Hook, HookSpec, Recipe

HUB_ID = "Salesforce/blip-image-captioning-base"


class BlipAdapter(HFCaptioner):
    name = "blip"
    hub_id = HUB_ID
    capabilities = Capabilities(family="blip", fusion="cross_attention", has_cross_attention=True,
                                tasks=("caption",), default_for=("caption",), published=True)
    capture_attention = None  # BLIP computes attention itself (eager); hooks read it
    attn_implementation = "eager (BLIP's own attention; probabilities read by forward hooks)"
    model_class = "BlipForConditionalGeneration"
    processor_class = "BlipImageProcessorPil"
    tiny_specials = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                     "bos_token": "[DEC]"}
    tiny_roles = ("bos_token", "sep_token", "pad_token")
    text_stack = TextStack("text_decoder.bert.encoder.layer.{i}",
                           image_kv=("crossattention.self.key", "crossattention.self.value"), residual="crossattention")

    @classmethod
    def published_config(cls) -> Any:
        """BLIP base captioning: ViT-B/16 at 384, a 12-layer BERT decoder with cross-attention and 12
        heads (the published checkpoint's config; `BlipTextConfig` defaults to 8)."""
        from transformers import BlipConfig  # heavy: only when this family is built

        return BlipConfig(text_config={"num_attention_heads": 12})

    @classmethod
    def tiny_config(cls, vocab_size: int, specials: Specials, *, image_size: int = 32, patch_size: int = 8,
                    hidden: int = 32, layers: int = 2, heads: int = 4, positions: int = 64) -> Any:
        from transformers import BlipConfig  # heavy: only when this family is built

        common = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
                  "intermediate_size": 4 * hidden}
        return BlipConfig(
            # BLIP's vision config initialises with std 1e-10 (it is meant to be loaded): use 0.02
            vision_config={**common, "image_size": image_size, "patch_size": patch_size, "initializer_range": 0.02},
            text_config={**common, "vocab_size": vocab_size, "max_position_embeddings": positions,
                         "encoder_hidden_size": hidden, "bos_token_id": specials.start,
                         "sep_token_id": specials.eos, "eos_token_id": specials.eos, "pad_token_id": specials.pad},
        )

    @classmethod
    def placeholder_specials(cls, config: Any) -> dict[str, tuple[str, int]]:
        t = config.text_config
        return {"pad_token": ("[PAD]", t.pad_token_id), "sep_token": ("[SEP]", t.sep_token_id),
                "bos_token": ("[DEC]", t.bos_token_id), "unk_token": ("[UNK]", 100), "cls_token": ("[CLS]", 101)}

    @property
    def specials(self) -> Specials:
        t = self.model.config.text_config
        return Specials(int(t.bos_token_id), int(t.sep_token_id), int(t.pad_token_id))

    def _logits(self, pixel_values: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.model(pixel_values=pixel_values, input_ids=ids, attention_mask=mask).logits

    def unembed(self, resid: torch.Tensor) -> torch.Tensor:
        """BERT layers are post-norm: the prediction head (transform, then decoder) reads the state as is."""
        return self.model.text_decoder.cls(resid)

    def _finish_block(self, block: Any, z: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """`BlipTextLayer` after its cross-attention context: ``LayerNorm(dense(z) + residual)``
        (`BlipTextSelfOutput`), then the feed-forward chunk, as ``BlipTextLayer.forward`` runs them."""
        from transformers.pytorch_utils import apply_chunking_to_forward

        out = block.crossattention.output(z, residual)
        return apply_chunking_to_forward(block.feed_forward_chunk, block.chunk_size_feed_forward,
                                         block.seq_len_dim, out)

    def blocks(self) -> list[Block]:
        v, t = self.model.config.vision_config, self.model.config.text_config
        hv, ht = v.num_attention_heads, t.num_attention_heads
        return [
            Block("vision", "vision_model.encoder.layers.{i}", v.num_hidden_layers, (
                Hook("attn.pattern", "self_attn", "pattern", n_heads=hv, output_index=1),
                Hook("attn.z", "self_attn.projection", "input", n_heads=hv),
                Hook("resid_pre", "", "input"),
                Hook("resid_post", "", "output"),
            )),
            Block("text", "text_decoder.bert.encoder.layer.{i}", t.num_hidden_layers, (
                Hook("attn.pattern", "attention.self", "pattern", n_heads=ht, output_index=1, mask_arg="attention_mask"),
                Hook("attn.z", "attention.output.dense", "input", n_heads=ht),
                Hook("xattn.pattern", "crossattention.self", "pattern", n_heads=ht, output_index=1,
                     mask_arg="encoder_attention_mask", mask_base="attention_mask"),
                Hook("xattn.z", "crossattention.output.dense", "input", n_heads=ht),
                Hook("resid_post", "", "output"),
            )),
        ]

    def single_hooks(self) -> list[HookSpec]:
        return [HookSpec(VISION_OUTPUT, "vision_model", "output")]

    def _groups(self) -> dict[str, list[str]]:
        lay = "text_decoder.bert.encoder.layer.{i}"
        return {
            "vision": ["vision_model"],
            "embeddings": ["text_decoder.bert.embeddings"],
            "text_self_attention": [f"{lay}.attention"],
            # query/key/value, output dense and LayerNorm: plain BERT cross-attention, no gate
            "cross_attention": [f"{lay}.crossattention"],
            "feed_forward": [f"{lay}.intermediate", f"{lay}.output"],
            "fusion": [],
            "head": ["text_decoder.cls"],
        }


register_model("blip", BlipAdapter.load, capabilities=BlipAdapter.capabilities,
               summary=f"BLIP: ViT + BERT decoder, cross-attention between self-attention and FFN (default {HUB_ID})",
               recipe=Recipe("blip", "caption", ZOO_CONFIG, n_train=12000, steps=2500, lr=2e-3))
