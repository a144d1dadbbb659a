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

from probe.adapter import Specials
from probe.models.hf_captioners import ZOO_CONFIG, HFCaptioner
from probe.registry import register_model
from probe.types import FUSION_PROJ, VISION_OUTPUT, Block, Capabilities, Hook, HookSpec, Recipe

HUB_ID = "microsoft/git-base-coco"
JOINT = "(batch, heads, image + text, image + text): joint, image block bidirectional, text causal"


class GitAdapter(HFCaptioner):
    name = "git"
    hub_id = HUB_ID
    capabilities = Capabilities(family="git", fusion="prefix", has_cross_attention=False, tasks=("caption",),
                                published=True)
    # the joint stack only has an eager implementation; the vision tower takes ours
    capture_attention = "git.image_encoder"
    attn_implementation = ("vision tower: probe_capture (SDPA kernel, patterns on request); "
                           "joint stack: eager, read by hooks")
    model_class = "GitForCausalLM"
    processor_class = "CLIPImageProcessorPil"
    tiny_specials = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]"}
    tiny_roles = ("cls_token", "sep_token", "pad_token")

    @classmethod
    def published_config(cls) -> Any:
        """GIT base: CLIP ViT-B/16 at 224, a 6-layer BERT-style joint stack."""
        from transformers import GitConfig  # heavy: only when this family is built

        return GitConfig()

    @classmethod
    def tiny_config(cls, vocab_size: int, specials: Specials, *, image_size: int = 32, patch_size: int = 8,
                    hidden: int = 32, layers: int = 2, heads: int = 4, positions: int = 64) -> Any:
        from transformers import GitConfig  # heavy: only when this family is built

        return GitConfig(
            vision_config={"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
                           "intermediate_size": 4 * hidden, "image_size": image_size, "patch_size": patch_size,
                           "projection_dim": hidden},
            hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * hidden,
            vocab_size=vocab_size, max_position_embeddings=positions, bos_token_id=specials.start,
            eos_token_id=specials.eos, pad_token_id=specials.pad,
        )

    @classmethod
    def placeholder_specials(cls, config: Any) -> dict[str, tuple[str, int]]:
        return {"pad_token": ("[PAD]", config.pad_token_id), "unk_token": ("[UNK]", 100),
                "cls_token": ("[CLS]", config.bos_token_id), "sep_token": ("[SEP]", config.eos_token_id)}

    def _new_processor(self) -> Any:
        from transformers import CLIPImageProcessorPil  # heavy: only when this family is built

        s = self.image_size
        return CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s})

    @property
    def specials(self) -> Specials:
        c = self.model.config
        return Specials(int(c.bos_token_id), int(c.eos_token_id), int(c.pad_token_id))

    def _logits(self, pixel_values: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values, input_ids=ids, attention_mask=mask).logits
        return out[:, self.n_image_tokens :]

    def unembed(self, resid: torch.Tensor) -> torch.Tensor:
        """GIT's BERT layers are post-norm: its ``output`` projection reads the state as is."""
        return self.model.output(resid)

    def _generate_kwargs(self, pixel_values: torch.Tensor) -> dict[str, Any]:
        sp = self.specials
        ids = torch.full((pixel_values.shape[0], 1), sp.start, dtype=torch.long, device=pixel_values.device)
        return {"input_ids": ids, "eos_token_id": sp.eos, "pad_token_id": sp.pad}

    def blocks(self) -> list[Block]:
        v, c = self.model.config.vision_config, self.model.config
        return [
            Block("vision", "git.image_encoder.vision_model.encoder.layers.{i}", v.num_hidden_layers, (
                Hook("attn.pattern", "self_attn", "pattern", n_heads=v.num_attention_heads),
                Hook("attn.z", "self_attn.out_proj", "input", n_heads=v.num_attention_heads),
                Hook("resid_pre", "", "input"),
                Hook("resid_post", "", "output"),
            )),
            Block("text", "git.encoder.layer.{i}", c.num_hidden_layers, (
                Hook("attn.pattern", "attention.self", "pattern", n_heads=c.num_attention_heads, output_index=1,
                     mask_arg="attention_mask", shape=JOINT),
                Hook("attn.z", "attention.output.dense", "input", n_heads=c.num_attention_heads,
                     shape="(batch, image + text, heads * head_dim)"),
                Hook("resid_post", "", "output", shape="(batch, image + text, dim)"),
            )),
        ]

    def single_hooks(self) -> list[HookSpec]:
        return [HookSpec(VISION_OUTPUT, "git.image_encoder", "output"),
                HookSpec(FUSION_PROJ, "git.visual_projection", "output")]

    def _groups(self) -> dict[str, list[str]]:
        lay = "git.encoder.layer.{i}"
        temporal = ["git.img_temporal_embedding"] if hasattr(self.model.git, "img_temporal_embedding") else []
        return {
            "vision": ["git.image_encoder"],
            "fusion": ["git.visual_projection", *temporal],
            "embeddings": ["git.embeddings"],
            "text_self_attention": [f"{lay}.attention"],
            "cross_attention": [],
            "feed_forward": [f"{lay}.intermediate", f"{lay}.output"],
            "head": ["output"],
        }


# GIT's single joint stack learns probe-shapes slower than the encoder-decoder families: at 2500
# steps it ends at 80% objects (training loss 0.26 against 0.08); 4500 steps reach the bar
register_model("git", GitAdapter.load, capabilities=GitAdapter.capabilities,
               summary=f"GIT: image tokens prefix one causal self-attention stack, no cross-attention (default {HUB_ID})",
               recipe=Recipe("git", "caption", ZOO_CONFIG, n_train=12000, steps=4500, lr=2e-3))
