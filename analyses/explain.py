"""The contract every attribution method follows, so that faithfulness scores them alike.

A method maps a `Target` to patch maps (b, S, patches): for captioners one map per caption step
(``S = T - 1``, step ``k`` produced ``ids[:, k + 1]``; steps not asked for, or past a caption's end,
are 0), for classifiers one map (``S = 1``) for the target class. Patches are the image tokens
without CLS, row-major on the adapter's grid (``adapter.grid``). Maps are not normalised: each
method says what its values mean.

Methods register themselves in `METHODS` (`register_method`) from their own modules; this module
holds the contract and the plain-attention baseline (`attention_maps`) the others must beat.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from probe.adapter import Captioner, Classifier
from probe.analysis import ParamError
from probe.capture import capture
from probe.types import ProbeError, layer_of, select


@dataclass(frozen=True)
class Target:
    """What to explain, teacher-forced.

    Attributes:
        pixel_values: (b, 3, H, W) preprocessed images.
        ids, mask: captioners: (b, T) ``[start] + caption tokens`` (right-padded) and its mask;
            the target of step ``k`` is the log-probability of ``ids[:, k + 1]``.
        labels: classifiers: (b,) the class whose logit is the target.
        steps: per image, the caption steps to explain (None: every real step). Methods that
            cost per target compute only these.
    """

    pixel_values: torch.Tensor
    ids: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    steps: Sequence[Sequence[int]] | None = None

    @property
    def batch(self) -> int:
        return int(self.pixel_values.shape[0])

    @property
    def n_steps(self) -> int:
        """S: T - 1 for captioners, 1 for classifiers."""
        return 1 if self.ids is None else int(self.ids.shape[1]) - 1

    def step_mask(self) -> torch.Tensor:
        """Bool (b, S): the (image, step) pairs to explain."""
        b, s = self.batch, self.n_steps
        if self.ids is None:
            return torch.ones(b, 1, dtype=torch.bool)
        real = (torch.ones(b, s + 1, dtype=torch.bool) if self.mask is None else self.mask.bool().cpu())[:, 1:]
        if self.steps is None:
            return real
        out = torch.zeros(b, s, dtype=torch.bool)
        for i, st in enumerate(self.steps):
            for k in st:
                if not 0 <= k < s:
                    raise ValueError(f"step {k} of image {i} is outside its caption's {s} steps")
                out[i, k] = True
        return out & real


def with_caption_length(adapter: Any, params: Any) -> Any:
    """`params` with ``max_new_tokens`` resolved: the captioner's default when unset; refused in
    one line on a model that does not caption (`probe.analysis.Analysis.resolve` of every analysis
    with that flag)."""
    if isinstance(adapter, Captioner):
        return dataclasses.replace(params, max_new_tokens=params.max_new_tokens or adapter.max_new_tokens)
    if params.max_new_tokens is not None:
        raise ParamError(f"--max-new-tokens: {adapter.name} does not caption; drop the flag")
    return params


def check_head(adapter: Any) -> None:
    """Refuse a classifier without a classification head (e.g. ``hf-vit`` loaded as a bare
    ``ViTModel``): there is no class logit to explain."""
    if isinstance(adapter, Classifier) and not adapter.labels:
        raise ProbeError(f"{adapter.name} has no classification head (its forward returns features, no class "
                         "logits): load a checkpoint with a head (e.g. a ViTForImageClassification folder)")


def check_target(adapter: Any, target: Target) -> None:
    """Refuse a target that does not fit the adapter's task or whose shapes disagree."""
    b = target.batch
    if target.pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must be (batch, 3, H, W); got {tuple(target.pixel_values.shape)}")
    if isinstance(adapter, Captioner):
        if target.ids is None:
            raise ValueError(f"{adapter.name} captions: the target needs caption ids (and their mask)")
        if target.ids.dim() != 2 or target.ids.shape[0] != b or target.ids.shape[1] < 2:
            raise ValueError(f"ids must be (batch={b}, T >= 2) [start, tokens...]; got {tuple(target.ids.shape)}")
        if target.mask is not None and target.mask.shape != target.ids.shape:
            raise ValueError(f"mask {tuple(target.mask.shape)} must match ids {tuple(target.ids.shape)}")
        if target.labels is not None:
            raise ValueError(f"{adapter.name} captions: give caption ids, not class labels")
    if isinstance(adapter, Classifier):
        check_head(adapter)
        if target.labels is None:
            raise ValueError(f"{adapter.name} classifies: the target needs class labels")
        n = len(adapter.labels)
        lab = target.labels
        if lab.dim() != 1 or len(lab) != b or lab.is_floating_point() or not bool(((lab >= 0) & (lab < n)).all()):
            raise ValueError(f"labels {lab.tolist()}: give one class index per image (batch {b}), 0 to {n - 1}")
    if target.steps is not None and len(target.steps) != b:
        raise ValueError(f"steps: give one list of steps per image ({b}); got {len(target.steps)}")


