"""Attributions through captum's own classes: integrated gradients, occlusion, feature ablation and
GradientSHAP, each as an `analyses.explain` method returning (b, S, patches) maps.

Nothing here re-implements an attribution algorithm: every method hands captum's core classes a
teacher-forced forward function (captum's ``LLMAttribution`` takes no ``pixel_values`` and rejects
IG, see ANCHORS). What each function scores, per (image, step) target:

- captioners: ``token_logprobs(px, ids, mask)[i, k]``, the teacher-forced log-probability of the
  token caption step ``k`` produced (raw logits, never post-processed generation scores);
- classifiers: the logit of the target class.

References followed:

- integrated gradients: Sundararajan, Taly & Yan 2017, "Axiomatic Attribution for Deep Networks"
  (eq. 1, completeness Prop. 1), as captum's ``LayerIntegratedGradients`` at the patch embedding.
- occlusion: Zeiler & Fergus 2014, "Visualizing and Understanding Convolutional Networks" (sec. 4.2),
  as captum's ``Occlusion`` with one window per patch.
- feature ablation: captum's ``FeatureAblation`` with a feature mask (one id per patch, or per object).
- GradientSHAP: Lundberg & Lee 2017, "A Unified Approach to Interpreting Model Predictions" (expected
  gradients over a baseline distribution), as captum's ``LayerGradientShap``.

The layer the gradient methods attribute to is the vision tower's patch embedding, the convolution
with kernel = stride = ``adapter.patch_size`` over the 3 input channels (`patch_embedding`); its
output holds exactly the patch tokens, before CLS and positions are added. With a black-image
baseline this equals attributing at the embedding output ``[CLS, patches] + positions``: CLS and
the positions are the same for input and baseline, so their ``x - x'`` and thus their share is
exactly 0, and the gradient of a sum is that of its summand.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from probe.adapter import Captioner, Classifier
from probe.analyses.explain import (
    METHODS,
    Method,
    Target,
    check_target,
    patch_span,
    register_method,
    with_caption_length,
)
from probe.analyses.grounding import remove_patches
from probe.analysis import Analysis, ParamError, param
from probe.capture import intervene
from probe.data import ImageSet, images_to_uint8
from probe.registry import register_analysis
from probe.runs.results import Result
from probe.types import InputMeta, ProbeError
from probe.viz.figures import short, token_maps


def _captum() -> Any:
    """``captum.attr``, imported on first use: it imports ``matplotlib.pyplot`` (its visualisation
    module), which ``import probe`` must not."""
    import captum.attr

    return captum.attr


IG = "integrated-gradients"
OCCLUSION = "occlusion"
ABLATION = "feature-ablation"
GRADIENT_SHAP = "gradient-shap"
#: the array of feature ablation with object masks (ImageSet masks, or `feature_ablation(objects=...)`)
OBJECTS = "feature-ablation.objects"
MAX_IMAGES = 8
#: median |delta| / |f_in - f_base| above which the summary says to raise ``n_steps``
REL_DELTA_HINT = 0.05
MAX_TOKENS = 12


class IGAttribution(NamedTuple):
    """Integrated gradients with their completeness check, per (image, step) target.

    maps: (b, S, patches), the attributions summed over the embedding dimension per patch.
    delta: (b, S) captum's convergence delta, ``sum(attributions) - (f_in - f_base)``.
    f_in, f_base: (b, S) the target's score at the input and at the baseline.
    Entries of targets not asked for are 0.
    """

    maps: torch.Tensor
    delta: torch.Tensor
    f_in: torch.Tensor
    f_base: torch.Tensor


# ------------------------------------------------------------------------------ shared pieces
def patch_embedding(adapter: Any) -> nn.Module:
    """The vision tower's patch embedding: the one ``Conv2d`` over 3 channels with kernel = stride =
    ``adapter.patch_size`` (every ViT family has one; its output is (b, dim, rows, cols)).

    Raises:
        ProbeError: none or several such convolutions (the message says which).
    """
    try:
        p = int(adapter.patch_size)
    except NotImplementedError:
        raise ProbeError(f"{adapter.name} has no patch size: attribution maps live on a ViT patch grid") from None
    hits = [(name, m) for name, m in adapter.model.named_modules()
            if isinstance(m, nn.Conv2d) and m.in_channels == 3 and tuple(m.kernel_size) == (p, p)
            and tuple(m.stride) == (p, p)]
    if len(hits) != 1:
        found = ", ".join(n for n, _ in hits) or "none"
        raise ProbeError(f"{adapter.name}: expected one patch embedding (Conv2d 3->dim, kernel = stride = {p}); "
                         f"found {found}")
    return hits[0][1]


def _require_task(adapter: Any, target: Target) -> None:
    if not isinstance(adapter, Captioner | Classifier):
        raise ProbeError(f"{adapter.name} neither captions nor classifies images: attribution explains a "
                         "caption token's log-prob or a class logit")
    check_target(adapter, target)
    if isinstance(adapter, Classifier):
        assert target.labels is not None
        n = len(adapter.labels)
        if target.labels.dim() != 1 or len(target.labels) != target.batch or not bool(
                ((target.labels >= 0) & (target.labels < n)).all()):
            raise ValueError(f"target labels {target.labels.tolist()}: give one class index per image, 0 to {n - 1}")


def _score_fn(adapter: Any) -> Callable[..., torch.Tensor]:
    """The forward captum differentiates/perturbs: captioners ``f(px, ids, mask) -> (n, S)``
    teacher-forced log-probs, classifiers ``f(px) -> (n, classes)`` logits."""
    if isinstance(adapter, Captioner):
        def caption_logprobs(px: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return adapter.token_logprobs(px, ids, mask)
        return caption_logprobs

    def class_logits(px: torch.Tensor) -> torch.Tensor:
        return adapter.forward({"pixel_values": px}).float()
    return class_logits


@contextmanager
def frozen_eval(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode and no parameter requiring gradients (the methods differentiate
    activations only, so no parameter gradient is stored); both restored on exit, module by
    module (a family may keep a frozen part in eval mode while the rest trains)."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        for m, t in modes:
            m.training = t


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """captum's GradientSHAP draws from numpy's and torch's global generators: seed both, restore after."""
    state = np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(state)


