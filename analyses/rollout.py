"""Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers").

Rollout follows attention through the residual stream from the input tokens to the last layer:
per layer fuse the heads, add the identity for the residual, renormalise the rows, and multiply
the layers from the first used one up (`rollout`). The result ``J_L`` (tokens x tokens) says, for
each output token, how much of it comes from each *input* token, so the CLS row over the patches
is a map over the input image, not over last-layer tokens.

Vision encoders (any model with ``vision.blocks.*.attn.pattern``): the stored ``rollout`` is
``J_L`` (batch, tokens, tokens) in the model's token order; the manifest's spans say where CLS and
the patches are, and the figure shows the CLS row over the patches on the grid.

Captioners: greedy generation captures the text->image pattern (`InputMeta.flow_hook`) and the
vision patterns. Per generated token the text->image row of every text layer is fused over heads,
restricted to the image tokens (the ``cls`` and ``image`` spans of its keys), averaged over the text
layers, and composed with the vision tower's rollout: ``map_t = mean_l(row_{t,l}) · J_L``, a
distribution over the *input* image tokens scaled by the token's image mass. Not renormalised:
each map sums to the layer-mean attention mass the token puts on the image (1 for a separate
cross-attention with mean fusion, less for a joint attention over ``[image; text]``). The
composition is only valid when the text reads exactly the vision tower's output tokens, in its
order (a per-token projection is fine); token counts are checked and anything else is refused.
What the map leaves out: the text stream's own self-attention, and image-to-image attention
outside the vision tower (the image block of a joint stack, a decoder-side vision stream), which
the captured hooks do not expose per step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from probe.adapter import Captioner, Classifier
from probe.analyses.explain import (
    Method,
    Target,
    check_target,
    flow_layers,
    patch_span,
    register_method,
    text_rows,
    with_caption_length,
)
from probe.analysis import Analysis, ParamError, param
from probe.capture import capture
from probe.capture.sites import at_least_float32
from probe.data import ImageSet, images_to_uint8
from probe.registry import register_analysis
from probe.runs.results import Result
from probe.types import VISION_PATTERN, InputMeta, ProbeError, layer_of, select
from probe.viz.figures import grid, no_ticks, overlay, short, token_maps

FUSIONS = ("mean", "max", "min")
SIGNED = ("positive", "refuse")
MAX_IMAGES = 8
MAX_TOKENS = 12
#: how far a row may be from a distribution before ``signed="refuse"`` refuses it: negative
#: entries beyond rounding, or a row sum off by more than low-precision (bf16) softmax rounding
NEG_TOL = 1e-6
SUM_TOL = 2e-2


class SignedPatternError(ProbeError, ValueError):
    """A pattern whose rows are not distributions, with ``signed="refuse"``."""


# ------------------------------------------------------------------------------ the method
def pattern_stats(pattern: torch.Tensor) -> dict[str, float]:
    """How far a (batch, heads, n, n) pattern is from row-stochastic: the share of negative
    entries and the range of the row sums."""
    p = pattern.double()
    sums = p.sum(-1)
    return {"negative": float((p < -NEG_TOL).double().mean()), "row_sum_min": float(sums.min()),
            "row_sum_max": float(sums.max())}


def stochastic_rows(pattern: torch.Tensor, signed: str = "positive", *, layer: int | None = None) -> torch.Tensor:
    """Make every head's rows distributions, or refuse a pattern whose rows are not.

    ``positive``: the positive part of each row, divided by its sum; a row with no positive entry
    becomes zero (after the residual step its token keeps only itself). On softmax attention (and
    on Performer's or the hybrid's effective matrices, whose rows are already distributions) this
    changes nothing beyond rounding. ``refuse``: raise `SignedPatternError` unless every entry is
    >= 0 and every row sums to 1 (within `SUM_TOL`).
    """
    if signed not in SIGNED:
        raise ValueError(f"signed {signed!r}: use one of {', '.join(SIGNED)}")
    if signed == "refuse":
        s = pattern_stats(pattern)
        if s["negative"] > 0 or s["row_sum_min"] < 1 - SUM_TOL or s["row_sum_max"] > 1 + SUM_TOL:
            where = f"layer {layer}" if layer is not None else "the pattern"
            raise SignedPatternError(
                f"{where} is not a distribution per row ({100 * s['negative']:.0f}% negative entries, row sums "
                f"{s['row_sum_min']:.2f} to {s['row_sum_max']:.2f}; an approximate attention's effective matrix); "
                f"rollout would leave [0, 1]: use signed='positive' (--signed positive)")
        return pattern
    pos = pattern.clamp(min=0)
    sums = pos.sum(-1, keepdim=True)
    return torch.where(sums > 0, pos / sums.clamp(min=torch.finfo(pos.dtype).tiny), torch.zeros_like(pos))


def fuse_heads(pattern: torch.Tensor, fusion: str = "mean") -> torch.Tensor:
    """(batch, heads, n, n) -> (batch, n, n): mean, max or min over the heads."""
    if fusion == "mean":
        return pattern.mean(1)
    if fusion == "max":
        return pattern.amax(1)
    if fusion == "min":
        return pattern.amin(1)
    raise ValueError(f"fusion {fusion!r}: use one of {', '.join(FUSIONS)}")


def discard_smallest(fused: torch.Tensor, ratio: float, keep: Sequence[int] | None = None) -> torch.Tensor:
    """Zero the smallest entries of every row of a fused (batch, n, n) matrix, per batch element.

    In each row the discardable entries are all but the diagonal and the columns in `keep` (e.g.
    CLS); the smallest ``floor(ratio * count)`` of them are set to 0. Unlike jacobgil/vit-explain,
    whose discard ranks the whole matrix of batch item 0 only, this ranks each row of each batch
    element, and a protected entry is never zeroed even when it is the smallest of its row.
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"discard ratio {ratio!r}: use 0 <= ratio < 1")
    if ratio == 0:
        return fused
    n = fused.shape[-1]
    protected = torch.eye(n, dtype=torch.bool, device=fused.device)
    for j in keep or ():
        if not 0 <= j < n:
            raise ValueError(f"keep index {j} outside the {n} tokens")
        protected[:, j] = True
    count = torch.floor(ratio * (~protected).sum(-1).double()).long()  # (n,) per row
    ranks = fused.masked_fill(protected, math.inf).argsort(dim=-1, stable=True).argsort(dim=-1)
    drop = (ranks < count[:, None]) & ~protected
    return fused.masked_fill(drop, 0.0)