Explainer = Callable[[Any, Target], torch.Tensor]


@dataclass(frozen=True)
class Method:
    """A registered attribution method.

    Attributes:
        name: what ``--methods`` calls it. fn: the `Explainer`.
        gradients: True when it backpropagates (the model must let gradients reach its input).
        applies: ``applies(adapter) -> None | reason`` (a one-line refusal, before any work).
        reference: the paper and equation it follows.
    """

    name: str
    fn: Explainer
    reference: str
    gradients: bool = False
    applies: Callable[[Any], str | None] | None = None

    def refusal(self, adapter: Any) -> str | None:
        return self.applies(adapter) if self.applies is not None else None


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"attribution method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


def patch_span(adapter: Any) -> tuple[int, int]:
    """The patch tokens among the image tokens ``[CLS, patches]``: (1, n_image_tokens)."""
    return 1, int(adapter.n_image_tokens)


def hook_names(adapter: Any, template: str) -> list[str]:
    """The adapter's hooks of a name template (``{i}`` = block), in layer order; [] when it has none."""
    try:
        specs = select(adapter.hook_specs(), template.format(i="*"))
    except KeyError:
        return []
    return [s.name for s in sorted(specs, key=lambda s: layer_of(s.name))]


def flow_layers(adapter: Captioner) -> list[str]:
    """Names of the flow pattern (the text->image attention) per text layer, in layer order."""
    return hook_names(adapter, adapter.flow_hook)


def text_rows(adapter: Captioner, pattern: torch.Tensor, n_steps: int) -> torch.Tensor:
    """Rows of a teacher-forced flow pattern (b, h, queries, keys) that produced caption steps
    ``0 .. n_steps - 1``: (b, h, n_steps, keys). Text queries start at `text_offset`."""
    t0 = adapter.text_offset()
    return pattern[:, :, t0 : t0 + n_steps]


def attention_maps(adapter: Any, target: Target) -> torch.Tensor:
    """Plain attention, the baseline: the text->image row at each step's query, mean over heads
    and text layers, restricted to the patches (b, S, patches). Classifiers: the last layer's
    CLS row, head mean."""
    check_target(adapter, target)
    lo, hi = patch_span(adapter)
    if isinstance(adapter, Classifier):
        name = select(adapter.hook_specs(), "vision.blocks.*.attn.pattern")
        last = max(name, key=lambda s: layer_of(s.name)).name
        with torch.no_grad(), capture(adapter, last, rows=[0]) as cache:
            adapter.forward({"pixel_values": target.pixel_values})
        return cache[last][:, :, 0, lo:hi].mean(1)[:, None].float().cpu()
    names = flow_layers(adapter)
    s = target.n_steps
    with torch.no_grad(), capture(adapter, names, reduce="mean") as cache:
        adapter.forward({"pixel_values": target.pixel_values, "input_ids": target.ids,
                         "attention_mask": target.mask})
    rows = torch.stack([text_rows(adapter, cache[n], s)[:, 0, :, lo:hi] for n in names]).mean(0)
    return (rows * target.step_mask()[..., None]).float().cpu()


register_method(Method("attention", attention_maps,
                       "raw attention: text->image row at the word's step, mean over heads and text layers"))