def gradient_refusal(adapter: Any) -> str | None:
    """Why gradients cannot flow from the patch embedding to the model's output (a forward run under
    ``no_grad`` inside the model, or no patch embedding), or None. Costs one forward of one image."""
    if not isinstance(adapter, Captioner | Classifier):
        return f"{adapter.name} neither captions nor classifies images"
    try:
        layer = patch_embedding(adapter)
    except ProbeError as e:
        return str(e)
    seen: list[torch.Tensor] = []

    def leaf(_m: nn.Module, _i: Any, out: torch.Tensor) -> torch.Tensor:
        seen.append(out.detach().requires_grad_(True))
        return seen[-1]

    with frozen_eval(adapter.model), torch.enable_grad():
        handle = layer.register_forward_hook(leaf)
        try:
            out = adapter.forward({"pixel_values": black_image(adapter)})
        finally:
            handle.remove()
        grad = None
        if seen and out.requires_grad:
            (grad,) = torch.autograd.grad(out.float().sum(), seen[0], allow_unused=True)
    if grad is None:
        return (f"{adapter.name}'s output does not depend differentiably on its patch embedding (its forward "
                "cuts the gradient, e.g. a frozen tower run under no_grad); use occlusion or feature-ablation")
    return None


def black_image(adapter: Any) -> torch.Tensor:
    """A black image as the adapter preprocesses it: (1, 3, H, W) on its device, in its dtype."""
    return _plain_image(adapter, (0, 0, 0))


def _plain_image(adapter: Any, rgb: tuple[int, int, int]) -> torch.Tensor:
    s = int(adapter.image_size)
    return adapter.preprocess([Image.new("RGB", (s, s), rgb)])["pixel_values"]


def _rows(target: Target) -> torch.Tensor:
    """(R, 2) the (image, step) pairs to explain, image-major."""
    return target.step_mask().nonzero()


def _row_inputs(adapter: Any, target: Target, rows: torch.Tensor) -> tuple[torch.Tensor, tuple | None, list[int]]:
    """Pixels, extra forward args and captum targets of the expanded batch: one row per pair."""
    dev = target.pixel_values.device
    img = rows[:, 0].to(dev)
    px = target.pixel_values[img]
    if isinstance(adapter, Captioner):
        assert target.ids is not None
        mask = target.mask if target.mask is not None else torch.ones_like(target.ids)
        return px, (target.ids[img.to(target.ids.device)], mask[img.to(mask.device)]), rows[:, 1].tolist()
    assert target.labels is not None
    return px, None, target.labels[rows[:, 0].to(target.labels.device)].tolist()


def _chunks(n: int, size: int, desc: str) -> Iterator[slice]:
    starts = range(0, n, size)
    for s in tqdm(starts, desc=desc, disable=len(starts) < 2):
        yield slice(s, min(s + size, n))


def _layer_to_patches(attr: torch.Tensor, adapter: Any) -> torch.Tensor:
    """Layer attributions -> (r, patches): summed over the embedding dimension at each patch token.
    Conv output (r, dim, rows, cols); or tokens (r, patches, dim) / (r, [CLS, patches], dim)."""
    n = adapter.grid[0] * adapter.grid[1]
    if attr.dim() == 4 and tuple(attr.shape[2:]) == tuple(adapter.grid):
        return attr.float().sum(1).flatten(1)
    if attr.dim() == 3 and attr.shape[1] in (n, adapter.n_image_tokens):
        lo, hi = (0, n) if attr.shape[1] == n else patch_span(adapter)
        return attr[:, lo:hi].float().sum(-1)
    raise ProbeError(f"{adapter.name}: patch embedding output {tuple(attr.shape)} is not on the {adapter.grid} grid")