def add_residual(fused: torch.Tensor) -> torch.Tensor:
    """``(A + I) / rowsum(A + I)``: rows divided by their own sums (keepdim), not columns by row
    sums as in jacobgil/vit-explain issue #16."""
    a = fused + torch.eye(fused.shape[-1], dtype=fused.dtype, device=fused.device)
    return a / a.sum(-1, keepdim=True)


def rollout(patterns: Sequence[torch.Tensor], *, fusion: str = "mean", discard_ratio: float = 0.0,
            start_layer: int = 0, keep: Sequence[int] | None = None, signed: str = "positive",
            rows: Sequence[int] | None = None, exact: bool = False) -> torch.Tensor:
    """Attention rollout of Abnar & Zuidema (2020) over layers in order; returns (batch, n, n).

    Per layer ``l`` from `start_layer` on, with ``A_l^h`` the (batch, heads, n, n) pattern:

    1. ``signed`` (see `stochastic_rows`): approximate attention kinds give *effective* matrices
       that need not be distributions (Linformer's ``P F`` has many negative entries and row sums
       far from 1, Nyströmformer's rows sum to about 0.6..1.1). Rollout composes distributions;
       with signed rows its products leave [0, 1]. The default ``positive`` takes each head's
       positive part and renormalises its rows to sum 1 (what the head moves *towards* each token,
       as a share), so the result stays row-stochastic for every kind; it is a no-op on softmax
       rows. ``refuse`` raises instead, for users who want only exact distributions.
    2. Fuse heads: ``Ā_l = mean_h A_l^h`` (or max, min).
    3. Discard (optional, `discard_smallest`): in each row, per batch element, zero the smallest
       `discard_ratio` share of the entries that are neither the diagonal nor a `keep` column.
       jacobgil/vit-explain instead ranks the whole fused matrix (of batch item 0).
    4. Residual: ``Â_l = (Ā_l + I) / rowsum(Ā_l + I)``, rows normalised with keepdim.
    5. Compose in layer order: ``J = Â_s``, then ``J_l = Â_l · J_{l-1}`` (not reversed).

    `keep`: token positions whose column is never discarded (the caller passes CLS; nothing is
    assumed about where it is). Layers before `start_layer` are skipped (identity), as in
    Chefer et al.'s fix for early-layer artifacts. The result's rows sum to 1 and its entries lie
    in [0, 1] (computed in float64, returned as float32).

    `rows`: only these rows of ``J_L`` (e.g. ``[0]`` for CLS), (batch, len(rows), n), computed
    from the top layer down as ``e_r^T Â_L ... Â_s`` (vector-matrix products instead of
    matrix-matrix ones: O(L n^2) instead of O(L n^3)), in the patterns' dtype (at least float32).
    With mean fusion and no discard the fused matrices are never formed: with
    ``w = v / (1 + rowsum(Ā))``, ``v Â = mean_h(w A^h) + w``, one pass over each pattern. `exact`:
    the caller vouches that every row is a distribution (unmasked softmax), so step 1 and the
    row sums are skipped (``w = v / 2``).
    """
    if not patterns:
        raise ValueError("rollout needs at least one layer's pattern")
    if fusion not in FUSIONS:
        raise ValueError(f"fusion {fusion!r}: use one of {', '.join(FUSIONS)}")
    if not 0 <= discard_ratio < 1:
        raise ValueError(f"discard ratio {discard_ratio!r}: use 0 <= ratio < 1")
    if isinstance(start_layer, bool) or not isinstance(start_layer, int) or not 0 <= start_layer < len(patterns):
        raise ValueError(f"start layer {start_layer!r}: use 0 to {len(patterns) - 1} ({len(patterns)} layers)")
    shape = patterns[0].shape
    if rows is not None and fusion == "mean" and discard_ratio == 0:
        return _rollout_rows(patterns, start_layer, rows, signed, exact)
    joint: torch.Tensor | None = None
    mats: list[torch.Tensor] = []
    for layer in range(start_layer, len(patterns)):
        p = patterns[layer]
        if p.dim() != 4 or p.shape[-1] != p.shape[-2] or p.shape[0] != shape[0] or p.shape[-1] != shape[-1]:
            raise ValueError(f"layer {layer} pattern must be (batch={shape[0]}, heads, {shape[-1]}, {shape[-1]}); "
                             f"got {tuple(p.shape)}")
        if not bool(torch.isfinite(p).all()):
            raise ValueError(f"layer {layer}'s attention holds NaN or inf (float16 overflows in some kinds: use "
                             "--dtype bfloat16 or float32)")
        p = at_least_float32(p) if rows is not None else p.double()
        a = fuse_heads(stochastic_rows(p, signed, layer=layer), fusion)
        a = add_residual(discard_smallest(a, discard_ratio, keep))
        if rows is not None:
            mats.append(a)
            continue
        joint = a if joint is None else a @ joint
    if rows is not None:
        n = shape[-1]
        for r in rows:
            if not 0 <= r < n:
                raise ValueError(f"row {r} outside the {n} tokens")
        v = torch.zeros(shape[0], len(rows), n, dtype=mats[0].dtype, device=mats[0].device)
        v[:, torch.arange(len(rows)), torch.as_tensor(list(rows))] = 1.0
        for a in reversed(mats):
            v = v @ a
        return v.float()
    assert joint is not None
    return joint.float()


