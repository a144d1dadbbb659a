"""The `ModelAdapter` base class: everything model-specific, behind one interface.

An adapter owns a native model and knows how to load its weights, preprocess images, run it,
which native modules map to which canonical hooks (`hook_specs`) and where the image and text
tokens sit (`input_meta`). Analyses only talk to adapters through this interface.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn

from probe.capture.engine import capture
from probe.types import Capabilities, HookSpec, InputMeta, WeightsInfo


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
