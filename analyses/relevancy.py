"""Gradient-weighted attention: Chefer et al.'s generic relevancy and gradient rollout.

**Relevancy** follows Chefer, Gur & Wolf, "Generic Attention-model Explainability for Interpreting
Bi-Modal and Encoder-Decoder Transformers" (ICCV 2021):

- per attention layer ``Ā = E_h[(∇A ⊙ A)^+]`` (eq. 5), with ``∇A = ∂y/∂A`` for one target ``y``,
  averaged over the heads of each batch element separately (the reference folds the batch into
  the heads and is right only at batch size 1);
- ``R^{ii} = I``, ``R^{tt} = I``, ``R^{ti} = 0``; self-attention over image tokens
  ``R^{ii} += Ā R^{ii}`` (eq. 6); over text tokens ``R^{tt} += Ā R^{tt}`` and ``R^{ti} += Ā R^{ti}``
  (eqs. 6, 7); cross-attention text->image ``R^{ti} += (R̄^{tt})^T Ā^{ti} R̄^{ii}`` (eq. 10) with
  ``R̄ = normalise(R - I) + I`` (eqs. 8, 9: rows divided by their sums, a zero row stays zero);
- encoder-decoder captioners (a separate text->image attention): every vision block, then per
  text block its self-attention rules, then eq. 10. MMCA's text->text and text->image parts are
  one layer's two softmaxes; they are applied in that order. MMCA also carries its image stream
  through each fusion layer (``text.blocks.{i}.vattn.pattern``): eq. 6 on ``R^{ii}`` after the
  layer's eq. 10, since the text read the stream as it entered the layer;
- one joint stack over ``[image; text]`` (GIT, the prefix VLM): ``R += Ā R`` over the joint
  sequence (Chefer's self-attention rule); the target token's row, restricted to the image span,
  is then composed with the vision tower's normalised self-relevancy, ``row · R̄^{ii}``, so that
  the map is over the input patches (ours: the paper stops at the joint stack's input tokens);
- classifiers (Chefer's ViT case): ``R += Ā R`` over the vision blocks, the CLS row.

Target: for captioners the teacher-forced log-probability of the token produced at each step
(``Captioner.token_logprobs``, from raw logits; the issue's target), or with ``score="logit"`` the
raw logit Chefer et al. differentiate; for classifiers the target class logit. Each target needs
its own gradients: one forward per image, then one vectorised backward per chunk of its tokens
(`pattern_gradients`).

**Gradient rollout** (jacobgil/vit-explain's ``grad_rollout``; REFERENCES.md): rollout's
residual and composition over ``mean_h (A ⊙ ∂y/∂A)^+``, each layer's gradient paired with the same
layer's attention (vit-explain issue #6 pairs them in reverse). For captioners the text->image row
at the step (gradient-weighted, mean over text layers) is composed with it, as `rollout` does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from probe.adapter import Captioner, Classifier
from probe.analyses.explain import (
    Method,
    Target,
    check_head,
    check_target,
    hook_names,
    patch_span,
    register_method,
    with_caption_length,
)
from probe.analyses.rollout import add_residual
from probe.analysis import Analysis, ParamError, param
from probe.capture import capture
from probe.data import ImageSet, images_to_uint8
from probe.registry import register_analysis
from probe.runs.results import Result
from probe.types import (
    TEXT_PATTERN,
    TEXT_VATTN_PATTERN,
    TEXT_XATTN_PATTERN,
    VISION_PATTERN,
    ProbeError,
)
from probe.viz.figures import grid, no_ticks, overlay, short, token_maps

METHODS = ("chefer", "grad-rollout")
VISION_MODES = ("per-token", "shared")
SCORES = ("logprob", "logit")
MAX_IMAGES = 8
MAX_TOKENS = 12


# ------------------------------------------------------------------------------ the rules
def grad_weighted(pattern: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Chefer eq. 5: ``E_h[(∇A ⊙ A)^+]`` per batch element: (b, h, q, k) x2 -> (b, q, k)."""
    return (grad * pattern).clamp(min=0).mean(1)


