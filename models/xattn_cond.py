"""Adapter ``xattn-cond``: the cross-attention conditioning block inside a small classifier."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from probe.adapter import ModelAdapter
from probe.capture import Intervention, Replace
from probe.data import images_to_tensor
from probe.models.cross_attention import TextConditionedClassifier
from probe.models.text import CharTokenizer
from probe.types import Capabilities, HookSpec, InputMeta, WeightsInfo
from probe.weights import state_dict_sha256


class ConditioningAdapter(ModelAdapter):
    """``xattn-cond``: `TextConditionedClassifier`; the image feature map queries a text prompt.

    Its pattern hook is ``vision.blocks.0.xattn.pattern`` (batch, heads, h*w, text): image
    queries, text keys (the reverse of a captioner's ``text.blocks.{i}.xattn.pattern``).
    Padding in the prompt batch is masked by the model itself.
    """

    name = "xattn-cond"
    capabilities = Capabilities(family="xattn-cond", fusion="cross_attention", has_cross_attention=True,
                                tasks=("classify",))

    def __init__(self, model: TextConditionedClassifier, tokenizer: CharTokenizer, weights: WeightsInfo,
                 image_size: int) -> None:
        self.model, self.tokenizer, self.weights, self.image_size = model.eval(), tokenizer, weights, image_size

    @classmethod
    def load(cls, *, weights: str = "auto", seed: int = 0, device: Any = "cpu", dtype: Any = torch.float32,
             image_size: int = 32, num_classes: int = 2) -> ConditioningAdapter:
        if weights == "auto":
            weights = "random"
        if weights != "random":
            raise FileNotFoundError(f"xattn-cond: weights {weights!r} not available; only random for now")
        torch.manual_seed(seed)
        tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz ")
        model = TextConditionedClassifier(len(tok), num_classes)
        return cls(model, tok, WeightsInfo("random", f"seed={seed}", state_dict_sha256(model)),
                   image_size).to(device, dtype)  # type: ignore[return-value]

    def hook_specs(self) -> list[HookSpec]:
        return [
            HookSpec("vision.blocks.0.xattn.pattern", "block", "pattern", "(batch, heads, h*w, text)",
                     n_heads=self.model.block.heads),
            HookSpec("vision.blocks.0.resid_pre", "stem", "output", "(batch, channels, h, w)"),
            HookSpec("vision.blocks.0.resid_post", "block", "output", "(batch, channels, h, w)"),
        ]

    def preprocess(self, images: Sequence[Image.Image], prompts: Sequence[str] | None = None) -> dict:
        px = images_to_tensor(images, self.image_size).to(self.device, self.dtype)
        prompts = list(prompts) if prompts is not None else [""] * len(images)
        ids = self.tokenizer.batch(prompts).to(self.device)
        return {"pixel_values": px, "input_ids": ids, "key_padding_mask": ids == self.tokenizer.pad_id}

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(batch["pixel_values"], batch["input_ids"], batch["key_padding_mask"])

    @property
    def grid(self) -> tuple[int, int]:
        g = self.image_size // 4  # two stride-2 convolutions
        return (g, g)

    def input_meta(self, batch: dict) -> InputMeta:
        g = self.grid
        return InputMeta(spans={"image": (0, g[0] * g[1]), "text": (0, batch["input_ids"].shape[1])}, grid=g,
                         image_size=(self.image_size, self.image_size),
                         tokens=[self.tokenizer.tokens(r) for r in batch["input_ids"]])

    def mask_image_tokens(self, removed: torch.Tensor | None = None) -> list[Intervention]:
        """Image tokens are the feature map's positions (the queries): removal zeroes them
        before the block. `removed`: bool (batch, h*w) or None for all."""

        def zero(fmap: torch.Tensor) -> torch.Tensor:
            if removed is None:
                return torch.zeros_like(fmap)
            keep = (~removed.to(fmap.device)).to(fmap.dtype).view(fmap.shape[0], 1, *fmap.shape[2:])
            return fmap * keep

        return [Replace("vision.blocks.0.resid_pre", zero)]


def register() -> None:
    from probe.registry import register_model

    register_model("xattn-cond", ConditioningAdapter.load, capabilities=ConditioningAdapter.capabilities,
                   summary="conv feature map conditioned on a text prompt by the cross-attention block")
