"""Attention maps of a vision encoder: every layer's pattern, reduced on the fly.

Works for any adapter whose hooks include ``vision.blocks.*.attn.pattern``; the CLS (or any
query) row over the image span, on the patch grid, is what the figure shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from probe.adapter import Classifier
from probe.analysis import Analysis, param
from probe.capture import capture
from probe.data import ImageSet, images_to_uint8
from probe.registry import register_analysis
from probe.runs.results import AttentionResult
from probe.types import VISION_PATTERN, layer_of, select
from probe.viz.figures import grid, no_ticks, overlay

MAX_IMAGES = 8


@register_analysis
class Attention(Analysis):
    """Capture every vision attention pattern of the images, heads fused on the fly."""

    name = "attention"
    summary = "attention maps per layer (head-mean CLS row over the patches), overlaid on the images"
    requires = (VISION_PATTERN.format(i="*"),)

    @dataclass(frozen=True)
    class Params:
        reduce: str = param("mean", "fuse heads while capturing; none keeps every head",
                            choices=("mean", "max", "min", "none"))
        rows: str = param("all", "query rows to keep: all, or only the CLS row", choices=("all", "cls"))
        batch_size: int = param(8, "images per forward", min=1)

    def run(self, adapter: Any, inputs: ImageSet, params: Params) -> AttentionResult:
        """Returns an `AttentionResult` with (batch, heads or 1, rows, tokens) patterns per layer."""
        specs = select(adapter.hook_specs(), self.requires)
        reduce = None if params.reduce == "none" else params.reduce
        images = inputs.images
        meta = None
        row_index: list[int] | None = None
        chunks: dict[str, list[torch.Tensor]] = {s.name: [] for s in specs}
        preds: list[str] = []
        labels = adapter.labels if isinstance(adapter, Classifier) else None
        starts = range(0, len(images), params.batch_size)
        for start in tqdm(starts, desc=f"attention {adapter.name}", disable=len(starts) < 2):
            batch = adapter.preprocess(images[start : start + params.batch_size])
            meta = adapter.input_meta(batch)
            if params.rows == "cls":
                if "cls" not in meta.spans:
                    raise ValueError(f"{adapter.name} has no CLS token; use --rows all")
                row_index = [meta.spans["cls"][0]]
            with torch.no_grad(), capture(adapter, self.requires[0], rows=row_index, reduce=reduce) as cache:
                out = adapter.forward(batch)
            for name in chunks:
                chunks[name].append(cache[name])
            if labels and isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[-1] == len(labels):
                probs = out.float().softmax(-1)
                preds += [f"{labels[int(j)]} ({float(p):.2f})" for p, j in zip(*probs.max(-1), strict=True)]
        assert meta is not None
        arrays = {name: torch.cat(parts) for name, parts in chunks.items()}
        arrays["input.image"] = images_to_uint8(images, meta.image_size or (224, 224))
        return AttentionResult(
            arrays=arrays, model=adapter.name, image_names=inputs.names, meta=meta.to_dict(),
            layers=sorted(layer_of(n) for n in chunks), reduce_heads=reduce, rows=row_index,
            approximate=meta.approximate or any(s.approximate for s in specs), predictions=preds or None,
        )

    def render(self, result: AttentionResult) -> dict[str, Figure]:
        return {"attention_cls": render_attention(result, "cls")} if "cls" in result.meta["spans"] else {}

    def summary_lines(self, result: AttentionResult) -> list[str]:
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


def render_attention(result: AttentionResult, query: str = "cls") -> Figure:
    """Per image (rows) and layer (columns): the head-mean attention of `query` over the patches,
    overlaid on the image. Approximate attention kinds are labelled 'effective'."""
    n_img = min(len(result.image_names), MAX_IMAGES)
    cols = 1 + len(result.layers)
    fig, axes = grid(n_img, cols, (1.9 * cols, 2.0 * n_img + 0.4))
    images = result.arrays.get("input.image")
    what = "effective attention" if result.approximate else "attention"
    for r in range(n_img):
        img = images[r].numpy() if images is not None else None
        if img is not None:
            axes[r][0].imshow(img)
        title = result.image_names[r] + (f"\npred: {result.predictions[r]}" if result.predictions else "")
        axes[r][0].set_title(title, fontsize=7)
        for c, layer in enumerate(result.layers, start=1):
            amap = result.query_map(layer, query)[r].numpy()
            if img is not None:
                overlay(axes[r][c], img, amap)
            else:
                axes[r][c].imshow(amap, cmap="inferno", interpolation="nearest")
            if r == 0:
                axes[r][c].set_title(f"layer {layer}", fontsize=8)
    no_ticks(axes)
    more = f" (first {MAX_IMAGES} of {len(result.image_names)} images)" if len(result.image_names) > n_img else ""
    fig.suptitle(f"{result.model}: {query.upper()} {what}, mean over heads{more}", fontsize=9)
    fig.tight_layout()
    return fig
