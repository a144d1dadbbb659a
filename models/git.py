"""``git``: transformers' `GitForCausalLM` (``microsoft/git-base-coco``).

GIT has no cross-attention: the projected image tokens (CLS + patches of a CLIP ViT) prefix one
self-attention stack, bidirectional inside the image block and causal over the text. Its text→image
flow is the image span of that joint pattern (`InputMeta.flow_hook` says so). The vision tower calls
transformers' attention interface and runs on ``probe_capture``; the joint stack computes its own
probabilities (eager only), read by forward hooks, and masks keys through its ``attention_mask``.
"""

from __future__ import annotations

from typing import Any

import torch

from probe.capture import hf_attention
from probe.models.hf_captioners import HFCaptionerAdapter, Specials
from probe.types import (
    FUSION_PROJ,
    TEXT_PATTERN,
    TEXT_RESID_POST,
    TEXT_Z,
    VISION_PATTERN,
    VISION_RESID_POST,
    VISION_Z,
    Capabilities,
    HookSpec,
)

HUB_ID = "microsoft/git-base-coco"


class GitAdapter(HFCaptionerAdapter):
    name = "git"
    hub_id = HUB_ID
    capabilities = Capabilities(family="git", fusion="prefix", has_cross_attention=False, tasks=("caption",))

    tiny_specials = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]"}
    tiny_roles = ("cls_token", "sep_token", "pad_token")

    @classmethod
    def published_config(cls) -> Any:
        """GIT base: CLIP ViT-B/16 at 224, a 6-layer BERT-style joint stack."""
        from transformers import GitConfig

        return GitConfig()

    @classmethod
    def tiny_config(cls, vocab_size: int, specials: Specials, *, image_size: int = 32, patch_size: int = 8,
                    hidden: int = 32, layers: int = 2, heads: int = 4, positions: int = 64) -> Any:
        from transformers import GitConfig

        return GitConfig(
            vision_config={"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
                           "intermediate_size": 4 * hidden, "image_size": image_size, "patch_size": patch_size,
                           "projection_dim": hidden},
            hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * hidden,
            vocab_size=vocab_size, max_position_embeddings=positions, bos_token_id=specials.start,
            eos_token_id=specials.eos, pad_token_id=specials.pad,
        )

    @classmethod
    def _from_pretrained(cls, ref: str, local_only: bool) -> Any:
        from transformers import GitForCausalLM

        return GitForCausalLM.from_pretrained(ref, local_files_only=local_only)

    @classmethod
    def _from_config(cls, config: Any) -> Any:
        from transformers import GitForCausalLM

        return GitForCausalLM(config)

    @classmethod
    def _image_processor(cls, ref: str | None, model: Any, local_only: bool = True) -> Any:
        from transformers import CLIPImageProcessorPil

        if ref is not None:
            return CLIPImageProcessorPil.from_pretrained(ref, local_files_only=local_only)
        s = int(model.config.vision_config.image_size)
        return CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s})

    @classmethod
    def _placeholder_specials(cls, model: Any) -> dict[str, tuple[str, int]]:
        c = model.config
        return {"pad_token": ("[PAD]", c.pad_token_id), "unk_token": ("[UNK]", 100),
                "cls_token": ("[CLS]", c.bos_token_id), "sep_token": ("[SEP]", c.eos_token_id)}

    def _use_capture_attention(self) -> None:
        # the joint stack only has an eager implementation; the vision tower takes ours
        self.model.git.image_encoder.set_attn_implementation(hf_attention.register())

    @property
    def attn_implementation(self) -> str:
        return "vision tower: probe_capture (SDPA kernel, patterns on request); joint stack: eager, read by hooks"

    @property
    def specials(self) -> Specials:
        c = self.model.config
        return Specials(int(c.bos_token_id), int(c.eos_token_id), int(c.pad_token_id))

    @property
    def vision_config(self) -> Any:
        return self.model.config.vision_config

    def text_offset(self) -> int:
        return self.n_image_tokens

    @property
    def flow_hook(self) -> str:
        return "text.blocks.{i}.attn.pattern"

    def _logits(self, pixel_values: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values, input_ids=ids, attention_mask=mask).logits
        return out[:, self.n_image_tokens :]

    def _generate(self, pixel_values: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        sp = self.specials
        ids = torch.full((pixel_values.shape[0], 1), sp.start, dtype=torch.long, device=pixel_values.device)
        return self.model.generate(pixel_values=pixel_values, input_ids=ids, eos_token_id=sp.eos,
                                   pad_token_id=sp.pad, **kwargs)

    def hook_specs(self) -> list[HookSpec]:
        v, c = self.model.config.vision_config, self.model.config
        specs: list[HookSpec] = []
        for i in range(v.num_hidden_layers):
            blk = f"git.image_encoder.vision_model.encoder.layers.{i}"
            specs += [
                HookSpec(VISION_PATTERN.format(i=i), f"{blk}.self_attn", "pattern", "(batch, heads, tokens, tokens)",
                         n_heads=v.num_attention_heads),
                HookSpec(VISION_Z.format(i=i), f"{blk}.self_attn.out_proj", "input",
                         "(batch, tokens, heads * head_dim)", n_heads=v.num_attention_heads),
                HookSpec(VISION_RESID_POST.format(i=i), blk, "output", "(batch, tokens, dim)"),
            ]
        specs.append(HookSpec(FUSION_PROJ, "git.visual_projection", "output", "(batch, image tokens, dim)"))
        h = c.num_attention_heads
        for i in range(c.num_hidden_layers):
            blk = f"git.encoder.layer.{i}"
            specs += [
                HookSpec(TEXT_PATTERN.format(i=i), f"{blk}.attention.self", "pattern",
                         "(batch, heads, image + text, image + text): joint, image block bidirectional, text causal",
                         n_heads=h, output_index=1, mask_arg="attention_mask"),
                HookSpec(TEXT_Z.format(i=i), f"{blk}.attention.output.dense", "input",
                         "(batch, image + text, heads * head_dim)", n_heads=h),
                HookSpec(TEXT_RESID_POST.format(i=i), blk, "output", "(batch, image + text, dim)"),
            ]
        return specs


    def param_groups(self) -> dict[str, list[str]]:
        lay = "git.encoder.layer"
        n = self.model.config.num_hidden_layers
        fusion = ["git.visual_projection"] + (["git.img_temporal_embedding"]
                                              if hasattr(self.model.git, "img_temporal_embedding") else [])
        return {
            "vision": ["git.image_encoder"],
            "fusion": fusion,
            "embeddings": ["git.embeddings"],
            "text_self_attention": [f"{lay}.{i}.attention" for i in range(n)],
            "cross_attention": [],
            "feed_forward": [p for i in range(n) for p in (f"{lay}.{i}.intermediate", f"{lay}.{i}.output")],
            "head": ["output"],
        }

def register() -> None:
    from probe.registry import register_model

    register_model("git", GitAdapter.load, capabilities=GitAdapter.capabilities,
                   summary=f"GIT: image tokens prefix one causal self-attention stack, no cross-attention (default {HUB_ID})")