def _rollout_rows(patterns: Sequence[torch.Tensor], start_layer: int, rows: Sequence[int], signed: str,
                  exact: bool) -> torch.Tensor:
    """Rows of the mean-fused, discard-free rollout, top layer down (see `rollout`)."""
    shape = patterns[0].shape
    n = shape[-1]
    if not len(rows):
        raise ValueError("rows is empty: give the token positions whose rollout rows you want (e.g. [0] for CLS)")
    for r in rows:
        if not 0 <= r < n:
            raise ValueError(f"row {r} outside the {n} tokens")
    p0 = at_least_float32(patterns[-1])
    v = torch.zeros(shape[0], len(rows), n, dtype=p0.dtype, device=p0.device)
    v[:, torch.arange(len(rows)), torch.as_tensor(list(rows))] = 1.0
    for layer in reversed(range(start_layer, len(patterns))):
        p = patterns[layer]
        if p.dim() != 4 or p.shape[-1] != p.shape[-2] or p.shape[0] != shape[0] or p.shape[-1] != n:
            raise ValueError(f"layer {layer} pattern must be (batch={shape[0]}, heads, {n}, {n}); got {tuple(p.shape)}")
        p = at_least_float32(p)
        if exact and signed != "refuse":
            w = v / 2  # vouched-for distributions: rowsum(Ā) = 1
        else:
            p = stochastic_rows(p, signed, layer=layer)
            # a row with no positive entry is zero now: use the true sums, Â = (Ā + I) / (1 + rowsum(Ā))
            w = v / (1 + p.sum(-1).mean(1))[:, None, :]
        h = p.shape[1]
        # one GEMV over all heads at once: (b, r, h*n) @ (b, h*n, m)
        v = torch.bmm(w.repeat(1, 1, h), p.reshape(shape[0], h * n, n)) / h + w
    # checked once at the end (a pass per layer would cost as much as the products): a NaN or inf
    # that can reach the requested rows reaches them
    if not bool(torch.isfinite(v).all()):
        raise ValueError("the attention holds NaN or inf (float16 overflows in some kinds: use --dtype bfloat16 or "
                         "float32)")
    return v.float()


