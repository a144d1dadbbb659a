"""Scores of the faithfulness benchmark: does a map point at the object its word names, and does
removing what it ranks first change the prediction? Pure functions, so that every attribution
method (`analyses.explain`) is scored alike.

Maps are (..., P) over the patches, row-major on ``adapter.grid``, CLS excluded (the
`analyses.explain` contract); object coverage is (..., P) from `patch_coverage`. On probe-shapes,
``ImageSet.masks[i][k]`` is the mask of ``ImageSet.samples[i].objects[k]``, and objects are in
reading order, which is the order an exact caption names them (`probe.data.shapes.caption_for`):
the k-th object phrase of an exact caption is mask k.

References followed:

- pointing game: Zhang et al. 2016 ("Top-down neural attention by excitation backprop"), as in
  Quantus' ``PointingGame`` without its bugs (empty masks counted as hits, ties at the maximum
  counted as hits): here an empty mask is refused and a tie is a miss unless every tied patch is
  inside. Zhang's 15-pixel tolerance becomes patch granularity: a patch is inside when any pixel
  of the object falls in it.
- energy-based pointing game: Wang et al. 2020 (Score-CAM, sec. 5.1.2), with exact masks and
  each patch's mass weighted by the fraction of it the object covers.
- deletion / insertion: Petsiuk et al. 2018 (RISE, sec. 4.1), on patches.
- cascading randomisation: Adebayo et al. 2018 ("Sanity checks for saliency maps", sec. 3).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from probe.adapter import Captioner, Classifier
from probe.analyses.ablation import vision_once, vision_outputs
from probe.analyses.explain import patch_span
from probe.capture import Intervention, MaskTokens, intervene
from probe.types import VISION_PATTERN, select

log = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor | Sequence[float]
ScoreFn = Callable[[torch.Tensor], torch.Tensor]
Mode = Literal["deletion", "insertion"]


def _array(x: ArrayLike, what: str) -> np.ndarray:
    a = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"{what} holds NaN or infinite values; score finite maps only")
    return a


def _pair(maps: ArrayLike, coverage: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    m, c = _array(maps, "maps"), _array(coverage, "coverage")
    if m.ndim == 0 or c.ndim == 0 or m.shape[-1] != c.shape[-1]:
        raise ValueError(f"maps {m.shape} and coverage {c.shape} must share their last (patch) axis")
    if (c < 0).any() or (c > 1).any():
        raise ValueError("coverage is a fraction per patch: values in [0, 1] (see patch_coverage)")
    if (c.sum(-1) == 0).any():
        raise ValueError("an object mask covers no patch: an empty mask cannot be pointed at; drop it")
    return np.broadcast_arrays(m, c)


# ----------------------------------------------------------------------------- geometry
def patch_coverage(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Fraction of each patch's area that `mask` (H, W) bool covers: (rows * cols,) float, row-major.

    Patches tile the image as `analyses.ablation.patches_under` does: patch row i spans
    ``[i H / rows, (i + 1) H / rows)`` in continuous pixel coordinates (columns likewise). When H
    is not a multiple of rows, a pixel straddling a patch boundary counts towards each patch with
    the share of its area inside it, so fractions stay exact and ``coverage > 0`` is exactly
    `patches_under`. Fractions are invariant to resizing the image and mask together.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W); got shape {mask.shape}")
    r, c = grid
    h, w = mask.shape
    ay, ax = _overlap(h, r), _overlap(w, c)  # (rows, H), (cols, W): pixel length inside each patch
    area = ay @ mask.astype(np.float64) @ ax.T
    return (area / ((h / r) * (w / c))).ravel()


def _overlap(n: int, parts: int) -> np.ndarray:
    """(parts, n): length of pixel [p, p + 1) inside part [i n / parts, (i + 1) n / parts)."""
    edges = np.linspace(0, n, parts + 1)
    px = np.arange(n)
    lo = np.maximum(px[None, :], edges[:-1, None])
    hi = np.minimum(px[None, :] + 1, edges[1:, None])
    return np.clip(hi - lo, 0, None)


def object_coverage(masks: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """`patch_coverage` of every object mask (objects, H, W) -> (objects, rows * cols)."""
    return np.stack([patch_coverage(m, grid) for m in np.asarray(masks)])


# ----------------------------------------------------------------------------- pointing and energy
def pointing_game(maps: ArrayLike, coverage: ArrayLike) -> np.ndarray:
    """Pointing game (Zhang et al. 2016): 1.0 where the map's maximum lies in a patch the object
    touches (coverage > 0), else 0.0. maps, coverage: (..., P), broadcast together -> (...,).

    A tie at the maximum is a hit only if every tied patch is inside (a flat map misses unless
    the object touches every patch). Refuses empty masks and NaN maps (ValueError).
    """
    m, c = _pair(maps, coverage)
    top = m == m.max(-1, keepdims=True)
    return (~(top & (c <= 0)).any(-1)).astype(np.float64)


def energy(maps: ArrayLike, coverage: ArrayLike, signed: Literal["refuse", "positive"] = "refuse") -> np.ndarray:
    """Energy-based pointing game (Wang et al. 2020): the share of the map's mass on the object,
    ``sum(m * cov) / sum(m)`` with each patch's mass weighted by its coverage fraction.
    maps, coverage: (..., P), broadcast together -> (...,) in [0, 1].

    Mass must be non-negative: a map with a negative entry is refused unless
    ``signed="positive"``, which scores its positive part (evidence for the target; the negative
    part is dropped, not mirrored). A map with no mass (all zero, or no positive part) has no
    energy to place: it scores NaN, which `nan_mean` leaves out and counts. Refuses empty masks
    and NaN maps.
    """
    m, c = _pair(maps, coverage)
    if signed == "positive":
        m = np.clip(m, 0, None)
    elif signed != "refuse":
        raise ValueError(f"signed={signed!r}: use 'refuse' or 'positive'")
    elif (m < 0).any():
        raise ValueError("energy needs non-negative maps; this one has negative entries (signed='positive' "
                         "scores its positive part)")
    total = m.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (m * c).sum(-1) / total, np.nan)


def nan_mean(values: ArrayLike) -> tuple[float, int]:
    """Mean over the defined (non-NaN) scores and how many there were (NaN mean when none)."""
    v = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    ok = ~np.isnan(v)
    return (float(v[ok].mean()) if ok.any() else float("nan")), int(ok.sum())


def random_pointing(coverage: ArrayLike) -> np.ndarray:
    """Expected pointing game of a map with i.i.d. continuous random values: (..., P) -> (...,).

    Such a map has a unique maximum almost surely, equally likely at each patch, so the expected
    hit rate is the share of patches inside (coverage > 0).
    """
    c = _array(coverage, "coverage")
    if (c.sum(-1) == 0).any():
        raise ValueError("an object mask covers no patch: an empty mask cannot be pointed at; drop it")
    return (c > 0).mean(-1)


def random_energy(coverage: ArrayLike) -> np.ndarray:
    """Expected `energy` of a map with i.i.d. positive random values (e.g. uniform): (..., P) -> (...,).

    Why the mean coverage: with ``S = sum_q m_q``, the shares ``m_p / S`` are exchangeable and sum
    to 1, so ``E[m_p / S] = 1 / P`` for every p, and by linearity
    ``E[sum_p m_p cov_p / S] = sum_p cov_p / P`` = the area fraction of the object (on a grid
    that tiles the image evenly). This holds for any i.i.d. positive distribution, not only the
    uniform one.
    """
    c = _array(coverage, "coverage")
    if (c.sum(-1) == 0).any():
        raise ValueError("an object mask covers no patch: an empty mask cannot be pointed at; drop it")
    return c.mean(-1)


# ----------------------------------------------------------------------------- deletion and insertion
def perturbation_orders(maps: ArrayLike) -> torch.Tensor:
    """Patches most relevant first: maps (N, P) -> long (N, P). Ties: the lower patch index first."""
    m = torch.as_tensor(_array(maps, "maps"))
    if m.dim() != 2:
        raise ValueError(f"maps must be (N, P); got shape {tuple(m.shape)}")
    return torch.argsort(-m, dim=-1, stable=True)


def removal_counts(fractions: ArrayLike, n_patches: int) -> np.ndarray:
    """Patches perturbed at each fraction: ``floor(f * P + 0.5)`` (K,) int (fractions in [0, 1],
    increasing; multiples of 1 / P are exact)."""
    f = _array(fractions, "fractions")
    if f.ndim != 1 or f.size < 2 or (np.diff(f) <= 0).any() or f[0] < 0 or f[-1] > 1:
        raise ValueError(f"fractions must be >= 2 strictly increasing values in [0, 1]; got {f.tolist()}")
    return np.floor(f * n_patches + 0.5).astype(np.int64)


def removal_masks(order: torch.Tensor, fractions: ArrayLike, mode: Mode = "deletion") -> torch.Tensor:
    """Which patches are removed (True) at each fraction: order (N, P) -> bool (N, K, P).

    ``deletion`` removes the first ``n_k`` patches of `order` (most relevant first); ``insertion``
    starts from every patch removed and puts back the first ``n_k``, so it removes all but them.
    ``n_k`` = `removal_counts`.
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode {mode!r}: use deletion or insertion")
    order = torch.as_tensor(order, dtype=torch.long).cpu()
    if order.dim() != 2:
        raise ValueError(f"order must be (N, P); got shape {tuple(order.shape)}")
    n, p = order.shape
    counts = torch.as_tensor(removal_counts(fractions, p))
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(p).expand(n, p))  # patch -> its place in order
    first = rank[:, None, :] < counts[None, :, None]
    return first if mode == "deletion" else ~first


