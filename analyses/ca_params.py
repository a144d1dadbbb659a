"""Cross-attention accounting: parameters and forward FLOPs per group, from the module groups
each adapter declares (`ModelAdapter.param_groups`), never from parameter-name guessing.

Tied parameters (BLIP's and GPT-2's LM head share the word embeddings) are counted once, in the
group of their first name, and `total_with_tied` counts them once per module that uses them.
Works on meta-device models (``on_meta()``): exact counts of the published architectures with no
download. FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` (2 FLOPs per
multiply-add, matmuls and convolutions only) for one teacher-forced forward of one image at the
model's input size and `text_tokens` caption tokens, and attributed to the group whose declared
module ran them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from probe.adapter import ModelAdapter
from probe.analysis import Analysis, ParamError, param
from probe.registry import register_analysis
from probe.runs.results import CAParamsResult
from probe.types import PARAM_GROUPS


@register_analysis
class CAParams(Analysis):
    """Parameters and forward FLOPs per declared group, for one or several captioners
    (``--model all``, the default, or ``a,b``); reads no images."""

    name = "ca-params"
    summary = "parameters and forward FLOPs per group (vision, text self-attention, cross-attention, ...) per family"
    task = "caption"
    reads_images = False
    many_models = True

    @dataclass(frozen=True)
    class Params:
        full_size: bool = param(False, "count the published architectures, built on the meta device (no download)")
        text_tokens: int = param(20, "caption length for the FLOP count", min=1, max=4096)

    def weights_for(self, params: Params, weights: str) -> str:
        return "meta" if params.full_size else weights

    def run(self, adapters: Sequence[ModelAdapter], inputs: None, params: Params) -> CAParamsResult:
        out: dict[str, Any] = {}
        for a in adapters:
            if params.text_tokens > a.max_caption_tokens + 1:
                raise ParamError(f"--text-tokens {params.text_tokens}: {a.name} ({a.weights.ref}) has "
                                 f"{a.max_caption_tokens + 1} text positions")
            out[a.name] = {"size": a.weights.ref, "fusion": a.capabilities.fusion,
                           "params": count_parameters(a), "flops": count_flops(a, params.text_tokens)}
        return CAParamsResult(models=out, full_size=params.full_size, text_tokens=params.text_tokens)

    def summary_lines(self, result: CAParamsResult) -> list[str]:
        size = "published architectures (meta device)" if result.full_size else "the loaded models"
        return [f"parameters per group, {size}; FLOPs for one image + {result.text_tokens} caption tokens",
                *table_lines(result)]


def declared_groups(adapter: ModelAdapter) -> dict[str, str]:
    """Declared path -> group, validated: known groups, paths that exist, no path twice."""
    declared = adapter.param_groups()
    unknown = set(declared) - set(PARAM_GROUPS)
    if unknown:
        raise ValueError(f"{adapter.name}: unknown parameter groups {sorted(unknown)}; use {PARAM_GROUPS}")
    paths: dict[str, str] = {}
    for group, mods in declared.items():
        for m in mods:
            try:
                adapter.model.get_parameter(m)
            except AttributeError:
                adapter.module(m)  # raises for a path that names nothing
            if m in paths:
                raise ValueError(f"{adapter.name}: {m} is declared in {paths[m]} and {group}")
            paths[m] = group
    return paths


def _owner(name: str, paths: dict[str, str]) -> str | None:
    """Group of the longest declared path that is `name` or contains it."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
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
        ValueError: a declared path names nothing, two groups declare the same path, or a
            parameter falls in no group (the message lists a few).
    """
    paths = declared_groups(adapter)
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


def count_flops(adapter: ModelAdapter, text_tokens: int = 20) -> dict[str, Any]:
    """Forward FLOPs per group for one image and `text_tokens` caption tokens (teacher-forced).

    Runs on the meta device when the model lives there (no memory, no weights). FLOPs that no
    declared module runs (e.g. a functional op at the model's top level) go to ``other``.

    Returns:
        ``{"groups": {group: flops, "other": flops}, "total": flops, "cross_attention_share": float,
        "input": {"image_size": int, "text_tokens": int}}``.
    """
    from torch.utils.flop_counter import FlopCounterMode

    paths = declared_groups(adapter)
    model = adapter.model
    device = next(model.parameters()).device
    s = adapter.image_size
    px = torch.zeros(1, 3, s, s, device=device, dtype=next(model.parameters()).dtype)
    ids = torch.zeros(1, text_tokens, dtype=torch.long, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        adapter.forward({"pixel_values": px, "input_ids": ids})
    per_module = counter.get_flop_counts()
    root = type(model).__name__
    total = int(counter.get_total_flops())
    groups = dict.fromkeys(PARAM_GROUPS, 0)
    for path, group in paths.items():
        ops = per_module.get(f"{root}.{path}")
        if ops and not _inside_declared(path, paths):
            groups[group] += int(sum(ops.values()))
    groups["other"] = total - sum(groups.values())
    return {"groups": groups, "total": total,
            "cross_attention_share": groups["cross_attention"] / total if total else 0.0,
            "input": {"image_size": s, "text_tokens": text_tokens}}


def _inside_declared(path: str, paths: dict[str, str]) -> bool:
    """Whether a strict ancestor of `path` is declared too (its FLOPs are counted there)."""
    parts = path.split(".")
    return any(".".join(parts[:k]) in paths for k in range(1, len(parts)))


def table_lines(result: CAParamsResult) -> list[str]:
    """Parameters (millions) per group and the cross-attention share of parameters and FLOPs."""
    short = {"vision": "vision", "embeddings": "embed", "text_self_attention": "text-self",
             "cross_attention": "x-attn", "feed_forward": "ffn", "fusion": "fusion", "head": "head"}
    head = ["model"] + list(short.values()) + ["total", "x-attn % params", "x-attn % FLOPs"]
    rows = [head]
    for name, m in result.models.items():
        g = m["params"]["groups"]
        rows.append([name] + [f"{g[k] / 1e6:.2f}M" for k in short] + [f"{m['params']['total'] / 1e6:.2f}M",
                     f"{100 * m['params']['cross_attention_share']:.1f}",
                     f"{100 * m['flops']['cross_attention_share']:.1f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
            for r in rows]
