"""Attention flow (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers", section 3).

The attention graph has ``(L + 1) * n`` nodes, node ``(l, i)`` for token ``i`` after layer ``l``
(layer 0: the input), and an edge from ``(l, i)`` to ``(l - 1, j)`` of capacity ``Â_l[i, j]``,
the same per-layer matrix as rollout (`analyses.rollout`): heads fused, the residual added, rows
renormalised. The attention flow of output token ``s`` to input token ``j`` is the value of the
maximum flow from ``(L, s)`` to ``(0, j)``; each output row is then normalised to sum to 1.

How the numbers are computed (exactly, and much faster than the paper's networkx script, which
runs one ``maximum_flow_value`` per node pair on the whole graph):

- Per source token and batch element one graph is built (CSR) and reused for every sink: only
  the source node of the top layer and the sink node of layer 0 are kept (the other top-layer
  nodes cannot be reached from the source, the other input nodes cannot reach the sink), so
  changing the sink rewrites only the ``n`` capacities into it. Zero-capacity edges and the edges
  of nodes the source cannot reach are dropped. Each sink is one `scipy.sparse.csgraph.maximum_flow`
  (Dinic). At ViT-B/16 size (197 tokens, 12 layers) the CLS row takes about 3 s on one CPU core,
  the per-pair networkx script about 7 minutes (``bench/attention_flow.py``).
- Dinic needs integer capacities: they are rounded *down* to multiples of ``2**-30`` (int32 holds
  every flow, which is at most the source's out-capacity, 1). The integer flow is feasible for the
  real capacities, so ``flow / 2**30`` is a lower bound; the cut it leaves (the nodes reachable
  from the source in its residual graph) is evaluated with the real float64 capacities, an upper
  bound. The value returned is that cut's capacity, which is the exact maximum flow whenever the
  rounded problem's minimum cut is also a minimum cut of the real one (the typical case); in any
  case the true value lies between the two bounds, and their gap (at most ``2**-30`` per edge of
  the cut, kept in `FlowValues.error`) is the certified error.

Vision encoders only: flow is defined over one self-attention stack. Captioners are refused
before their weights load (rollout and relevancy compose their text->image attention).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from scipy.sparse import csr_array
from scipy.sparse.csgraph import breadth_first_order, maximum_flow
from tqdm.auto import tqdm

from probe.adapter import Captioner
from probe.analyses.explain import Method, Target, check_target, patch_span, register_method
from probe.analyses.rollout import (
    FUSIONS,
    SIGNED,
    SUM_TOL,
    SignedPatternError,
    _merge_stats,
    _top,
    _vision_specs,
    add_residual,
    fuse_heads,
    pattern_stats,
    stochastic_rows,
)
from probe.analysis import Analysis, ParamError, param
from probe.capture import capture
from probe.data import ImageSet, images_to_uint8
from probe.registry import register_analysis
from probe.runs.results import Result
from probe.types import VISION_PATTERN, InputMeta, ProbeError, layer_of
from probe.viz.figures import grid, no_ticks, overlay, short

log = logging.getLogger(__name__)

#: capacities are rounded down to multiples of 1 / SCALE for the integer solver
SCALE_BITS = 30
#: above this many edge visits (sinks x edges) a progress bar is shown (about a second of work)
PROGRESS_WORK = 5e7
MAX_IMAGES = 8
CAPTIONER_REFUSAL = ("attention flow is defined over one self-attention stack; use rollout or relevancy "
                     "for captioners")


# ------------------------------------------------------------------------------ the method
def flow_capacities(patterns: Sequence[torch.Tensor], *, fusion: str = "mean", start_layer: int = 0,
                    signed: str = "refuse") -> torch.Tensor:
    """The edge capacities of the attention graph: ``Â_l = add_residual(fuse_heads(A_l))`` for the
    layers from `start_layer` on, (layers, batch, n, n) float64, rows summing to 1.

    `patterns`: per layer (batch, heads, n, n). ``signed="refuse"`` raises `SignedPatternError`
    unless every head's rows are distributions (entries >= 0, sums 1 within rollout's `SUM_TOL`);
    ``"positive"`` takes each head's positive part with rows renormalised (rollout's
    `stochastic_rows`), a no-op on softmax rows and what makes Linformer's or Nyströmformer's signed
    effective matrices usable: max-flow capacities must be non-negative.
    """
    if not patterns:
        raise ValueError("attention flow needs at least one layer's pattern")
    if fusion not in FUSIONS:
        raise ValueError(f"fusion {fusion!r}: use one of {', '.join(FUSIONS)}")
    if signed not in SIGNED:
        raise ValueError(f"signed {signed!r}: use one of {', '.join(SIGNED)}")
    if isinstance(start_layer, bool) or not isinstance(start_layer, int) or not 0 <= start_layer < len(patterns):
        raise ValueError(f"start layer {start_layer!r}: use 0 to {len(patterns) - 1} ({len(patterns)} layers)")
    shape = patterns[0].shape
    out = []
    for layer in range(start_layer, len(patterns)):
        p = patterns[layer]
        if p.dim() != 4 or p.shape[-1] != p.shape[-2] or p.shape[0] != shape[0] or p.shape[-1] != shape[-1]:
            raise ValueError(f"layer {layer} pattern must be (batch={shape[0]}, heads, {shape[-1]}, {shape[-1]}); "
                             f"got {tuple(p.shape)}")
        if not bool(torch.isfinite(p).all()):
            raise ValueError(f"layer {layer}'s attention holds NaN or inf (float16 overflows in some kinds: use "
                             "--dtype bfloat16 or float32)")
        p = p.detach().double().cpu()
        if signed == "refuse":
            s = pattern_stats(p)
            if s["negative"] > 0 or s["row_sum_min"] < 1 - SUM_TOL or s["row_sum_max"] > 1 + SUM_TOL:
                raise SignedPatternError(
                    f"layer {layer} is not a distribution per row ({100 * s['negative']:.0f}% negative entries, "
                    f"row sums {s['row_sum_min']:.2f} to {s['row_sum_max']:.2f}; an approximate attention's "
                    "effective matrix) and max-flow capacities must be non-negative: use signed='positive' "
                    "(--signed positive)")
        else:
            p = stochastic_rows(p, "positive")
        out.append(add_residual(fuse_heads(p, fusion)))
    return torch.stack(out)


@dataclass(frozen=True)
class FlowValues:
    """Raw maximum-flow values and their certified error.

    Attributes:
        values: (batch, sources, n) float64, the maximum flow from each source token of the top
            layer to each input token (not normalised; each is at most 1, the source's capacity).
        error: (batch, sources, n) float64, certified: ``0 <= values - exact <= error`` (at most
            ``2**-30`` per edge of the cut found; about 1e-7 at 197 tokens; see the module docstring).
    """

    values: torch.Tensor
    error: torch.Tensor

    def normalised(self) -> torch.Tensor:
        """Each row divided by its sum, as in the paper: (batch, sources, n)."""
        return self.values / self.values.sum(-1, keepdim=True)


def _sources(source: int | Sequence[int], n: int) -> list[int]:
    many = [source] if isinstance(source, int | np.integer) else list(source)
    if not many:
        raise ValueError("give at least one source token")
    for s in many:
        if isinstance(s, bool) or not isinstance(s, int | np.integer) or not 0 <= s < n:
            raise ValueError(f"source token {s!r}: use 0 to {n - 1} ({n} tokens)")
    return [int(s) for s in many]


class _LayeredGraph:
    """The attention graph of one batch element and one source (at least two layers), pruned, in
    CSR; `solve(j)` is the maximum flow to input token ``j``.

    Node 0 is the source ``(m, s)``, then the ``n`` nodes of each layer ``m - 1`` down to 1, and
    the sink last. Every edge goes from a lower to a higher node index; the last ``n_tail`` edges
    are those of the reachable layer-1 nodes into the sink, the only capacities that change with
    the sink.
    """

    def __init__(self, caps: np.ndarray, source: int) -> None:
        m, n, _ = caps.shape  # caps[k - 1]: capacities of graph layer k, k = 1 (input side) .. m
        self.bottom = caps[0]
        self.sink = 1 + (m - 1) * n
        self.scale = float(2**SCALE_BITS)
        reach = caps[m - 1, source] > 0
        cols = np.flatnonzero(reach)
        tails, heads, data = [np.zeros(len(cols), np.int64)], [1 + cols], [caps[m - 1, source, cols]]
        for k in range(m - 1, 1, -1):  # edges (k, i) -> (k - 1, t), only from nodes the source reaches
            rows, cols = np.nonzero(reach[:, None] & (caps[k - 1] > 0))
            base = 1 + (m - 1 - k) * n
            tails.append(base + rows)
            heads.append(base + n + cols)
            data.append(caps[k - 1][rows, cols])
            reach = (caps[k - 1][reach] > 0).any(0)
        self.layer1 = np.flatnonzero(reach)
        self.n_tail = len(self.layer1)
        tails.append(1 + (m - 2) * n + self.layer1)
        heads.append(np.full(self.n_tail, self.sink))
        data.append(np.zeros(self.n_tail))
        self.tails, self.heads = np.concatenate(tails), np.concatenate(heads)
        self.capf = np.concatenate(data)
        self.capi = np.floor(self.capf * self.scale).astype(np.int32)
        indptr = np.concatenate([[0], np.cumsum(np.bincount(self.tails, minlength=self.sink + 1))])
        self.graph = csr_array((self.capi.copy(), self.heads.astype(np.int32), indptr.astype(np.int32)),
                               shape=(self.sink + 1, self.sink + 1))
        self.graph.has_sorted_indices = True
        self.source_out = (float(self.capf[: len(heads[0])].sum()), int(self.capi[: len(heads[0])].sum()))
        self._forward: np.ndarray | None = None  # where our edges sit among scipy's (which adds reverses)
        self._indices = self._capm = np.zeros(0, np.int32)

    def solve(self, j: int) -> tuple[float, float]:
        """(value, certified error) of the maximum flow to input token `j`."""
        col = self.bottom[self.layer1, j]
        if not col.any():
            return 0.0, 0.0
        ints = np.floor(col * self.scale).astype(np.int32)
        self.capf[-self.n_tail :] = col
        self.capi[-self.n_tail :] = ints
        self.graph.data[-self.n_tail :] = ints
        res = maximum_flow(self.graph, 0, self.sink)
        flow = int(res.flow_value)
        lower = flow / self.scale
        # Upper bound: the real capacity of a minimum cut of the rounded problem. The two trivial
        # cuts (the source's out-edges, the sink's in-edges) usually are one; else find the cut.
        tight = [f for f, i in (self.source_out, (float(col.sum()), int(ints.astype(np.int64).sum()))) if i == flow]
        cut = min(tight) if tight else self._cut(res.flow)
        if cut < lower - 1e-9:
            raise RuntimeError(f"cut {cut} below the flow {lower}: the integer capacities overflowed")
        return cut, max(cut - lower, 0.0)

    def _cut(self, flow: Any) -> float:
        """Real capacity of the cut left by a maximum `flow` (scipy's antisymmetric flow matrix):
        the nodes the source still reaches through residual capacity."""
        if self._forward is None:
            rows = np.repeat(np.arange(flow.shape[0]), np.diff(flow.indptr))
            self._forward = np.flatnonzero(flow.indices > rows)
            if len(self._forward) != len(self.capi):
                raise RuntimeError("scipy's maximum_flow changed its edge layout; attention flow needs updating")
            self._indices, self._capm = flow.indices.copy(), np.zeros(len(flow.data), np.int32)
        self._capm[self._forward] = self.capi
        live = self._capm > flow.data  # reverse entries: capacity 0 > -flow where the edge carries flow
        indptr = np.concatenate([[0], np.cumsum(live)])[flow.indptr]
        residual = csr_array((np.ones(int(indptr[-1]), np.int8), self._indices[live], indptr), shape=flow.shape)
        side = np.zeros(flow.shape[0], bool)
        side[breadth_first_order(residual, 0, directed=True, return_predecessors=False)] = True
        if side[self.sink]:
            raise RuntimeError("scipy's maximum_flow left an augmenting path")
        return float(self.capf[side[self.tails] & ~side[self.heads]].sum())


def max_flow_values(capacities: torch.Tensor, source: int | Sequence[int] = 0, *,
                    progress: bool | None = None, desc: str = "attention flow") -> FlowValues:
    """Maximum flow from each source token of the top layer to each input token of the layered
    graph whose layer ``k`` (1 = the input side) has capacities ``capacities[k - 1]`` (from
    `flow_capacities`: (layers, batch, n, n), non-negative, rows summing to at most 1).

    Returns raw values with certified errors (`FlowValues`), (batch, sources, n). `progress`: a
    tqdm bar over the sinks (None: only when the work is long).
    """
    if capacities.dim() != 4 or capacities.shape[-1] != capacities.shape[-2]:
        raise ValueError(f"capacities must be (layers, batch, n, n); got {tuple(capacities.shape)}")
    caps = capacities.detach().double().cpu().numpy()
    if (caps < 0).any() or not np.isfinite(caps).all():
        raise ValueError("max-flow capacities must be finite and non-negative")
    if caps.sum(-1).max() > 1 + 1e-6:
        raise ValueError("capacity rows must sum to at most 1 (they are rows of add_residual(...)); int32 flows "
                         "would overflow otherwise")
    m, b, n, _ = caps.shape
    sources = _sources(source, n)
    values = np.zeros((b, len(sources), n))
    error = np.zeros((b, len(sources), n))
    work = b * len(sources) * n * (2 * n + max(m - 2, 0) * n * n)
    quiet = work < PROGRESS_WORK if progress is None else not progress
    bar = tqdm(total=b * len(sources) * n, desc=desc, disable=quiet)
    with bar:
        for e in range(b):
            for k, s in enumerate(sources):
                if m == 1:  # one edge from the source to each input token
                    values[e, k] = caps[0, e, s]
                    bar.update(n)
                    continue
                g = _LayeredGraph(caps[:, e], s)
                for j in range(n):
                    values[e, k, j], error[e, k, j] = g.solve(j)
                    bar.update(1)
    log.debug("attention flow: %d x %d sources x %d sinks, largest certified error %.3g", b, len(sources), n,
              float(error.max()) if error.size else 0.0)
    return FlowValues(torch.from_numpy(values), torch.from_numpy(error))


def attention_flow_values(patterns: Sequence[torch.Tensor], *, source: int | Sequence[int] = 0,
                          fusion: str = "mean", start_layer: int = 0, signed: str = "refuse",
                          progress: bool | None = None) -> FlowValues:
    """Raw attention flow of Abnar & Zuidema (2020): `flow_capacities` then `max_flow_values`;
    values (batch, len(sources), n), not normalised, with their certified errors."""
    caps = flow_capacities(patterns, fusion=fusion, start_layer=start_layer, signed=signed)
    return max_flow_values(caps, source, progress=progress)


def attention_flow(patterns: Sequence[torch.Tensor], *, source: int | Sequence[int] = 0, fusion: str = "mean",
                   start_layer: int = 0, signed: str = "refuse", progress: bool | None = None) -> torch.Tensor:
    """Attention flow (Abnar & Zuidema 2020, section 3) from the top layer's `source` token(s) to
    the input tokens: (batch, len(sources), n) float64, each row normalised to sum to 1.

    `patterns`: per layer (batch, heads, n, n), in layer order. The graph's capacities are
    ``Â_l = (Ā_l + I) / rowsum(Ā_l + I)`` with ``Ā_l`` the heads fused by `fusion` (as rollout);
    layers before `start_layer` are left out (as identities they would only add chains of
    capacity 1, which never bind: every flow is at most the source's capacity, 1).
    Each value is the exact maximum flow from ``(L, s)`` to ``(0, j)`` (see the module docstring
    for the solver and its certified error), divided by the sum of its row as in the paper; the
    raw values are `attention_flow_values`. `signed`: see `flow_capacities` (default: refuse
    patterns whose rows are not distributions).
    """
    return attention_flow_values(patterns, source=source, fusion=fusion, start_layer=start_layer,
                                 signed=signed, progress=progress).normalised()


def _rollout_rows(caps: torch.Tensor, sources: Sequence[int]) -> torch.Tensor:
    """Rollout's rows for `sources` from the same capacities (``J = Â_m ... Â_1``): (batch, sources, n)."""
    rows = caps[-1][:, list(sources)]
    for k in range(caps.shape[0] - 2, -1, -1):
        rows = rows @ caps[k]
    return rows


# ------------------------------------------------------------------------------ the result
@dataclass(frozen=True)
class AttentionFlowResult(Result):
    """Attention flow of a vision encoder from one token of its last layer to its input tokens.

    Fields:
        model, image_names: registered model name; one name per image.
        meta: `InputMeta.to_dict()` of the inputs (spans ``cls`` and ``image``, patch ``grid``).
        layers: vision layers in the graph (``start_layer`` to the last); depth: vision layers in all.
        fusion, start_layer, signed: the parameters that ran.
        source: token position traced (CLS by default); source_span: the span it opens (``cls``) or None.
        approximate: True when the vision patterns are effective matrices of an approximate kind.
        pattern_stats: per layer in the graph, `pattern_stats` of the raw per-head pattern.
        max_error: the largest certified error of a raw flow value (`FlowValues.error`).
        top_patches: per image, the top patch indices of its map, row-major on the grid.
    Arrays:
        ``flow``: (batch, 1, tokens) the flow of `source` to each input token, normalised to sum 1.
        ``flow.raw``: (batch, 1, tokens) the maximum-flow values before normalising (each <= 1).
        ``flow.rollout``: (batch, 1, tokens) rollout's row of `source` over the same layers, for comparison.
        ``flow.map``: (batch, rows, cols) ``flow`` over the patches on the grid (the CLS map by default).
        ``input.image``: (batch, H, W, 3) uint8.
    """

    kind: ClassVar[str] = "attention-flow"
    schema_version: ClassVar[int] = 1
    model: str = ""
    image_names: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    layers: list[int] = field(default_factory=list)
    depth: int = 0
    fusion: str = "mean"
    start_layer: int = 0
    signed: str = "refuse"
    source: int = 0
    source_span: str | None = None
    approximate: bool = False
    pattern_stats: list[dict[str, float]] = field(default_factory=list)
    max_error: float = 0.0
    top_patches: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        b = len(self.image_names)
        for name in ("flow", "flow.raw", "flow.rollout"):
            t = self.arrays.get(name)
            if t is None or t.dim() != 3 or t.shape[:2] != (b, 1):
                raise ValueError(f"{name} must be (batch={b}, 1, tokens); got {None if t is None else tuple(t.shape)}")

    def patch_map(self, image: int) -> torch.Tensor:
        """The normalised flow of the source token over the patches, on the grid (rows, cols)."""
        return self.arrays["flow.map"][image]

    def rollout_map(self, image: int) -> torch.Tensor:
        """Rollout's row of the source token over the patches, on the grid (rows, cols)."""
        meta = self.input_meta()
        lo, hi = meta.spans["image"]
        return self.arrays["flow.rollout"][image, 0, lo:hi].reshape(*meta.grid)  # type: ignore[misc]


# ------------------------------------------------------------------------------ the analysis
def flow_refusal(adapter: Any) -> str | None:
    """Why attention flow does not apply to `adapter` (one line), or None."""
    if isinstance(adapter, Captioner) or "caption" in adapter.capabilities.tasks:
        return f"flow: vision encoders only; {adapter.name} captions, and {CAPTIONER_REFUSAL}"
    try:
        _vision_specs(adapter)
    except KeyError:
        return f"flow: {adapter.name} offers no {VISION_PATTERN.format(i='*')} hooks (a self-attention stack)"
    return None


@register_analysis
class AttentionFlow(Analysis):
    """Attention flow of a vision encoder: max-flow from the CLS token (or another) to the input."""

    name = "attention-flow"
    summary = "attention flow (Abnar & Zuidema 2020): exact max-flow from CLS to each input patch"
    requires = (VISION_PATTERN.format(i="*"),)

    @dataclass(frozen=True)
    class Params:
        fusion: str = param("mean", "how heads are fused per layer", choices=FUSIONS)
        start_layer: int = param(0, "first vision layer in the graph (earlier layers are skipped)", min=0)
        signed: str = param("refuse", "effective matrices with negative entries or rows not summing to 1: "
                                      "refuse, or take the positive part and renormalise rows", choices=SIGNED)
        source: int | None = param(None, "token position whose flow to the input is traced (default: CLS)",
                                   min=0)
        batch_size: int = param(8, "images per forward", min=1)

    def check(self, model: str, capabilities: Any) -> str | None:
        if "caption" in capabilities.tasks:
            return f"{self.name}: {model} captions; {CAPTIONER_REFUSAL}"
        return super().check(model, capabilities)

    def resolve(self, adapter: Any, params: Params) -> Params:
        if isinstance(adapter, Captioner) or "caption" in adapter.capabilities.tasks:
            raise ProbeError(f"{self.name}: {adapter.name} captions; {CAPTIONER_REFUSAL}")
        depth = len(_vision_specs(adapter))
        if params.start_layer >= depth:
            raise ParamError(f"--start-layer {params.start_layer}: {adapter.name} has {depth} vision layers "
                             f"(use 0 to {depth - 1})")
        n = int(adapter.n_image_tokens)
        if params.source is None:
            side = adapter.image_size
            spans = adapter.input_meta(adapter.preprocess([Image.new("RGB", (side, side))])).spans
            if "cls" not in spans:
                raise ParamError(f"--source: {adapter.name} has no CLS token; give a token position (0 to {n - 1})")
            return dataclasses.replace(params, source=spans["cls"][0])
        if params.source >= n:
            raise ParamError(f"--source {params.source}: {adapter.name} has {n} tokens (use 0 to {n - 1})")
        return params

    def run(self, adapter: Any, inputs: ImageSet, params: Params) -> AttentionFlowResult:
        """Returns an `AttentionFlowResult` (see its docstring for the arrays)."""
        assert params.source is not None, "resolve() sets the source"
        specs = _vision_specs(adapter)
        names = [s.name for s in specs]
        images = inputs.images
        meta: InputMeta | None = None
        parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        stats: list[list[dict[str, float]]] = []
        starts = range(0, len(images), params.batch_size)
        for start in tqdm(starts, desc=f"attention flow {adapter.name}", disable=len(starts) < 2):
            batch = adapter.preprocess(images[start : start + params.batch_size])
            meta = adapter.input_meta(batch)
            with torch.no_grad(), capture(adapter, names) as cache:
                adapter.forward(batch)
            patterns = [cache[n] for n in names]
            stats.append([pattern_stats(p) for p in patterns[params.start_layer :]])
            caps = flow_capacities(patterns, fusion=params.fusion, start_layer=params.start_layer,
                                   signed=params.signed)
            fv = max_flow_values(caps, params.source, desc=f"attention flow {adapter.name}")
            parts.append((fv.values, fv.error, _rollout_rows(caps, [params.source])))
        assert meta is not None
        raw = torch.cat([p[0] for p in parts])
        error = torch.cat([p[1] for p in parts])
        flow = raw / raw.sum(-1, keepdim=True)
        arrays = {"flow": flow.float(), "flow.raw": raw.float(), "flow.rollout": torch.cat([p[2] for p in parts]).float(),
                  "input.image": images_to_uint8(images, meta.image_size or (224, 224))}
        top: list[list[int]] = []
        if "image" in meta.spans and meta.grid is not None:
            lo, hi = meta.spans["image"]
            row = arrays["flow"][:, 0, lo:hi]
            arrays["flow.map"] = row.reshape(row.shape[0], *meta.grid)
            top = [_top(r) for r in row]
        span = next((k for k, (a, b) in meta.spans.items() if a == params.source and b - a == 1), None)
        return AttentionFlowResult(
            arrays=arrays, model=adapter.name, image_names=inputs.names, meta=meta.to_dict(),
            layers=[layer_of(n) for n in names][params.start_layer :], depth=len(names), fusion=params.fusion,
            start_layer=params.start_layer, signed=params.signed, source=params.source, source_span=span,
            approximate=meta.approximate or any(s.approximate for s in specs), pattern_stats=_merge_stats(stats),
            max_error=float(error.max()), top_patches=top,
        )

    def render(self, result: AttentionFlowResult) -> dict[str, Figure]:
        return {"attention_flow": render_flow_maps(result)} if "flow.map" in result.arrays else {}

    def summary_lines(self, result: AttentionFlowResult) -> list[str]:
        who = "CLS" if result.source_span == "cls" else f"token {result.source}"
        lines = [f"{len(result.image_names)} images, vision layers {result.layers[0]}..{result.layers[-1]} of "
                 f"{result.depth}, heads fused by {result.fusion}: max-flow from the last layer's {who} to each "
                 f"input token, rows normalised (certified error of raw values <= {result.max_error:.1g})"]
        treated = [(layer, s) for layer, s in zip(result.layers, result.pattern_stats, strict=True)
                   if s["negative"] > 0 or abs(s["row_sum_min"] - 1) > SUM_TOL or abs(s["row_sum_max"] - 1) > SUM_TOL]
        if treated:
            lines.append(f"  signed effective matrices in {len(treated)} layers: positive part, rows renormalised")
        g = result.meta.get("grid")
        spans = result.meta["spans"]
        for i, name in enumerate(result.image_names):
            raw = result.arrays["flow.raw"][i, 0]
            own = float(result.arrays["flow"][i, 0, result.source])
            line = f"  {name}: {who} keeps {own:.2f} of its own input token; raw flows {float(raw.min()):.2f} to " \
                   f"{float(raw.max()):.2f}"
            if g and result.top_patches:
                lo, hi = spans["image"]
                rho = _rank_correlation(result.arrays["flow"][i, 0, lo:hi], result.arrays["flow.rollout"][i, 0, lo:hi])
                tops = "/".join(f"({p // g[1]},{p % g[1]})" for p in result.top_patches[i][:3])
                line += f"; top patches {tops}; rank correlation with rollout {rho:.2f}"
            lines.append(line)
        return lines


def _rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rho (ties broken by position) of two 1-d tensors; nan when one is constant."""
    ra, rb = (t.double().argsort().argsort().double() for t in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den else math.nan


# ------------------------------------------------------------------------------ figures
def render_flow_maps(result: AttentionFlowResult) -> Figure:
    """Per image (rows): the image, its attention-flow map and rollout's map over the patches, each
    coloured from its own minimum to its maximum (the titles give both)."""
    n_img = min(len(result.image_names), MAX_IMAGES)
    fig, axes = grid(n_img, 3, (6.6, 2.1 * n_img + 0.4))
    images = result.arrays["input.image"]
    for r in range(n_img):
        img = images[r].numpy()
        axes[r][0].imshow(img)
        axes[r][0].set_title(short(result.image_names[r]), fontsize=7)
        for ax, amap, what in ((axes[r][1], result.patch_map(r), "flow"), (axes[r][2], result.rollout_map(r), "rollout")):
            # flow maps are nearly flat (most raw flows are close to 1): stretch min..max to show their order
            overlay(ax, img, amap.numpy(), vmin=float(amap.min()), vmax=float(amap.max()))
            ax.set_title(f"{what}: mass {float(amap.sum()):.2f}, {float(amap.min()):.3f}..{float(amap.max()):.3f}",
                         fontsize=6)
    no_ticks(axes)
    more = f" (first {MAX_IMAGES} of {len(result.image_names)} images)" if len(result.image_names) > n_img else ""
    who = "CLS" if result.source_span == "cls" else f"token {result.source}"
    kind = ", effective attention" if result.approximate else ""
    fig.suptitle(f"{result.model}: attention flow from {who} (vision layers {result.layers[0]}..{result.layers[-1]}, "
                 f"heads by {result.fusion}){kind}{more}", fontsize=8)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ attribution method
def flow_maps(adapter: Any, target: Target) -> torch.Tensor:
    """Attention flow as an attribution method (`analyses.explain` contract): for classifiers the
    last layer's CLS row of `attention_flow` (normalised over all input tokens, CLS included),
    restricted to the patches: (b, 1, patches). Signed effective matrices take the positive part."""
    check_target(adapter, target)
    why = flow_refusal(adapter)
    if why:
        raise ProbeError(why)
    names = [s.name for s in _vision_specs(adapter)]
    batch = {"pixel_values": target.pixel_values}
    with torch.no_grad(), capture(adapter, names) as cache:
        adapter.forward(batch)
    spans = adapter.input_meta(batch).spans
    if "cls" not in spans:
        raise ProbeError(f"flow: {adapter.name} has no CLS token to trace")
    lo, hi = patch_span(adapter)
    flow = attention_flow([cache[n] for n in names], source=spans["cls"][0], signed="positive")
    return flow[:, :, lo:hi].float().cpu()


register_method(Method("flow", flow_maps,
                       "Abnar & Zuidema 2020 attention flow (sec. 3): exact max-flow from the last layer's CLS node to "
                       "each input node of the graph with capacities (mean_h A + I) / rowsum, normalised over all "
                       "input tokens; vision encoders only",
                       applies=flow_refusal))
