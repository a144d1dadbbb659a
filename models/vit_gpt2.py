"""``vit-gpt2``: transformers' `VisionEncoderDecoderModel`, a ViT encoder and a GPT-2 decoder with a
cross-attention in every block (``nlpconnect/vit-gpt2-image-captioning``).

Both stacks call transformers' attention interface, so the whole model runs on ``probe_capture``:
the SDPA kernel computes every output and patterns are recomputed only where a capture listens.
GPT-2's cross-attention honours a key mask, so image tokens are removed through the same site.
"""

from __future__ import annotations

from typing import Any

import torch

from probe.capture import hf_attention
from probe.models.hf_captioners import HFCaptionerAdapter, Specials
from probe.models.hf_vit import vision_specs
from probe.types import (
    TEXT_PATTERN,
    TEXT_RESID_POST,
    TEXT_XATTN_PATTERN,
    TEXT_XATTN_Z,
    TEXT_Z,
    Capabilities,
    HookSpec,
)

HUB_ID = "nlpconnect/vit-gpt2-image-captioning"


class ViTGPT2Adapter(HFCaptionerAdapter):
    name = "vit-gpt2"
    hub_id = HUB_ID
    capabilities = Capabilities(family="vit-gpt2", fusion="cross_attention", has_cross_attention=True,
                                tasks=("caption",))

    tiny_specials = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>"}

    @classmethod
    def published_config(cls) -> Any:
        """ViT-B/16 at 224 (google/vit-base-patch16-224-in21k) + GPT-2 small with cross-attention."""
        from transformers import GPT2Config, VisionEncoderDecoderConfig, ViTConfig

        dec = GPT2Config(add_cross_attention=True, is_decoder=True)
        cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(ViTConfig(), dec)
        cfg.decoder_start_token_id = cfg.pad_token_id = cfg.eos_token_id = dec.eos_token_id
        return cfg

    @classmethod
    def tiny_config(cls, vocab_size: int, specials: Specials, *, image_size: int = 32, patch_size: int = 8,
                    hidden: int = 32, layers: int = 2, heads: int = 4, positions: int = 64) -> Any:
        """A small config of the same classes, for tests and the zoo."""
        from transformers import GPT2Config, VisionEncoderDecoderConfig, ViTConfig

        enc = ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * hidden, image_size=image_size, patch_size=patch_size)
        dec = GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, vocab_size=vocab_size, n_positions=positions,
                         add_cross_attention=True, is_decoder=True, bos_token_id=specials.start,
                         eos_token_id=specials.eos, pad_token_id=specials.pad)
        cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
        cfg.decoder_start_token_id, cfg.eos_token_id, cfg.pad_token_id = specials.start, specials.eos, specials.pad
        return cfg

    @classmethod
    def _from_pretrained(cls, ref: str, local_only: bool) -> Any:
        from transformers import VisionEncoderDecoderModel

        return VisionEncoderDecoderModel.from_pretrained(ref, local_files_only=local_only,
                                                         attn_implementation=hf_attention.register())

    @classmethod
    def _from_config(cls, config: Any) -> Any:
        from transformers import VisionEncoderDecoderModel

        return VisionEncoderDecoderModel(config=config)

    @classmethod
    def _image_processor(cls, ref: str | None, model: Any, local_only: bool = True) -> Any:
        from transformers import ViTImageProcessorPil

        if ref is not None:
            return ViTImageProcessorPil.from_pretrained(ref, local_files_only=local_only)
        s = int(model.config.encoder.image_size)
        return ViTImageProcessorPil(size={"height": s, "width": s})

    @classmethod
    def _placeholder_specials(cls, model: Any) -> dict[str, tuple[str, int]]:
        eos = int(model.config.decoder.eos_token_id)
        return {"bos_token": ("<|endoftext|>", eos), "eos_token": ("<|endoftext|>", eos),
                "pad_token": ("<|endoftext|>", eos), "unk_token": ("<|endoftext|>", eos)}

    def _use_capture_attention(self) -> None:
        self.model.set_attn_implementation(hf_attention.register())

    @property
    def specials(self) -> Specials:
        c = self.model.config
        dec = c.decoder
        start = c.decoder_start_token_id if c.decoder_start_token_id is not None else dec.bos_token_id
        eos = dec.eos_token_id if dec.eos_token_id is not None else c.eos_token_id
        pad = c.pad_token_id if c.pad_token_id is not None else eos
        return Specials(int(start), int(eos), int(pad))

    @property
    def vision_config(self) -> Any:
        return self.model.config.encoder

    def _logits(self, pixel_values: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values, decoder_input_ids=ids, decoder_attention_mask=mask).logits

    def _generate(self, pixel_values: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        sp = self.specials
        return self.model.generate(pixel_values=pixel_values, decoder_start_token_id=sp.start,
                                   eos_token_id=sp.eos, pad_token_id=sp.pad, **kwargs)

    def hook_specs(self) -> list[HookSpec]:
        dec = self.model.config.decoder
        h = dec.n_head
        specs = vision_specs(self.vision_config, "encoder.")
        for i in range(dec.n_layer):
            blk = f"decoder.transformer.h.{i}"
            specs += [
                HookSpec(TEXT_PATTERN.format(i=i), f"{blk}.attn", "pattern", "(batch, heads, text, text): causal",
                         n_heads=h),
                HookSpec(TEXT_Z.format(i=i), f"{blk}.attn.c_proj", "input", "(batch, text, heads * head_dim)",
                         n_heads=h),
                HookSpec(TEXT_XATTN_PATTERN.format(i=i), f"{blk}.crossattention", "pattern",
                         "(batch, heads, text, image tokens = CLS + patches)", n_heads=h),
                HookSpec(TEXT_XATTN_Z.format(i=i), f"{blk}.crossattention.c_proj", "input",
                         "(batch, text, heads * head_dim)", n_heads=h),
                HookSpec(TEXT_RESID_POST.format(i=i), blk, "output", "(batch, text, dim)"),
            ]
        return specs


    def param_groups(self) -> dict[str, list[str]]:
        dec = "decoder.transformer"
        n = self.model.config.decoder.n_layer
        return {
            "vision": ["encoder"],
            "fusion": ["enc_to_dec_proj"] if hasattr(self.model, "enc_to_dec_proj") else [],
            "embeddings": [f"{dec}.wte", f"{dec}.wpe"],
            "text_self_attention": [p for i in range(n) for p in (f"{dec}.h.{i}.attn", f"{dec}.h.{i}.ln_1")],
            "cross_attention": [p for i in range(n) for p in (f"{dec}.h.{i}.crossattention", f"{dec}.h.{i}.ln_cross_attn")],
            "feed_forward": [p for i in range(n) for p in (f"{dec}.h.{i}.mlp", f"{dec}.h.{i}.ln_2")],
            "head": [f"{dec}.ln_f", "decoder.lm_head"],
        }

def register() -> None:
    from probe.registry import register_model

    register_model("vit-gpt2", ViTGPT2Adapter.load, capabilities=ViTGPT2Adapter.capabilities,
                   summary=f"ViT encoder + GPT-2 decoder, cross-attention in every block (default {HUB_ID})")
