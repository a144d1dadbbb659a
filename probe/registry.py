"""One registration point for models and analyses. Lookups that fail list what exists."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from probe.adapter import ModelAdapter
from probe.types import Capabilities


class UnknownNameError(KeyError):
    """An unknown model or analysis name. `str()` is a one-line message listing the known names."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class ModelEntry:
    name: str
    loader: Callable[..., ModelAdapter]
    capabilities: Capabilities
    summary: str
    default_weights: str


@dataclass(frozen=True)
class AnalysisEntry:
    name: str
    summary: str
    module: Any  # the analysis module: run(), render(), add_arguments(), from_args()


_MODELS: dict[str, ModelEntry] = {}
_ANALYSES: dict[str, AnalysisEntry] = {}
_loaded = False


def register_model(
    name: str,
    loader: Callable[..., ModelAdapter],
    *,
    capabilities: Capabilities,
    summary: str,
    default_weights: str = "auto",
) -> None:
    """Register `loader(weights=..., device=..., dtype=..., seed=..., **kw) -> ModelAdapter`."""
    if name in _MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    _MODELS[name] = ModelEntry(name, loader, capabilities, summary, default_weights)


def register_analysis(name: str, module: Any, *, summary: str) -> None:
    if name in _ANALYSES:
        raise ValueError(f"analysis {name!r} is registered twice")
    _ANALYSES[name] = AnalysisEntry(name, summary, module)


def _ensure_loaded() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        importlib.import_module("probe.models")
        importlib.import_module("probe.analyses")


def _unknown(kind: str, name: str, known: list[str]) -> UnknownNameError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return UnknownNameError(f"unknown {kind} {name!r}.{hint} Known {kind}s: {', '.join(sorted(known))}")


def models() -> dict[str, ModelEntry]:
    _ensure_loaded()
    return dict(_MODELS)


def analyses() -> dict[str, AnalysisEntry]:
    _ensure_loaded()
    return dict(_ANALYSES)


def model_entry(name: str) -> ModelEntry:
    _ensure_loaded()
    if name not in _MODELS:
        raise _unknown("model", name, list(_MODELS))
    return _MODELS[name]


def analysis_entry(name: str) -> AnalysisEntry:
    _ensure_loaded()
    if name not in _ANALYSES:
        raise _unknown("analysis", name, list(_ANALYSES))
    return _ANALYSES[name]


def load_model(name: str, **kwargs: Any) -> ModelAdapter:
    """Load a registered model by name, e.g. ``load_model("vit-performer", weights="random")``."""
    return model_entry(name).loader(**kwargs)