def compose_text_rows(rows: torch.Tensor, vision_rollout: torch.Tensor) -> torch.Tensor:
    """Text->image rows (batch, steps, image tokens) composed with the vision rollout
    (batch, image tokens, image tokens): (batch, steps, image tokens) over the input tokens."""
    return (rows.double() @ vision_rollout.double()).float()


# ------------------------------------------------------------------------------ the result
@dataclass(frozen=True)
class RolloutResult(Result):
    """Attention rollout of a vision encoder, or per generated token of a captioner.

    Fields:
        model, image_names: registered model name; one name per image.
        meta: spans of the stored token axis (``cls``, ``image``), patch ``grid``, ``image_size``;
            for captioners also ``flow_hook`` and ``joint`` (the image tokens of the keys, which
            are the vision tower's tokens in its order).
        layers: vision layers composed (``start_layer`` to the last); depth: vision layers in all.
        fusion, discard_ratio, start_layer, signed: the parameters that ran.
        approximate: True when the vision patterns are effective matrices of an approximate kind.
        pattern_stats: per composed layer, `pattern_stats` of the raw per-head pattern (the share
            of negative entries, the row-sum range): what ``signed`` had to treat.
        captioner: True for captioners; then tokens, captions (per image), text_layers, joint.
        top_patches: per image (encoders: the CLS map) or per image and token (captioners), the
            top patch indices, row-major on the grid.
    Arrays:
        ``rollout``: encoders (batch, tokens, tokens), ``J_L`` in the model's token order;
            captioners (batch, steps, image tokens), each token's composed map over the input
            image tokens (steps after a caption's end are 0).
        ``rollout.cls_map``: encoders with a CLS token, (batch, rows, cols) CLS row on the grid.
        ``rollout.vision``, ``rollout.text_rows``: captioners, the vision rollout (batch, image
            tokens, image tokens) and the layer-mean text->image rows before composition
            (batch, steps, image tokens).
        ``input.image``: (batch, H, W, 3) uint8.
    """

    kind: ClassVar[str] = "rollout"
    schema_version: ClassVar[int] = 1
    model: str = ""
    image_names: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    layers: list[int] = field(default_factory=list)
    depth: int = 0
    fusion: str = "mean"
    discard_ratio: float = 0.0
    start_layer: int = 0
    signed: str = "positive"
    approximate: bool = False
    pattern_stats: list[dict[str, float]] = field(default_factory=list)
    captioner: bool = False
    tokens: list[list[str]] | None = None
    captions: list[str] | None = None
    text_layers: list[int] | None = None
    joint: bool = False
    top_patches: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        b = len(self.image_names)
        r = self.arrays.get("rollout")
        if r is None or r.dim() != 3 or r.shape[0] != b:
            raise ValueError(f"rollout must be (batch={b}, ., .); got {None if r is None else tuple(r.shape)}")
        if not self.captioner and r.shape[1] != r.shape[2]:
            raise ValueError(f"an encoder's rollout must be square per image; got {tuple(r.shape)}")
        if self.captioner and (self.tokens is None or self.captions is None or len(self.tokens) != b
                               or any(len(t) > r.shape[1] for t in self.tokens)):
            raise ValueError("a captioner's rollout needs one token list and caption per image, within its steps")

    def patch_map(self, image: int) -> torch.Tensor:
        """Encoders: the CLS row of the rollout over the patches, on the grid (rows, cols)."""
        if self.captioner:
            raise ValueError("a captioner's rollout has one map per generated token: use token_maps")
        return self.arrays["rollout.cls_map"][image]

    def token_maps(self, image: int) -> torch.Tensor:
        """Captioners: each generated token's rollout over the patches, on the grid (steps_i, rows, cols)."""
        if not self.captioner or self.tokens is None:
            raise ValueError("an encoder's rollout has one CLS map per image: use patch_map")
        meta = self.input_meta()
        lo, hi = meta.spans["image"]
        m = self.arrays["rollout"][image, : len(self.tokens[image]), lo:hi]
        return m.reshape(m.shape[0], *meta.grid)  # type: ignore[misc]


