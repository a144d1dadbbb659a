"""The nnsight bridge: an nnsight model over an adapter's native model whose envoys answer to the
canonical hook vocabulary.

`canonical_model(adapter)` wraps the adapter's model in a thin module whose first child is the
native model (``m.model.<native path>`` keeps working) and whose other children are the namespaces
``vision`` and ``text``, each with ``blocks``: a list of the very native block modules, so that
nnsight makes ``m.text.blocks[i]`` another name of the native block's envoy. Inside each block,
``rename`` aliases named after the hooks point at native modules:

- ``attn`` / ``xattn``: the smallest module under the block that holds both the ``.pattern`` and
  the ``.z`` module of that hook group (self- and cross-attention);
- ``attn.o_proj`` / ``xattn.o_proj``: the module whose *input* is the ``.z`` activation
  (batch, tokens, heads * head_dim), so ``.input[:, :, h*d:(h+1)*d] = 0`` zeroes head h.

Everything is derived from the adapter's block templates (`probe.types.Block`); this module knows
no model family. ``m.trace(**batch)`` runs ``adapter.forward(batch)`` with the batch exactly as
``adapter.preprocess`` returns it. nnsight is imported on first use (it costs ~0.4 s).
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import torch
from torch import nn

from probe.capture.engine import first_tensor
from probe.types import Block, HookSpec, ProbeError

STACKS = ("vision", "text")
#: hook groups that get an alias when they have both a pattern and a per-head ``.z`` hook
GROUPS = ("attn", "xattn", "vattn")


class HasBlocks(Protocol):
    name: str
    model: nn.Module

    def blocks(self) -> list[Block]: ...

    def hook_specs(self) -> list[HookSpec]: ...

    def module(self, path: str) -> nn.Module: ...

    def forward(self, batch: dict[str, torch.Tensor]) -> Any: ...


def resid(output: Any, spec: HookSpec | None = None) -> torch.Tensor:
    """The ``resid_post`` tensor in a block envoy's ``.output`` (inside a trace it is a real value),
    read as the hook reads it (`probe.capture.engine.first_tensor` with ``spec.output_index``): a
    tensor as is, element ``output_index`` of a tuple (e.g. the text stream of a block that returns
    ``(visual, text)``), a ``ModelOutput``'s ``last_hidden_state``. It is the very tensor the model
    passes on: writing into it in place (``resid(...)[:, t] = ...``) edits the run.
    """
    return first_tensor(output, spec.output_index if spec is not None else None)


def _common(paths: list[str]) -> str:
    """Longest common dotted prefix of module paths ("" = the block itself)."""
    parts = [p.split(".") if p else [] for p in paths]
    out: list[str] = []
    for comps in zip(*parts, strict=False):
        if len(set(comps)) != 1:
            break
        out.append(comps[0])
    return ".".join(out)


def block_aliases(block: Block) -> dict[str, str]:
    """Canonical alias -> native module path, both relative to one block of `block`.

    ``{"attn": "attention", "attn.o_proj": "attention.output.dense", ...}``. A group (``attn``,
    ``xattn``, ``vattn``) gets an alias only when it has a pattern hook and a per-head ``.z`` input
    hook below the block; its container is the smallest module holding both. A group with a
    pattern only (an attention computed inside a bigger module, or the block itself) gets none:
    there is no module of its own whose output is that attention.
    """
    hooks = {h.name: h for h in block.hooks}
    out: dict[str, str] = {}
    for group in GROUPS:
        pattern, z = hooks.get(f"{group}.pattern"), hooks.get(f"{group}.z")
        if pattern is None or z is None or z.kind != "input":
            continue
        container = _common([pattern.module, z.module])
        if not container or z.module == container:
            continue
        out[group] = container
        out[f"{group}.o_proj"] = z.module
    return out


def _envoy_path(path: str, served: frozenset[str]) -> str:
    """A native module path as nnsight's envoy tree spells it: a submodule named after a value
    nnsight serves on every envoy (``output``, ``input`` ...) is mounted as ``E_<name>``."""
    return ".".join(f"E_{c}" if c in served else c for c in path.split("."))


class Blocks(nn.ModuleList):
    """``vision.blocks`` / ``text.blocks``: the native block modules (shared, not copies)."""


class Stack(nn.Module):
    """A canonical namespace (``vision``, ``text``) holding ``blocks``."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = Blocks(blocks)


