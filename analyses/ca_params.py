"""Cross-attention parameter accounting: parameters per group, from the groups each adapter
declares (`ModelAdapter.param_groups`), never from parameter-name guessing.

Tied parameters (BLIP's and GPT-2's LM head share the word embeddings) are counted once, in the
group of their first name, and `total_with_tied` counts them once per module that uses them.
Works on meta-device models (`HFCaptionerAdapter.on_meta()`): exact counts of the published
architectures with no download.
"""

from __future__ import annotations

from typing import Any

from probe.adapter import PARAM_GROUPS, ModelAdapter


def _owner(name: str, paths: dict[str, str]) -> str | None:
    """Group of the longest declared module path containing parameter `name`."""
    parts = name.split(".")
    for k in range(len(parts) - 1, 0, -1):
        g = paths.get(".".join(parts[:k]))
        if g is not None:
            return g
    return None


def count_parameters(adapter: ModelAdapter) -> dict[str, Any]:
    """Parameters per group of `adapter`'s model.

    Returns:
        ``{"groups": {group: count}, "total": unique parameters, "total_with_tied": counting a
        tied tensor once per use, "cross_attention_share": cross-attention / total}``.

    Raises:
        ValueError: a declared path names no module, two groups declare the same path, or a
            parameter falls in no group (the message lists a few).
    """
    declared = adapter.param_groups()
    unknown = set(declared) - set(PARAM_GROUPS)
    if unknown:
        raise ValueError(f"{adapter.name}: unknown parameter groups {sorted(unknown)}; use {PARAM_GROUPS}")
    paths: dict[str, str] = {}
    for group, mods in declared.items():
        for m in mods:
            adapter.module(m)  # raises for a path that names nothing
            if m in paths:
                raise ValueError(f"{adapter.name}: {m} is declared in {paths[m]} and {group}")
            paths[m] = group
    counts = dict.fromkeys(PARAM_GROUPS, 0)
    missing: list[str] = []
    for name, p in adapter.model.named_parameters():  # unique tensors: a tied one appears once
        g = _owner(name, paths)
        if g is None:
            missing.append(name)
        else:
            counts[g] += p.numel()
    if missing:
        raise ValueError(f"{adapter.name}: {len(missing)} parameters in no declared group, e.g. {missing[:5]}")
    total = sum(counts.values())
    with_tied = sum(p.numel() for _, p in adapter.model.named_parameters(remove_duplicate=False))
    return {"groups": counts, "total": total, "total_with_tied": with_tied,
            "cross_attention_share": counts["cross_attention"] / total if total else 0.0}
