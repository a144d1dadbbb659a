"""One registration point for models and analyses. Lookups that fail list what exists.

`probe.models` registers every model family and `probe.analyses` every analysis when imported;
``import probe`` imports both, so the tables are full whenever a user or the CLI reads them.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from probe.types import Capabilities, ProbeError, Recipe


class UnknownNameError(ProbeError, KeyError):
    """An unknown model or analysis name. `str()` is a one-line message listing the known names."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: ``loader(weights=..., seed=..., device=..., dtype=..., config=...)``."""

    name: str
    loader: Callable[..., Any]
    capabilities: Capabilities
    summary: str
    default_weights: str = "auto"
    recipe: Recipe | None = None


_MODELS: dict[str, ModelEntry] = {}
_ANALYSES: dict[str, Any] = {}
T = TypeVar("T")


def register_model(name: str, loader: Callable[..., Any], *, capabilities: Capabilities, summary: str,
                   default_weights: str = "auto", recipe: Recipe | None = None) -> None:
    """Register `loader` under `name` (one family may register several names, e.g. the ViT kinds);
    `recipe` says how its bundled zoo checkpoint is trained."""
    if name in _MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    _MODELS[name] = ModelEntry(name, loader, capabilities, summary, default_weights, recipe)


def register_analysis(cls: type[T]) -> type[T]:
    """Class decorator: register an `probe.analysis.Analysis` subclass under its ``name``."""
    name = cls.name  # type: ignore[attr-defined]
    if name in _ANALYSES:
        raise ValueError(f"analysis {name!r} is registered twice")
    _ANALYSES[name] = cls()
    return cls


def _unknown(kind: str, name: str, known: list[str]) -> UnknownNameError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    plural = "analyses" if kind == "analysis" else f"{kind}s"
    return UnknownNameError(f"unknown {kind} {name!r}.{hint} Known {plural}: {', '.join(sorted(known))}")


def models(task: str | None = None) -> dict[str, ModelEntry]:
    """Registered models (those whose capabilities include `task`, if given), in registration order."""
    return {n: e for n, e in _MODELS.items() if task is None or task in e.capabilities.tasks}


def analyses() -> dict[str, Any]:
    """Registered analyses (instances of `probe.analysis.Analysis`) by name."""
    return dict(_ANALYSES)


def model_entry(name: str) -> ModelEntry:
    if not isinstance(name, str):
        raise UnknownNameError(f"a model name is a string; got {name!r}. Known models: {', '.join(sorted(_MODELS))}")
    if name not in _MODELS:
        raise _unknown("model", name, list(_MODELS))
    return _MODELS[name]


def analysis(name: str) -> Any:
    if not isinstance(name, str):
        raise UnknownNameError(f"an analysis name is a string; got {name!r}. Known: {', '.join(sorted(_ANALYSES))}")
    if name not in _ANALYSES:
        raise _unknown("analysis", name, list(_ANALYSES))
    return _ANALYSES[name]


def default_model(task: str | None) -> str:
    """The model a family declared as the default for `task` (`Capabilities.default_for`); with no
    task, the first registered model."""
    for name, e in _MODELS.items():
        if task is None or task in e.capabilities.default_for:
            return name
    raise ProbeError(f"no registered model is the default for task {task!r}; pass --model")


def load_model(name: str, **kwargs: Any) -> Any:
    """Load a registered model by name, e.g. ``load_model("vit-performer", weights="random")``."""
    return model_entry(name).loader(**kwargs)
