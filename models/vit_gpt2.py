"""``vit-gpt2``: transformers' `VisionEncoderDecoderModel`, a ViT encoder and a GPT-2 decoder with a
cross-attention in every block (``nlpconnect/vit-gpt2-image-captioning``).

Both stacks call transformers' attention interface, so the whole model runs on ``probe_capture``:
the SDPA kernel computes every output and patterns are recomputed only where a capture listens.
GPT-2's cross-attention honours a key mask, so image tokens are removed through the same site.
"""

from __future__ import annotations

from typing import Any

import torch

from probe.adapter import Specials
from probe.models.hf_captioners import ZOO_CONFIG, HFCaptioner, TextStack
from probe.models.hf_vit import hf_vit_block
from probe.registry import register_model
from probe.types import VISION_OUTPUT, Block, Capabilities, Hook, HookSpec, Recipe, prefixed

HUB_ID = "nlpconnect/vit-gpt2-image-captioning"


class ViTGPT2Adapter(HFCaptioner):
    name = "vit-gpt2"
    hub_id = HUB_ID
    capabilities = Capabilities(family="vit-gpt2", fusion="cross_attention", has_cross_attention=True,
                                tasks=("caption",), published=True)
    model_class = "VisionEncoderDecoderModel"
    processor_class = "ViTImageProcessorPil"
    vision_key = "encoder"
    tiny_specials = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>"}
    text_stack = TextStack("decoder.transformer.h.{i}", image_kv=("crossattention.c_attn",), residual="ln_cross_attn")

    @classmethod
    def published_config(cls) -> Any:
        """ViT-B/16 at 224 (google/vit-base-patch16-224-in21k) + GPT-2 small with cross-attention."""
        from transformers import (  # heavy: only when this family is built
            GPT2Config,
            VisionEncoderDecoderConfig,
            ViTConfig,
        )

        dec = GPT2Config(add_cross_attention=True, is_decoder=True)
        cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(ViTConfig(), dec)
        cfg.decoder_start_token_id = cfg.pad_token_id = cfg.eos_token_id = dec.eos_token_id
        return cfg

    @classmethod
    def tiny_config(cls, vocab_size: int, specials: Specials, *, image_size: int = 32, patch_size: int = 8,
                    hidden: int = 32, layers: int = 2, heads: int = 4, positions: int = 64) -> Any:
        from transformers import (  # heavy: only when this family is built
            GPT2Config,
            VisionEncoderDecoderConfig,
            ViTConfig,
        )

        enc = ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * hidden, image_size=image_size, patch_size=patch_size)
        dec = GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, vocab_size=vocab_size, n_positions=positions,
                         add_cross_attention=True, is_decoder=True, bos_token_id=specials.start,
                         eos_token_id=specials.eos, pad_token_id=specials.pad)
        cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
        cfg.decoder_start_token_id, cfg.eos_token_id, cfg.pad_token_id = specials.start, specials.eos, specials.pad
        return cfg

    @classmethod
    def placeholder_specials(cls, config: Any) -> dict[str, tuple[str, int]]:
        eos = int(config.decoder.eos_token_id)
        return {r: ("<|endoftext|>", eos) for r in ("bos_token", "eos_token", "pad_token", "unk_token")}

    @property
    def specials(self) -> Specials:
        c = self.model.config
        start = c.decoder_start_token_id if c.decoder_start_token_id is not None else c.decoder.bos_token_id
        eos = c.decoder.eos_token_id if c.decoder.eos_token_id is not None else c.eos_token_id
        return Specials(int(start), int(eos), int(c.pad_token_id if c.pad_token_id is not None else eos))

    def _logits(self, pixel_values: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.model(pixel_values=pixel_values, decoder_input_ids=ids, decoder_attention_mask=mask).logits

    def unembed(self, resid: torch.Tensor) -> torch.Tensor:
        """GPT-2 is pre-norm: ``ln_f``, then the (tied) ``lm_head``."""
        dec = self.model.decoder
        return dec.lm_head(dec.transformer.ln_f(resid))

    def _finish_block(self, block: Any, z: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """`GPT2Block` after its cross-attention heads: ``x = residual + c_proj(z)``, then
        ``x + mlp(ln_2(x))``, as ``GPT2Block.forward`` runs them (dropouts are identities in eval)."""
        x = residual + block.crossattention.resid_dropout(block.crossattention.c_proj(z))
        return x + block.mlp(block.ln_2(x))

    def _generate_kwargs(self, pixel_values: torch.Tensor) -> dict[str, Any]:
        sp = self.specials
        return {"decoder_start_token_id": sp.start, "eos_token_id": sp.eos, "pad_token_id": sp.pad}

    def blocks(self) -> list[Block]:
        h = self.model.config.decoder.n_head
        text = Block("text", "decoder.transformer.h.{i}", self.model.config.decoder.n_layer, (
            Hook("attn.pattern", "attn", "pattern", n_heads=h),
            Hook("attn.z", "attn.c_proj", "input", n_heads=h),
            Hook("xattn.pattern", "crossattention", "pattern", n_heads=h),
            Hook("xattn.z", "crossattention.c_proj", "input", n_heads=h),
            Hook("resid_post", "", "output"),
        ))
        return [*prefixed([hf_vit_block(self.vision_config)], "encoder."), text]

    def single_hooks(self) -> list[HookSpec]:
        return [HookSpec(VISION_OUTPUT, "encoder", "output")]

    def _groups(self) -> dict[str, list[str]]:
        d, lay = "decoder.transformer", "decoder.transformer.h.{i}"
        return {
            "vision": ["encoder"],
            "fusion": ["enc_to_dec_proj"] if hasattr(self.model, "enc_to_dec_proj") else [],
            "embeddings": [f"{d}.wte", f"{d}.wpe"],
            "text_self_attention": [f"{lay}.attn", f"{lay}.ln_1"],
            "cross_attention": [f"{lay}.crossattention", f"{lay}.ln_cross_attn"],
            "feed_forward": [f"{lay}.mlp", f"{lay}.ln_2"],
            "head": [f"{d}.ln_f", "decoder.lm_head"],
        }


register_model("vit-gpt2", ViTGPT2Adapter.load, capabilities=ViTGPT2Adapter.capabilities,
               summary=f"ViT encoder + GPT-2 decoder, cross-attention in every block (default {HUB_ID})",
               recipe=Recipe("vit-gpt2", "caption", ZOO_CONFIG, n_train=12000, steps=2500, lr=2e-3))