def curve_auc(scores: ArrayLike, fractions: ArrayLike) -> np.ndarray:
    """Trapezoid area under curves (..., K) over `fractions` (K,), divided by the fraction span so
    that the width is 1 (the mean height of the curve): (...,)."""
    s, f = _array(scores, "scores"), _array(fractions, "fractions")
    removal_counts(f, 1)  # validates fractions
    if s.shape[-1] != f.size:
        raise ValueError(f"scores have {s.shape[-1]} points, fractions {f.size}")
    area = ((s[..., 1:] + s[..., :-1]) / 2 * np.diff(f)).sum(-1)
    return area / (f[-1] - f[0])


class PerturbationCurves(NamedTuple):
    """Scores along the fractions: `curve` (N, K) in the map's order; `random` (N, K) the mean
    over `random_runs` (R, N, K), the same perturbation in random orders."""

    curve: torch.Tensor
    random: torch.Tensor
    random_runs: torch.Tensor


def perturbation_curves(score_fn: ScoreFn, maps: ArrayLike, fractions: ArrayLike, mode: Mode = "deletion", *,
                        random_orders: int = 8, generator: torch.Generator | None = None) -> PerturbationCurves:
    """Deletion or insertion curves (Petsiuk et al. 2018) of maps (N, P) and their random-order
    baseline, in one `score_fn` call.

    `score_fn(removed: bool (N, K', P)) -> (N, K')` scores row n (image or caption target n) with
    each of its K' patch sets removed; here ``K' = K (1 + random_orders)``, the map's K first.
    Random orders are drawn from `generator` (None: seeded with 0). Deletion: lower area
    (`curve_auc`) is better; insertion: higher.
    """
    if random_orders < 1:
        raise ValueError(f"random_orders {random_orders}: use 1 or more (the baseline)")
    order = perturbation_orders(maps)
    n, p = order.shape
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    rand = torch.rand(random_orders, n, p, generator=g).argsort(-1)
    own = removal_masks(order, fractions, mode)
    k = own.shape[1]
    others = removal_masks(rand.reshape(-1, p), fractions, mode).reshape(random_orders, n, k, p)
    removed = torch.cat([own, others.permute(1, 0, 2, 3).reshape(n, random_orders * k, p)], 1)
    scores = torch.as_tensor(score_fn(removed)).detach().float().cpu()
    if scores.shape != removed.shape[:2]:
        raise ValueError(f"score_fn returned {tuple(scores.shape)}; expected (N, K') = {tuple(removed.shape[:2])}")
    runs = scores[:, k:].reshape(n, random_orders, k).permute(1, 0, 2)
    return PerturbationCurves(scores[:, :k], runs.mean(0), runs)


