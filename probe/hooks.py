"""The canonical hook vocabulary shared by every model family, and `HookSpec`.

An adapter maps its native modules to these names; analyses only ever use the names.

Names (shapes in brackets):
- ``vision.blocks.{i}.attn.pattern``  (batch, heads, query, key), post-softmax or effective attention
- ``vision.blocks.{i}.attn.z``        (batch, tokens, heads * head_dim), per-head outputs before the
  output projection (concatenated heads; `HookSpec.n_heads` says how to split them)
- ``vision.blocks.{i}.resid_post``    (batch, tokens, dim)
- ``text.blocks.{i}.attn.pattern``, ``text.blocks.{i}.xattn.pattern`` (batch, heads, text, image),
  ``text.blocks.{i}.attn.z``, ``text.blocks.{i}.xattn.z`` (per-head outputs of the self- and
  cross-attention), ``text.blocks.{i}.resid_post``
- ``fusion.proj`` (batch, image tokens, d_model) for a projection between vision and text
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

HookKind = Literal["output", "input", "pattern"]

VISION_PATTERN = "vision.blocks.{i}.attn.pattern"
VISION_Z = "vision.blocks.{i}.attn.z"
VISION_RESID_POST = "vision.blocks.{i}.resid_post"
TEXT_PATTERN = "text.blocks.{i}.attn.pattern"
TEXT_XATTN_PATTERN = "text.blocks.{i}.xattn.pattern"
TEXT_Z = "text.blocks.{i}.attn.z"
TEXT_XATTN_Z = "text.blocks.{i}.xattn.z"
TEXT_RESID_POST = "text.blocks.{i}.resid_post"
FUSION_PROJ = "fusion.proj"

_LAYER_RE = re.compile(r"\.blocks\.(\d+)\.")


@dataclass(frozen=True)
class HookSpec:
    """Where a canonical hook lives in a native model.

    Attributes:
        name: canonical name, e.g. ``vision.blocks.3.attn.pattern``.
        module: dotted path of the native module, relative to the adapter's model.
        kind: ``output`` (forward output), ``input`` (first positional input) or ``pattern``
            (an attention site that emits its pattern lazily, see `probe.sites`).
        shape: the tensor's shape in words, for documentation and error messages.
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
    """

    name: str
    module: str
    kind: HookKind
    shape: str
    n_heads: int | None = None
    approximate: bool = False
    output_index: int | None = None
    mask_arg: str | None = None
    mask_base: str | None = None

    @property
    def layer(self) -> int | None:
        """Block index parsed from the name, or None for hooks outside a block."""
        m = _LAYER_RE.search(self.name)
        return int(m.group(1)) if m else None


def select(specs: Sequence[HookSpec], patterns: str | Iterable[str]) -> list[HookSpec]:
    """Specs whose canonical name matches any of the glob `patterns` (``*`` matches dots too).

    Raises:
        KeyError: a pattern matched nothing; the message lists the available names.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = list(patterns)
    chosen: list[HookSpec] = []
    for pat in patterns:
        hits = [s for s in specs if fnmatch.fnmatchcase(s.name, pat)]
        if not hits:
            names = ", ".join(s.name for s in specs[:12]) + (" ..." if len(specs) > 12 else "")
            raise KeyError(f"no hook matches {pat!r}; this model has: {names}")
        chosen.extend(h for h in hits if h not in chosen)
    return chosen


def layer_of(name: str) -> int | None:
    """Block index in a canonical name (``vision.blocks.3.attn.pattern`` -> 3)."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None
