"""Adapter of transformers' `ViTModel` / `ViTForImageClassification` (``hf-vit``).

Attention is captured through the ``probe_capture`` attention function: the model keeps the SDPA
kernel for its outputs, and patterns are recomputed only for the layers a capture asks for.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from probe.adapter import ModelAdapter
from probe.capture import hf_attention
from probe.data import to_rgb
from probe.types import (
    VISION_PATTERN,
    VISION_RESID_POST,
    VISION_Z,
    Capabilities,
    HookSpec,
    InputMeta,
    WeightsInfo,
)
from probe.weights import load_hf

HUB_ID = "google/vit-base-patch16-224"
CAPABILITIES = Capabilities(family="hf-vit", attention_kind="standard", tasks=("classify", "features"))


class HFViTAdapter(ModelAdapter):
    """Wraps a transformers ViT; the model's attention implementation is set to ``probe_capture``."""

    name = "hf-vit"
    capabilities = CAPABILITIES

    def __init__(self, model: Any, weights: WeightsInfo, processor: Any) -> None:
        model.set_attn_implementation(hf_attention.register())
        self.model = model.eval()
        self.weights = weights
        self.processor = processor
        self.config = model.config
        self._prefix = "vit." if hasattr(model, "vit") else ""

    @classmethod
    def load(
        cls,
        *,
        weights: str = "auto",
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        config: dict[str, Any] | None = None,
    ) -> HFViTAdapter:
        from transformers import (
            AutoConfig,
            ViTConfig,
            ViTForImageClassification,
            ViTImageProcessorPil,
            ViTModel,
        )

        name = hf_attention.register()

        def load(ref: str, local_only: bool) -> Any:
            cfg = AutoConfig.from_pretrained(ref, local_files_only=local_only)
            archs = cfg.architectures or []
            klass = ViTForImageClassification if "ViTForImageClassification" in archs else ViTModel
            return klass.from_pretrained(ref, local_files_only=local_only, attn_implementation=name)

        def build_random() -> Any:
            torch.manual_seed(seed)
            cfg = ViTConfig(**(config or {}))
            return ViTModel._from_config(copy.deepcopy(cfg), attn_implementation=name)

        model, info, ref = load_hf(load, build_random, weights, hub_id=HUB_ID, model_name="hf-vit")
        processor = None
        if ref:
            try:
                processor = ViTImageProcessorPil.from_pretrained(ref, local_files_only=True)
            except OSError:
                processor = None
        if processor is None:
            s = model.config.image_size
            processor = ViTImageProcessorPil(size={"height": s, "width": s})
        return cls(model, info, processor).to(device, dtype)  # type: ignore[return-value]

    @property
    def attn_implementation(self) -> str:
        return f"{self.model.config._attn_implementation} (SDPA kernel, patterns recomputed on request)"

    def hook_specs(self) -> list[HookSpec]:
        return vision_specs(self.config, self._prefix)

    @property
    def image_size(self) -> int:
        return int(self.config.image_size)

    def preprocess(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        s = self.image_size
        rgb = [to_rgb(im) for im in images]
        px = self.processor(rgb, size={"height": s, "width": s}, return_tensors="pt")["pixel_values"]
        return {"pixel_values": px.to(self.device, self.dtype)}

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        out = self.model(pixel_values=batch["pixel_values"])
        return out.logits if hasattr(out, "logits") else out.last_hidden_state

    def input_meta(self, batch: dict[str, torch.Tensor]) -> InputMeta:
        g = self.image_size // int(self.config.patch_size)
        return InputMeta(spans={"cls": (0, 1), "image": (1, 1 + g * g)}, grid=(g, g),
                         image_size=(self.image_size, self.image_size))


def vision_specs(config: Any, prefix: str = "") -> list[HookSpec]:
    """Canonical vision hooks of a transformers ViT whose layers sit at ``{prefix}layers.{i}``."""
    h = config.num_attention_heads
    specs: list[HookSpec] = []
    for i in range(config.num_hidden_layers):
        specs += [
            HookSpec(VISION_PATTERN.format(i=i), f"{prefix}layers.{i}.attention", "pattern",
                     "(batch, heads, tokens, tokens)", n_heads=h),
            HookSpec(VISION_Z.format(i=i), f"{prefix}layers.{i}.attention.o_proj", "input",
                     "(batch, tokens, heads * head_dim)", n_heads=h),
            HookSpec(VISION_RESID_POST.format(i=i), f"{prefix}layers.{i}", "output", "(batch, tokens, dim)"),
        ]
    return specs


def register() -> None:
    from probe.registry import register_model

    register_model(
        "hf-vit",
        HFViTAdapter.load,
        capabilities=CAPABILITIES,
        summary=f"transformers ViTModel/ViTForImageClassification (default {HUB_ID})",
    )
