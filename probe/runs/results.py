"""Frozen result dataclasses: JSON-able fields plus named tensors stored beside them.

Every result has a `kind` and a `schema_version`; `to_dict()` gives its JSON part, `arrays` its
tensors (saved to ``arrays.safetensors`` by the store), and `result_from_dict` rebuilds it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from probe.types import VISION_PATTERN, InputMeta

_TYPES: dict[str, type[Result]] = {}


@dataclass(frozen=True)
class Result:
    """Base of every result. Subclasses set `kind` and `schema_version` and add fields."""

    kind: ClassVar[str] = "result"
    schema_version: ClassVar[int] = 1
    #: arrays that use NaN for "not computed" (every other array must be finite to be saved)
    nan_padded: ClassVar[tuple[str, ...]] = ()
    arrays: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.kind in _TYPES and _TYPES[cls.kind] is not cls:
            raise ValueError(f"result kind {cls.kind!r} is defined twice")
        _TYPES[cls.kind] = cls

    def input_meta(self) -> InputMeta:
        """The `InputMeta` of a result that stores one in its ``meta`` field."""
        return InputMeta.from_dict(self.meta)  # type: ignore[attr-defined]

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "arrays"}
        return {"kind": self.kind, "schema_version": self.schema_version, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any], arrays: dict[str, torch.Tensor]) -> Result:
        version = d.get("schema_version")
        if version != cls.schema_version:
            raise ValueError(
                f"{cls.kind} result has schema version {version}; this probe reads {cls.schema_version}"
            )
        names = {f.name for f in dataclasses.fields(cls)} - {"arrays"}
        return cls(arrays=arrays, **{k: v for k, v in d.items() if k in names})


def result_from_dict(d: dict[str, Any], arrays: dict[str, torch.Tensor]) -> Result:
    kind = d.get("kind")
    if kind not in _TYPES:
        raise ValueError(f"unknown result kind {kind!r}; known: {', '.join(sorted(_TYPES))}")
    return _TYPES[kind].from_dict(d, arrays)


@dataclass(frozen=True)
class AttentionResult(Result):
    """Attention patterns of a vision encoder over a batch of images.

    Fields:
        model: registered model name.
        image_names: one name per image (batch,).
        meta: `InputMeta.to_dict()` of the inputs (token spans, patch grid).
        layers: block indices captured.
        reduce_heads: how heads were fused when captured (``mean``/``max``/``min``) or None.
        rows: query rows kept (None: all rows).
        approximate: True when patterns are effective matrices of an approximate attention.
        predictions: top predicted label per image, when the model classifies.
    Arrays:
        ``vision.blocks.{i}.attn.pattern``: (batch, heads or 1, rows, tokens) float32.
        ``input.image``: (batch, H, W, 3) uint8, the images as the model saw them.
    """

    kind: ClassVar[str] = "attention"
    schema_version: ClassVar[int] = 1
    model: str = ""
    image_names: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    layers: list[int] = field(default_factory=list)
    reduce_heads: str | None = None
    rows: list[int] | None = None
    approximate: bool = False
    predictions: list[str] | None = None

    def __post_init__(self) -> None:
        b = len(self.image_names)
        for i in self.layers:
            p = self.arrays.get(VISION_PATTERN.format(i=i))
            if p is None:
                raise ValueError(f"attention result lacks the pattern of layer {i}")
            if p.dim() != 4 or p.shape[0] != b:
                raise ValueError(f"layer {i} pattern must be (batch={b}, heads, rows, tokens); got {tuple(p.shape)}")
        img = self.arrays.get("input.image")
        if img is not None and (img.dim() != 4 or img.shape[0] != b or img.shape[-1] != 3):
            raise ValueError(f"input.image must be (batch={b}, H, W, 3); got {tuple(img.shape)}")

    def pattern(self, layer: int) -> torch.Tensor:
        return self.arrays[VISION_PATTERN.format(i=layer)]

    def query_map(self, layer: int, query: str | int = "cls") -> torch.Tensor:
        """Head-mean attention of one query over the image span, on the patch grid: (batch, rows, cols).

        `query` is a span name (its first token) or a token position.
        """
        meta = self.input_meta()
        if meta.grid is None or "image" not in meta.spans:
            raise ValueError("this result has no image span on a patch grid")
        q = meta.spans[query][0] if isinstance(query, str) else query
        if self.rows is not None:
            if q not in self.rows:
                raise ValueError(f"query row {q} was not captured (rows kept: {self.rows})")
            q = self.rows.index(q)
        lo, hi = meta.spans["image"]
        p = self.pattern(layer).float().mean(dim=1)[:, q, lo:hi]
        return p.reshape(p.shape[0], *meta.grid)


@dataclass(frozen=True)
class FlowResult(Result):
    """Text->image attention of every generated caption token (see `probe.analyses.flow`).

    Fields:
        model: registered model name.
        image_names: one per image (images,).
        meta: `InputMeta.to_dict()`: spans of the flow pattern's keys (``image``, ``cls``, and
            ``text`` for joint attention), patch grid, image size, ``flow_hook``.
        layers: text block indices.
        tokens: per image, the generated tokens up to and including the end token (steps_i,).
        captions: per image, the decoded caption.
        fusion: the family's fusion kind; joint: True when rows come from a joint self-attention.
        top_patches: per image and token, the top patch indices (row-major on the grid) of the
            layer-mean patch attention.
    Arrays:
        ``flow.rows``: (images, layers, steps, keys) head-mean attention row of each step.
        ``flow.image_mass``, ``flow.cls_mass``: (images, steps, layers) mass on patches / on CLS.
        ``flow.text_mass``: (images, steps, layers), joint attention only.
        ``input.image``: (images, H, W, 3) uint8.
    """

    kind: ClassVar[str] = "flow"
    schema_version: ClassVar[int] = 1
    model: str = ""
    image_names: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    layers: list[int] = field(default_factory=list)
    tokens: list[list[str]] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    fusion: str = ""
    joint: bool = False
    top_patches: list[list[list[int]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        b = len(self.image_names)
        rows = self.arrays.get("flow.rows")
        if rows is None or rows.dim() != 4 or rows.shape[0] != b or rows.shape[1] != len(self.layers):
            shape = None if rows is None else tuple(rows.shape)
            raise ValueError(f"flow.rows must be (images={b}, layers={len(self.layers)}, steps, keys); got {shape}")
        if len(self.tokens) != b or len(self.captions) != b:
            raise ValueError("one token list and one caption per image")
        if any(len(t) > rows.shape[2] for t in self.tokens):
            raise ValueError("more tokens than captured steps")

    def patch_maps(self, image: int, layer: int | None = None) -> torch.Tensor:
        """Head-mean attention of each generated token on the patches, on the grid:
        (steps_i, rows, cols); mean over layers, or one `layer`."""
        meta = self.input_meta()
        if meta.grid is None:
            raise ValueError("this result has no patch grid")
        lo, hi = meta.spans["image"]
        rows = self.arrays["flow.rows"][image, :, : len(self.tokens[image]), lo:hi].float()
        m = rows.mean(0) if layer is None else rows[self.layers.index(layer)]
        return m.reshape(m.shape[0], *meta.grid)


@dataclass(frozen=True)
class AblationResult(Result):
    """Ablation variants x images (see `probe.analyses.ablation`).

    Fields:
        variants: per variant ``{name, kind, layer, head, removed_tokens}``; ``none`` first.
        reference / reference_tokens: per image, the unablated greedy caption (and its tokens).
        captions: (variants, images) greedy caption under each variant ("" when not generated).
        changed: (variants, images) reference token positions that changed.
        accuracy: per variant name ``{"exact", "objects"}`` against `truth` (probe-shapes), or None.
        object_words: per object / object-random variant, the fraction of named objects whose
            colour+shape words the ablation removed from the caption, or None.
        layers: text layers swept; head_scope: what a head ablation zeroes.
    Arrays:
        ``ablation.logprob``: (variants, images) mean log-prob per token of the reference caption.
        ``ablation.drop``: (variants, images) logprob of ``none`` minus logprob.
        ``ablation.heads``: (layers, heads) image-mean drop per head (NaN where not run).
        ``ablation.removed``: (variants, images, image tokens) bool, the [CLS, patches] tokens each
        variant removed (all False for layer and head variants); ``input.image``: (images, H, W, 3)
        uint8 (runs saved before these existed lack both).
    """

    kind: ClassVar[str] = "ablation"
    schema_version: ClassVar[int] = 1
    nan_padded: ClassVar[tuple[str, ...]] = ("ablation.heads",)
    model: str = ""
    image_names: list[str] = field(default_factory=list)
    variants: list[dict[str, Any]] = field(default_factory=list)
    reference: list[str] = field(default_factory=list)
    reference_tokens: list[list[str]] = field(default_factory=list)
    captions: list[list[str]] = field(default_factory=list)
    changed: list[list[list[int]]] = field(default_factory=list)
    accuracy: dict[str, dict[str, float]] | None = None
    object_words: dict[str, float] | None = None
    layers: list[int] = field(default_factory=list)
    head_scope: str = ""
    fusion: str = ""
    truth: list[str] | None = None
    batched: bool = True

    def __post_init__(self) -> None:
        lp = self.arrays.get("ablation.logprob")
        if lp is None or tuple(lp.shape) != (len(self.variants), len(self.image_names)):
            raise ValueError(f"ablation.logprob must be (variants={len(self.variants)}, "
                             f"images={len(self.image_names)}); got {None if lp is None else tuple(lp.shape)}")


@dataclass(frozen=True)
class CAParamsResult(Result):
    """Per family: parameter and FLOP counts per group (see `probe.analyses.ca_params`)."""

    kind: ClassVar[str] = "ca-params"
    schema_version: ClassVar[int] = 1
    models: dict[str, Any] = field(default_factory=dict)
    full_size: bool = False
    text_tokens: int = 20