def normalise(r: torch.Tensor) -> torch.Tensor:
    """Chefer eqs. 8, 9: ``R̄ = (R - I) / rowsum(R - I) + I`` for square (b, n, n) `r`; a row of
    ``R - I`` that sums to 0 stays 0 (never NaN)."""
    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
    d = r - eye
    s = d.sum(-1, keepdim=True)
    return torch.where(s != 0, d / torch.where(s != 0, s, torch.ones_like(s)), torch.zeros_like(d)) + eye


def self_rule(r: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Chefer eqs. 6, 7: ``R += Ā R`` (a: (b, q, q); r: (b, q, m))."""
    return r + a @ r


def cross_rule(r_ti: torch.Tensor, r_tt: torch.Tensor, a_ti: torch.Tensor, r_ii: torch.Tensor) -> torch.Tensor:
    """Chefer eq. 10: ``R^{ti} += (R̄^{tt})^T Ā^{ti} R̄^{ii}``."""
    return r_ti + normalise(r_tt).transpose(-1, -2) @ a_ti @ normalise(r_ii)


def encoder_relevancy(vision: Sequence[torch.Tensor]) -> torch.Tensor:
    """``R^{ii}`` after every vision block: fused (b, n, n) per layer -> (b, n, n)."""
    b, n = vision[0].shape[0], vision[0].shape[-1]
    r = torch.eye(n, dtype=vision[0].dtype).expand(b, n, n).clone()
    for a in vision:
        r = self_rule(r, a)
    return r


def decoder_relevancy(r_ii: torch.Tensor, text_self: Sequence[torch.Tensor],
                      text_cross: Sequence[torch.Tensor],
                      image_self: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """Encoder-decoder rules: per text block self-attention (eqs. 6, 7), then eq. 10.

    Args: r_ii (b, n_i, n_i); text_self (b, T, T) and text_cross (b, T, n_i) per text block;
        image_self (b, n_i, n_i) per text block for decoders that carry their own visual stream
        (MMCA): block l's text reads the visual stream as it entered the block, so eq. 10 uses
        ``R^{ii}`` before the block's own image self-attention, which then updates it (eq. 6)
        for the next block.
    Returns: ``R^{ti}`` (b, T, n_i).
    """
    b, t = text_self[0].shape[0], text_self[0].shape[-1]
    r_tt = torch.eye(t, dtype=r_ii.dtype).expand(b, t, t).clone()
    r_ti = torch.zeros(b, t, r_ii.shape[-1], dtype=r_ii.dtype)
    vv = list(image_self) if image_self is not None else [None] * len(text_self)
    for a_tt, a_ti, a_vv in zip(text_self, text_cross, vv, strict=True):
        r_tt, r_ti = self_rule(r_tt, a_tt), self_rule(r_ti, a_tt)
        r_ti = cross_rule(r_ti, r_tt, a_ti, r_ii)
        if a_vv is not None:
            r_ii = self_rule(r_ii, a_vv)
    return r_ti


def joint_relevancy(joint: Sequence[torch.Tensor]) -> torch.Tensor:
    """Self-attention rule over one joint stack: fused (b, n, n) per layer -> R (b, n, n)."""
    return encoder_relevancy(joint)


def grad_rollout(fused: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rollout (residual, rows renormalised, composed from the first layer up) of gradient-weighted
    fused matrices (b, n, n) per layer -> (b, n, n)."""
    joint: torch.Tensor | None = None
    for a in fused:
        a = add_residual(a)
        joint = a if joint is None else a @ joint
    assert joint is not None
    return joint


# ------------------------------------------------------------------------------ gradients
def _pairs(target: Target) -> list[tuple[int, int]]:
    m = target.step_mask()
    return [(int(i), int(k)) for i, k in m.nonzero().tolist()]


def pattern_gradients(adapter: Any, target: Target, hooks: Sequence[str], chunk: int = 8, *,
                      shared: Sequence[str] = (), score: str = "logprob",
                      ) -> Iterator[tuple[list[tuple[int, int]], dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """Patterns and their gradients for every (image, step) pair of `target`: yields (pairs,
    patterns, grads), each name -> (pairs, heads, q, k) float64 on CPU, `chunk` pairs at a time.

    Captioners: one teacher-forced forward per image; the gradients of its targets come from one
    vectorised backward per chunk (``torch.autograd.grad(..., is_grads_batched=True)`` over one-hot
    cotangents), so the forward is never repeated. Hooks in `shared` get one gradient per image,
    of the sum of its targets, repeated for each pair (one ordinary backward). Classifiers: the
    rows of a replicated batch, one target each; the objective is the sum of the rows' targets, so
    each row's gradient is its own target's. `score`: a caption token's ``logprob`` (its
    teacher-forced log-probability) or raw ``logit``; classifiers always use the class logit.
    """
    check_target(adapter, target)
    pairs = _pairs(target)
    if isinstance(adapter, Classifier):
        yield from _class_gradients(adapter, target, hooks, pairs, chunk)
        return
    assert target.ids is not None
    own = [n for n in hooks if n not in shared]
    for i in sorted({i for i, _ in pairs}):
        steps = [k for j, k in pairs if j == i]
        px = target.pixel_values[i : i + 1].detach().clone().requires_grad_()
        ids = target.ids[i : i + 1]
        mask = None if target.mask is None else target.mask[i : i + 1]
        with torch.enable_grad(), capture(adapter, hooks, grad=True) as cache:
            fn = adapter.token_logprobs if score == "logprob" else adapter.token_logits
            logp = fn(px, ids, mask)[0]
            tensors = {n: cache[n] for n in hooks}
            common: dict[str, torch.Tensor] = {}
            if shared:
                got = torch.autograd.grad(logp[steps].sum(), [tensors[n] for n in shared], retain_graph=True,
                                          allow_unused=True)
                common = {n: _grad_or_zero(g, tensors[n], n) for n, g in zip(shared, got, strict=True)}
            for s0 in range(0, len(steps), chunk):
                part = steps[s0 : s0 + chunk]
                onehot = torch.zeros(len(part), logp.shape[0], dtype=logp.dtype, device=logp.device)
                onehot[torch.arange(len(part)), torch.as_tensor(part)] = 1
                got = torch.autograd.grad(logp, [tensors[n] for n in own], grad_outputs=onehot,
                                          is_grads_batched=True, retain_graph=True, allow_unused=True) if own else ()
                grads = {n: _grad_or_zero(g, tensors[n], n)[:, 0] for n, g in zip(own, got, strict=True)}
                grads.update({n: g.expand(len(part), *g.shape[1:]) for n, g in common.items()})
                pats = {n: t.detach().double().cpu().expand(len(part), *t.shape[1:]) for n, t in tensors.items()}
                yield [(i, k) for k in part], pats, grads


def _grad_or_zero(g: torch.Tensor | None, like: torch.Tensor, name: str = "a pattern") -> torch.Tensor:
    """The gradient on CPU in float64; a pattern the target's gradient never reaches is an error
    (it would silently give a zero map), not a zero."""
    if g is None:
        raise ProbeError(f"{name} is not on the path of the target's gradient (was it captured from a copy, e.g. "
                         "under an intervention?): relevancy cannot weight it")
    return g.detach().double().cpu()


def _class_gradients(adapter: Any, target: Target, hooks: Sequence[str], pairs: list[tuple[int, int]], chunk: int,
                     ) -> Iterator[tuple[list[tuple[int, int]], dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    assert target.labels is not None
    for start in range(0, len(pairs), chunk):
        part = pairs[start : start + chunk]
        rows = torch.tensor([i for i, _ in part])
        px = target.pixel_values[rows.to(target.pixel_values.device)].detach().clone().requires_grad_()
        with torch.enable_grad(), capture(adapter, hooks, grad=True) as cache:
            logits = adapter.forward({"pixel_values": px})
            y = logits.gather(1, target.labels.to(logits.device)[rows, None]).sum()
            names = list(hooks)
            tensors = [cache[n] for n in names]
            grads = torch.autograd.grad(y, tensors, allow_unused=True)
        pats = {n: t.detach().double().cpu() for n, t in zip(names, tensors, strict=True)}
        gs = {n: _grad_or_zero(g, pats[n], n) for n, g in zip(names, grads, strict=True)}
        yield part, pats, gs


# ------------------------------------------------------------------------------ the maps
def _fused(pats: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], names: Sequence[str]) -> list[torch.Tensor]:
    return [grad_weighted(pats[n], grads[n]) for n in names]


def relevancy_maps(adapter: Any, target: Target, *, method: str = "chefer", chunk: int = 8,
                   vision: str = "per-token", score: str = "logprob", progress: bool = False) -> torch.Tensor:
    """Maps (b, S, patches) of `method` (``chefer`` or ``grad-rollout``) per `Target` step; see the
    module docstring for the rules. Steps not asked for are 0.

    `vision`: ``per-token`` (Chefer et al.: each target's own gradients everywhere) or ``shared``
    (captioners: the vision tower's layers are weighted by the gradient of the sum of the image's
    explained log-probabilities, one backward per image; the text layers keep each token's own).
    Shared is the fast approximation: the per-token backward then stops at the text stack.
    `score`: what a caption token's gradient is of: ``logprob`` (the issue's target; competing
    tokens' logits enter through the softmax) or ``logit`` (Chefer et al.'s and REFERENCES.md's)."""
    if score not in SCORES:
        raise ValueError(f"score {score!r}: use one of {', '.join(SCORES)}")
    if method not in METHODS:
        raise ValueError(f"method {method!r}: use one of {', '.join(METHODS)}")
    if vision not in VISION_MODES:
        raise ValueError(f"vision {vision!r}: use one of {', '.join(VISION_MODES)}")
    vision_names = hook_names(adapter, VISION_PATTERN)
    lo, hi = patch_span(adapter)
    n_img = int(adapter.n_image_tokens)
    out = torch.zeros(target.batch, target.n_steps, hi - lo, dtype=torch.float64)
    if isinstance(adapter, Classifier):
        text_self: list[str] = []
        cross: list[str] = []
    else:
        text_self = hook_names(adapter, TEXT_PATTERN)
        cross = [] if adapter.capabilities.joint_attention else hook_names(adapter, TEXT_XATTN_PATTERN)
    # a decoder's visual stream (MMCA): the last layer's update is read by nothing, so not requested
    image_self = [] if isinstance(adapter, Classifier) else hook_names(adapter, TEXT_VATTN_PATTERN)[:-1]
    hooks = vision_names + text_self + cross + image_self
    shared = vision if vision == "shared" and not isinstance(adapter, Classifier) else None
    chunks = pattern_gradients(adapter, target, hooks, chunk, shared=vision_names if shared else (), score=score)
    total = int(target.step_mask().sum())
    for part, pats, grads in tqdm(chunks, total=-(-total // chunk), desc=f"{method} {adapter.name}",
                                  disable=not progress):
        if shared:  # one vision gradient per image: fuse and compose it once, not once per pair
            fv = [f.expand(len(part), *f.shape[1:]) for f in _fused({n: pats[n][:1] for n in vision_names},
                                                                     {n: grads[n][:1] for n in vision_names},
                                                                     vision_names)]
        else:
            fv = _fused(pats, grads, vision_names)
        idx_i = torch.tensor([i for i, _ in part])
        idx_k = torch.tensor([k for _, k in part])
        ar = torch.arange(len(part))
        if isinstance(adapter, Classifier):
            r = encoder_relevancy(fv) if method == "chefer" else grad_rollout(fv)
            out[idx_i, 0] = r[:, 0, lo:hi]
            continue
        t0 = adapter.text_offset()
        if method == "grad-rollout":
            v = grad_rollout([f[:1] for f in fv]).expand(len(part), -1, -1) if shared else grad_rollout(fv)
            flow = text_self if adapter.capabilities.joint_attention else cross
            rows = torch.stack([f[ar, t0 + idx_k, :n_img] for f in _fused(pats, grads, flow)]).mean(0)
            out[idx_i, idx_k] = (rows[:, None] @ v)[:, 0, lo:hi]
            continue
        r_ii = encoder_relevancy([f[:1] for f in fv]).expand(len(part), -1, -1) if shared else encoder_relevancy(fv)
        if adapter.capabilities.joint_attention:
            r = joint_relevancy(_fused(pats, grads, text_self))
            row = r[ar, t0 + idx_k, :n_img]
            out[idx_i, idx_k] = (row[:, None] @ normalise(r_ii))[:, 0, lo:hi]
        else:
            r_ti = decoder_relevancy(r_ii, _fused(pats, grads, text_self), _fused(pats, grads, cross),
                                     [*_fused(pats, grads, image_self), None] if image_self else None)
            out[idx_i, idx_k] = r_ti[ar, idx_k, lo:hi]
    return out.float()


def _not_without_vision(adapter: Any) -> str | None:
    if not hook_names(adapter, VISION_PATTERN):
        return f"{adapter.name} exposes no vision attention patterns; gradient relevancy needs them"
    return None


register_method(Method("relevancy", lambda a, t: relevancy_maps(a, t, method="chefer"),
                       "Chefer, Gur & Wolf ICCV 2021, eqs. 5-10 (generic relevancy)", gradients=True,
                       applies=_not_without_vision))
register_method(Method("grad-rollout", lambda a, t: relevancy_maps(a, t, method="grad-rollout"),
                       "gradient rollout: rollout of mean_h (A * dy/dA)^+ (jacobgil/vit-explain, layers paired)",
                       gradients=True, applies=_not_without_vision))


# ------------------------------------------------------------------------------ the analysis
@dataclass(frozen=True)
class RelevancyResult(Result):
    """Gradient-weighted attention maps per caption token (captioners) or for the class (classifiers).

    Fields: model, image_names, meta (spans, grid, image_size), method, captioner, tokens and
    captions (captioners), labels (classifiers: the explained class per image), top_patches.
    Arrays:
        ``relevancy``: (batch, steps, patches) the map of each step (classifiers: steps = 1);
            steps after a caption's end are 0. Patches row-major on ``meta["grid"]``.
        ``relevancy.target``: (batch, steps) the explained log-probability (captioners) or logit.
        ``input.image``: (batch, H, W, 3) uint8.
    """

    kind: ClassVar[str] = "relevancy"
    schema_version: ClassVar[int] = 1
    model: str = ""
    image_names: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    method: str = "chefer"
    captioner: bool = False
    tokens: list[list[str]] | None = None
    captions: list[str] | None = None
    labels: list[str] | None = None
    top_patches: list[Any] = field(default_factory=list)

    def token_maps(self, image: int) -> torch.Tensor:
        """(steps_i, rows, cols): each caption step's map on the patch grid."""
        n = len(self.tokens[image]) if self.tokens else 1
        return self.arrays["relevancy"][image, :n].reshape(n, *self.meta["grid"])


@register_analysis
class Relevancy(Analysis):
    """Chefer et al.'s relevancy or gradient rollout, per caption token or for the predicted class."""

    name = "relevancy"
    summary = "gradient-weighted attention (Chefer et al. ICCV 2021 relevancy, or gradient rollout) per token"
    requires = (VISION_PATTERN.format(i="*"),)

    @dataclass(frozen=True)
    class Params:
        method: str = param("chefer", "Chefer et al.'s relevancy rules, or gradient rollout", choices=METHODS)
        max_new_tokens: int | None = param(None, "caption tokens to generate, captioners only (default: the "
                                                 "model's)", min=1)
        targets_per_backward: int = param(8, "targets explained by one (vectorised) backward; memory grows with it",
                                          min=1)
        score: str = param("logprob", "a caption token's target: its log-probability or its raw logit",
                           choices=SCORES)
        vision_relevancy: str = param("per-token", "vision layers weighted per token (Chefer et al.) or by the "
                                                   "whole caption's gradient (shared: faster)", choices=VISION_MODES)
        batch_size: int = param(8, "images per caption batch", min=1)

    def resolve(self, adapter: Any, params: Params) -> Params:
        check_head(adapter)
        params = with_caption_length(adapter, params)
        if isinstance(adapter, Captioner):
            return params
        if params.score != "logprob":
            raise ParamError(f"--score {params.score}: {adapter.name} classifies; its target is the class logit")
        if params.vision_relevancy != "per-token":
            raise ParamError(f"--vision-relevancy {params.vision_relevancy}: {adapter.name} has one target per image; "
                             "drop the flag")
        return params

    def run(self, adapter: Any, inputs: ImageSet, params: Params) -> RelevancyResult:
        """Returns a `RelevancyResult` (see its docstring for the arrays)."""
        images = inputs.images
        maps, targets, tokens, captions, labels = [], [], [], [], []
        meta = None
        for start in range(0, len(images), params.batch_size):
            chunk = images[start : start + params.batch_size]
            batch = adapter.preprocess(chunk)
            px = batch["pixel_values"]
            meta = adapter.input_meta(batch)
            if isinstance(adapter, Captioner):
                with torch.no_grad():
                    cap = adapter.caption_pixels(px, params.max_new_tokens)
                ids, mask = adapter.teacher_ids(cap["ids"], cap["tokens"])
                target = Target(px, ids, mask)
                with torch.no_grad():
                    targets.append(adapter.token_logprobs(px, ids, mask).float().cpu())
                tokens += cap["tokens"]
                captions += cap["text"]
            else:
                with torch.no_grad():
                    logits = adapter.forward({"pixel_values": px})
                lab = logits.argmax(-1)
                target = Target(px, labels=lab)
                targets.append(logits.gather(1, lab[:, None]).float().cpu())
                labels += [adapter.labels[int(c)] for c in lab]
            maps.append(relevancy_maps(adapter, target, method=params.method, chunk=params.targets_per_backward,
                                       vision=params.vision_relevancy, score=params.score, progress=True))
        assert meta is not None
        steps = max(m.shape[1] for m in maps)
        pad = [torch.nn.functional.pad(m, (0, 0, 0, steps - m.shape[1])) for m in maps]
        tpad = [torch.nn.functional.pad(t, (0, steps - t.shape[1])) for t in targets]
        rel = torch.cat(pad)
        top = [[m.topk(min(5, m.numel())).indices.tolist() for m in rel[i, : (len(tokens[i]) if tokens else 1)]]
               for i in range(rel.shape[0])]
        cap_mode = isinstance(adapter, Captioner)
        return RelevancyResult(
            arrays={"relevancy": rel, "relevancy.target": torch.cat(tpad),
                    "input.image": images_to_uint8(images, meta.image_size or (224, 224))},
            model=adapter.name, image_names=inputs.names,
            meta={"spans": {"image": [0, rel.shape[-1]]}, "grid": list(adapter.grid),
                  "image_size": list(meta.image_size or ())},
            method=params.method, captioner=cap_mode, tokens=tokens or None, captions=captions or None,
            labels=labels or None, top_patches=top)

    def render(self, result: RelevancyResult) -> dict[str, Figure]:
        what = "relevancy (Chefer et al. 2021)" if result.method == "chefer" else "gradient rollout"
        if result.captioner:
            assert result.tokens is not None and result.captions is not None
            return {"relevancy_tokens": token_maps(
                result.arrays["input.image"], result.image_names, result.captions, result.tokens,
                result.token_maps, lambda r, s: float(result.arrays["relevancy"][r, s].sum()),
                f"{result.model}: each generated token's {what} over the input patches", MAX_IMAGES, MAX_TOKENS)}
        n = min(len(result.image_names), MAX_IMAGES)
        fig, axes = grid(n, 2, (4.0, 2.0 * n + 0.4))
        for r in range(n):
            img = result.arrays["input.image"][r].numpy()
            axes[r][0].imshow(img)
            axes[r][0].set_title(short(result.image_names[r]), fontsize=7)
            m = result.token_maps(r)[0]
            overlay(axes[r][1], img, m.numpy(), vmin=0.0, vmax=float(m.max()) or 1.0)
            axes[r][1].set_title(f"class {result.labels[r] if result.labels else '?'}", fontsize=7)
        no_ticks(axes)
        fig.suptitle(f"{result.model}: {what} of the predicted class", fontsize=8)
        fig.tight_layout()
        return {"relevancy_class": fig}

    def summary_lines(self, result: RelevancyResult) -> list[str]:
        g = result.meta["grid"]
        lines = [f"{len(result.image_names)} images, method {result.method}; per token: top patch (row,col)"]
        for i, name in enumerate(result.image_names):
            tops = [f"({t[0] // g[1]},{t[0] % g[1]})" if t else "-" for t in result.top_patches[i]]
            if result.captioner:
                assert result.tokens is not None and result.captions is not None
                lines.append(f"  {name}: {result.captions[i]!r}")
                lines.append("    " + "  ".join(f"{tok}@{tp}" for tok, tp in zip(result.tokens[i], tops, strict=False)))
            else:
                lines.append(f"  {name}: class {result.labels[i] if result.labels else '?'} @ {tops[0]}")
        return lines
