"""probe: interpretability and probing for vision transformers and vision-language captioners.

The Python API in one import::

    import probe
    adapter = probe.load_model("vit-performer", weights="random")
    with probe.capture(adapter, "vision.blocks.*.attn.pattern", rows=[0], reduce="mean") as cache:
        adapter.forward(adapter.preprocess(images))

``probe.models()`` and ``probe.analyses()`` list what is registered; ``probe.execute(RunSpec(...))``
runs an analysis end to end as ``probe run`` does. Importing probe registers every model family
and analysis (the packages `probe.models` and `probe.analyses`).
"""

from __future__ import annotations

import types as _types
from typing import Any

from probe import analyses, models, registry
from probe.capture import (
    ActivationCache,
    MaskTokens,
    Patch,
    Precomputed,
    Replace,
    ZeroHeads,
    capture,
    intervene,
)
from probe.data import ImageSet, load_images
from probe.pipeline import RunSpec, execute
from probe.registry import load_model
from probe.runs.store import RunStore

__version__ = "0.1.0"


class _Listing(_types.ModuleType):
    """`probe.models` and `probe.analyses` are packages that can also be called to list what they
    registered: ``probe.models()`` -> {name: ModelEntry}, ``probe.analyses()`` -> {name: Analysis}."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return (registry.models if self.__name__.endswith(".models") else registry.analyses)(*args, **kwargs)


for _pkg in (models, analyses):
    _pkg.__class__ = _Listing
del _pkg

__all__ = [
    "ActivationCache", "ImageSet", "MaskTokens", "Patch", "Precomputed", "Replace", "RunSpec", "RunStore",
    "ZeroHeads", "analyses", "capture", "execute", "intervene", "load_images", "load_model", "models",
]