# ----------------------------------------------------------------------------- model-facing scorers
VISION_ATTENTION = VISION_PATTERN.format(i="*")


def remove_patches(adapter: Any, removed: torch.Tensor) -> list[Intervention]:
    """Interventions that remove patches, never CLS: removed bool (b, P) over the patches.

    Captioners: ``adapter.mask_image_tokens`` (the text reads nothing of them). Classifiers:
    `MaskTokens` over every ``vision.blocks.*.attn.pattern``, so no token (CLS included) ever
    attends to a removed patch; the head reads CLS only, so the patch's own stream is dead.

    What "removed" means differs by family, as each family's real token removal does: a classifier's
    removed patch token is never attended to by any layer, so its content reaches nothing
    (Nystromformer's landmarks average kept tokens only). A captioner's text reads nothing of the
    removed image tokens (and MMCA's visual stream does not relay them), but inside the vision
    tower, before removal, every patch still mixes into the kept tokens: removal takes tokens away
    from the text, not pixels away from the image. tests/test_grounding.py checks both.
    """
    lo, hi = patch_span(adapter)
    removed = torch.as_tensor(removed, dtype=torch.bool)
    if removed.dim() != 2 or removed.shape[1] != hi - lo:
        raise ValueError(f"removed must be (b, {hi - lo} patches); got {tuple(removed.shape)}")
    tokens = torch.zeros(removed.shape[0], adapter.n_image_tokens, dtype=torch.bool)
    tokens[:, lo:hi] = removed
    if isinstance(adapter, Captioner):
        return adapter.mask_image_tokens(tokens)
    if isinstance(adapter, Classifier):
        if not select(adapter.hook_specs(), VISION_ATTENTION):
            raise ValueError(f"{adapter.name}: no {VISION_ATTENTION} hooks, so its patch tokens cannot be removed")
        return [MaskTokens(tokens, attention=VISION_ATTENTION)]
    raise ValueError(f"{adapter.name} neither captions nor classifies over CLS + patch tokens: nothing to remove")