# ------------------------------------------------------------------------------ the analysis
@register_analysis
class Rollout(Analysis):
    """Attention rollout of a vision encoder, or of each generated token of a captioner."""

    name = "rollout"
    summary = "attention rollout (Abnar & Zuidema 2020): CLS map over the input patches, or one per caption token"
    requires = (VISION_PATTERN.format(i="*"),)

    @dataclass(frozen=True)
    class Params:
        fusion: str = param("mean", "how heads are fused per layer", choices=FUSIONS)
        discard_ratio: float = param(0.0, "per row, zero this share of the smallest entries (never the diagonal "
                                          "or CLS); 0 <= x < 1", min=0.0)
        start_layer: int = param(0, "first vision layer composed (earlier layers are skipped)", min=0)
        signed: str = param("positive", "effective matrices with negative entries or rows not summing to 1: "
                                        "take the positive part and renormalise rows, or refuse", choices=SIGNED)
        max_new_tokens: int | None = param(None, "caption tokens to generate, captioners only (default: the "
                                                 "model's)", min=1)
        batch_size: int = param(8, "images per forward", min=1)

        def __post_init__(self) -> None:
            r = self.discard_ratio
            if isinstance(r, int | float) and not isinstance(r, bool) and r >= 1:
                raise ParamError(f"--discard-ratio {r!r}: must be < 1 (it is the share of each row zeroed)")

    def resolve(self, adapter: Any, params: Params) -> Params:
        depth = len(_vision_specs(adapter))
        if params.start_layer >= depth:
            raise ParamError(f"--start-layer {params.start_layer}: {adapter.name} has {depth} vision layers "
                             f"(use 0 to {depth - 1})")
        return with_caption_length(adapter, params)

    def run(self, adapter: Any, inputs: ImageSet, params: Params) -> RolloutResult:
        """Returns a `RolloutResult` (see its docstring for the arrays)."""
        if isinstance(adapter, Captioner):
            return _run_captioner(adapter, inputs, params)
        return _run_encoder(adapter, inputs, params)

    def render(self, result: RolloutResult) -> dict[str, Figure]:
        if result.captioner:
            return {"rollout_tokens": render_token_maps(result)}
        return {"rollout_cls": render_cls_maps(result)} if "rollout.cls_map" in result.arrays else {}

    def summary_lines(self, result: RolloutResult) -> list[str]:
        head = (f"{len(result.image_names)} images, vision layers {result.layers[0]}..{result.layers[-1]} of "
                f"{result.depth}, heads fused by {result.fusion}, discard {result.discard_ratio:g}")
        lines = [head]
        treated = [(layer, s) for layer, s in zip(result.layers, result.pattern_stats, strict=True)
                   if s["negative"] > 0 or abs(s["row_sum_min"] - 1) > SUM_TOL or abs(s["row_sum_max"] - 1) > SUM_TOL]
        if treated:
            worst = max(treated, key=lambda t: t[1]["negative"])
            lines.append(f"  signed effective matrices in {len(treated)} layers (worst: layer {worst[0]}, "
                         f"{100 * worst[1]['negative']:.0f}% negative, row sums {worst[1]['row_sum_min']:.2f} to "
                         f"{worst[1]['row_sum_max']:.2f}): positive part, rows renormalised")
        g = result.meta.get("grid")

        def where(p: int) -> str:
            return f"({p // g[1]},{p % g[1]})" if g else str(p)

        if not result.captioner:
            spans = result.meta["spans"]
            for i, name in enumerate(result.image_names):
                if "cls" not in spans:
                    break
                c = spans["cls"][0]
                self_share = float(result.arrays["rollout"][i, c, c])
                tops = "/".join(where(p) for p in result.top_patches[i][:3])
                lines.append(f"  {name}: CLS keeps {self_share:.2f} of itself; top patches {tops}")
            return lines
        assert result.tokens is not None and result.captions is not None
        lines[0] += (f"; text->image rows averaged over {len(result.text_layers or [])} text layers; "
                     "per token: image mass @ top patch")
        for i, name in enumerate(result.image_names):
            lines.append(f"  {name}: {result.captions[i]!r}")
            mass = result.arrays["rollout"][i].sum(-1)
            parts = [f"{tok}:{float(mass[s]):.2f}@{where(result.top_patches[i][s][0])}"
                     for s, tok in enumerate(result.tokens[i]) if result.top_patches[i][s]]
            lines.append("    " + "  ".join(parts))
        return lines


