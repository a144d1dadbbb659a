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

from probe.models.hf_captioners import HFCaptionerAdapter, Specials
from probe.types import (
    TEXT_PATTERN,
    TEXT_RESID_POST,
    TEXT_XATTN_PATTERN,
    TEXT_XATTN_Z,
    TEXT_Z,
    VISION_PATTERN,
    VISION_RESID_POST,
    VISION_Z,
    Capabilities,
    HookSpec,
)

HUB_ID = "Salesforce/blip-image-captioning-base"


class BlipAdapter(HFCaptionerAdapter):
    name = "blip"
    hub_id = HUB_ID
    capabilities = Capabilities(family="blip", fusion="cross_attention", has_cross_attention=True,
                                tasks=("caption",))

    tiny_specials = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                    "bos_token": "[DEC]"}
    tiny_roles = ("bos_token", "sep_token", "pad_token")

    @classmethod
    def published_config(cls) -> Any:
        """BLIP base captioning: ViT-B/16 at 384, a 12-layer BERT decoder with cross-attention."""
        from transformers import BlipConfig

        return BlipConfig()

    @classmethod
    def tiny_config(cls, vocab_size: int, specials: Specials, *, image_size: int = 32, patch_size: int = 8,
                    hidden: int = 32, layers: int = 2, heads: int = 4, positions: int = 64) -> Any:
        from transformers import BlipConfig

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
    def _from_pretrained(cls, ref: str, local_only: bool) -> Any:
        from transformers import BlipForConditionalGeneration

        return BlipForConditionalGeneration.from_pretrained(ref, local_files_only=local_only)

    @classmethod
    def _from_config(cls, config: Any) -> Any:
        from transformers import BlipForConditionalGeneration

        return BlipForConditionalGeneration(config)

    @classmethod
    def _image_processor(cls, ref: str | None, model: Any, local_only: bool = True) -> Any:
        from transformers import BlipImageProcessorPil

        if ref is not None:
            return BlipImageProcessorPil.from_pretrained(ref, local_files_only=local_only)
        s = int(model.config.vision_config.image_size)
        return BlipImageProcessorPil(size={"height": s, "width": s})

    @classmethod
    def _placeholder_specials(cls, model: Any) -> dict[str, tuple[str, int]]:
        t = model.config.text_config
        return {"pad_token": ("[PAD]", t.pad_token_id), "sep_token": ("[SEP]", t.sep_token_id),
                "bos_token": ("[DEC]", t.bos_token_id), "unk_token": ("[UNK]", 100), "cls_token": ("[CLS]", 101)}

    def _use_capture_attention(self) -> None:
        """Nothing to switch: BLIP computes attention itself (eager); hooks read it."""

    @property
    def attn_implementation(self) -> str:
        return "eager (BLIP's own attention; probabilities read by forward hooks)"

    @property
    def specials(self) -> Specials:
        t = self.model.config.text_config
        return Specials(int(t.bos_token_id), int(t.sep_token_id), int(t.pad_token_id))

    @property
    def vision_config(self) -> Any:
        return self.model.config.vision_config

    def _logits(self, pixel_values: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values, input_ids=ids, attention_mask=mask).logits

    def _generate(self, pixel_values: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.model.generate(pixel_values=pixel_values, **kwargs)

    def hook_specs(self) -> list[HookSpec]:
        v, t = self.model.config.vision_config, self.model.config.text_config
        specs: list[HookSpec] = []
        for i in range(v.num_hidden_layers):
            blk = f"vision_model.encoder.layers.{i}"
            specs += [
                HookSpec(VISION_PATTERN.format(i=i), f"{blk}.self_attn", "pattern", "(batch, heads, tokens, tokens)",
                         n_heads=v.num_attention_heads, output_index=1),
                HookSpec(VISION_Z.format(i=i), f"{blk}.self_attn.projection", "input",
                         "(batch, tokens, heads * head_dim)", n_heads=v.num_attention_heads),
                HookSpec(VISION_RESID_POST.format(i=i), blk, "output", "(batch, tokens, dim)"),
            ]
        h = t.num_attention_heads
        for i in range(t.num_hidden_layers):
            blk = f"text_decoder.bert.encoder.layer.{i}"
            specs += [
                HookSpec(TEXT_PATTERN.format(i=i), f"{blk}.attention.self", "pattern",
                         "(batch, heads, text, text): causal", n_heads=h, output_index=1, mask_arg="attention_mask"),
                HookSpec(TEXT_Z.format(i=i), f"{blk}.attention.output.dense", "input",
                         "(batch, text, heads * head_dim)", n_heads=h),
                HookSpec(TEXT_XATTN_PATTERN.format(i=i), f"{blk}.crossattention.self", "pattern",
                         "(batch, heads, text, image tokens = CLS + patches)", n_heads=h, output_index=1,
                         mask_arg="encoder_attention_mask", mask_base="attention_mask"),
                HookSpec(TEXT_XATTN_Z.format(i=i), f"{blk}.crossattention.output.dense", "input",
                         "(batch, text, heads * head_dim)", n_heads=h),
                HookSpec(TEXT_RESID_POST.format(i=i), blk, "output", "(batch, text, dim)"),
            ]
        return specs


    def param_groups(self) -> dict[str, list[str]]:
        lay = "text_decoder.bert.encoder.layer"
        n = self.model.config.text_config.num_hidden_layers
        return {
            "vision": ["vision_model"],
            "embeddings": ["text_decoder.bert.embeddings"],
            "text_self_attention": [f"{lay}.{i}.attention" for i in range(n)],
            # query/key/value, output dense and LayerNorm: plain BERT cross-attention, no gate
            "cross_attention": [f"{lay}.{i}.crossattention" for i in range(n)],
            "feed_forward": [p for i in range(n) for p in (f"{lay}.{i}.intermediate", f"{lay}.{i}.output")],
            "fusion": [],
            "head": ["text_decoder.cls"],
        }

def register() -> None:
    from probe.registry import register_model

    register_model("blip", BlipAdapter.load, capabilities=BlipAdapter.capabilities,
                   summary=f"BLIP: ViT + BERT decoder, cross-attention between self-attention and FFN (default {HUB_ID})")
