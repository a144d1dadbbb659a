"""A from-scratch ViT with six attention kinds and its adapters (``vit-standard``, ``vit-performer`` ...).

Checkpoint folder: ``config.json`` (``{"probe_model": "vit", "config": {...}}``) and ``model.safetensors``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

import torch
from PIL import Image
from torch import nn

from probe.adapter import Classifier
from probe.data import images_to_tensor
from probe.models.attention import APPROXIMATE_KINDS, ATTENTION_KINDS, AttentionConfig, make_attention
from probe.registry import register_model
from probe.types import Block, Capabilities, Hook, Recipe
from probe.weights import CheckpointError, load_state, read_checkpoint, write_checkpoint


@dataclass(frozen=True)
class ViTConfig:
    """ViT hyper-parameters. Defaults: a small model for 64 px images (8x8 patches of 8 px)."""

    image_size: int = 64
    patch_size: int = 8
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10
    attention: str = "standard"
    dropout: float = 0.0
    attention_options: dict[str, Any] = field(default_factory=dict)
    labels: tuple[str, ...] = ()
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"unknown attention kind {self.attention!r}; known: {', '.join(ATTENTION_KINDS)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def grid(self) -> tuple[int, int]:
        g = self.image_size // self.patch_size
        return (g, g)

    @property
    def seq_len(self) -> int:
        return self.grid[0] * self.grid[1] + 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["labels"], d["mean"], d["std"] = list(self.labels), list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViTConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ViT config fields {sorted(unknown)}")
        d = dict(d)
        for key in ("labels", "mean", "std"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


class ViTBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        acfg = AttentionConfig(
            dim=cfg.dim, heads=cfg.heads, seq_len=cfg.seq_len, dropout=cfg.dropout, grid=cfg.grid,
            **cfg.attention_options,
        )
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = make_attention(cfg.attention, acfg)
        self.norm2 = nn.LayerNorm(cfg.dim)
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, hidden), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(hidden, cfg.dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision transformer: patch embedding, CLS token, learned positions, pre-norm blocks, head.

    ``forward(pixels (batch, 3, H, W)) -> logits (batch, num_classes)``; with ``features=True``
    the final normalised tokens (batch, 1 + patches, dim), CLS first (what a captioner reads).
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(3, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.seq_len, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, pixels: torch.Tensor, features: bool = False) -> torch.Tensor:
        h, w = pixels.shape[-2:]
        if (h, w) != (self.cfg.image_size, self.cfg.image_size):
            raise ValueError(
                f"this ViT takes {self.cfg.image_size}x{self.cfg.image_size} images, got {h}x{w}: "
                "preprocess with the adapter (it resizes)"
            )
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x if features else self.head(x[:, 0])


def vit_block(cfg: ViTConfig) -> Block:
    """Hooks of a from-scratch `ViT` whose blocks sit at ``blocks.{i}`` (use `prefixed` inside a model)."""
    return Block("vision", "blocks.{i}", cfg.depth, (
        Hook("attn.pattern", "attn", "pattern", n_heads=cfg.heads, approximate=cfg.attention in APPROXIMATE_KINDS),
        Hook("attn.z", "attn.out_proj", "input", n_heads=cfg.heads),
        Hook("resid_pre", "", "input"),
        Hook("resid_post", "", "output"),
    ))


def model_name(kind: str) -> str:
    return f"vit-{kind.replace('_', '-')}"


def capabilities_for(kind: str) -> Capabilities:
    return Capabilities(family="vit", attention_weights="effective" if kind in APPROXIMATE_KINDS else "exact",
                        attention_kind=kind, tasks=("classify",),
                        default_for=("classify",) if kind == "standard" else ())


class ViTAdapter(Classifier):
    """Adapter of the from-scratch ViT, one subclass per attention kind (`ADAPTERS`).
    `load(config=...)` takes `ViTConfig` fields."""

    name = "vit-standard"
    attention: ClassVar[str] = "standard"
    capabilities = capabilities_for("standard")
    model: ViT

    @classmethod
    def _build(cls, config: dict[str, Any] | None, meta: bool) -> Self:
        cfg = ViTConfig.from_dict({"attention": cls.attention, **(config or {})})
        if cfg.attention != cls.attention:
            raise ValueError(f"{cls.name} has {cls.attention!r} attention; config asks for {cfg.attention!r}")
        return cls(ViT(cfg))

    @classmethod
    def _load(cls, ref: str, local_only: bool) -> Self:
        meta, state = read_checkpoint(ref, "vit")
        cfg = ViTConfig.from_dict(meta["config"])
        if cfg.attention != cls.attention:
            raise CheckpointError(f"{ref} holds a ViT with {cfg.attention!r} attention; load it as "
                                  f"{model_name(cfg.attention)}")
        return cls(load_state(ViT(cfg), state, ref))

    def _save(self, folder: Path) -> None:
        write_checkpoint(folder, "vit", self.model, config=self.model.cfg.to_dict())

    def blocks(self) -> list[Block]:
        return [vit_block(self.model.cfg)]

    @property
    def image_size(self) -> int:
        return self.model.cfg.image_size

    @property
    def patch_size(self) -> int:
        return self.model.cfg.patch_size

    @property
    def labels(self) -> list[str]:
        return list(self.model.cfg.labels) or [str(i) for i in range(self.model.cfg.num_classes)]

    @property
    def attn_implementation(self) -> str:
        return self.model.cfg.attention

    def _pixels(self, images: list[Image.Image]) -> torch.Tensor:
        return images_to_tensor(images, self.image_size, self.model.cfg.mean, self.model.cfg.std)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits (b, num_classes)."""
        return self.model(batch["pixel_values"])


# the probe-shapes zoo: every kind at the same small size (64 px images, 8 px patches)
ZOO_CONFIG = {"dim": 64, "depth": 4, "heads": 4, "patch_size": 8, "image_size": 64}
SUMMARIES = {
    "standard": "ViT, multi-head softmax attention (SDPA kernel)",
    "merged_qkv": "ViT, softmax attention with one merged QKV projection",
    "linformer": "ViT, Linformer low-rank sequence projections (fixed length)",
    "performer": "ViT, Performer FAVOR+ positive orthogonal random features",
    "nystrom": "ViT, Nystromformer segment-mean landmarks + iterative pseudo-inverse",
    "hybrid": "ViT, dilated local softmax + global linear attention, gated per head",
}
#: the adapter class of each attention kind
ADAPTERS: dict[str, type[ViTAdapter]] = {
    k: ViTAdapter if k == "standard" else type(f"ViT{k.title().replace('_', '')}Adapter", (ViTAdapter,), {
        "name": model_name(k), "attention": k, "capabilities": capabilities_for(k), "__module__": __name__})
    for k in ATTENTION_KINDS
}
for _kind, _cls in ADAPTERS.items():
    register_model(_cls.name, _cls.load, capabilities=_cls.capabilities, summary=SUMMARIES[_kind],
                   recipe=Recipe(_cls.name, "classify", ZOO_CONFIG, n_train=12000, steps=2500, lr=2e-3))