class Canonical(nn.Module):
    """The module nnsight wraps: ``model`` (the native model, first child, so native envoy paths
    stay primary), then ``vision`` and ``text`` namespaces over the native blocks.

    ``forward(**batch)`` is ``adapter.forward(batch)``: `batch` as ``adapter.preprocess`` returns it
    (``pixel_values`` (b, 3, H, W), for captioners ``input_ids``/``attention_mask`` (b, T)).

    Attributes:
        adapter: the adapter (not a submodule).
        specs: canonical hook name -> `HookSpec`, e.g. for `resid`.
        aliases: canonical module path (``text.blocks.0.attn.o_proj``) -> native module path
            relative to the adapter's model (``text_decoder.bert.encoder.layer.0.attention.output.dense``).
        depth: blocks per stack.
    """

    def __init__(self, adapter: HasBlocks) -> None:
        super().__init__()
        self.model = adapter.model
        self.adapter = adapter
        self.specs = {s.name: s for s in adapter.hook_specs()}
        self.aliases: dict[str, str] = {}
        self.depth: dict[str, int] = {}
        for block in adapter.blocks():
            if block.stack in self.depth:
                raise ProbeError(f"{adapter.name}: two block templates for the {block.stack} stack; the canonical "
                                 "index i must name one block, so declare one template per stack")
            self.depth[block.stack] = block.depth
            natives = [block.path.format(i=i) for i in range(block.depth)]
            setattr(self, block.stack, Stack([adapter.module(p) for p in natives]))
            for i, native in enumerate(natives):
                self.aliases[f"{block.stack}.blocks.{i}"] = native
                for alias, rel in block_aliases(block).items():
                    self.aliases[f"{block.stack}.blocks.{i}.{alias}"] = f"{native}.{rel}"

    def forward(self, **batch: torch.Tensor) -> Any:
        if "pixel_values" not in batch:
            raise ProbeError(f"{self.adapter.name}: trace with the batch as keywords, e.g. "
                             f"m.trace(**adapter.preprocess(images)); got {sorted(batch) or 'nothing'}")
        return self.adapter.forward(batch)

    def rename(self, served: frozenset[str]) -> dict[str, str]:
        """nnsight ``rename`` entries that bind each alias on the block envoy it belongs to.

        Keys and aliases are anchored at this module (``text.blocks.0.attention`` ->
        ``text.blocks.0.attn``), so an alias binds only where the hook specs put it, never on
        another module that happens to share a native name.
        """
        out: dict[str, str] = {}
        for canon, native in self.aliases.items():
            parts = canon.split(".")
            if len(parts) <= 3:  # the block itself: the shared envoy needs no alias
                continue
            block = ".".join(parts[:3])
            rel = native[len(self.aliases[block]) + 1:]
            if len(parts) == 5 and parts[4] == "o_proj":  # binds on the group's native container
                host = self.aliases[f"{block}.{parts[3]}"][len(self.aliases[block]) + 1:]
                out[f"{block}.{_envoy_path(rel, served)}"] = f"{block}.{_envoy_path(host, served)}.o_proj"
            else:
                out[f"{block}.{_envoy_path(rel, served)}"] = canon
        return out


def _batched(invokes: list[tuple[tuple, dict[str, Any]]]) -> dict[str, Any]:
    """Several invokes' batches -> one, concatenated along dim 0 (same shapes past dim 0)."""
    if any(args for args, _ in invokes):
        raise ProbeError("give each invoke its batch as keywords: tracer.invoke(**adapter.preprocess(...))")
    keys = [sorted(kw) for _, kw in invokes]
    if any(k != keys[0] for k in keys):
        raise ProbeError(f"invokes of one trace need the same inputs; got {keys}")
    out: dict[str, Any] = {}
    for key in keys[0]:
        values = [kw[key] for _, kw in invokes]
        if not all(isinstance(v, torch.Tensor) for v in values):
            raise ProbeError(f"invoke input {key!r} is not a tensor; pass the batch adapter.preprocess returns")
        shapes = {tuple(v.shape[1:]) for v in values}
        if len(shapes) > 1:
            raise ProbeError(f"invokes are concatenated along the batch: {key!r} has shapes "
                             f"{[tuple(v.shape) for v in values]}; preprocess the images (and captions) of all "
                             "invokes in one call so they share one length, and pass row slices to each invoke")
        out[key] = torch.cat(values, dim=0)
    return out