def _targets(steps: torch.Tensor | Sequence[tuple[int, int]], mask: torch.Tensor) -> torch.Tensor:
    """(N, 2) (image, step) pairs from a bool (b, S) step mask (row-major) or from pairs."""
    if isinstance(steps, torch.Tensor) and steps.dtype == torch.bool:
        pairs = steps.cpu().nonzero()
    else:
        pairs = torch.as_tensor(list(steps), dtype=torch.long).reshape(-1, 2)
    b, t = mask.shape
    for i, k in pairs.tolist():
        if not (0 <= i < b and 0 <= k < t - 1 and mask[i, k + 1]):
            raise ValueError(f"target (image {i}, step {k}) is not a real caption step (ids[{i}, {k + 1}])")
    return pairs


def caption_removal_scorer(adapter: Captioner, pixel_values: torch.Tensor, ids: torch.Tensor,
                           mask: torch.Tensor | None, steps: torch.Tensor | Sequence[tuple[int, int]], *,
                           chunk: int = 64) -> ScoreFn:
    """A `score_fn` for `perturbation_curves` over caption targets.

    pixel_values (b, 3, H, W); ids, mask (b, T) as for ``token_logprobs``; `steps`: the N targets,
    a bool (b, S = T - 1) step mask (``Target.step_mask()``; targets in row-major order, as
    ``maps[step_mask]`` orders the maps) or (image, step) pairs. ``score_fn(removed (N, K, P))``
    returns (N, K): the teacher-forced log-prob of target n's token with its patches removed from
    what the text reads (`remove_patches`; CLS is never removed), ``chunk`` (target, perturbation)
    rows per forward. The vision tower runs once per image (removal only changes what the text
    reads). Use ``exp`` for RISE's probability curves.
    """
    if not isinstance(adapter, Captioner):
        raise ValueError(f"{adapter.name} does not caption; use class_removal_scorer")
    mask = torch.ones_like(ids) if mask is None else mask
    pairs = _targets(steps, mask.cpu())
    ids, mask = ids.to(adapter.device), mask.to(adapter.device)
    vision: list[Any] = []

    def score(removed: torch.Tensor) -> torch.Tensor:
        removed = _check_removed(removed, len(pairs), adapter)
        n, k, p = removed.shape
        rows = pairs.repeat_interleave(k, 0)
        flat = removed.reshape(n * k, p)
        out = torch.empty(n * k)
        if not vision:
            vision.append(vision_outputs(adapter, pixel_values, ids, mask))
        for s in range(0, n * k, chunk):
            img, step = rows[s : s + chunk, 0], rows[s : s + chunk, 1]
            with torch.no_grad(), vision_once(adapter, vision[0], img), \
                    intervene(adapter, remove_patches(adapter, flat[s : s + chunk])):
                lp = adapter.token_logprobs(pixel_values[img], ids[img], mask[img])
            out[s : s + chunk] = lp[torch.arange(len(img), device=lp.device), step.to(lp.device)].float().cpu()
        return out.reshape(n, k)

    return score


