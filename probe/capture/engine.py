"""Capture and intervention: hooks installed inside a context manager, removed in ``finally``.

This module knows nothing about model families: it reads an adapter's `HookSpec` list and
installs torch forward hooks (``output``/``input`` hooks) or attention-site listeners
(``pattern`` hooks, see `probe.capture.sites`). Interventions use the same specs and the same
guarantees: nothing outlives the ``with`` block, also when the block raises. Hooks and
interventions act only on forwards run by the thread that entered the block, so one adapter can
be captured and intervened on from several threads at once.
"""

from __future__ import annotations

import numbers
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch import nn

from probe.capture import sites
from probe.capture.cache import ActivationCache
from probe.capture.sites import Index, PatternSource
from probe.types import HookSpec, select

HeadReduction = Literal["mean", "max", "min"]


class HasHooks(Protocol):
    model: nn.Module

    def hook_specs(self) -> list[HookSpec]: ...

    def module(self, path: str) -> nn.Module: ...


def first_tensor(value: Any, index: int | None = None) -> torch.Tensor:
    """The tensor a hook reads in a module's output (or input tuple): the value itself, element
    `index` (default 0) of a tuple or list, or a transformers ModelOutput's ``last_hidden_state``."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, tuple | list):
        return value[index or 0]
    if hasattr(value, "last_hidden_state"):
        return value.last_hidden_state
    raise TypeError(f"cannot find a tensor in a {type(value).__name__}")


def reduce_heads(pattern: torch.Tensor, how: HeadReduction | None) -> torch.Tensor:
    """Fuse the head dimension (dim 1) of a (batch, heads, q, k) pattern, keeping the dim."""
    if how is None:
        return pattern
    if how == "mean":
        return pattern.mean(dim=1, keepdim=True)
    if how == "max":
        return pattern.amax(dim=1, keepdim=True)
    if how == "min":
        return pattern.amin(dim=1, keepdim=True)
    raise ValueError(f"unknown head reduction {how!r}; use mean, max or min")


@contextmanager
def capture(
    adapter: HasHooks,
    hooks: str | Sequence[str] = "*",
    *,
    heads: Index = None,
    rows: Index = None,
    reduce: HeadReduction | None = None,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device | None = "cpu",
    cache: ActivationCache | None = None,
    grad: bool = False,
    output: str | None = None,
) -> Iterator[ActivationCache]:
    """Record the hooks whose canonical names match `hooks` (globs) while the block runs.

    With ``grad=True`` the captured tensors stay in the autograd graph: a pattern is the very
    (batch, heads, q, k) float32 tensor the attention output is computed from (`sites.attend`:
    modules with a fast kernel recompute their output from it; modules that compute attention
    themselves hand over their own tensor), outputs and inputs are not detached. Backpropagate
    inside the block, e.g. ``torch.autograd.grad(y, cache.calls(name))``; on exit every stored
    tensor is detached, so no graph and no hook survives the context. `heads`, `rows` and `reduce`
    are refused then (a selection would cut the graph), `dtype` and `device` are ignored (tensors
    stay where and as the graph has them), and the forward must run with gradients enabled.

    Args:
        adapter: anything with ``model``, ``hook_specs()`` and ``module(path)``.
        hooks: glob pattern(s) over canonical names, e.g. ``"vision.blocks.*.attn.pattern"``.
        heads: for patterns, heads to compute (None: all). Only these are ever computed.
        rows: for patterns, query rows to compute (None: all), e.g. ``[0]`` for the CLS row.
        reduce: fuse the heads of patterns on the fly (``mean``/``max``/``min``) before storing.
        dtype: dtype of stored tensors (None: as computed).
        device: device of stored tensors (None: where computed). Reductions run before the copy,
            on the model's device.
        cache: an existing cache to append to.
        output: None (default): as the enclosing block says (`sites.output_from_pattern`, or an
            outer capture's `output`), else ``kernel``. ``kernel``: every module's output is what its
            fast kernel gives, bit for bit as without capture. ``pattern``: a softmax site whose full pattern (every head and
            query row) is captured computes its output as ``P @ V`` from that pattern instead of
            also running the kernel (`sites.output_from_pattern`): full-map capture then costs about
            an eager forward, and outputs are ``softmax(Q K^T * scale + mask) @ V`` in the model's
            dtype (float32 softmax for half precision, as transformers' eager attention), which
            differs from the SDPA kernel's by float rounding (~1e-6 in float32). It applies to the
            sites on transformers' attention interface (``hf-vit``, ViT-GPT2, GIT's vision tower);
            our own ViTs always run their kernel. The innermost explicit choice holds in its block.

    Yields:
        The `ActivationCache`, filled as the model runs.
    """
    if output not in (None, "kernel", "pattern"):
        raise ValueError(f"capture(output={output!r}): use 'kernel' (outputs as without capture) or 'pattern' "
                         "(outputs computed as P @ V from fully captured patterns)")
    specs = select(adapter.hook_specs(), hooks)
    cache = cache if cache is not None else ActivationCache()
    cache.selection = {"heads": _jsonable(heads), "rows": _jsonable(rows), "reduce_heads": reduce}
    if grad and (heads is not None or rows is not None or reduce is not None):
        raise ValueError("capture(grad=True) keeps whole patterns in the autograd graph: drop heads=, rows= and "
                         "reduce= (select from the captured tensors instead)")

    owner = threading.get_ident()

    def store(name: str, value: torch.Tensor) -> None:
        if threading.get_ident() != owner:  # forwards of other threads are not ours to record
            return
        if not grad:
            cache.add(name, value.detach().to(device=device, dtype=dtype))
            return
        if not torch.is_grad_enabled():
            raise RuntimeError(f"capture(grad=True) of {name}: the forward runs without gradients (inside "
                               "torch.no_grad() or inference_mode); run it with gradients enabled")
        cache.add(name, value)

    def on_grad(p: torch.Tensor, name: str) -> None:
        store(name, p)

    handles: list[Any] = []
    try:
        for spec in specs:
            module = adapter.module(spec.module)
            cache.specs[spec.name] = spec
            if spec.kind == "pattern" and grad:
                handles.append(sites.add_grad_listener(module, lambda p, name=spec.name: on_grad(p, name)))
                if spec.output_index is not None:
                    handles.append(sites.bridge_output_pattern(module, spec.output_index))
            elif spec.kind == "pattern":

                def on_pattern(src: PatternSource, name: str = spec.name) -> None:
                    try:
                        with torch.no_grad():
                            p = src.compute(heads, rows)
                    except IndexError as e:
                        raise ValueError(f"capture of {name}: heads={_jsonable(heads)}, rows={_jsonable(rows)} select "
                                         f"outside this pattern ({e}); use indices within its heads and queries") from None
                    store(name, reduce_heads(p, reduce))

                handles.append(sites.add_pattern_listener(module, on_pattern))
                if spec.output_index is not None:
                    handles.append(sites.bridge_output_pattern(module, spec.output_index))
            elif spec.kind == "output":

                def on_output(_m: nn.Module, _a: Any, out: Any, spec: HookSpec = spec) -> None:
                    store(spec.name, first_tensor(out, spec.output_index))

                handles.append(module.register_forward_hook(on_output))
            elif spec.kind == "input":

                def on_input(_m: nn.Module, args: tuple, spec: HookSpec = spec) -> None:
                    store(spec.name, first_tensor(args, 0))

                handles.append(module.register_forward_pre_hook(on_input))
            else:
                raise ValueError(f"hook {spec.name}: unknown kind {spec.kind!r}")
        # the policy is the thread's: the innermost explicit choice holds inside its block (a
        # "kernel" capture nested in a "pattern" one runs every kernel, so its outputs are exact)
        with nullcontext() if output is None else sites.output_from_pattern(output == "pattern"):
            yield cache
    finally:
        for h in handles:
            h.remove()
        if grad:
            cache.detach_()


def _jsonable(idx: Index) -> Any:
    if idx is None or isinstance(idx, int):
        return idx
    if isinstance(idx, slice):
        return [idx.start, idx.stop, idx.step]
    if isinstance(idx, torch.Tensor):
        return idx.tolist()
    return list(idx)


# ----------------------------------------------------------------------------- interventions


@dataclass(frozen=True)
class ZeroHeads:
    """Zero the outputs of some heads before the output projection.

    `hook` names per-head hooks (``*.attn.z``, whose spec has ``n_heads``). `heads` is a list of
    head indices (all batch elements), or a bool tensor (batch, n_heads), True meaning zeroed, so
    that each batch element can ablate different heads in one batched forward.
    """

    hook: str
    heads: Sequence[int] | torch.Tensor


@dataclass(frozen=True)
class Replace:
    """Replace an activation by a tensor, or by ``fn(activation)``. Shapes must match."""

    hook: str
    value: torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MaskTokens:
    """Remove tokens as keys of the attention sites matching `attention` (pattern hook names).

    `tokens` is a list of token positions (all batch elements), or a bool tensor (batch, m),
    True meaning removed, covering the first m <= n_keys keys (so a mask over an image prefix holds
    whatever the text length is). A removed token receives exactly zero attention (zero effective weight
    for approximate kinds) and contributes nothing to the outputs of those layers.
    """

    tokens: Sequence[int] | torch.Tensor
    attention: str = "*.attn.pattern"


@dataclass(frozen=True)
class Precomputed:
    """The module behind an ``output`` hook does not run while active: each call returns `output`,
    or ``output(*args, **kwargs)`` when it is callable (the call's own arguments).

    For work that does not change between the rows of a batch, e.g. the vision tower under
    ablations that only change what the text reads: compute it once with `record_outputs`, then
    hand every row its copy with `select_batch`.
    """

    hook: str
    output: Any


@dataclass(frozen=True)
class Patch:
    """Activation patching: write `source`, the activation a *clean* run produced at `hook`, into
    this run wherever `tokens` and `heads` say; every other entry stays as this run computes it.

    `hook` names one ``(batch, tokens, features)`` hook (``*.resid_post``, ``*.attn.z`` ...).
    `source` is (batch or 1, tokens, features) (capture it from the clean run first). `tokens`:
    None (every position), a list of positions (every row), or a bool tensor (batch, tokens), True
    meaning patched, so each row of a batch can patch a different set (one forward per sweep).
    `heads` (per-head hooks only): None (every head), a list of heads, or bool (batch, n_heads).

    Positions are absolute. A call shorter than `source` covers its first positions (a causal
    prefix); positions past the end of `source` are never patched. While a Patch on a text hook is
    active, captioners generate without their decoder's key/value cache (`uncached`), so every
    step re-runs the whole prefix and is patched at the same absolute positions as teacher forcing.
    """

    hook: str
    source: torch.Tensor
    tokens: Sequence[int] | torch.Tensor | None = None
    heads: Sequence[int] | torch.Tensor | None = None


Intervention = ZeroHeads | Replace | MaskTokens | Precomputed | Patch

# per model and thread: position-indexed interventions on a text hook (generation must not use a KV cache)
_UNCACHED: weakref.WeakKeyDictionary[nn.Module, dict[int, int]] = weakref.WeakKeyDictionary()


def uncached(model: nn.Module) -> bool:
    """Whether an intervention the calling thread holds needs `model` to generate without its
    key/value cache (see `Patch`); other threads' generations keep their cache."""
    with sites.LOCK:
        return _UNCACHED.get(model, {}).get(threading.get_ident(), 0) > 0


class _Uncache:
    def __init__(self, model: nn.Module) -> None:
        self.model, self.owner = model, threading.get_ident()
        with sites.LOCK:
            mine = _UNCACHED.setdefault(model, {})
            mine[self.owner] = mine.get(self.owner, 0) + 1

    def remove(self) -> None:
        with sites.LOCK:
            mine = _UNCACHED[self.model]
            mine[self.owner] -= 1
            if not mine[self.owner]:
                del mine[self.owner]


def _whole(indices: Sequence[Any], what: str) -> None:
    if any(isinstance(i, bool | np.bool_) or not isinstance(i, numbers.Integral) for i in indices):
        raise ValueError(f"{what} must be whole numbers (or give a bool mask tensor); got {list(indices)!r:.80}")


def _head_keep(heads: Sequence[int] | torch.Tensor, batch: int, n_heads: int, ref: torch.Tensor,
               what: str = "ZeroHeads", verb: str = "zeroed") -> torch.Tensor:
    if isinstance(heads, torch.Tensor):
        if heads.dtype != torch.bool:
            raise ValueError(f"{what} heads mask must be a bool tensor (True = {verb}); got {heads.dtype}")
        if heads.dim() == 1:
            heads = heads[None]
        if heads.dim() != 2 or heads.shape[0] not in (1, batch) or heads.shape[1] != n_heads:
            raise ValueError(f"{what} heads mask must be (batch={batch} or 1, heads={n_heads}); got {tuple(heads.shape)}")
        zero = heads.to(device=ref.device, dtype=torch.bool).expand(batch, n_heads)
    else:
        _whole(heads, f"{what} heads")
        bad = [h for h in heads if not 0 <= h < n_heads]
        if bad:
            raise ValueError(f"heads {bad} out of range: this layer has {n_heads} heads")
        zero = torch.zeros(batch, n_heads, dtype=torch.bool, device=ref.device)
        zero[:, [int(h) for h in heads]] = True
    return (~zero).to(ref.dtype)


def _zero_heads(x: torch.Tensor, heads: Sequence[int] | torch.Tensor, n_heads: int) -> torch.Tensor:
    b = x.shape[0]
    keep = _head_keep(heads, b, n_heads, x)
    shape = x.shape
    xh = x.reshape(*shape[:-1], n_heads, shape[-1] // n_heads)
    keep = keep.view(b, *([1] * (xh.dim() - 3)), n_heads, 1)
    return (xh * keep).reshape(shape)


def _token_keep_fn(tokens: Sequence[int] | torch.Tensor) -> sites.KeyMaskFn:
    def fn(batch: int, n_keys: int, device: torch.device) -> torch.Tensor:
        if isinstance(tokens, torch.Tensor):
            if tokens.dtype != torch.bool:
                raise ValueError(f"MaskTokens mask must be a bool tensor (True = removed); got {tokens.dtype}: "
                                 "a float mask would remove every non-zero entry")
            removed = tokens.to(device=device)
            if removed.dim() == 1:
                removed = removed.unsqueeze(0).expand(batch, -1)
            if removed.shape[0] != batch or removed.dim() != 2 or removed.shape[1] > n_keys:
                raise ValueError(
                    f"MaskTokens mask must be (batch={batch}, keys<={n_keys}); got {tuple(removed.shape)}"
                )
            keep = torch.ones(batch, n_keys, dtype=torch.bool, device=device)
            keep[:, : removed.shape[1]] = ~removed
            return keep
        keep = torch.ones(batch, n_keys, dtype=torch.bool, device=device)
        _whole(tokens, "MaskTokens positions")
        bad = [t for t in tokens if not -n_keys <= t < n_keys]
        if bad:
            raise ValueError(f"token positions {bad} out of range: this attention has {n_keys} keys")
        keep[:, list(tokens)] = False
        return keep

    return fn


@contextmanager
def intervene(adapter: HasHooks, interventions: Sequence[Intervention]) -> Iterator[None]:
    """Apply interventions while the block runs; every hook is removed in ``finally``.

    Example::

        with intervene(adapter, [ZeroHeads("vision.blocks.2.attn.z", [0, 3])]):
            logits = adapter.forward(batch)
    """
    all_specs = adapter.hook_specs()
    handles: list[Any] = []
    try:
        for iv in interventions:
            if isinstance(iv, MaskTokens):
                targets = [s for s in select(all_specs, iv.attention) if s.kind == "pattern"]
                if not targets:
                    raise ValueError(f"MaskTokens: {iv.attention!r} names no attention pattern hook")
                fn = _token_keep_fn(iv.tokens)
                for s in targets:
                    module = adapter.module(s.module)
                    if s.output_index is not None:
                        if s.mask_arg is None:
                            raise ValueError(f"{s.name}: this module computes its own attention and its adapter "
                                             "declares no mask argument, so its keys cannot be masked")
                        handles.append(sites.route_key_masks(module, s.mask_arg, s.mask_base, s.output_index))
                    handles.append(sites.add_key_mask(module, fn))
                continue
            if isinstance(iv, Patch):
                handles.extend(_install_patch(adapter, all_specs, iv))
                continue
            for spec in select(all_specs, iv.hook):
                if isinstance(iv, Precomputed):
                    handles.append(_stand_in(adapter, spec, iv.output))
                else:
                    handles.append(_install_value_hook(adapter.module(spec.module), spec, iv))
        yield
    finally:
        for h in handles:
            h.remove()


def _patch_mask(iv: Patch, spec: HookSpec, batch: int, n: int, features: int, device: torch.device) -> torch.Tensor:
    """Bool (batch, n, features): which entries of the first `n` positions `iv` patches."""
    if iv.tokens is None:
        rows = torch.ones(batch, n, dtype=torch.bool, device=device)
    elif isinstance(iv.tokens, torch.Tensor):
        tokens = iv.tokens[None] if iv.tokens.dim() == 1 else iv.tokens
        if tokens.dtype != torch.bool or tokens.dim() != 2 or tokens.shape[0] not in (1, batch):
            raise ValueError(f"Patch {spec.name}: tokens must be a bool tensor (batch={batch} or 1, tokens), True = "
                             f"patched; got {iv.tokens.dtype} {tuple(iv.tokens.shape)}")
        rows = torch.zeros(tokens.shape[0], n, dtype=torch.bool, device=device)
        m = min(n, tokens.shape[1])
        rows[:, :m] = tokens[:, :m].to(device)
        rows = rows.expand(batch, n)
    else:
        rows = torch.zeros(batch, n, dtype=torch.bool, device=device)
        rows[:, [int(t) for t in iv.tokens if t < n]] = True
    if iv.heads is None:
        return rows[..., None].expand(batch, n, features)
    n_heads = spec.n_heads or 1
    heads = ~_head_keep(iv.heads, batch, n_heads, rows.float(), "Patch", "patched").bool()  # True = patched
    per = heads[:, None, :, None].expand(batch, n, n_heads, features // n_heads)
    return (rows[:, :, None, None] & per).reshape(batch, n, features)


def _install_patch(adapter: HasHooks, all_specs: list[HookSpec], iv: Patch) -> list[Any]:
    specs = select(all_specs, iv.hook)
    if len(specs) != 1:
        raise ValueError(f"Patch names one hook (its source is that hook's activation); {iv.hook!r} matches "
                         f"{len(specs)}: {', '.join(s.name for s in specs[:6]) or 'none'}")
    (spec,) = specs
    if spec.calls != 1:
        raise ValueError(f"Patch {spec.name}: its module runs {spec.calls} times per forward ({spec.shape}), so one "
                         "source cannot say which call it is; patch a hook that runs once (e.g. the block's resid_post)")
    src = iv.source
    if not isinstance(src, torch.Tensor) or src.dim() != 3:
        raise ValueError(f"Patch {spec.name}: source must be a (batch or 1, tokens, features) tensor, the clean "
                         f"run's activation; got {getattr(src, 'shape', type(src).__name__)}")
    if iv.heads is not None and spec.n_heads is None:
        raise ValueError(f"Patch {spec.name}: heads need a per-head hook (*.attn.z, *.xattn.z)")
    if not isinstance(iv.tokens, torch.Tensor) and iv.tokens is not None:
        _whole(iv.tokens, "Patch positions")
        bad = [t for t in iv.tokens if not 0 <= t < src.shape[1]]
        if bad:
            raise ValueError(f"Patch {spec.name}: positions {bad} out of range: the source has {src.shape[1]} tokens")

    def change(x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != src.shape[-1] or src.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"Patch {spec.name}: source {tuple(src.shape)} does not fit the activation "
                             f"{tuple(x.shape)} (batch or 1, tokens, features)")
        n = min(x.shape[1], src.shape[1])
        mask = _patch_mask(iv, spec, x.shape[0], n, x.shape[-1], x.device)
        head = torch.where(mask, src[:, :n].to(device=x.device, dtype=x.dtype), x[:, :n])
        return head if n == x.shape[1] else torch.cat([head, x[:, n:]], dim=1)

    handles = [_install_value_hook(adapter.module(spec.module), spec, change)]
    if spec.name.startswith("text."):
        handles.append(_Uncache(adapter.model))
    return handles


def _install_value_hook(module: nn.Module, spec: HookSpec,
                        iv: ZeroHeads | Replace | Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if spec.kind == "pattern":
        raise ValueError(
            f"{spec.name} is an attention pattern, which is derived, not replaced; "
            "use MaskTokens to change what a layer attends to, or ZeroHeads on its .attn.z hook"
        )
    if callable(iv) and not isinstance(iv, ZeroHeads | Replace):
        change = iv
    elif isinstance(iv, ZeroHeads):
        if spec.n_heads is None:
            raise ValueError(f"ZeroHeads needs a per-head hook (*.attn.z); {spec.name} is not one")
        n_heads = spec.n_heads

        def change(x: torch.Tensor) -> torch.Tensor:
            return _zero_heads(x, iv.heads, n_heads)
    else:

        def change(x: torch.Tensor) -> torch.Tensor:
            new = iv.value(x) if callable(iv.value) else iv.value
            if new.shape != x.shape:
                raise ValueError(f"Replace {spec.name}: shape {tuple(new.shape)} != {tuple(x.shape)}")
            return new.to(dtype=x.dtype, device=x.device)

    owner = threading.get_ident()
    if spec.kind == "input":

        def pre(_m: nn.Module, args: tuple) -> tuple | None:
            if threading.get_ident() != owner:
                return None
            return (change(args[0]), *args[1:])

        return module.register_forward_pre_hook(pre)

    def post(_m: nn.Module, _a: Any, out: Any) -> Any:
        if threading.get_ident() != owner:
            return None
        if isinstance(out, torch.Tensor):
            return change(out)
        if hasattr(out, "last_hidden_state") and hasattr(out, "keys"):  # a transformers ModelOutput
            fields = {k: out[k] for k in out.keys()}
            fields["last_hidden_state"] = change(out.last_hidden_state)
            return type(out)(**fields)
        idx = spec.output_index or 0
        new = (*out[:idx], change(out[idx]), *out[idx + 1 :])
        return list(new) if isinstance(out, list) else new

    return module.register_forward_hook(post)


class _StandIn(nn.Module):
    """Answers for a module while `Precomputed` is active: each thread that installed an output
    gets it; every other call runs the real module. One per module, shared by all threads."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.outputs: dict[int, Any] = {}
        self.__dict__["original"] = original  # not a submodule: its parameters keep their names

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # the parent reads the real module's attributes (e.g. `.config`)
            return getattr(self.__dict__["original"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        output = self.outputs.get(threading.get_ident(), _StandIn)
        if output is _StandIn:
            return self.__dict__["original"](*args, **kwargs)
        return output(*args, **kwargs) if callable(output) else output


def standing_in(model: nn.Module) -> list[str]:
    """Paths of the modules of `model` that a `Precomputed` (in any thread) stands in for right now."""
    return [name for name, m in model.named_modules() if isinstance(m, _StandIn)]


class _Swap:
    def __init__(self, parent: nn.Module, child: str, original: nn.Module) -> None:
        self.parent, self.child, self.original = parent, child, original

    def remove(self) -> None:
        self.parent._modules[self.child] = self.original


class _StandInHandle:
    def __init__(self, stand: _StandIn, owner: int, handle: Any) -> None:
        self.stand, self.owner, self.handle = stand, owner, handle

    def remove(self) -> None:
        self.stand.outputs.pop(self.owner, None)
        self.handle.remove()


def _stand_in(adapter: HasHooks, spec: HookSpec, output: Any) -> _StandInHandle:
    if spec.kind != "output" or not spec.module:
        raise ValueError(f"Precomputed needs an output hook on a submodule; {spec.name} is a {spec.kind} hook")
    parent_path, _, child = spec.module.rpartition(".")
    parent = adapter.module(parent_path) if parent_path else adapter.model

    def install() -> list[_Swap]:
        original = parent._modules[child]
        parent._modules[child] = _StandIn(original)
        return [_Swap(parent, child, original)]

    me = threading.get_ident()
    with sites.LOCK:
        handle = sites.refcounted(parent, f"stand-in:{child}", install)
        stand = parent._modules[child]
        if me in stand.outputs:
            handle.remove()
            raise ValueError(f"{spec.name} is already precomputed in this thread")
        stand.outputs[me] = output
    return _StandInHandle(stand, me, handle)


def select_batch(value: Any, index: torch.Tensor, batch: int) -> Any:
    """Rows `index` of every batch-first tensor (batch size `batch`) inside `value`: a tensor, a
    tuple or list, a dict or a transformers ``ModelOutput``; anything else is returned as is."""
    if isinstance(value, torch.Tensor):
        return value[index.to(value.device)] if value.dim() and value.shape[0] == batch else value
    if hasattr(value, "keys"):  # dict, ModelOutput
        return type(value)(**{k: select_batch(value[k], index, batch) for k in value.keys()})
    if isinstance(value, tuple | list):
        return type(value)(select_batch(v, index, batch) for v in value)
    return value


@contextmanager
def record_outputs(adapter: HasHooks, hook: str) -> Iterator[list[Any]]:
    """Keep the raw outputs (tensors, tuples or ``ModelOutput``s, not copied) of the module behind
    an ``output`` hook, one per call, while the block runs."""
    (spec,) = select(adapter.hook_specs(), hook)
    if spec.kind != "output":
        raise ValueError(f"record_outputs needs an output hook; {spec.name} is a {spec.kind} hook")
    calls: list[Any] = []
    owner = threading.get_ident()

    def keep(_m: nn.Module, _a: Any, out: Any) -> None:
        if threading.get_ident() == owner:
            calls.append(out)

    handle = adapter.module(spec.module).register_forward_hook(keep)
    try:
        yield calls
    finally:
        handle.remove()
