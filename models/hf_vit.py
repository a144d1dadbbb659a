"""Adapter of transformers' `ViTModel` / `ViTForImageClassification` (``hf-vit``).

Attention is captured through the ``probe_capture`` attention function: the model keeps the SDPA
kernel for its outputs, and patterns are recomputed only for the layers a capture asks for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

import torch
from PIL import Image

from probe.adapter import Classifier
from probe.data import to_rgb
from probe.registry import register_model
from probe.types import Block, Capabilities, Hook, prefixed
from probe.weights import from_pretrained, hf_part

HUB_ID = "google/vit-base-patch16-224"


def hf_vit_block(config: Any) -> Block:
    """Hooks of a transformers ViT whose layers sit at ``layers.{i}`` (use `prefixed` inside a model)."""
    h = config.num_attention_heads
    return Block("vision", "layers.{i}", config.num_hidden_layers, (
        Hook("attn.pattern", "attention", "pattern", n_heads=h),
        Hook("attn.z", "attention.o_proj", "input", n_heads=h),
        Hook("resid_pre", "", "input"),
        Hook("resid_post", "", "output"),
    ))


class HFViTAdapter(Classifier):
    """Wraps a transformers ViT; the model's attention implementation is set to ``probe_capture``."""

    name = "hf-vit"
    hub_id = HUB_ID
    auto = ("hub", "random")
    capture_attention = ""
    capabilities = Capabilities(family="hf-vit", attention_kind="standard", tasks=("classify", "features"),
                                published=True)

    @classmethod
    def _build(cls, config: dict[str, Any] | None, meta: bool) -> Self:
        """`config`: `transformers.ViTConfig` fields (default: ViT-B/16 at 224, no head)."""
        from transformers import ViTConfig, ViTModel  # heavy: only when this family is built

        model = ViTModel(ViTConfig(**(config or {})))
        return cls(model, processor=cls._new_processor(model.config))

    @classmethod
    def _load(cls, ref: str, local_only: bool) -> Self:
        from transformers import (  # heavy: only when this family is built
            AutoConfig,
            ViTForImageClassification,
            ViTImageProcessorPil,
            ViTModel,
        )

        archs = hf_part(AutoConfig, ref, local_only).architectures or []
        model = from_pretrained(ViTForImageClassification if "ViTForImageClassification" in archs else ViTModel,
                                ref, local_only)
        try:
            processor = hf_part(ViTImageProcessorPil, ref, True)
        except OSError:
            processor = cls._new_processor(model.config)
        return cls(model, processor=processor)

    @staticmethod
    def _new_processor(config: Any) -> Any:
        from transformers import ViTImageProcessorPil  # heavy: only when this family is built

        return ViTImageProcessorPil(size={"height": config.image_size, "width": config.image_size})

    def _save(self, folder: Path) -> None:
        self.model.save_pretrained(folder)
        self.processor.save_pretrained(folder)

    @property
    def attn_implementation(self) -> str:
        return f"{self.model.config._attn_implementation} (SDPA kernel, patterns recomputed on request)"

    def blocks(self) -> list[Block]:
        return prefixed([hf_vit_block(self.model.config)], "vit." if hasattr(self.model, "vit") else "")

    @property
    def image_size(self) -> int:
        return int(self.model.config.image_size)

    @property
    def patch_size(self) -> int:
        return int(self.model.config.patch_size)

    @property
    def labels(self) -> list[str]:
        """Class names of the head; none for a bare ``ViTModel`` (its config's default id2label
        names classes no head computes)."""
        if not hasattr(self.model, "classifier"):
            return []
        id2label = getattr(self.model.config, "id2label", None) or {}
        return [str(id2label.get(i, i)) for i in range(len(id2label))]

    def _pixels(self, images: list[Image.Image]) -> torch.Tensor:
        s = self.image_size
        return self.processor([to_rgb(im) for im in images], size={"height": s, "width": s},
                              return_tensors="pt")["pixel_values"]

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        """Logits (b, classes), or the last hidden state (b, tokens, dim) of a ViT without a head."""
        out = self.model(pixel_values=batch["pixel_values"])
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


register_model("hf-vit", HFViTAdapter.load, capabilities=HFViTAdapter.capabilities,
               summary=f"transformers ViTModel/ViTForImageClassification (default {HUB_ID})")
