"""Attention maps of a vision encoder: every layer's pattern, reduced on the fly.

Works for any adapter whose hooks include ``vision.blocks.*.attn.pattern``; the CLS (or any
query) row over the image span, on the patch grid, is what the figure shows.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch
from matplotlib.figure import Figure
from PIL import Image
from tqdm.auto import tqdm

from probe.adapter import ModelAdapter
from probe.capture import capture
from probe.data import images_to_uint8
from probe.render import render_attention
from probe.runs.results import AttentionResult
from probe.types import VISION_PATTERN, layer_of, select

NAME = "attention"
SUMMARY = "attention maps per layer (head-mean CLS row over the patches), overlaid on the images"
REQUIRES = VISION_PATTERN.format(i="*")


def run(
    adapter: ModelAdapter,
    images: Sequence[Image.Image],
    names: Sequence[str] | None = None,
    *,
    reduce: str | None = "mean",
    rows: str = "all",
    batch_size: int = 8,
    progress: bool = True,
) -> AttentionResult:
    """Capture every vision attention pattern for `images`.

    Args:
        reduce: head fusion at capture time (``mean``/``max``/``min``) or None to keep all heads.
        rows: ``all`` query rows, or ``cls`` (only the CLS row: far less memory).
        batch_size: images per forward.
    Returns:
        An `AttentionResult` with (batch, heads or 1, rows, tokens) patterns per layer.
    """
    try:
        specs = select(adapter.hook_specs(), REQUIRES)
    except KeyError:
        raise ValueError(f"{adapter.name} has no vision attention pattern hooks ({REQUIRES})") from None
    names = list(names) if names is not None else [f"image_{i}" for i in range(len(images))]
    if len(names) != len(images):
        raise ValueError(f"{len(images)} images but {len(names)} names")
    meta = None
    row_index: list[int] | None = None
    chunks: dict[str, list[torch.Tensor]] = {s.name: [] for s in specs}
    preds: list[str] = []
    labels = getattr(adapter, "labels", None)
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc=f"attention {adapter.name}", disable=not progress or len(starts) < 2):
        batch = adapter.preprocess(images[start : start + batch_size])
        meta = adapter.input_meta(batch)
        if rows == "cls":
            if "cls" not in meta.spans:
                raise ValueError(f"{adapter.name} has no CLS token; use rows='all'")
            row_index = [meta.spans["cls"][0]]
        elif rows != "all":
            raise ValueError(f"rows must be 'all' or 'cls', got {rows!r}")
        with torch.no_grad(), capture(adapter, REQUIRES, rows=row_index, reduce=reduce) as cache:
            out = adapter.forward(batch)
        for name in chunks:
            chunks[name].append(cache[name])
        if labels and isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[-1] == len(labels):
            probs = out.float().softmax(-1)
            preds += [f"{labels[int(j)]} ({float(p):.2f})" for p, j in zip(*probs.max(-1), strict=True)]
    assert meta is not None
    arrays = {name: torch.cat(parts) for name, parts in chunks.items()}
    size = meta.image_size or (224, 224)
    arrays["input.image"] = images_to_uint8(images, size)
    return AttentionResult(
        arrays=arrays,
        model=adapter.name,
        image_names=names,
        meta=meta.to_dict(),
        layers=sorted(layer_of(n) for n in chunks),
        reduce_heads=reduce,
        rows=row_index,
        approximate=meta.approximate or any(s.approximate for s in specs),
        predictions=preds or None,
    )


def render(result: AttentionResult) -> dict[str, Figure]:
    return {"attention_cls": render_attention(result, "cls")} if "cls" in result.meta["spans"] else {}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reduce", choices=["mean", "max", "min", "none"], default="mean",
                        help="fuse heads while capturing (default: mean); none keeps every head")
    parser.add_argument("--rows", choices=["all", "cls"], default="all",
                        help="query rows to keep: all, or only the CLS row")
    parser.add_argument("--batch-size", type=int, default=8)


def params_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {"reduce": None if args.reduce == "none" else args.reduce, "rows": args.rows,
            "batch_size": args.batch_size}


def summary_lines(result: AttentionResult) -> list[str]:
    lines = [f"{len(result.image_names)} images, {len(result.layers)} layers"
             + (" (effective attention of an approximate kind)" if result.approximate else "")]
    if "cls" in result.meta["spans"]:
        for layer in result.layers:
            m = result.query_map(layer, "cls").flatten(1)
            lines.append(f"  layer {layer}: CLS mass on patches {float(m.sum(-1).mean()):.3f}, "
                         f"top patch per image {m.argmax(-1).tolist()}")
    if result.predictions:
        lines.append("  predictions: " + ", ".join(result.predictions))
    return lines