def _vision_specs(adapter: Any) -> list[Any]:
    specs = select(adapter.hook_specs(), VISION_PATTERN.format(i="*"))
    return sorted(specs, key=lambda s: s.layer)


def _keep(spans: dict[str, tuple[int, int]], offset: int = 0) -> list[int]:
    return list(range(spans["cls"][0] - offset, spans["cls"][1] - offset)) if "cls" in spans else []


def _top(m: torch.Tensor, k: int = 5) -> list[int]:
    return m.topk(min(k, m.numel())).indices.tolist()


def _run_encoder(adapter: Any, inputs: ImageSet, params: Any) -> RolloutResult:
    specs = _vision_specs(adapter)
    names = [s.name for s in specs]
    images = inputs.images
    meta: InputMeta | None = None
    parts: list[torch.Tensor] = []
    stats: list[list[dict[str, float]]] = []
    starts = range(0, len(images), params.batch_size)
    for start in tqdm(starts, desc=f"rollout {adapter.name}", disable=len(starts) < 2):
        batch = adapter.preprocess(images[start : start + params.batch_size])
        meta = adapter.input_meta(batch)
        with torch.no_grad(), capture(adapter, names) as cache:
            adapter.forward(batch)
        patterns = [cache[n] for n in names]
        stats.append([pattern_stats(p) for p in patterns[params.start_layer :]])
        parts.append(rollout(patterns, fusion=params.fusion, discard_ratio=params.discard_ratio,
                             start_layer=params.start_layer, keep=_keep(meta.spans), signed=params.signed))
    assert meta is not None
    joint = torch.cat(parts)
    arrays = {"rollout": joint, "input.image": images_to_uint8(images, meta.image_size or (224, 224))}
    top: list[list[int]] = []
    if "cls" in meta.spans and "image" in meta.spans and meta.grid is not None:
        c = meta.spans["cls"][0]
        lo, hi = meta.spans["image"]
        cls_row = joint[:, c, lo:hi]
        arrays["rollout.cls_map"] = cls_row.reshape(cls_row.shape[0], *meta.grid)
        top = [_top(r) for r in cls_row]
    return RolloutResult(
        arrays=arrays, model=adapter.name, image_names=inputs.names, meta=meta.to_dict(),
        layers=[layer_of(n) for n in names][params.start_layer :], depth=len(names), fusion=params.fusion,
        discard_ratio=params.discard_ratio, start_layer=params.start_layer, signed=params.signed,
        approximate=meta.approximate or any(s.approximate for s in specs), pattern_stats=_merge_stats(stats),
        top_patches=top,
    )


