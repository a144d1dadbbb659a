"""A from-scratch ViT with six attention kinds, its checkpoint format and its adapter.

Checkpoint folder: ``config.json`` (``{"probe_model": "vit", "config": {...}}``) and
``model.safetensors``. Written by `save_vit` (and ``probe train vit``), read by `load_vit`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from probe.adapter import ModelAdapter
from probe.data import images_to_tensor
from probe.io import atomic_dir
from probe.models.attention import APPROXIMATE_KINDS, ATTENTION_KINDS, AttentionConfig, make_attention
from probe.types import (
    VISION_PATTERN,
    VISION_RESID_POST,
    VISION_Z,
    Capabilities,
    HookSpec,
    InputMeta,
    WeightsInfo,
)
from probe.weights import files_sha256, state_dict_sha256
from probe.zoo import source_of

log = logging.getLogger(__name__)


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


class Block(nn.Module):
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

    ``forward(pixels (batch, 3, H, W)) -> logits (batch, num_classes)``; `features` gives the
    final normalised tokens (batch, 1 + patches, dim), CLS first.
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(3, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.seq_len, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
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
        return self.norm(x)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixels)[:, 0])


def save_vit(model: ViT, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint folder atomically (config.json + model.safetensors)."""
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        meta = {"probe_model": "vit", "config": model.cfg.to_dict(), **(extra or {})}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
    return folder


def load_vit(folder: str | Path) -> tuple[ViT, dict[str, Any]]:
    """Read a checkpoint folder written by `save_vit`. Returns the model and its config.json."""
    folder = Path(folder)
    cfg_path, weights = folder / "config.json", folder / "model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise FileNotFoundError(
            f"{folder} is not a probe ViT checkpoint: expected config.json and model.safetensors "
            "(written by `probe train vit --out DIR`)"
        )
    meta = json.loads(cfg_path.read_text())
    if meta.get("probe_model") != "vit":
        raise ValueError(f"{cfg_path} is not a probe ViT config (probe_model={meta.get('probe_model')!r})")
    model = ViT(ViTConfig.from_dict(meta["config"]))
    model.load_state_dict(load_file(str(weights)))
    return model, meta


