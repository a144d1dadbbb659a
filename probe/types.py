"""Plain types shared by every layer: the hook vocabulary as data, hook specs and block templates,
input metadata, capabilities, weights info. This module imports nothing from the project.

The canonical hook names (`VOCABULARY`) are the one language between adapters and analyses: an
adapter maps its native modules to them, declared once per block template (`Block`, expanded by
`expand`), and an analysis written against them runs on every family.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

HookKind = Literal["output", "input", "pattern"]
Fusion = Literal["none", "cross_attention", "prefix", "multimodal_causal"]

#: parameter groups an adapter can declare (see `ModelAdapter.param_groups`)
PARAM_GROUPS = ("vision", "embeddings", "text_self_attention", "cross_attention", "feed_forward", "fusion", "head")


class ProbeError(Exception):
    """A user-facing error of the project: its message names the problem and the fix."""


# ------------------------------------------------------------------------------ vocabulary
@dataclass(frozen=True)
class HookName:
    """One canonical hook name: its template (``{i}`` = block index), shape and meaning."""

    template: str
    shape: str
    doc: str


VOCABULARY: tuple[HookName, ...] = (
    HookName("vision.blocks.{i}.attn.pattern", "(batch, heads, query, key)",
             "post-softmax attention, or the effective matrix of an approximate kind"),
    HookName("vision.blocks.{i}.attn.z", "(batch, tokens, heads * head_dim)",
             "per-head outputs before the output projection"),
    HookName("vision.blocks.{i}.resid_pre", "(batch, tokens, dim) or (batch, channels, h, w)",
             "the block's input"),
    HookName("vision.blocks.{i}.resid_post", "(batch, tokens, dim) or (batch, channels, h, w)",
             "the block's output"),
    HookName("vision.blocks.{i}.xattn.pattern", "(batch, heads, h*w, text)",
             "image queries attending to text keys (the cross-attention conditioning block)"),
    HookName("vision.output", "(batch, image tokens, dim)",
             "the vision tower's output, as the text side reads it (captioners)"),
    HookName("fusion.proj", "(batch, image tokens, d_model)", "the projection between vision and text"),
    HookName("text.blocks.{i}.attn.pattern", "(batch, heads, text, text)",
             "text self-attention; for prefix models the joint (prefix + text) attention"),
    HookName("text.blocks.{i}.attn.z", "(batch, text, heads * head_dim)", "per-head self-attention outputs"),
    HookName("text.blocks.{i}.xattn.pattern", "(batch, heads, text, image)",
             "text->image attention where it is separate (ViT-GPT2, BLIP, MMCA)"),
    HookName("text.blocks.{i}.xattn.z", "(batch, text, heads * head_dim)", "per-head cross-attention outputs"),
    HookName("text.blocks.{i}.vattn.pattern", "(batch, heads, image, image)",
             "image->image attention of a decoder layer that carries its own visual stream (MMCA)"),
    HookName("text.blocks.{i}.resid_post", "(batch, text, dim)", "the block's output"),
    HookName("text.blocks.{i}.vresid_post", "(batch, image, dim)",
             "the visual stream's output of a decoder layer that carries its own (MMCA)"),
)

_TEMPLATE_RES = [(h, re.compile("^" + re.escape(h.template).replace(r"\{i\}", r"\d+") + "$")) for h in VOCABULARY]
_LAYER_RE = re.compile(r"\.blocks\.(\d+)\.")


def vocabulary_entry(name: str) -> HookName | None:
    """The vocabulary entry a concrete hook name instantiates, or None when it is not canonical."""
    return next((h for h, rx in _TEMPLATE_RES if rx.match(name)), None)


def layer_of(name: str) -> int | None:
    """Block index in a canonical name (``vision.blocks.3.attn.pattern`` -> 3)."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class HookSpec:
    """Where a canonical hook lives in a native model.

    Attributes:
        name: canonical name, e.g. ``vision.blocks.3.attn.pattern``.
        module: dotted path of the native module, relative to the adapter's model.
        kind: ``output`` (forward output), ``input`` (first positional input) or ``pattern``
            (an attention site that emits its pattern lazily, see `probe.capture.sites`).
        shape: the tensor's shape in words (default: the vocabulary's).
        n_heads: number of heads, for hooks whose last dimension concatenates heads.
        approximate: for patterns, True when the stored matrix is the *effective* token-by-token
            matrix of an approximate attention (Linformer, Performer, ...), not a softmax.
        output_index: for modules that return tuples, which element is the tensor. For a
            ``pattern`` hook it marks a module that computes its own probabilities and returns them
            at that index (BLIP, GIT's text stack): a forward hook reads them, no recomputation.
        mask_arg: for such modules, the keyword argument through which the module takes its
            additive attention mask; interventions that remove keys add to it (see `MaskTokens`).
        mask_base: the argument that holds the mask the model passed (default: `mask_arg`). BLIP's
            cross-attention receives its mask as ``attention_mask`` but reads
            ``encoder_attention_mask``, which transformers 5.23 leaves None.
        calls: how many times the module runs per forward (MMCA's ``attn.out_proj`` serves the
            visual stream, then the text stream: 2). A `Patch` needs one call to know which
            activation its source is.
    """

    name: str
    module: str
    kind: HookKind
    shape: str = ""
    n_heads: int | None = None
    approximate: bool = False
    output_index: int | None = None
    mask_arg: str | None = None
    mask_base: str | None = None
    calls: int = 1

    def __post_init__(self) -> None:
        if not self.shape:
            entry = vocabulary_entry(self.name)
            object.__setattr__(self, "shape", entry.shape if entry else "")

    @property
    def layer(self) -> int | None:
        """Block index parsed from the name, or None for hooks outside a block."""
        return layer_of(self.name)