def _merge_stats(per_batch: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    """Per layer over batches: the largest negative share, the widest row-sum range."""
    return [{"negative": max(s["negative"] for s in layer), "row_sum_min": min(s["row_sum_min"] for s in layer),
             "row_sum_max": max(s["row_sum_max"] for s in layer)} for layer in zip(*per_batch, strict=True)]


def image_key_range(meta: InputMeta) -> tuple[int, int]:
    """The keys of the flow pattern that are image tokens: the ``cls`` and ``image`` spans, which
    must be contiguous."""
    spans = [meta.spans["image"]] + ([meta.spans["cls"]] if "cls" in meta.spans else [])
    lo, hi = min(s[0] for s in spans), max(s[1] for s in spans)
    if sum(s[1] - s[0] for s in spans) != hi - lo:
        raise ProbeError(f"the image tokens of the text->image keys are not contiguous ({meta.spans}); "
                         "rollout cannot compose them with the vision tower")
    return lo, hi


def text_image_rows(cache: Any, hook: str, layers: Sequence[int], key_range: tuple[int, int],
                    fusion: str) -> torch.Tensor:
    """Per generation step, the text->image row of each text layer fused over heads and restricted
    to the image keys, averaged over the layers: (batch, steps, image tokens)."""
    lo, hi = key_range
    per_layer = [fuse_heads(cache.stack_calls(hook.format(i=i))[..., lo:hi], fusion) for i in layers]
    rows = torch.stack(per_layer).mean(0)
    if bool((rows < -NEG_TOL).any()):
        raise ProbeError("the text->image attention has negative entries (an effective matrix); rollout composes "
                         "only distributions there")
    return rows


def _run_captioner(adapter: Captioner, inputs: ImageSet, params: Any) -> RolloutResult:
    specs = _vision_specs(adapter)
    names = [s.name for s in specs]
    hook = adapter.flow_hook
    images = inputs.images
    results: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    tokens: list[list[str]] = []
    captions: list[str] = []
    stats: list[list[dict[str, float]]] = []
    meta: InputMeta | None = None
    text_layers: list[int] = []
    starts = range(0, len(images), params.batch_size)
    for start in tqdm(starts, desc=f"rollout {adapter.name}", disable=len(starts) < 2):
        chunk = images[start : start + params.batch_size]
        caps, cache = adapter.generate_with_cache(chunk, [hook.format(i="*"), *names],
                                                  max_new_tokens=params.max_new_tokens)
        meta = cache.meta
        assert meta is not None
        text_layers = sorted({layer_of(n) for n in cache.names() if n not in names})
        patterns = [cache.calls(n)[0] for n in names]  # the encoder runs once per image
        lo, hi = image_key_range(meta)
        n_vision = patterns[0].shape[-1]
        if hi - lo != n_vision:
            raise ProbeError(f"{adapter.name}: the text reads {hi - lo} image tokens but its vision tower has "
                             f"{n_vision}; rollout composes only when the text reads the tower's output tokens "
                             "one to one, in order")
        keep = _keep(meta.spans, lo)
        stats.append([pattern_stats(p) for p in patterns[params.start_layer :]])
        vision = rollout(patterns, fusion=params.fusion, discard_ratio=params.discard_ratio,
                         start_layer=params.start_layer, keep=keep, signed=params.signed)
        rows = text_image_rows(cache, hook, text_layers, (lo, hi), params.fusion)
        results.append((compose_text_rows(rows, vision), vision, rows))
        tokens += caps["tokens"]
        captions += caps["text"]
    assert meta is not None
    lo, hi = image_key_range(meta)
    steps = max(r[0].shape[1] for r in results)

    def pad_steps(t: torch.Tensor) -> torch.Tensor:  # (b, steps_chunk, m) -> (b, steps, m)
        return torch.nn.functional.pad(t, (0, 0, 0, steps - t.shape[1]))

    composed = torch.cat([pad_steps(r[0]) for r in results])
    vision = torch.cat([r[1] for r in results])
    rows = torch.cat([pad_steps(r[2]) for r in results])
    spans = {k: (a - lo, b - lo) for k, (a, b) in meta.spans.items() if k in ("cls", "image")}
    out_meta = {**InputMeta(spans=spans, grid=meta.grid, image_size=meta.image_size).to_dict(),
                "flow_hook": meta.flow_hook, "joint": meta.joint}
    out_meta.pop("tokens", None)
    p0, p1 = spans["image"]
    top = [[_top(composed[i, s, p0:p1]) for s in range(len(t))] for i, t in enumerate(tokens)]
    arrays = {"rollout": composed, "rollout.vision": vision, "rollout.text_rows": rows,
              "input.image": images_to_uint8(images, meta.image_size or (224, 224))}
    return RolloutResult(
        arrays=arrays, model=adapter.name, image_names=inputs.names, meta=out_meta,
        layers=[layer_of(n) for n in names][params.start_layer :], depth=len(names), fusion=params.fusion,
        discard_ratio=params.discard_ratio, start_layer=params.start_layer, signed=params.signed,
        approximate=any(s.approximate for s in specs), pattern_stats=_merge_stats(stats), captioner=True,
        tokens=tokens, captions=captions, text_layers=text_layers, joint=meta.joint, top_patches=top,
    )


# ------------------------------------------------------------------------------ figures
def _what(result: RolloutResult) -> str:
    layers = f"vision layers {result.layers[0]}..{result.layers[-1]}"
    extra = f", discard {result.discard_ratio:g}" if result.discard_ratio else ""
    return f"rollout ({layers}, heads by {result.fusion}{extra})"


def render_cls_maps(result: RolloutResult) -> Figure:
    """Per image (rows): the image and its CLS rollout over the patches, overlaid."""
    n_img = min(len(result.image_names), MAX_IMAGES)
    fig, axes = grid(n_img, 2, (4.0, 2.0 * n_img + 0.4))
    images = result.arrays["input.image"]
    for r in range(n_img):
        img = images[r].numpy()
        axes[r][0].imshow(img)
        axes[r][0].set_title(short(result.image_names[r]), fontsize=7)
        amap = result.patch_map(r)
        overlay(axes[r][1], img, amap.numpy(), vmin=0.0, vmax=float(amap.max()) or 1.0)
        axes[r][1].set_title(f"patch mass {float(amap.sum()):.2f}", fontsize=7)
    no_ticks(axes)
    more = f" (first {MAX_IMAGES} of {len(result.image_names)} images)" if len(result.image_names) > n_img else ""
    kind = ", effective attention" if result.approximate else ""
    fig.suptitle(f"{result.model}: CLS {_what(result)}{kind}{more}", fontsize=8)
    fig.tight_layout()
    return fig


def render_token_maps(result: RolloutResult) -> Figure:
    """Per image: one panel per generated token with its rollout over the input patches."""
    assert result.tokens is not None and result.captions is not None
    return token_maps(result.arrays["input.image"], result.image_names, result.captions, result.tokens,
                      result.token_maps, lambda r, s: float(result.arrays["rollout"][r, s].sum()),
                      f"{result.model}: each generated token's text->image attention (mean over text layers) "
                      f"through the {_what(result)}", MAX_IMAGES, MAX_TOKENS)


# ------------------------------------------------------------------------------ as an attribution method
def rollout_maps(adapter: Any, target: Target) -> torch.Tensor:
    """Rollout maps (b, S, patches) for a teacher-forced `Target` (see `probe.analyses.explain`):
    classifiers the CLS row of the vision rollout, captioners each step's text->image row (head
    mean, mean over text layers) composed with it, as `Rollout` does during generation. Defaults:
    mean fusion, no discard, all layers, signed rows by their positive part."""
    check_target(adapter, target)
    names = [s.name for s in _vision_specs(adapter)]
    lo, hi = patch_span(adapter)
    flows = [] if isinstance(adapter, Classifier) else flow_layers(adapter)
    batch: dict[str, Any] = {"pixel_values": target.pixel_values}
    if target.ids is not None:
        batch.update(input_ids=target.ids, attention_mask=target.mask)
    with torch.no_grad(), capture(adapter, names + flows) as cache:
        adapter.forward(batch)
    vision = rollout([cache[n] for n in names], keep=[0])
    if isinstance(adapter, Classifier):
        return vision[:, 0, lo:hi][:, None]
    n_img = vision.shape[-1]
    rows = torch.stack([fuse_heads(text_rows(adapter, cache[n], target.n_steps)[..., :n_img]) for n in flows]).mean(0)
    out = compose_text_rows(rows, vision)[..., lo:hi]
    return out * target.step_mask()[..., None]


register_method(Method("rollout", rollout_maps, "Abnar & Zuidema 2020 rollout; captioners: text->image row "
                       "composed with the vision rollout"))
