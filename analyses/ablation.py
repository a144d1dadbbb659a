"""Ablations of how image information reaches the caption, for every captioner family.

Variants (each applied to every image):

- ``none``: the unablated model (the reference).
- ``blind``: every image token (CLS and patches) removed from every text layer's reads.
- ``top-k``: the k patches the caption attends to most (layer-, head- and token-mean of the flow
  pattern over the reference caption) removed; ``random-k``: k random patches removed.
- ``object:j``: on probe-shapes, the patches under object j's mask removed (any overlap), with
  ``object-random:j``: as many random patches.
- ``layer:i``: every image token removed from text layer i only (cross-attention layer for
  ViT-GPT2, BLIP and MMCA; the image span of the joint self-attention for GIT and the prefix VLM).
- ``head:i.h``: head h of layer i zeroed: its cross-attention output (``text.blocks.{i}.xattn.z``)
  where the family has one; in joint-attention families and MMCA (one attention, shared
  projections) the whole head, which reads text and image together (`head_scope` says which).

Removal is real (see `probe.capture.MaskTokens`): a removed image token receives exactly zero
attention and contributes nothing; for BLIP the mask is routed into the cross-attention mask that
transformers drops. Variants run batched: rows of one batched forward carry different variants
through per-row key masks and per-row head masks. Where the captioner can resume its text stack
(`probe.adapter.Captioner.text_run`: BLIP, ViT-GPT2) the sweep shares what variants have in
common: one unablated forward, then each (variant, image) row runs only from the block its variant
first changes (`entry_point`; a layer's or head's variants from that layer's cross-attention head
outputs), with each image's cross-attention keys and values computed once. `loop=True` runs one
whole forward per variant (the reference the batched path must equal, to the last bit).

Metrics per variant and image: the teacher-forced log-probability of the reference caption (the
unablated greedy caption, end token included; mean per token) and its drop from ``none``; the
greedy caption under the ablation; which reference token positions changed; and, with ground
truth, the caption accuracy (`probe.data.metrics.caption_metrics`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from probe.analysis import Analysis, ParamError, param
from probe.capture import (
    Intervention,
    MaskTokens,
    Precomputed,
    ZeroHeads,
    capture,
    intervene,
    record_outputs,
    select_batch,
)
from probe.data import ImageSet, images_to_uint8
from probe.data.metrics import caption_metrics, named_objects
from probe.registry import register_analysis
from probe.runs.results import AblationResult
from probe.types import VISION_OUTPUT, select
from probe.viz.figures import grid, text_figure

log = logging.getLogger(__name__)

KINDS = ("blind", "region", "layers", "heads", "all")


@dataclass(frozen=True)
class Variant:
    """One ablation. `removed`: bool (images, n_image_tokens) for every layer, or None;
    `layer_removed`: a layer whose image tokens are all removed; `head`: (layer, head) zeroed."""

    name: str
    kind: str
    removed: torch.Tensor | None = None
    layer: int | None = None
    head: tuple[int, int] | None = None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "layer": self.layer,
                "head": list(self.head) if self.head else None,
                "removed_tokens": None if self.removed is None else self.removed.sum(1).tolist()}


# ----------------------------------------------------------------------------- geometry
def patches_under(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Bool (rows * cols,): patches of a `grid` over the image that contain any pixel of `mask` (H, W)."""
    h, w = mask.shape
    r, c = grid
    ys = np.linspace(0, h, r + 1)
    xs = np.linspace(0, w, c + 1)
    out = np.zeros((r, c), dtype=bool)
    for i in range(r):
        for j in range(c):
            y0, y1 = int(np.floor(ys[i])), int(np.ceil(ys[i + 1]))
            x0, x1 = int(np.floor(xs[j])), int(np.ceil(xs[j + 1]))
            out[i, j] = mask[y0:y1, x0:x1].any()
    return out.ravel()


def _token_mask(patches: np.ndarray | torch.Tensor, n_tokens: int, span: tuple[int, int]) -> torch.Tensor:
    """Patch-level bool (..., patches) -> token-level (..., n_tokens) over the image tokens, the
    patches at `span` (the ``image`` span of the adapter's metadata)."""
    p = torch.as_tensor(patches, dtype=torch.bool)
    out = torch.zeros(*p.shape[:-1], n_tokens, dtype=torch.bool)
    out[..., span[0] : span[1]] = p
    return out



