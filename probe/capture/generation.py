"""Capture during autoregressive generation, for any captioner adapter.

Generation runs one forward per new token (with a KV cache, or re-running the prefix: either way
the newest query row is the last one). Vision hooks are captured whole (they fire once per image);
text hooks keep only the newest position of every forward, so call ``k`` of a text pattern is the
row (b, heads, 1, keys_k) and call ``k`` of a text output or input hook (``resid_post``, ``z``) the
state (b, 1, dim) that predicted generated token ``k``, whether the model caches keys and values
(one new position per call) or re-runs the prefix (GIT's first call: image and start positions).
`ActivationCache.stack_calls` assembles them into (b, heads, steps, keys).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from probe.capture.cache import ActivationCache
from probe.capture.engine import HasHooks, HeadReduction, capture
from probe.types import TEXT_VATTN_PATTERN, select, vocabulary_entry

VATTN = vocabulary_entry(TEXT_VATTN_PATTERN.format(i=0))


@contextmanager
def capture_generation(
    adapter: HasHooks,
    hooks: str | Sequence[str] = "*.pattern",
    *,
    heads: Any = None,
    reduce: HeadReduction | None = None,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device | None = "cpu",
) -> Iterator[ActivationCache]:
    """Capture the hooks matching `hooks` while a generation loop runs inside the block."""
    specs = select(adapter.hook_specs(), hooks)
    # text-query hooks keep the newest row per step; the rest (vision, and a decoder's own visual
    # stream, whose queries are image tokens) are captured whole at every call
    text = [s.name for s in specs if s.name.startswith("text.") and vocabulary_entry(s.name) != VATTN]
    other = [s.name for s in specs if s.name not in text]
    cache = ActivationCache()
    cache.stepwise = set(text)
    kw: dict[str, Any] = {"heads": heads, "reduce": reduce, "dtype": dtype, "device": device, "cache": cache}
    by_name = {s.name: s for s in specs}
    positions = [n for n in text if by_name[n].kind != "pattern"]
    with ExitStack() as stack:
        if other:
            stack.enter_context(capture(adapter, other, **kw))
        if text:
            stack.enter_context(capture(adapter, text, rows=slice(-1, None), **kw))  # a view, no copy
        yield cache
    for name in positions:  # (b, positions, dim) per call -> its newest position (b, 1, dim)
        cache.map_calls(name, lambda t: t[:, -1:].clone())
    cache.selection = {"heads": heads, "rows": "text patterns: the newest query row of each generation step",
                       "reduce_heads": reduce}


def generated_tokens(new: torch.Tensor, eos: int, pad: int, to_tokens: Callable[[list[int]], list[str]]) -> list[list[str]]:
    """Per row of generated ids (b, steps): token strings up to and including the first `eos`."""
    out = []
    for row in new.tolist():
        n = next((j + 1 for j, t in enumerate(row) if t == eos), len(row))
        kept = row[:n]
        while kept and kept[-1] == pad and pad != eos:
            kept.pop()
        out.append(to_tokens(kept))
    return out