#: a hook of a block template: a `HookSpec` whose name is the part after ``{stack}.blocks.{i}.``
#: (e.g. ``attn.pattern``) and whose module path is relative to the block (``""``: the block itself)
Hook = HookSpec


@dataclass(frozen=True)
class Block:
    """A stack of `depth` identical blocks at ``path`` (``{i}`` = index) with the same hooks."""

    stack: Literal["vision", "text"]
    path: str
    depth: int
    hooks: tuple[Hook, ...]


def expand(blocks: Iterable[Block], extra: Iterable[HookSpec] = ()) -> list[HookSpec]:
    """Block templates -> one `HookSpec` per block and hook (plus `extra` single hooks), in order."""
    specs: list[HookSpec] = []
    for b in blocks:
        for i in range(b.depth):
            base = b.path.format(i=i)
            for h in b.hooks:
                specs.append(replace(h, name=f"{b.stack}.blocks.{i}.{h.name}",
                                     module=f"{base}.{h.module}" if h.module else base))
    specs.extend(extra)
    return specs


def prefixed(blocks: Iterable[Block], prefix: str) -> list[Block]:
    """The same templates with module paths under `prefix` (a sub-model inside a bigger one)."""
    return [replace(b, path=prefix + b.path) for b in blocks]


def select(specs: Sequence[HookSpec], patterns: str | Iterable[str]) -> list[HookSpec]:
    """Specs whose canonical name matches any of the glob `patterns` (``*`` matches dots too).

    Raises:
        KeyError: a pattern matched nothing; the message lists the available names.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    chosen: list[HookSpec] = []
    for pat in patterns:
        hits = [s for s in specs if fnmatch.fnmatchcase(s.name, pat)]
        if not hits:
            names = ", ".join(s.name for s in specs[:12]) + (" ..." if len(specs) > 12 else "")
            raise KeyError(f"no hook matches {pat!r}; this model has: {names}")
        chosen.extend(h for h in hits if h not in chosen)
    return chosen


# ------------------------------------------------------------------------------ model facts
@dataclass(frozen=True)
class Capabilities:
    """What a model family can do, declared by its adapter and read by analyses and the CLI.

    Attributes:
        family: short family name (``vit``, ``hf-vit``, ``captioner`` ...).
        fusion: how image information reaches text: ``none`` (vision only), ``cross_attention``,
            ``prefix`` (image tokens prefix one causal self-attention stack) or ``multimodal_causal``
            (MMCA: text reads text and image through separate softmaxes).
        has_cross_attention: whether text->image attention is a separate cross-attention.
        attention_weights: ``exact`` (softmax probabilities) or ``effective`` (the token-by-token
            matrix of an approximate attention, e.g. ``D^-1 phi(Q) phi(K)^T`` for Performer).
        attention_kind: the attention mechanism (``standard``, ``performer`` ...).
        tasks: what the model's head does (``classify``, ``caption``, ``features``).
        default_for: tasks for which this model is the default of analyses that need that task.
        published: whether a published architecture exists (``weights="meta"`` builds it);
            otherwise ``meta`` builds the family's default size.
    """

    family: str
    fusion: Fusion = "none"
    has_cross_attention: bool = False
    attention_weights: Literal["exact", "effective"] = "exact"
    attention_kind: str = "standard"
    tasks: tuple[str, ...] = ()
    default_for: tuple[str, ...] = ()
    published: bool = False

    @property
    def joint_attention(self) -> bool:
        """Image tokens share one self-attention with the text (prefix models)."""
        return self.fusion == "prefix"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class InputMeta:
    """Metadata of one batch of inputs, the same for every family.

    Attributes:
        spans: half-open token ranges by role, e.g. ``{"cls": (0, 1), "image": (1, 65)}``.
        grid: (rows, cols) of the patch grid of the ``image`` span, or None.
        image_size: (height, width) in pixels of the preprocessed image.
        tokens: per batch element, the token strings (text models), or None.
        approximate: True when captured patterns are effective matrices, not softmax weights.
        flow_hook: for captioners, the name template (``{i}`` = layer) of the pattern whose keys
            hold the image tokens at the `image` and `cls` spans: ``text.blocks.{i}.xattn.pattern``
            for cross-attention, ``text.blocks.{i}.attn.pattern`` for joint attention over
            ``[image; text]`` (GIT, prefix VLM), where the `text` span indexes the same keys.
        joint: True when `flow_hook` is a joint attention over ``[image; text]``.
    """

    spans: dict[str, tuple[int, int]]
    grid: tuple[int, int] | None = None
    image_size: tuple[int, int] | None = None
    tokens: list[list[str]] | None = None
    approximate: bool = False
    flow_hook: str | None = None
    joint: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spans"] = {k: list(v) for k, v in self.spans.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputMeta:
        return cls(
            spans={k: (int(v[0]), int(v[1])) for k, v in d["spans"].items()},
            grid=tuple(d["grid"]) if d.get("grid") else None,
            image_size=tuple(d["image_size"]) if d.get("image_size") else None,
            tokens=d.get("tokens"),
            approximate=bool(d.get("approximate", False)),
            flow_hook=d.get("flow_hook"),
            joint=bool(d.get("joint", False)),
        )


@dataclass(frozen=True)
class Recipe:
    """How a family's bundled probe-shapes checkpoint (the zoo) is made; declared by the family
    when it registers (`probe.registry.register_model`), built by `probe.zoo.train_family`.

    Attributes:
        task: ``classify`` (colour and shape of the largest object) or ``caption``.
        config: the family's model config, as its loader takes it (``load(weights="random",
            config=...)``). n_train, steps, batch_size, lr, seed: training; data_seed, n_test,
            image_size: the probe-shapes data; dtype: of the saved weights; extra: e.g. a ``note``
            saying why the checkpoint misses the quality bar.
    """

    name: str
    task: str
    config: dict[str, Any]
    n_train: int
    steps: int
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    data_seed: int = 0
    n_test: int = 512
    image_size: int = 64
    dtype: str = "float16"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class WeightsInfo:
    """Which weights a loaded model has. `source`: ``random``, ``meta``, ``local``, ``hub`` or ``demo``."""

    source: str
    ref: str
    sha256: str | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# name templates used in code (``{i}`` = block index)
VISION_PATTERN = "vision.blocks.{i}.attn.pattern"
VISION_OUTPUT = "vision.output"
TEXT_PATTERN = "text.blocks.{i}.attn.pattern"
TEXT_XATTN_PATTERN = "text.blocks.{i}.xattn.pattern"
TEXT_VATTN_PATTERN = "text.blocks.{i}.vattn.pattern"
TEXT_VRESID_POST = "text.blocks.{i}.vresid_post"
FUSION_PROJ = "fusion.proj"