# ----------------------------------------------------------------------------- model plumbing
def _text_batch(adapter: Any, px: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"pixel_values": px, "input_ids": ids.to(adapter.device), "attention_mask": mask.to(adapter.device)}


class _Specs:
    """An adapter whose hook specs are expanded once (``hook_specs()`` expands the block templates
    on every call); everything else is the adapter's. `intervene` and the helpers here take it."""

    def __init__(self, adapter: Any) -> None:
        self._adapter = adapter
        self._specs = adapter.hook_specs()

    def hook_specs(self) -> list[Any]:
        return self._specs

    def __getattr__(self, name: str) -> Any:
        return getattr(self._adapter, name)


def _cached(adapter: Any) -> Any:
    return adapter if isinstance(adapter, _Specs) else _Specs(adapter)


def _flow_layers(adapter: Any) -> list[int]:
    """Text layers whose flow pattern (the one that reads the image tokens) exists."""
    return sorted(s.layer for s in select(adapter.hook_specs(), adapter.flow_hook.format(i="*")))


def _head_hook(adapter: Any, layer: int) -> tuple[str, str]:
    """The per-head hook a head ablation zeroes, and its scope."""
    names = {s.name for s in adapter.hook_specs()}
    xz = f"text.blocks.{layer}.xattn.z"
    if not adapter.capabilities.joint_attention and xz in names:
        return xz, "cross-attention"
    return f"text.blocks.{layer}.attn.z", "whole head (text and image)"


def _n_heads(adapter: Any, hook: str) -> int:
    spec = next(s for s in adapter.hook_specs() if s.name == hook)
    if not spec.n_heads:
        raise ValueError(f"{adapter.name}: {hook} declares no head count")
    return int(spec.n_heads)


def interventions_for(adapter: Any, rows: Sequence[tuple[Variant, int]],
                      layers: Sequence[int] | None = None) -> list[Intervention]:
    """Interventions for one batched forward whose row r runs variant ``rows[r][0]`` on image
    ``rows[r][1]``: one per-row key mask over all layers, per-layer key masks, per-layer head masks.
    `layers`: only what acts on these text layers, as each layer's own interventions (for blocks
    run one at a time on different rows, see `TextRun`)."""
    a = _cached(adapter)
    b, n_tok = len(rows), a.n_image_tokens
    flow = _flow_layers(a)
    todo = flow if layers is None else [i for i in flow if i in set(layers)]
    ivs: list[Intervention] = []
    removed = torch.zeros(b, n_tok, dtype=torch.bool)
    for r, (v, i) in enumerate(rows):
        if v.removed is not None:
            removed[r] = v.removed[i]
    if removed.any():
        if layers is None:
            ivs.append(MaskTokens(removed, attention=a.flow_hook.format(i="*")))
        else:
            ivs += [MaskTokens(removed, attention=a.flow_hook.format(i=layer)) for layer in todo]
    for layer in todo:
        flags = torch.tensor([v.layer == layer for v, _ in rows])
        if flags.any():
            ivs.append(MaskTokens(flags[:, None].expand(b, n_tok).clone(), attention=a.flow_hook.format(i=layer)))
        hook, _ = _head_hook(a, layer)
        hv = [(r, v.head[1]) for r, (v, _) in enumerate(rows) if v.head is not None and v.head[0] == layer]
        if hv:
            heads = torch.zeros(b, _n_heads(a, hook), dtype=torch.bool)
            for r, h in hv:
                heads[r, h] = True
            ivs.append(ZeroHeads(hook, heads))
    return ivs


@contextmanager
def vision_once(adapter: Any, vision_out: Any, rows_image: torch.Tensor) -> Iterator[None]:
    """While the block runs, the vision tower (hook ``vision.output``) does not run again: a batch
    whose rows are images `rows_image` gets those rows of `vision_out`, the tower's output on the
    distinct images. Ablations change only what the text reads, never the vision tower, so each
    image's features are computed once however many variants read them."""
    n = _batch_of(vision_out)

    def rows(*args: Any, **kwargs: Any) -> Any:
        return select_batch(vision_out, rows_image, n)

    with intervene(adapter, [Precomputed(VISION_OUTPUT, rows)]):
        yield


