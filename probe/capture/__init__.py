"""The capture engine: hooks installed inside context managers, attention sites, the activation
cache, interventions and capture during generation. It knows nothing about model families."""

from probe.capture.cache import ActivationCache
from probe.capture.engine import (
    HasHooks,
    HeadReduction,
    Intervention,
    MaskTokens,
    Patch,
    Precomputed,
    Replace,
    ZeroHeads,
    capture,
    intervene,
    record_outputs,
    reduce_heads,
    select_batch,
    uncached,
)
from probe.capture.generation import capture_generation, generated_tokens

__all__ = [
    "ActivationCache", "HasHooks", "HeadReduction", "Intervention", "MaskTokens", "Patch", "Precomputed",
    "Replace", "ZeroHeads", "capture", "capture_generation", "generated_tokens", "intervene",
    "record_outputs", "reduce_heads", "select_batch", "uncached",
]