class ViTAdapter(ModelAdapter):
    """Adapter of the from-scratch ViT (any attention kind)."""

    def __init__(self, model: ViT, weights: WeightsInfo, name: str | None = None) -> None:
        self.model = model.eval()
        self.cfg = model.cfg
        self.name = name or f"vit-{model.cfg.attention.replace('_', '-')}"
        self.weights = weights
        self.capabilities = capabilities_for(model.cfg.attention)

    @classmethod
    def load(
        cls,
        *,
        attention: str = "standard",
        weights: str = "auto",
        seed: int = 0,
        config: dict[str, Any] | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> ViTAdapter:
        """Load weights: ``random`` (seeded), a checkpoint folder, or ``auto``/``demo``.

        ``auto`` uses bundled demo weights when they exist for this kind and otherwise random
        weights, saying so in the log and in `weights`.
        """
        name = f"vit-{attention.replace('_', '-')}"
        if weights in ("auto", "demo"):
            from probe.zoo import demo_path

            demo = demo_path(name)
            if (demo / "config.json").is_file():
                log.info("%s: bundled demo weights (probe-shapes zoo) from %s", name, demo)
                weights = str(demo)
            elif weights == "demo":
                raise FileNotFoundError(
                    f"no demo weights are bundled for {name}; use --weights random, or build them with "
                    f"`probe zoo train {name}`, or pass a checkpoint folder"
                )
            else:
                log.warning("%s: no bundled weights; using random weights (seed %d)", name, seed)
                weights = "random"
        if weights == "random":
            torch.manual_seed(seed)
            vcfg = ViTConfig(attention=attention, **(config or {}))
            model = ViT(vcfg)
            info = WeightsInfo("random", f"seed={seed}", state_dict_sha256(model))
        else:
            path = Path(weights)
            if not path.exists():
                raise FileNotFoundError(
                    f"weights {weights!r}: no such folder. Use auto, random, or a folder written by "
                    "`probe train vit --out DIR`"
                )
            model, _ = load_vit(path)
            if model.cfg.attention != attention:
                raise ValueError(
                    f"{path} holds a ViT with {model.cfg.attention!r} attention; load it as "
                    f"vit-{model.cfg.attention.replace('_', '-')}"
                )
            info = WeightsInfo(source_of(path), str(path.resolve()), files_sha256([path / "model.safetensors"]))
        adapter = cls(model, info, name=name)
        return adapter.to(device, dtype)  # type: ignore[return-value]

    def hook_specs(self) -> list[HookSpec]:
        return vit_specs(self.cfg)

    def preprocess(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        pixels = images_to_tensor(images, self.cfg.image_size, self.cfg.mean, self.cfg.std)
        return {"pixel_values": pixels.to(self.device, self.dtype)}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(batch["pixel_values"])

    def input_meta(self, batch: dict[str, torch.Tensor]) -> InputMeta:
        n = self.cfg.seq_len
        return InputMeta(
            spans={"cls": (0, 1), "image": (1, n)},
            grid=self.cfg.grid,
            image_size=(self.cfg.image_size, self.cfg.image_size),
            approximate=self.cfg.attention in APPROXIMATE_KINDS,
        )

    @property
    def attn_implementation(self) -> str:
        return self.cfg.attention

    @property
    def labels(self) -> list[str]:
        return list(self.cfg.labels) or [str(i) for i in range(self.cfg.num_classes)]


def vit_specs(cfg: ViTConfig, prefix: str = "") -> list[HookSpec]:
    """Canonical vision hooks of a from-scratch `ViT` whose blocks sit at ``{prefix}blocks.{i}``."""
    approx = cfg.attention in APPROXIMATE_KINDS
    specs: list[HookSpec] = []
    for i in range(cfg.depth):
        specs += [
            HookSpec(VISION_PATTERN.format(i=i), f"{prefix}blocks.{i}.attn", "pattern",
                     "(batch, heads, tokens, tokens)", n_heads=cfg.heads, approximate=approx),
            HookSpec(VISION_Z.format(i=i), f"{prefix}blocks.{i}.attn.out_proj", "input",
                     "(batch, tokens, heads * head_dim)", n_heads=cfg.heads),
            HookSpec(VISION_RESID_POST.format(i=i), f"{prefix}blocks.{i}", "output", "(batch, tokens, dim)"),
        ]
    return specs


def capabilities_for(kind: str) -> Capabilities:
    return Capabilities(
        family="vit",
        fusion="none",
        has_cross_attention=False,
        attention_weights="effective" if kind in APPROXIMATE_KINDS else "exact",
        attention_kind=kind,
        tasks=("classify",),
    )


def register() -> None:
    from functools import partial

    from probe.registry import register_model

    summaries = {
        "standard": "ViT, multi-head softmax attention (SDPA kernel)",
        "merged_qkv": "ViT, softmax attention with one merged QKV projection",
        "linformer": "ViT, Linformer low-rank sequence projections (fixed length)",
        "performer": "ViT, Performer FAVOR+ positive orthogonal random features",
        "nystrom": "ViT, Nystromformer segment-mean landmarks + iterative pseudo-inverse",
        "hybrid": "ViT, dilated local softmax + global linear attention, gated per head",
    }
    for kind in ATTENTION_KINDS:
        register_model(
            f"vit-{kind.replace('_', '-')}",
            partial(ViTAdapter.load, attention=kind),
            capabilities=capabilities_for(kind),
            summary=summaries[kind],
        )


def with_attention(cfg: ViTConfig, kind: str) -> ViTConfig:
    """The same config with another attention kind."""
    return replace(cfg, attention=kind)