def _pixels_to_patches(attr: torch.Tensor, adapter: Any) -> torch.Tensor:
    """Pixel attributions (m, 3, H, W) -> (m, patches): the mean over each patch's pixels (for
    one-window-per-patch occlusion or a patch mask, the one value its pixels share)."""
    (r, c), p = adapter.grid, int(adapter.patch_size)
    a = attr[..., : r * p, : c * p].float()
    return a.reshape(a.shape[0], a.shape[1], r, p, c, p).mean((1, 3, 5)).flatten(1)


def _empty(target: Target, adapter: Any) -> torch.Tensor:
    return torch.zeros(target.batch, target.n_steps, adapter.grid[0] * adapter.grid[1])


# ------------------------------------------------------------------------------ gradient methods
def integrated_gradients(adapter: Any, target: Target, *, n_steps: int = 64, internal_batch_size: int = 64,
                         batch_size: int = 8, method: str = "gausslegendre") -> IGAttribution:
    """Integrated gradients (Sundararajan et al. 2017) at the patch embedding, by captum's
    ``LayerIntegratedGradients``, from the embedding of a black image.

    Why a black image and not a zero embedding: a zero patch embedding is a token no image produces
    (it drops the conv bias), and zeroing the whole embedding output would also remove CLS and the
    positions, whose share would then be mixed into the map; the black image is an image the model
    can see, and it leaves CLS and positions untouched. The known cost: black pixels of the input
    get no attribution (``x - x' = 0``); `gradient_shap` averages over other baselines.

    Each (image, step) pair of ``target.step_mask()`` becomes one row of an expanded batch with its
    own captum target (the step, or the class); `batch_size` rows go to captum at a time and
    `internal_batch_size` bounds the rows (rows x integration points) of one forward.

    Returns:
        `IGAttribution`: maps (b, S, patches) = attributions summed over the embedding dimension at
        each patch; completeness per target: ``delta = sum(maps) - (f_in - f_base)`` is captum's
        convergence delta (it shrinks with `n_steps`).
    """
    _require_task(adapter, target)
    if (why := gradient_refusal(adapter)) is not None:
        raise ProbeError(why)
    layer = patch_embedding(adapter)
    f = _score_fn(adapter)
    maps = _empty(target, adapter)
    delta, f_in, f_base = (torch.zeros(target.batch, target.n_steps) for _ in range(3))
    rows = _rows(target)
    step = max(1, min(batch_size, internal_batch_size))
    with frozen_eval(adapter.model):
        lig = _captum().LayerIntegratedGradients(f, layer)
        black = black_image(adapter)
        for sl in _chunks(len(rows), step, f"integrated gradients {adapter.name}"):
            r = rows[sl]
            px, args, tgt = _row_inputs(adapter, target, r)
            base = black.expand_as(px)
            attr, d = lig.attribute(px, baselines=base, target=tgt, additional_forward_args=args, n_steps=n_steps,
                                    method=method, internal_batch_size=internal_batch_size,
                                    return_convergence_delta=True)
            i, k = r[:, 0], r[:, 1]
            maps[i, k] = _layer_to_patches(attr.detach(), adapter).cpu()
            delta[i, k] = d.detach().float().cpu()
            with torch.no_grad():
                pick = torch.arange(len(tgt), device=px.device), torch.as_tensor(tgt, device=px.device)
                f_in[i, k] = f(px, *(args or ()))[pick].float().cpu()
                f_base[i, k] = f(base, *(args or ()))[pick].float().cpu()
    return IGAttribution(maps, delta, f_in, f_base)