def class_removal_scorer(adapter: Classifier, pixel_values: torch.Tensor, labels: torch.Tensor, *,
                         chunk: int = 64) -> ScoreFn:
    """A `score_fn` for `perturbation_curves` over classified images.

    pixel_values (N, 3, H, W), labels (N,). ``score_fn(removed (N, K, P))`` returns (N, K): the
    log-softmax of class ``labels[n]`` with the patches removed from every vision attention
    (`remove_patches`: a removed token receives exactly zero attention; CLS is never removed),
    ``chunk`` rows per forward.
    """
    if not isinstance(adapter, Classifier):
        raise ValueError(f"{adapter.name} does not classify over CLS + patch tokens; use caption_removal_scorer")
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    if labels.shape != (pixel_values.shape[0],):
        raise ValueError(f"labels must be (N={pixel_values.shape[0]},); got {tuple(labels.shape)}")

    def score(removed: torch.Tensor) -> torch.Tensor:
        removed = _check_removed(removed, len(labels), adapter)
        n, k, p = removed.shape
        img = torch.arange(n).repeat_interleave(k)
        flat = removed.reshape(n * k, p)
        out = torch.empty(n * k)
        for s in range(0, n * k, chunk):
            rows = img[s : s + chunk]
            with torch.no_grad(), intervene(adapter, remove_patches(adapter, flat[s : s + chunk])):
                logits = adapter.forward({"pixel_values": pixel_values[rows]})
            if logits.dim() != 2:
                raise ValueError(f"{adapter.name} returns features {tuple(logits.shape)}, not class logits: it has "
                                 "no classification head to score")
            lp = torch.log_softmax(logits.float(), -1)
            out[s : s + chunk] = lp.gather(1, labels[rows, None].to(lp.device))[:, 0].cpu()
        return out.reshape(n, k)

    return score


def _check_removed(removed: torch.Tensor, n: int, adapter: Any) -> torch.Tensor:
    removed = torch.as_tensor(removed)
    p = adapter.grid[0] * adapter.grid[1]
    if removed.dtype != torch.bool or removed.dim() != 3 or removed.shape[0] != n or removed.shape[2] != p:
        raise ValueError(f"removed must be bool (N={n}, K, P={p}); got {removed.dtype} {tuple(removed.shape)}")
    return removed.cpu()


# ----------------------------------------------------------------------------- randomisation
PARTS = {"encoder": "vision", "decoder": "text"}


