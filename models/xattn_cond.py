"""Adapter ``xattn-cond``: the cross-attention conditioning block inside a small classifier."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import torch
from PIL import Image

from probe.adapter import ModelAdapter
from probe.capture import Intervention, Replace
from probe.data import images_to_tensor
from probe.models.cross_attention import TextConditionedClassifier
from probe.models.text import CharTokenizer
from probe.registry import register_model
from probe.types import Block, Capabilities, Hook, HookSpec, InputMeta
from probe.weights import load_state, read_checkpoint, write_checkpoint


class ConditioningAdapter(ModelAdapter):
    """``xattn-cond``: `TextConditionedClassifier`; the image feature map queries a text prompt.

    Its pattern hook is ``vision.blocks.0.xattn.pattern`` (batch, heads, h*w, text): image
    queries, text keys (the reverse of a captioner's ``text.blocks.{i}.xattn.pattern``).
    Padding in the prompt batch is masked by the model itself. `load(config=...)`: the
    `TextConditionedClassifier` arguments but the vocabulary (``image_size``, ``num_classes`` ...).
    """

    name = "xattn-cond"
    capabilities = Capabilities(family="xattn-cond", fusion="cross_attention", has_cross_attention=True,
                                tasks=("classify",))
    model: TextConditionedClassifier

    @classmethod
    def _build(cls, config: dict[str, Any] | None, meta: bool) -> Self:
        tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz ")
        return cls(TextConditionedClassifier(len(tok), **{"num_classes": 2, **(config or {})}), tokenizer=tok)

    @classmethod
    def _load(cls, ref: str, local_only: bool) -> Self:
        meta, state = read_checkpoint(ref, cls.name, "tokenizer.json")
        model = load_state(TextConditionedClassifier(**meta["config"]), state, ref)
        return cls(model, tokenizer=CharTokenizer.load(Path(ref) / "tokenizer.json"))

    def _save(self, folder: Path) -> None:
        write_checkpoint(folder, self.name, self.model, config=self.model.cfg)
        self.tokenizer.save(folder / "tokenizer.json")

    def blocks(self) -> list[Block]:
        return [Block("vision", "block", 1, (
            Hook("xattn.pattern", "", "pattern", n_heads=self.model.block.heads, shape="(batch, heads, h*w, text)"),
            Hook("resid_post", "", "output", shape="(batch, channels, h, w)"),
        ))]

    def single_hooks(self) -> list[HookSpec]:
        return [HookSpec("vision.blocks.0.resid_pre", "stem", "output", "(batch, channels, h, w)")]

    @property
    def image_size(self) -> int:
        return int(self.model.cfg["image_size"])

    @property
    def grid(self) -> tuple[int, int]:
        g = self.image_size // 4  # two stride-2 convolutions
        return (g, g)

    def preprocess(self, images: Sequence[Image.Image], prompts: Sequence[str] | None = None) -> dict:
        px = images_to_tensor(images, self.image_size).to(self.device, self.dtype)
        prompts = list(prompts) if prompts is not None else [""] * len(images)
        ids = self.tokenizer.batch(prompts).to(self.device)
        return {"pixel_values": px, "input_ids": ids, "key_padding_mask": ids == self.tokenizer.pad_id}

    def forward(self, batch: dict) -> torch.Tensor:
        """Logits (b, num_classes)."""
        return self.model(batch["pixel_values"], batch["input_ids"], batch["key_padding_mask"])

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


register_model("xattn-cond", ConditioningAdapter.load, capabilities=ConditioningAdapter.capabilities,
               summary="conv feature map conditioned on a text prompt by the cross-attention block")