def gradient_shap(adapter: Any, target: Target, *, n_samples: int = 16, internal_batch_size: int = 64,
                  seed: int = 0) -> torch.Tensor:
    """GradientSHAP (Lundberg & Lee 2017) at the patch embedding, by captum's ``LayerGradientShap``:
    the expected gradient x (input - baseline) over `n_samples` draws of a baseline from {black,
    white, the normaliser's mean colour} and a point on the path. (b, S, patches).

    Why this one: it is IG with the baseline averaged out. IG from a black image is blind to black
    pixels, and the choice of one baseline is arbitrary; GradientSHAP's expectation over several
    plain images shows how much a map owes to that choice. Completeness holds only in expectation,
    so no delta is reported. Draws are seeded by `seed` (global RNG states are restored).
    """
    _require_task(adapter, target)
    if (why := gradient_refusal(adapter)) is not None:
        raise ProbeError(why)
    f = _score_fn(adapter)
    maps = _empty(target, adapter)
    rows = _rows(target)
    with frozen_eval(adapter.model), _seeded(seed, target.pixel_values.device):
        lgs = _captum().LayerGradientShap(f, patch_embedding(adapter))
        black = black_image(adapter)
        dist = torch.cat([black, _plain_image(adapter, (255, 255, 255)), torch.zeros_like(black)])
        for sl in _chunks(len(rows), max(1, internal_batch_size // n_samples), f"gradient shap {adapter.name}"):
            r = rows[sl]
            px, args, tgt = _row_inputs(adapter, target, r)
            attr = lgs.attribute(px, baselines=dist, n_samples=n_samples, stdevs=0.0, target=tgt,
                                 additional_forward_args=args)
            maps[r[:, 0], r[:, 1]] = _layer_to_patches(attr.detach(), adapter).cpu()
    return maps


# ------------------------------------------------------------------------------ perturbation methods
def _per_image(adapter: Any, target: Target, attribute: Callable[[Callable, torch.Tensor, int], torch.Tensor],
               desc: str) -> torch.Tensor:
    """Run a perturbation method image by image with a forward that returns every asked-for step of
    that image, (n, m): captum then gives one map per output column, (m, 3, H, W), so each perturbed
    image is scored once for all its steps instead of once per step. captum's ablation code handles
    outputs of shape (batch, *) (its non-aggregate mode) though its docs speak of one scalar per
    example; one image per call keeps a per-image feature mask valid (the tests check the values
    against a patch removed by hand)."""
    _require_task(adapter, target)
    f = _score_fn(adapter)
    maps = _empty(target, adapter)
    want = target.step_mask()
    with frozen_eval(adapter.model):
        for i in tqdm(range(target.batch), desc=desc, disable=target.batch < 2):
            steps = want[i].nonzero()[:, 0]
            if not len(steps):
                continue
            if isinstance(adapter, Captioner):
                assert target.ids is not None
                ids = target.ids[i : i + 1]
                mask = target.mask[i : i + 1] if target.mask is not None else torch.ones_like(ids)
                cols = steps.to(ids.device)

                def score(px: torch.Tensor, ids: torch.Tensor = ids, mask: torch.Tensor = mask,
                          cols: torch.Tensor = cols) -> torch.Tensor:
                    n = px.shape[0]
                    return f(px, ids.expand(n, -1), mask.expand(n, -1))[:, cols]
            else:
                assert target.labels is not None
                label = int(target.labels[i])

                def score(px: torch.Tensor, label: int = label) -> torch.Tensor:
                    return f(px)[:, label : label + 1]
            attr = attribute(score, target.pixel_values[i : i + 1], i)
            maps[i, steps.cpu()] = _pixels_to_patches(attr.detach(), adapter).cpu()
    return maps


def occlusion(adapter: Any, target: Target, *, perturbations_per_eval: int = 16) -> torch.Tensor:
    """Occlusion (Zeiler & Fergus 2014) by captum's ``Occlusion`` on ``pixel_values``: the window is
    one patch (3, p, p) and the stride p, so each window is exactly one patch; (b, S, patches), entry
    = ``f(x) - f(x with that patch set to 0)``.

    The baseline 0 is 0 *after* normalisation: each channel at the normaliser's mean, i.e. the mean
    colour in pixel terms (mid-grey for mean 0.5, the ImageNet mean colour for CLIP-style
    processors), not black.
    """
    p = int(adapter.patch_size)
    occ_window = (3, p, p)

    def attribute(score: Callable, px: torch.Tensor, _i: int) -> torch.Tensor:
        return _captum().Occlusion(score).attribute(px, sliding_window_shapes=occ_window, strides=occ_window, baselines=0,
                                          perturbations_per_eval=perturbations_per_eval)

    return _per_image(adapter, target, attribute, f"occlusion {adapter.name}")


def patch_mask(adapter: Any, height: int, width: int) -> torch.Tensor:
    """(H, W) long: each pixel's patch id, row-major on ``adapter.grid``; pixels right of or below
    the grid (when the side is not a multiple of the patch) get the extra id ``patches``."""
    (r, c), p = adapter.grid, int(adapter.patch_size)
    y, x = torch.arange(height)[:, None] // p, torch.arange(width)[None, :] // p
    ids = y * c + x
    return torch.where((y < r) & (x < c), ids, torch.full_like(ids, r * c))


def object_labels(masks: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per image, bool object masks (objects, H, W) -> a label map (H, W): 0 background, ``k + 1``
    where object ``k`` is visible (a later object drawn over an earlier one wins, as drawn)."""
    out = []
    for m in masks:
        m = np.asarray(m, dtype=bool)
        lab = np.zeros(m.shape[1:], dtype=np.int64)
        for k in range(m.shape[0]):
            lab[m[k]] = k + 1
        out.append(lab)
    return out


def feature_ablation(adapter: Any, target: Target, *, objects: torch.Tensor | Sequence[Any] | None = None,
                     perturbations_per_eval: int = 16) -> torch.Tensor:
    """Feature ablation by captum's ``FeatureAblation`` on ``pixel_values`` (baseline 0 after
    normalisation, as `occlusion`); (b, S, patches).

    objects: None ablates each patch on its own (a patch feature mask: the same thing as `occlusion`
        with patch windows, through another class). Otherwise a label map per image, (b, H, W) or a
        list of (H, W), any integer ids (0 background included: every id is a segment, ablated
        whole). Maps are resized to the model's input with nearest-neighbour sampling, which assumes
        preprocessing resizes the whole image (no crop; square images are safe). Back to patches by
        coverage: a patch gets the mean over its pixels of their segment's effect, i.e. the
        coverage-weighted mean of the effects of removing the segments it overlaps.
    """
    h, w = target.pixel_values.shape[-2:]
    dev = target.pixel_values.device
    if objects is None:
        shared = patch_mask(adapter, h, w)[None, None].to(dev)
        masks = None
    else:
        if len(objects) != target.batch:
            raise ValueError(f"give one object label map per image: {target.batch} images, {len(objects)} maps")
        masks = [_label_mask(o, h, w).to(dev) for o in objects]

    def attribute(score: Callable, px: torch.Tensor, i: int) -> torch.Tensor:
        fm = shared if masks is None else masks[i]
        return _captum().FeatureAblation(score).attribute(px, baselines=0, feature_mask=fm,
                                                perturbations_per_eval=perturbations_per_eval)

    return _per_image(adapter, target, attribute, f"feature ablation {adapter.name}")


def _label_mask(labels: Any, h: int, w: int) -> torch.Tensor:
    """A label map (H', W') -> captum feature mask (1, 1, h, w) with contiguous ids 0..n-1."""
    lab = torch.as_tensor(np.asarray(labels)).long()
    if lab.dim() != 2:
        raise ValueError(f"an object label map is (H, W) integer ids; got shape {tuple(lab.shape)}")
    if tuple(lab.shape) != (h, w):
        lab = torch.nn.functional.interpolate(lab[None, None].float(), size=(h, w), mode="nearest-exact")[0, 0].long()
    return torch.unique(lab, return_inverse=True)[1][None, None]


# ------------------------------------------------------------------------------ registration
def _token_game(adapter: Any, target: Target, attribute: Callable[[Callable], Any], **kwargs: Any) -> torch.Tensor:
    """Run a captum perturbation class on the patch-token game: the input is a (pairs, P) keep mask
    of ones, baseline 0, each patch its own feature; the forward removes the patches whose keep is
    0 through the family's real token removal (`probe.analyses.grounding.remove_patches`: the text
    of a captioner reads nothing of them; a classifier's tokens never attend to them) and returns
    each pair's target. No pixel is changed, so nothing out of distribution enters the model."""
    _require_task(adapter, target)
    rows = _rows(target)
    if not len(rows):
        return _empty(target, adapter)
    px, extra, targets = _row_inputs(adapter, target, rows)
    lo, hi = patch_span(adapter)
    keep = torch.ones(len(rows), hi - lo, device=px.device)
    score = _score_fn(adapter)
    steps = torch.as_tensor(targets, device=px.device)

    def forward(k: torch.Tensor, pixels: torch.Tensor, *args: Any) -> torch.Tensor:
        n = k.shape[0]
        idx = torch.arange(n, device=k.device) % len(rows)
        with intervene(adapter, remove_patches(adapter, (k < 0.5).cpu())):
            out = score(pixels, *args)
        return out[torch.arange(n, device=out.device), steps[idx]]

    with torch.no_grad():
        attr = attribute(forward).attribute(keep, baselines=0.0, additional_forward_args=(px, *(extra or ())),
                                            **kwargs)
    out = _empty(target, adapter)
    out[rows[:, 0], rows[:, 1]] = attr.float().cpu()
    return out


def token_ablation(adapter: Any, target: Target, *, perturbations_per_eval: int = 16) -> torch.Tensor:
    """Patch-token ablation by captum's ``FeatureAblation`` on the token game (`_token_game`): a
    patch's value is ``f(all) - f(all but that patch)``, occlusion in token space. (b, S, patches)."""
    return _token_game(adapter, target, lambda f: _captum().FeatureAblation(f),
                       perturbations_per_eval=perturbations_per_eval)


def token_shapley(adapter: Any, target: Target, *, n_samples: int = 8, perturbations_per_eval: int = 32,
                  seed: int = 0) -> torch.Tensor:
    """Shapley values of the patch tokens (Shapley 1953; permutation sampling of Castro et al. 2009)
    by captum's ``ShapleyValueSampling`` on the token game (`_token_game`): each patch's mean
    marginal contribution over `n_samples` random orders of adding patches to an empty image. Unlike
    single-patch ablation, patches that are redundant with each other (the pieces of one object)
    share the credit instead of each getting almost none; the values sum to ``f(all) - f(none)``.
    (b, S, patches)."""
    with _seeded(seed, target.pixel_values.device):
        return _token_game(adapter, target, lambda f: _captum().ShapleyValueSampling(f), n_samples=n_samples,
                           perturbations_per_eval=perturbations_per_eval)


def _ig_maps(adapter: Any, target: Target) -> torch.Tensor:
    return integrated_gradients(adapter, target).maps


register_method(Method(IG, _ig_maps, "Sundararajan et al. 2017 (integrated gradients, eq. 1), captum "
                       "LayerIntegratedGradients at the patch embedding from a black image; maps sum the "
                       "embedding dimension per patch", gradients=True, applies=gradient_refusal))
register_method(Method(OCCLUSION, occlusion, "Zeiler & Fergus 2014 (occlusion, sec. 4.2), captum Occlusion with "
                       "one window per patch: f(x) - f(x with the patch at the normaliser's mean)"))
register_method(Method(ABLATION, feature_ablation, "captum FeatureAblation with a patch feature mask: "
                       "f(x) - f(x with the patch at the normaliser's mean)"))
register_method(Method("token-ablation", token_ablation, "captum FeatureAblation over patch tokens removed for "
                       "real (mask_image_tokens): f(all) - f(all but the patch)"))
register_method(Method("token-shapley", token_shapley, "Shapley values of the patch tokens (removed for real), "
                       "captum ShapleyValueSampling (Castro et al. 2009 permutation sampling)"))
register_method(Method(GRADIENT_SHAP, gradient_shap, "Lundberg & Lee 2017 (GradientSHAP), captum "
                       "LayerGradientShap at the patch embedding over black, white and mean-colour baselines",
                       gradients=True, applies=gradient_refusal))


# ------------------------------------------------------------------------------ the result
@dataclass(frozen=True)
class AttributionResult(Result):
    """Attribution maps of several methods over the same targets (see the module docstring).

    Fields:
        model, image_names: registered model name; one name per image.
        meta: ``grid``, ``image_size`` and the spans of ``[CLS, patches]`` (`InputMeta.to_dict`).
        methods: the methods run, in order; references: the reference of each.
        captioner: True for captioners. tokens: per image, the generated tokens up to and including
            the end token (classifiers: the target class name); captions: per image, the caption
            (classifiers: the class name). labels: classifiers, the target class index per image.
        n_steps: IG integration points; baseline: what IG starts from.
        objects: True when object-mask feature ablation ran (``attribution.feature-ablation.objects``).
    Arrays:
        ``attribution.<method>``: (images, S, patches) float32, row-major on ``meta["grid"]``; S =
            caption steps (classifiers 1); steps past a caption's end are 0.
        ``attribution.integrated-gradients.delta`` / ``.f_in`` / ``.f_base``: (images, S) completeness.
        ``input.image``: (images, H, W, 3) uint8.
    """

    kind: ClassVar[str] = "attribution"
    schema_version: ClassVar[int] = 1
    model: str = ""
    image_names: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    methods: list[str] = field(default_factory=list)
    references: dict[str, str] = field(default_factory=dict)
    captioner: bool = False
    tokens: list[list[str]] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    labels: list[int] | None = None
    n_steps: int = 0
    baseline: str = ""
    objects: bool = False

    def __post_init__(self) -> None:
        b = len(self.image_names)
        grid = self.meta.get("grid")
        n = grid[0] * grid[1] if grid else None
        for name, a in self.arrays.items():
            if name.startswith("attribution.") and a.dim() == 3 and (a.shape[0] != b or a.shape[2] != n):
                raise ValueError(f"{name} must be (images={b}, steps, patches={n}); got {tuple(a.shape)}")

    def maps(self, method: str) -> torch.Tensor:
        """(images, S, patches) of one method (or ``feature-ablation.objects``)."""
        key = f"attribution.{method}"
        if key not in self.arrays:
            raise KeyError(f"no maps of {method!r}; this result has {', '.join(self.methods)}")
        return self.arrays[key]

    def token_maps(self, method: str, image: int) -> torch.Tensor:
        """(steps of the image, rows, cols): one map per token (classifiers: one)."""
        m = self.maps(method)[image, : len(self.tokens[image])]
        return m.reshape(m.shape[0], *self.meta["grid"])

    def completeness(self) -> dict[str, float] | None:
        """IG completeness over the targets explained: median |delta|, median and max of
        |delta| / |f_in - f_base| (targets with f_in == f_base left out of the ratio)."""
        d = self.arrays.get(f"attribution.{IG}.delta")
        if d is None:
            return None
        gap = (self.arrays[f"attribution.{IG}.f_in"] - self.arrays[f"attribution.{IG}.f_base"]).abs()
        asked = self.maps(IG).abs().sum(-1) > 0
        if not bool(asked.any()):
            return None
        ratio = d.abs()[asked & (gap > 0)] / gap[asked & (gap > 0)]
        return {"targets": int(asked.sum()), "median_abs_delta": float(d.abs()[asked].median()),
                "median_rel": float(ratio.median()) if ratio.numel() else math.nan,
                "max_rel": float(ratio.max()) if ratio.numel() else math.nan,
                "median_gap": float(gap[asked].median())}


# ------------------------------------------------------------------------------ the analysis
def _split(methods: str) -> list[str]:
    return list(dict.fromkeys(m.strip() for m in methods.split(",") if m.strip()))


@register_analysis
class Attribution(Analysis):
    """captum attributions (IG, occlusion, feature ablation, GradientSHAP ...) of each caption token
    or of the predicted class, as patch maps."""

    name = "attribution"
    summary = ("captum attributions per caption token or class: integrated gradients (with completeness), "
               "occlusion, feature ablation, GradientSHAP, on the patch grid")

    @dataclass(frozen=True)
    class Params:
        methods: str = param(f"{IG},{OCCLUSION}", "comma-separated attribution methods (see probe.analyses."
                                                  "explain.METHODS)")
        n_steps: int = param(64, "integrated gradients: integration points (Gauss-Legendre); raise it when the "
                                      "summary reports a large completeness gap", min=2)
        internal_batch_size: int = param(64, "gradient methods: most rows (targets x points) per forward", min=1)
        batch_size: int = param(8, "images per caption call; (image, step) targets per captum call", min=1)
        perturbations_per_eval: int = param(16, "occlusion / feature ablation: perturbed images per forward",
                                            min=1)
        n_samples: int = param(16, "gradient-shap: samples per target", min=1)
        shap_seed: int = param(0, "gradient-shap: seed of its baseline and path draws", min=0)
        max_new_tokens: int | None = param(None, "caption tokens to generate, captioners only (default: the "
                                                 "model's)", min=1)

        def __post_init__(self) -> None:
            if not isinstance(self.methods, str):
                return  # validate() names the type
            names = _split(self.methods)
            unknown = [m for m in names if m not in METHODS]
            if unknown or not names:
                what = f"unknown {', '.join(map(repr, unknown))}" if unknown else "no method given"
                raise ParamError(f"--methods {self.methods!r}: {what}; known: {', '.join(sorted(METHODS))}")

        @property
        def method_names(self) -> list[str]:
            return _split(self.methods)

    def resolve(self, adapter: Any, params: Params) -> Params:
        if not isinstance(adapter, Captioner | Classifier):
            raise ProbeError(f"{self.name} explains a caption token's log-prob or a class logit; {adapter.name} "
                             "neither captions nor classifies images on a patch grid")
        for m in params.method_names:
            why = METHODS[m].refusal(adapter)
            if why:
                raise ProbeError(f"--methods {m}: {why}")
        return with_caption_length(adapter, params)

    def run(self, adapter: Any, inputs: ImageSet, params: Params) -> AttributionResult:
        """Greedy captions (captioners) or the predicted class (classifiers) as targets, every real
        step explained; returns an `AttributionResult`."""
        names = params.method_names
        captioner = isinstance(adapter, Captioner)
        images = inputs.images
        labels_map = object_labels(inputs.masks) if inputs.masks is not None and ABLATION in names else None
        parts: dict[str, list[torch.Tensor]] = {}
        tokens: list[list[str]] = []
        captions: list[str] = []
        labels: list[int] = []
        for start in range(0, len(images), params.batch_size):
            chunk = slice(start, start + params.batch_size)
            px = adapter.preprocess(images[chunk])["pixel_values"]
            if captioner:
                caps = adapter.caption_pixels(px, params.max_new_tokens)
                ids, mask = adapter.teacher_ids(caps["ids"], caps["tokens"])
                target = Target(px, ids=ids, mask=mask)
                tokens += caps["tokens"]
                captions += caps["text"]
            else:
                with torch.no_grad():
                    pred = adapter.forward({"pixel_values": px}).argmax(-1)
                target = Target(px, labels=pred)
                labels += pred.tolist()
                tokens += [[adapter.labels[j]] for j in pred.tolist()]
                captions += [adapter.labels[j] for j in pred.tolist()]
            for key, value in self._explain(adapter, target, names, params,
                                            labels_map[chunk] if labels_map is not None else None).items():
                parts.setdefault(key, []).append(value)
        steps = max(p.shape[1] for v in parts.values() for p in v)

        def pad(t: torch.Tensor) -> torch.Tensor:  # (b, S_chunk, ...) -> (b, S, ...)
            extra = [0, 0] * (t.dim() - 2)
            return torch.nn.functional.pad(t, [*extra, 0, steps - t.shape[1]])

        arrays = {f"attribution.{k}": torch.cat([pad(t) for t in v]).float() for k, v in parts.items()}
        s = adapter.image_size
        arrays["input.image"] = images_to_uint8(images, s)
        meta = InputMeta(spans={"cls": (0, 1), "image": patch_span(adapter)}, grid=adapter.grid,
                         image_size=(s, s)).to_dict()
        return AttributionResult(
            arrays=arrays, model=adapter.name, image_names=inputs.names, meta=meta, methods=names,
            references={m: METHODS[m].reference for m in names}, captioner=captioner, tokens=tokens,
            captions=captions, labels=None if captioner else labels, n_steps=params.n_steps,
            baseline="black image (as preprocessed)" if IG in names else "", objects=labels_map is not None)

    @staticmethod
    def _explain(adapter: Any, target: Target, names: list[str], params: Params,
                 objects: list[np.ndarray] | None) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for m in names:
            if m == IG:
                ig = integrated_gradients(adapter, target, n_steps=params.n_steps,
                                          internal_batch_size=params.internal_batch_size,
                                          batch_size=params.batch_size)
                out.update({IG: ig.maps, f"{IG}.delta": ig.delta, f"{IG}.f_in": ig.f_in,
                            f"{IG}.f_base": ig.f_base})
            elif m == OCCLUSION:
                out[m] = occlusion(adapter, target, perturbations_per_eval=params.perturbations_per_eval)
            elif m == ABLATION:
                out[m] = feature_ablation(adapter, target, perturbations_per_eval=params.perturbations_per_eval)
                if objects is not None:
                    out[OBJECTS] = feature_ablation(adapter, target, objects=objects,
                                                    perturbations_per_eval=params.perturbations_per_eval)
            elif m == GRADIENT_SHAP:
                out[m] = gradient_shap(adapter, target, n_samples=params.n_samples,
                                       internal_batch_size=params.internal_batch_size, seed=params.shap_seed)
            else:  # another module's method, with its own defaults
                out[m] = METHODS[m].fn(adapter, target).float().cpu()
        return out

    def render(self, result: AttributionResult) -> dict[str, Figure]:
        """One figure per method: each token's (or the class's) map over the image, positive part."""
        figs = {}
        shown = [*result.methods, *([OBJECTS] if result.objects else [])]
        for m in shown:
            what = "each generated token's" if result.captioner else "the predicted class's"
            title = (f"{result.model}: {m}, {what} map (positive part; one colour scale per image; "
                     f"number = map sum)")
            figs[f"attribution_{m.replace('-', '_').replace('.', '_')}"] = token_maps(
                result.arrays["input.image"], result.image_names, result.captions, result.tokens,
                lambda r, m=m: result.token_maps(m, r),
                lambda r, s, m=m: float(result.maps(m)[r, s].sum()), title, MAX_IMAGES, MAX_TOKENS)
        return figs

    def summary_lines(self, result: AttributionResult) -> list[str]:
        what = "caption tokens" if result.captioner else "predicted classes"
        lines = [f"{len(result.image_names)} images, {what} explained by {', '.join(result.methods)}"]
        c = result.completeness()
        if c is not None:
            lines.append(f"  {IG} completeness over {c['targets']} targets ({result.n_steps} steps from a "
                         f"{result.baseline}): median |delta| {c['median_abs_delta']:.3g}, median |delta| / "
                         f"|f_in - f_base| {c['median_rel']:.3g} (max {c['max_rel']:.3g}; median |f_in - f_base| "
                         f"{c['median_gap']:.3g})")
            if c["median_rel"] > REL_DELTA_HINT:
                lines.append(f"  the integral is not converged (|delta| above {REL_DELTA_HINT:.0%} of the output change): "
                             f"raise --n-steps (now {result.n_steps})")
        g = result.meta["grid"]
        for i, name in enumerate(result.image_names):
            lines.append(f"  {name}: {short(result.captions[i], 60)!r}")
            for m in result.methods:
                total = result.maps(m)[i].sum(0)
                top = "/".join(f"({p // g[1]},{p % g[1]})" for p in total.topk(min(3, total.numel())).indices.tolist())
                lines.append(f"    {m}: top patches {top} (summed over steps)")
        return lines