def part_layers(adapter: Any, part: Literal["encoder", "decoder"]) -> list[str]:
    """Module paths of the part's layers, bottom to top: the encoder is the ``vision`` block stack,
    the decoder the ``text`` one (the blocks of ``param_groups``' text groups; classifiers declare
    no parameter groups, so the block templates are what both families share)."""
    if part not in PARTS:
        raise ValueError(f"part {part!r}: use encoder or decoder")
    paths = [b.path.format(i=i) for b in adapter.blocks() if b.stack == PARTS[part] for i in range(b.depth)]
    if not paths:
        have = [p for p, s in PARTS.items() if any(b.stack == s for b in adapter.blocks())]
        raise ValueError(f"{adapter.name} has no {part} ({PARTS[part]} layers); its parts: {', '.join(have) or 'none'}")
    return paths


@contextmanager
def cascading_randomisation(adapter: Any, part: Literal["encoder", "decoder"], *,
                            seed: int = 0) -> Iterator[Iterator[tuple[int, Any]]]:
    """Cascading randomisation (Adebayo et al. 2018), restored on exit.

    Yields an iterator of ``(layer index, adapter)``: each step re-draws the parameters of one
    more layer of `part` (see `part_layers`), from the top layer down, so step j has the top j + 1
    layers random. Each parameter is re-drawn i.i.d. from a normal with that parameter's own mean
    and standard deviation (seeded by `seed`): the scale the layer was trained at stays, the
    learned structure goes (a parameter with no spread, e.g. a freshly initialised LayerNorm
    gain, has none and keeps its value). Only the layers' parameters change (not the head, embeddings or
    buffers); compare each step's maps with the maps of the unchanged model, computed before.
    Every parameter of the part is restored bit for bit when the block exits, also on exceptions::

        with cascading_randomisation(adapter, "decoder") as steps:
            for layer, randomised in steps:
                maps = method(randomised, target)
    """
    layers = part_layers(adapter, part)
    params: dict[int, torch.nn.Parameter] = {}
    for path in layers:
        for p in adapter.module(path).parameters():
            params.setdefault(id(p), p)
    saved = {k: p.detach().clone() for k, p in params.items()}

    def steps() -> Iterator[tuple[int, Any]]:
        g = torch.Generator().manual_seed(seed)
        for i in reversed(range(len(layers))):
            with torch.no_grad():
                for p in adapter.module(layers[i]).parameters():
                    _redraw(p, g)
            log.debug("%s: %s layer %d randomised", adapter.name, part, i)
            yield i, adapter

    try:
        yield steps()
    finally:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(saved[k])


def _redraw(p: torch.Tensor, g: torch.Generator) -> None:
    x = p.detach().float()
    mean, std = x.mean().cpu(), x.std(unbiased=False).cpu()
    p.copy_((torch.randn(p.shape, generator=g) * std + mean).to(p.device, p.dtype))


def rank_correlation(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Spearman rank correlation along the last axis: (..., P), (..., P) -> (...,).

    Tied values get their average rank; a constant row has no ranking and scores NaN.
    """
    x, y = np.broadcast_arrays(_array(a, "a"), _array(b, "b"))
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx = rx - rx.mean(-1, keepdims=True)
    ry = ry - ry.mean(-1, keepdims=True)
    den = np.sqrt((rx**2).sum(-1) * (ry**2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(-1) / den, np.nan)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks along the last axis, ties sharing their average rank."""
    shape, p = x.shape, x.shape[-1]
    flat = x.reshape(-1, p)
    order = np.argsort(flat, -1, kind="stable")
    sorted_ = np.take_along_axis(flat, order, -1)
    new = np.ones_like(sorted_, dtype=bool)
    new[:, 1:] = sorted_[:, 1:] != sorted_[:, :-1]
    group = np.cumsum(new, -1) - 1 + np.arange(len(flat))[:, None] * p  # tie groups, unique across rows
    pos = np.broadcast_to(np.arange(1, p + 1, dtype=np.float64), flat.shape)
    mean = np.bincount(group.ravel(), pos.ravel()) / np.maximum(np.bincount(group.ravel()), 1)
    ranks = np.empty_like(flat, dtype=np.float64)
    np.put_along_axis(ranks, order, mean[group], -1)
    return ranks.reshape(shape)
