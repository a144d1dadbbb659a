"""The `ModelAdapter` base class: everything model-specific, behind one interface.

An adapter owns a native model and knows how to load its weights, preprocess images, run it,
which native modules map to which canonical hooks (`hook_specs`) and where the image and text
tokens sit (`input_meta`). Analyses only talk to adapters through this interface.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch import nn

from probe.hooks import HookSpec

Fusion = Literal["none", "cross_attention", "prefix", "mmca"]

#: parameter groups an adapter can declare (see `ModelAdapter.param_groups`)
PARAM_GROUPS = ("vision", "embeddings", "text_self_attention", "cross_attention", "feed_forward", "fusion", "head")


@dataclass(frozen=True)
class Capabilities:
    """What a model family can do, declared by its adapter.

    Attributes:
        family: short family name (``vit``, ``hf-vit``, ``captioner`` ...).
        fusion: how image information reaches text: ``none`` (vision only), ``cross_attention``,
            ``prefix`` (image tokens prefix one causal self-attention stack) or ``mmca``.
        has_cross_attention: whether text->image attention is a separate cross-attention.
        attention_weights: ``exact`` (softmax probabilities) or ``effective`` (the token-by-token
            matrix of an approximate attention, e.g. ``D^-1 phi(Q) phi(K)^T`` for Performer).
        attention_kind: the attention mechanism (``standard``, ``performer`` ...).
        tasks: what the model's head does (``classify``, ``caption``, ``features``).
    """

    family: str
    fusion: Fusion = "none"
    has_cross_attention: bool = False
    attention_weights: Literal["exact", "effective"] = "exact"
    attention_kind: str = "standard"
    tasks: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class InputMeta:
    """Metadata of one batch of inputs, the same for every family.

    Attributes:
        spans: half-open token ranges by role, e.g. ``{"cls": (0, 1), "image": (1, 65)}``.
        grid: (rows, cols) of the patch grid of the ``image`` span, or None.
        image_size: (height, width) in pixels of the preprocessed image.
        tokens: per batch element, the token strings (text models), or None.
        approximate: True when captured patterns are effective matrices, not softmax weights.
        flow_hook: for captioners, the name template (``{i}`` = layer) of the pattern whose keys
            hold the image tokens at the `image` and `cls` spans: ``text.blocks.{i}.xattn.pattern``
            for cross-attention, ``text.blocks.{i}.attn.pattern`` for joint attention over
            ``[image; text]`` (GIT, prefix VLM), where the `text` span indexes the same keys.
    """

    spans: dict[str, tuple[int, int]]
    grid: tuple[int, int] | None = None
    image_size: tuple[int, int] | None = None
    tokens: list[list[str]] | None = None
    approximate: bool = False
    flow_hook: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spans"] = {k: list(v) for k, v in self.spans.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputMeta:
        return cls(
            spans={k: (int(v[0]), int(v[1])) for k, v in d["spans"].items()},
            grid=tuple(d["grid"]) if d.get("grid") else None,
            image_size=tuple(d["image_size"]) if d.get("image_size") else None,
            tokens=d.get("tokens"),
            approximate=bool(d.get("approximate", False)),
            flow_hook=d.get("flow_hook"),
        )


@dataclass(frozen=True)
class WeightsInfo:
    """Which weights a loaded model has. `source` is one of ``random``, ``local``, ``hub``, ``demo``."""

    source: str
    ref: str
    sha256: str | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def state_dict_sha256(model: nn.Module) -> str:
    """SHA-256 over parameter and buffer names, shapes, dtypes and bytes, in a fixed order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def files_sha256(paths: Sequence[Path]) -> str:
    """SHA-256 over the bytes of weight files, in sorted name order."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


class ModelAdapter(abc.ABC):
    """Base class of every adapter. Subclasses set `name`, `model`, `capabilities`, `weights`."""

    name: str
    model: nn.Module
    capabilities: Capabilities
    weights: WeightsInfo

    @abc.abstractmethod
    def hook_specs(self) -> list[HookSpec]:
        """Every canonical hook this model offers, mapped to native module paths."""

    @abc.abstractmethod
    def preprocess(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """RGB PIL images -> model inputs, at least ``pixel_values`` (batch, 3, H, W)."""

    @abc.abstractmethod
    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        """Run the model on preprocessed inputs."""

    @abc.abstractmethod
    def input_meta(self, batch: dict[str, torch.Tensor]) -> InputMeta:
        """Token spans, patch grid and token strings for this batch."""

    @property
    def attn_implementation(self) -> str:
        """The attention implementation actually used, for the run manifest."""
        return "native"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> ModelAdapter:
        """Move the model; returns self."""
        self.model.to(device=device, dtype=dtype)
        return self

    def describe(self) -> dict[str, Any]:
        """Model facts for a run manifest."""
        return {
            "name": self.name,
            "class": type(self.model).__name__,
            "capabilities": self.capabilities.to_dict(),
            "weights": self.weights.to_dict(),
            "attn_implementation": self.attn_implementation,
            "parameters": sum(p.numel() for p in self.model.parameters()),
        }

    def run_with_cache(
        self, images: Sequence[Image.Image], hooks: str | Sequence[str] = "*", **capture_kwargs: Any
    ) -> tuple[Any, Any]:
        """Preprocess `images`, run the model under `probe.capture.capture` and return
        ``(output, cache)``, the cache's `meta` set to this batch's `InputMeta`."""
        from probe.capture import capture

        batch = self.preprocess(images)
        with torch.no_grad(), capture(self, hooks, **capture_kwargs) as cache:
            out = self.forward(batch)
        cache.meta = self.input_meta(batch)
        return out, cache

    def param_groups(self) -> dict[str, list[str]]:
        """Module paths per parameter group (`PARAM_GROUPS`), for parameter accounting.

        A parameter belongs to the group of the longest declared path that contains it; every
        parameter must be covered (`probe.analyses.ca_params` checks). Families declare this so
        that no analysis guesses from parameter names.
        """
        raise NotImplementedError(f"{self.name} declares no parameter groups")

    def module(self, path: str) -> nn.Module:
        """The native module at a dotted path; a clear error when there is none."""
        try:
            return self.model.get_submodule(path)
        except AttributeError as e:
            raise KeyError(f"{self.name}: no module {path!r} in {type(self.model).__name__}") from e