def _batch_of(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.shape[0]
    return _batch_of(value[0] if not hasattr(value, "keys") else next(iter(value.values())))


def vision_outputs(adapter: Any, px: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> Any:
    """The vision tower's output on `px` (one teacher-forced forward, recorded at ``vision.output``)."""
    with torch.no_grad(), record_outputs(adapter, VISION_OUTPUT) as calls:
        adapter.forward(_text_batch(adapter, px, ids, mask))
    return calls[0]


def _mean_logprob(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(b,): mean over the caption tokens (`mask`) of log p(ids[:, t + 1] | ...) from logits (b, T, vocab)."""
    logits = logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None].to(logits.device))[..., 0]
    m = mask[:, 1:].to(logp.device).float()
    return ((logp * m).sum(1) / m.sum(1)).cpu()


@torch.no_grad()
def _evaluate_rows(adapter: Any, rows: Sequence[tuple[Variant, int]], px: torch.Tensor, ids: torch.Tensor,
                   mask: torch.Tensor, vision: Any | None, max_new_tokens: int | None,
                   generate: bool) -> tuple[torch.Tensor, list[str], list[list[str]]]:
    """Mean log-prob of the reference caption per row, and (if `generate`) captions under each row's variant."""
    idx = torch.tensor([i for _, i in rows])
    rpx, rids, rmask = px[idx], ids[idx], mask[idx]
    with (vision_once(adapter, vision, idx) if vision is not None else nullcontext()), \
            intervene(adapter, interventions_for(adapter, rows)):
        mean = _mean_logprob(adapter.forward(_text_batch(adapter, rpx, rids, rmask)), rids, rmask)
        texts: list[str] = []
        toks: list[list[str]] = []
        if generate:
            caps = adapter.caption_pixels(rpx, max_new_tokens)
            texts, toks = caps["text"], caps["tokens"]
    return mean, texts, toks


# ----------------------------------------------------------------------------- shared-prefix sweep
Row = tuple[Variant, int]


def entry_point(v: Variant, layers: Sequence[int]) -> tuple[int, bool] | None:
    """Where variant `v` first changes the text stack: ``(block, at_heads)``, or None when it
    ablates nothing (it is the unablated forward). Removed tokens change every layer's
    cross-attention, from the first (``at_heads`` False: the whole block runs). A layer or head
    ablation of block l changes nothing of block l before its cross-attention head outputs
    (``at_heads`` True): a head is zeroed there, and a layer whose image tokens are all removed
    reads nothing, so its heads' outputs are exactly zero (see `probe.capture.MaskTokens`). A
    variant ablating several layers enters at the lowest."""
    marks = []
    if v.removed is not None:
        marks.append((min(layers), False))
    if v.layer is not None:
        marks.append((v.layer, True))
    if v.head is not None:
        marks.append((v.head[0], True))
    if not marks:
        return None
    first = min(m[0] for m in marks)
    return first, all(at for layer, at in marks if layer == first)


def _head_interventions(a: Any, rows: Sequence[Row], layer: int) -> list[Intervention]:
    """Layer and head ablations of block `layer` as zeroed cross-attention head outputs: row r's
    head for a head ablation, every head for a layer ablation (a layer whose image tokens are all
    removed reads nothing, so its heads' outputs are exactly zero, as `MaskTokens` makes them);
    rows ablating nothing there keep every head. None when no row ablates `layer`."""
    hook, _ = _head_hook(a, layer)
    if hook != f"text.blocks.{layer}.xattn.z":
        raise ValueError(f"{a.name}: block {layer} has no cross-attention heads ({hook}) to resume at")
    heads = torch.zeros(len(rows), _n_heads(a, hook), dtype=torch.bool)
    whole = [r for r, (v, _) in enumerate(rows) if v.layer == layer]
    one = [(r, v.head[1]) for r, (v, _) in enumerate(rows)
           if v.layer != layer and v.head is not None and v.head[0] == layer]
    heads[whole] = True
    if one:
        heads[[r for r, _ in one], [h for _, h in one]] = True
    return [ZeroHeads(hook, heads)] if heads.any() else []


def _resumed_interventions(a: Any, rows: Sequence[Row]) -> list[Intervention]:
    """`interventions_for` with layer ablations as zeroed heads (`_head_interventions`): the same
    numbers, and no key mask, so rows of layer, head and no ablation share one attention kernel
    path (a per-row key mask gives every row of its batch a mask)."""
    ivs = interventions_for(a, [(Variant(v.name, v.kind, v.removed), i) for v, i in rows])
    for layer in _flow_layers(a):
        ivs += _head_interventions(a, rows, layer)
    return ivs


@torch.no_grad()
def _shared_logprob(adapter: Any, run: Any, rows: Sequence[Row], ids: torch.Tensor, mask: torch.Tensor,
                    batch_size: int, progress: bool) -> torch.Tensor:
    """(len(rows),) mean log-prob of the reference per row, every row resumed from `run` (a
    `TextRun` of the unablated forward on all images) at its `entry_point`: blocks below it are
    shared, cross-attention keys and values are each image's, computed once."""
    a = _cached(adapter)
    layers = _flow_layers(a)
    entry = [entry_point(v, layers) for v, _ in rows]
    out = torch.zeros(len(rows))

    def images(ks: Sequence[int]) -> torch.Tensor:
        return torch.tensor([rows[k][1] for k in ks], dtype=torch.long)

    base = [k for k, e in enumerate(entry) if e is None]
    if base:
        idx = images(base)
        out[base] = _mean_logprob(run.logits[idx.to(run.logits.device)], ids[idx], mask[idx])
    todo = sorted((k for k, e in enumerate(entry) if e is not None), key=lambda k: entry[k])
    masked = [k for k in todo if rows[k][0].removed is not None]
    plain = [k for k in todo if rows[k][0].removed is None]
    # rows removing tokens everywhere never share a batch with the others: a per-row key mask gives
    # every row of its batch a (zero) mask, which can take another kernel path than none
    chunks = [g[c : c + batch_size] for g in (masked, plain) for c in range(0, len(g), batch_size)]
    for chunk in tqdm(chunks, desc=f"ablation {adapter.name}", disable=not progress or len(chunks) < 2):
        hidden: torch.Tensor | None = None
        live: list[int] = []
        for layer in range(entry[chunk[0]][0], run.depth):
            fresh = [k for k in chunk if entry[k] == (layer, False)]
            at_heads = [k for k in chunk if entry[k] == (layer, True)]
            parts = []
            if live or fresh:
                if fresh:
                    h = run.hidden(layer, images(fresh))
                    hidden = h if hidden is None else torch.cat([hidden, h])
                live = live + fresh
                with intervene(a, interventions_for(a, [rows[k] for k in live], [layer])):
                    parts.append(run.block(layer, hidden, images(live)))
            if at_heads:
                with intervene(a, _head_interventions(a, [rows[k] for k in at_heads], layer)):
                    parts.append(run.finish_block(layer, images(at_heads)))
                live = live + at_heads
            hidden = parts[0] if len(parts) == 1 else torch.cat(parts)
        out[live] = _mean_logprob(adapter.unembed(hidden), ids[images(live)], mask[images(live)])
    return out


def _attended_patches(adapter: Any, px: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(images, patches): mean over layers, heads and caption tokens of the flow pattern's patch weights."""
    batch = _text_batch(adapter, px, ids, mask)
    with torch.no_grad(), capture(adapter, adapter.flow_hook.format(i="*"), reduce="mean") as cache:
        adapter.forward(batch)
    meta = adapter.input_meta(batch)
    (lo, hi), (t0, t1) = meta.spans["image"], meta.spans["text"]  # the flow pattern's key and query spans
    m = mask.float()
    per_layer = []
    for name in cache.names():
        q = cache[name][:, 0, t0:t1, lo:hi].float().cpu()  # (b, caption tokens, patches)
        per_layer.append((q * m[:, :, None]).sum(1) / m.sum(1, keepdim=True))
    return torch.stack(per_layer).mean(0)


# ----------------------------------------------------------------------------- run
def build_variants(adapter: Any, kind: str, n_images: int, *, k: int, span: tuple[int, int],
                   attended: torch.Tensor | None, objects: Sequence[np.ndarray] | None, seed: int = 0) -> list[Variant]:
    """The variants of `kind` (``blind|region|layers|heads|all``), ``none`` first. `span`: the
    patches' positions among the image tokens; `k` patches per top-k / random-k region."""
    if kind not in KINDS:
        raise ValueError(f"unknown ablation kind {kind!r}; use one of {', '.join(KINDS)}")
    n_tok = adapter.n_image_tokens
    n_patch = span[1] - span[0]
    g = torch.Generator().manual_seed(seed)
    out = [Variant("none", "none")]
    if kind in ("blind", "all"):
        out.append(Variant("blind", "blind", torch.ones(n_images, n_tok, dtype=torch.bool)))
    if kind in ("region", "all"):
        if attended is not None:
            top = torch.zeros(n_images, n_patch, dtype=torch.bool)
            top.scatter_(1, attended.topk(k, dim=1).indices, True)
            out.append(Variant(f"top-{k}", "region", _token_mask(top, n_tok, span)))
        rand = _random_patches(n_images, n_patch, [k] * n_images, g)
        out.append(Variant(f"random-{k}", "region", _token_mask(rand, n_tok, span)))
        if objects is not None:
            for j in range(max(len(o) for o in objects)):
                under = np.zeros((n_images, n_patch), dtype=bool)
                for i, masks in enumerate(objects):
                    if j < len(masks):
                        under[i] = patches_under(masks[j], adapter.grid)
                counts = under.sum(1).tolist()
                out.append(Variant(f"object:{j}", "object", _token_mask(under, n_tok, span)))
                out.append(Variant(f"object-random:{j}", "object-random",
                                   _token_mask(_random_patches(n_images, n_patch, counts, g), n_tok, span)))
    layers = _flow_layers(adapter)
    if kind in ("layers", "all"):
        out += [Variant(f"layer:{i}", "layer", layer=i) for i in layers]
    if kind in ("heads", "all"):
        for i in layers:
            hook, _ = _head_hook(adapter, i)
            out += [Variant(f"head:{i}.{h}", "head", head=(i, h)) for h in range(_n_heads(adapter, hook))]
    return out


def _random_patches(n_images: int, n_patch: int, counts: Sequence[int], g: torch.Generator) -> torch.Tensor:
    out = torch.zeros(n_images, n_patch, dtype=torch.bool)
    for i, c in enumerate(counts):
        out[i, torch.randperm(n_patch, generator=g)[:c]] = True
    return out


@register_analysis
class Ablation(Analysis):
    """Caption the images, then re-score that caption and re-caption under each ablation."""

    name = "ablation"
    summary = "remove image tokens, regions, layers or heads: log-prob drop of the caption, captions, accuracy"
    task = "caption"
    default_images = "shapes"

    @dataclass(frozen=True)
    class Params:
        kind: str = param("all", "which ablations", choices=KINDS)
        k: int | None = param(None, "patches per top-k / random region (default 1/8 of the patches)", min=1)
        max_new_tokens: int | None = param(None, "caption tokens to generate (default: the model's)", min=1)
        batch_size: int = param(64, "variant x image rows per forward", min=1)
        generate: bool = param(True, "also caption under each variant (--no-generate: log-probs only)")
        loop: bool = param(False, "one forward per variant (the reference the batched path equals)")
        baseline_seed: int = param(0, "seed of the random-patch baselines", min=0, max=2**63 - 1)

    def resolve(self, adapter: Any, params: Params) -> Params:
        n_patch = adapter.grid[0] * adapter.grid[1]
        k = params.k if params.k is not None else max(1, n_patch // 8)
        if k > n_patch:
            raise ParamError(f"--k {k}: {adapter.name} has {n_patch} patches; use 1..{n_patch}")
        return dataclasses.replace(params, k=k, max_new_tokens=params.max_new_tokens or adapter.max_new_tokens)

    def run(self, adapter: Any, inputs: ImageSet, params: Params) -> AblationResult:
        """`AblationResult`; arrays ``ablation.logprob`` (variants, images) mean log-prob per token of
        the reference caption, ``ablation.drop`` = logprob[none] - logprob, ``ablation.heads``
        (layers, heads) image-mean drop of each head (NaN without a head sweep), ``ablation.removed``
        (variants, images, image tokens) bool, the tokens each variant removed from every layer's reads
        ([CLS, patches]; all False for layer and head variants), ``input.image`` (images, H, W, 3)
        uint8 at the model's resolution. With probe-shapes
        inputs (masks and samples) it adds the ``object:j`` variants and the caption accuracy."""
        n = len(inputs)
        objects, truth = inputs.masks, inputs.samples
        px, ref, ids, mask = reference(adapter, inputs.images, params.max_new_tokens)
        span = adapter.input_meta({"pixel_values": px}).spans["image"]
        k = self.resolve(adapter, params).k
        attended = _attended_patches(adapter, px, ids, mask) if params.kind in ("region", "all") else None
        variants = build_variants(adapter, params.kind, n, k=k, span=span, attended=attended, objects=objects,
                                  seed=params.baseline_seed)
        logprob, texts, tokens = evaluate_variants(
            adapter, variants, px, ids, mask, loop=params.loop, batch_size=params.batch_size,
            generate=params.generate, max_new_tokens=params.max_new_tokens, progress=True)
        drop = logprob[0:1] - logprob
        gen = params.generate
        changed = [[_changed(ref["tokens"][i], tokens[j][i]) if gen else [] for i in range(n)]
                   for j in range(len(variants))]
        layers = _flow_layers(adapter)
        n_heads = max((_n_heads(adapter, _head_hook(adapter, i)[0]) for i in layers), default=0)
        heads = torch.full((len(layers), n_heads), float("nan"))
        for j, v in enumerate(variants):
            if v.head is not None:
                heads[layers.index(v.head[0]), v.head[1]] = drop[j].mean()
        accuracy = ({v.name: caption_metrics(texts[j], truth) for j, v in enumerate(variants)}
                    if truth is not None and gen else None)
        removed = torch.zeros(len(variants), n, adapter.n_image_tokens, dtype=torch.bool)
        for j, v in enumerate(variants):
            if v.removed is not None:
                removed[j] = v.removed.to(torch.bool).cpu()
        size = (adapter.image_size, adapter.image_size)
        return AblationResult(
            arrays={"ablation.logprob": logprob, "ablation.drop": drop, "ablation.heads": heads,
                    "ablation.removed": removed, "input.image": images_to_uint8(inputs.images, size)},
            model=adapter.name, image_names=inputs.names, variants=[v.describe() for v in variants],
            reference=ref["text"], reference_tokens=ref["tokens"], captions=texts, changed=changed,
            accuracy=accuracy, object_words=_object_words(variants, texts, truth) if truth is not None and gen else None,
            layers=layers, head_scope=_head_hook(adapter, layers[0])[1] if layers else "",
            fusion=adapter.capabilities.fusion, truth=[t.caption for t in truth] if truth is not None else None,
            batched=not params.loop,
        )

    def render(self, result: AblationResult) -> dict[str, Figure]:
        figs: dict[str, Figure] = {"ablation_drop": render_drop(result)}
        if not torch.isnan(result.arrays["ablation.heads"]).all():
            figs["ablation_heads"] = render_heads(result)
        if any(any(c) for c in result.captions):
            figs["ablation_captions"] = render_captions(result)
        return figs

    def summary_lines(self, result: AblationResult) -> list[str]:
        return summary_lines(result)


#: images per shared forward of the batched sweep (`evaluate_variants`): what it keeps per image
#: (every text layer's cross-attention keys and values, states and logits; ~47 MB for BLIP-base at
#: 384 px) is held for this many images at a time
IMAGE_CHUNK = 16


def evaluate_variants(
    adapter: Any,
    variants: Sequence[Variant],
    px: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    loop: bool = False,
    batch_size: int = 64,
    generate: bool = True,
    max_new_tokens: int | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, list[list[str]], list[list[list[str]]]]:
    """Every variant on every image: mean log-prob per token of the reference `ids` (variants,
    images), and with `generate` the greedy caption texts and tokens [variant][image].

    Batched, for captioners with `Captioner.text_run` (BLIP, ViT-GPT2): one unablated forward on
    the images, then every (variant, image) row resumed at the block where its variant first
    changes something (`entry_point`): the blocks below are shared, a layer's or head's variants
    start from the unablated state at that layer's cross-attention heads, and each image's
    cross-attention keys and values (and vision features) are computed once. Rows are packed
    `batch_size` at a time; generation runs the rows in batches of `batch_size` with the shared
    vision features and keys/values. Other captioners: rows packed into whole forwards, vision
    features computed once. `loop`: one whole forward per variant, vision tower included (the naive
    reference the batched path must equal; the shared path gives the same numbers to the last bit,
    see tests/test_ablation_sweep.py).
    """
    n = px.shape[0]
    logprob = torch.zeros(len(variants), n)
    texts: list[list[str]] = [[""] * n for _ in variants]
    tokens: list[list[list[str]]] = [[[] for _ in range(n)] for _ in variants]
    if not loop and n > IMAGE_CHUNK:
        # the shared path keeps every text layer's keys, values and states of its images: bound
        # that memory by running IMAGE_CHUNK images at a time (rows of different images share nothing)
        for start in range(0, n, IMAGE_CHUNK):
            g = slice(start, start + IMAGE_CHUNK)
            sub = [dataclasses.replace(v, removed=None if v.removed is None else v.removed[g]) for v in variants]
            lp, tx, tk = evaluate_variants(adapter, sub, px[g], ids[g], mask[g], batch_size=batch_size,
                                           generate=generate, max_new_tokens=max_new_tokens, progress=progress)
            logprob[:, g] = lp
            for j in range(len(variants)):
                texts[j][g], tokens[j][g] = tx[j], tk[j]
        return logprob, texts, tokens
    rows = [(v, i) for v in variants for i in range(n)]
    vindex = {id(v): j for j, v in enumerate(variants)}
    run, vision = (None, None) if loop else _resumable(adapter, px, ids, mask)
    if run is not None:
        mean = _shared_logprob(adapter, run, rows, ids, mask, batch_size, progress)
        for r, (v, i) in enumerate(rows):
            logprob[vindex[id(v)], i] = mean[r]
        if generate:
            for chunk, caps in _shared_captions(adapter, run, vision, rows, px, batch_size, max_new_tokens, progress):
                for r, (v, i) in enumerate(chunk):
                    texts[vindex[id(v)]][i], tokens[vindex[id(v)]][i] = caps["text"][r], caps["tokens"][r]
        return logprob, texts, tokens
    chunks = _chunks(rows, batch_size, by_variant=loop)
    # the batched path runs the vision tower once; the reference loop is the naive one: a whole forward per variant
    vision = None if loop else vision_outputs(adapter, px, ids, mask)
    for chunk in tqdm(chunks, desc=f"ablation {adapter.name}", disable=not progress or len(chunks) < 2):
        mean, tx, tk = _evaluate_rows(adapter, chunk, px, ids, mask, vision, max_new_tokens, generate)
        for r, (v, i) in enumerate(chunk):
            logprob[vindex[id(v)], i] = mean[r]
            if generate:
                texts[vindex[id(v)]][i], tokens[vindex[id(v)]][i] = tx[r], tk[r]
    return logprob, texts, tokens


def _shared_captions(adapter: Any, run: Any, vision: Any, rows: Sequence[Row], px: torch.Tensor, batch_size: int,
                     max_new_tokens: int | None, progress: bool) -> Iterator[tuple[list[Row], dict[str, Any]]]:
    """Greedy captions of `rows`, `batch_size` rows per ``generate``: (chunk, captions) per batch.
    Vision features and cross-attention keys/values are the unablated forward's (`run`), taken
    per row; layer ablations act as zeroed heads (`_resumed_interventions`) and rows removing
    tokens are batched apart, so each row's arithmetic is the loop's."""
    a = _cached(adapter)
    masked = [r for r in rows if r[0].removed is not None]
    plain = [r for r in rows if r[0].removed is None]
    chunks = [g[k : k + batch_size] for g in (masked, plain) for k in range(0, len(g), batch_size)]
    for chunk in tqdm(chunks, desc=f"captions {adapter.name}", disable=not progress or len(chunks) < 2):
        idx = torch.tensor([i for _, i in chunk])
        with torch.no_grad(), vision_once(a, vision, idx), run.shared_image_kv(idx), \
                intervene(a, _resumed_interventions(a, chunk)):
            caps = adapter.caption_pixels(px[idx], max_new_tokens)
        yield chunk, caps


def _resumable(adapter: Any, px: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[Any, Any]:
    """The unablated forward as a `TextRun` and the vision tower's output in it, or (None, None)
    where the captioner cannot resume its text stack (`Captioner.text_run` raises NotImplementedError)."""
    try:
        with torch.no_grad(), record_outputs(adapter, VISION_OUTPUT) as calls:
            run = adapter.text_run(px, ids.to(adapter.device), mask.to(adapter.device))
    except NotImplementedError as e:
        log.debug("%s; batching whole forwards", e)
        return None, None
    return run, calls[0]


def reference(adapter: Any, images: Sequence[Any], max_new_tokens: int | None = None
              ) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor, torch.Tensor]:
    """Pixels, the unablated greedy captions, and their ids and mask ([start] + tokens + end)."""
    px = adapter.preprocess(list(images))["pixel_values"]
    ref = adapter.caption_pixels(px, max_new_tokens)
    ids, mask = adapter.teacher_ids(ref["ids"], ref["tokens"])
    return px, ref, ids, mask


def _chunks(rows: list[tuple[Variant, int]], size: int, by_variant: bool) -> list[list[tuple[Variant, int]]]:
    if by_variant:  # the reference loop: one forward per variant
        out: dict[int, list[tuple[Variant, int]]] = {}
        for r in rows:
            out.setdefault(id(r[0]), []).append(r)
        return list(out.values())
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def _changed(ref: list[str], new: list[str]) -> list[int]:
    """Positions where the ablated caption's tokens differ from the reference (length differences count)."""
    return [t for t in range(max(len(ref), len(new))) if t >= len(ref) or t >= len(new) or ref[t] != new[t]]


def _object_words(variants: Sequence[Variant], texts: list[list[str]], truth: Sequence[Any]) -> dict[str, float]:
    """Per object / random variant: the fraction of (image, object j) where the reference named
    object j's colour and shape and the ablated caption no longer does."""
    base = texts[0]
    out: dict[str, float] = {}
    for j, v in enumerate(variants):
        if v.kind not in ("object", "object-random"):
            continue
        obj = int(v.name.split(":")[1])
        lost = total = 0
        for i, s in enumerate(truth):
            if obj >= len(s.objects):
                continue
            pair = (s.objects[obj].colour, s.objects[obj].shape)
            before = named_objects(base[i])[pair]
            if before == 0:
                continue
            total += 1
            lost += named_objects(texts[j][i])[pair] < before
        out[v.name] = lost / total if total else float("nan")
    return out


# ----------------------------------------------------------------------------- rendering
def render_heads(result: AblationResult) -> Figure:
    h = result.arrays["ablation.heads"].numpy()
    fig, axes = grid(1, 1, (1.2 + 0.45 * h.shape[1], 1.0 + 0.4 * h.shape[0]))
    ax = axes[0][0]
    im = ax.imshow(h, cmap="magma", aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("text layer")
    ax.set_yticks(range(len(result.layers)), [str(i) for i in result.layers])
    ax.set_title(f"{result.model}: log-prob drop per head ({result.head_scope})", fontsize=9)
    fig.colorbar(im, ax=ax, label="nats / token")
    return fig


def render_drop(result: AblationResult) -> Figure:
    drop = result.arrays["ablation.drop"].mean(1).numpy()
    keep = [j for j, v in enumerate(result.variants) if v["kind"] != "head"]
    fig, axes = grid(1, 1, (6, 0.6 + 0.28 * len(keep)))
    ax = axes[0][0]
    ax.barh([result.variants[j]["name"] for j in keep], drop[keep], color="tab:purple")
    ax.invert_yaxis()
    ax.set_xlabel("mean log-prob drop of the reference caption (nats / token)")
    ax.set_title(result.model, fontsize=9)
    return fig


def render_captions(result: AblationResult, max_images: int = 4) -> Figure:
    keep = [j for j, v in enumerate(result.variants) if v["kind"] != "head"]
    n = min(max_images, len(result.image_names))
    lines = []
    for i in range(n):
        lines.append(f"{result.image_names[i]}")
        for j in keep:
            lines.append(f"    {result.variants[j]['name']:>18}: {result.captions[j][i]}")
    return text_figure(lines)


def summary_lines(result: AblationResult) -> list[str]:
    drop = result.arrays["ablation.drop"].mean(1)
    lines = [f"{result.model}: {len(result.image_names)} images, {len(result.variants)} variants"
             f" ({'batched' if result.batched else 'one forward per variant'}); reference = unablated greedy caption"]
    head = f"  {'variant':<20} {'logprob drop':>12}  {'changed':>8}"
    if result.accuracy:
        head += f"  {'exact':>6} {'objects':>7}"
    lines.append(head)
    for j, v in enumerate(result.variants):
        if v["kind"] == "head":
            continue
        changed = np.mean([bool(c) for c in result.changed[j]]) if result.changed else 0.0
        row = f"  {v['name']:<20} {float(drop[j]):>12.3f}  {changed:>8.0%}"
        if result.accuracy:
            a = result.accuracy[v["name"]]
            row += f"  {a['exact']:>6.0%} {a['objects']:>7.0%}"
        lines.append(row)
    heads = result.arrays["ablation.heads"]
    if not torch.isnan(heads).all():
        flat = torch.nan_to_num(heads, nan=-float("inf"))
        li, hi = divmod(int(flat.argmax()), heads.shape[1])
        lines.append(f"  head sweep ({result.head_scope}): largest drop {float(heads[li, hi]):.3f} at layer "
                     f"{result.layers[li]} head {hi}")
    if result.object_words:
        lines.append("  object words lost: " + ", ".join(f"{k} {v:.0%}" for k, v in result.object_words.items()))
    blind = _caption_of(result, "blind", 0)
    if blind:
        lines.append(f"  e.g. {result.image_names[0]}: {result.reference[0]!r} -> blind {blind!r}")
    return lines


def _caption_of(result: AblationResult, name: str, i: int) -> str | None:
    for j, v in enumerate(result.variants):
        if v["name"] == name:
            return result.captions[j][i]
    return None