@functools.cache
def _classes() -> tuple[type, type]:
    """nnsight's classes with the canonical behaviour, built on first use (lazy import)."""
    from nnsight import NNsight
    from nnsight.intervention.envoy import Envoy, traceable

    class BlocksEnvoy(Envoy):
        """``vision.blocks`` / ``text.blocks``: indexing out of range names the number of blocks."""

        def __getitem__(self, key: Any) -> Any:
            n = len(self)
            if isinstance(key, int) and not -n <= key < n:
                stack = self.path.split(".")[-2]
                raise IndexError(f"{stack}.blocks[{key}]: this model has {n} {stack} blocks (0 .. {n - 1})")
            return super().__getitem__(key)

    class CanonicalModel(NNsight):
        """An nnsight model over `Canonical`: ``m.vision.blocks[i]``, ``m.text.blocks[i]``, their
        ``attn``/``xattn`` and ``.o_proj`` aliases, ``m.model.<native path>``."""

        def __getattr__(self, name: str) -> Any:
            try:
                return super().__getattr__(name)
            except AttributeError:
                module = self.__dict__.get("_module")
                if name in STACKS and isinstance(module, Canonical):
                    raise AttributeError(f"{module.adapter.name} has no {name} stack; it has "
                                         f"{', '.join(module.depth)}") from None
                raise

        def _batch_size(self, *inputs: Any, **kwargs: Any) -> int:
            px = kwargs.get("pixel_values")
            return int(px.shape[0]) if isinstance(px, torch.Tensor) else (1 if inputs or kwargs else 0)

        def _batch(self, invokes: list[tuple[tuple, dict[str, Any]]], fn: Any) -> tuple:
            if len(invokes) <= 1:
                return super()._batch(invokes, fn)
            return (), _batched(invokes)

        @traceable
        def generate(self, pixel_values: torch.Tensor, max_new_tokens: int | None = None, num_beams: int = 1,
                     **generate_kwargs: Any) -> dict[str, Any]:
            """``with m.generate(pixel_values=..., max_new_tokens=n) as tracer:`` traces the adapter's
            own generation (``adapter.caption_pixels``): every decoding step revisits the text
            blocks, so ``for step in tracer.iter[:]:`` targets each step. Returns what
            ``caption_pixels`` returns (``tracer.result``)."""
            adapter = self.__dict__["_module"].adapter
            if not hasattr(adapter, "caption_pixels"):
                raise ProbeError(f"{adapter.name} does not generate (it is not a captioner); use m.trace(**batch)")
            return adapter.caption_pixels(pixel_values, max_new_tokens, num_beams, **generate_kwargs)

    return CanonicalModel, BlocksEnvoy


def _served(envoy_class: type) -> frozenset[str]:
    """Names nnsight serves on every envoy as data descriptors (``output``, ``input`` ...)."""
    return frozenset(n for klass in envoy_class.__mro__ for n, v in vars(klass).items()
                     if not n.startswith("_") and inspect.isdatadescriptor(v))


def canonical_model(adapter: HasBlocks) -> Any:
    """An nnsight model over `adapter`'s native model with canonical envoys.

    ``m.vision.blocks[i]`` / ``m.text.blocks[i]`` are the native blocks' envoys (their ``.output``
    is what the ``resid_post`` hook reads; see `resid`), ``.attn`` / ``.xattn`` the attention
    modules and ``.attn.o_proj.input`` the per-head ``attn.z`` (batch, tokens, heads * head_dim).
    ``m.model.<native path>`` reaches every native module. Trace with
    ``with m.trace(**adapter.preprocess(images, captions)):``.

    nnsight instruments the modules it wraps in place (an inert ``forward`` wrapper outside a
    trace); probe's own hooks and interventions keep working on the same adapter.
    """
    model_cls, blocks_envoy = _classes()
    root = Canonical(adapter)
    with warnings.catch_warnings():  # BERT-style `output` submodules are mounted as `E_output`: said in the docs
        warnings.filterwarnings("ignore", message=r".*has a submodule named '\w+', which nnsight already serves")
        try:
            m = model_cls(root, rename=root.rename(_served(blocks_envoy)), envoys={Blocks: blocks_envoy})
        except ValueError as e:  # an alias that would shadow a native name of the block
            raise ProbeError(f"{adapter.name}: its canonical nnsight aliases clash with native names ({e}); "
                             "rename the clashing module in its adapter's block template") from e
    wrong = [canon for canon, envoy in _resolved(m, root) if envoy is None
             or envoy._module is not adapter.module(root.aliases[canon])]
    if wrong:  # nnsight skips a rename key that resolves nowhere: never silently
        raise ProbeError(f"{adapter.name}: canonical aliases that do not reach their native module: {wrong}")
    return m


def _resolved(m: Any, root: Canonical) -> Iterator[tuple[str, Any]]:
    """(canonical path, its envoy or None)."""
    for canon in root.aliases:
        try:
            yield canon, m.get(canon)
        except AttributeError:
            yield canon, None


def aliases_markdown(adapters: Mapping[str, HasBlocks]) -> str:
    """The README's alias table: per model and stack, the native module behind each canonical
    envoy (``{i}`` = block index), derived from the block templates (no weights needed)."""
    found = {name: [(b, block_aliases(b)) for b in adapter.blocks()] for name, adapter in adapters.items()}
    cols = [c for g in GROUPS for c in (g, f"{g}.o_proj")
            if any(c in a for rows in found.values() for _, a in rows)]
    lines = ["| model | canonical | native `blocks[i]` | " + " | ".join(f"`{c}`" for c in cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    for name, rows in found.items():
        for block, a in rows:
            cells = [f"`{a[c]}`" if c in a else "-" for c in cols]
            lines.append(f"| `{name}` | `{block.stack}.blocks[i]` | `{block.path}` | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def aliases(m: Any) -> dict[str, str]:
    """Canonical module path -> native module path (relative to the adapter's model) of a model
    `canonical_model` built, e.g. ``{"text.blocks.0.attn": "text_decoder...layer.0.attention"}``."""
    return dict(m._module.aliases)
