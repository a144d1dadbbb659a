"""Attention sites: the one place where attention modules meet the capture engine.

An attention module (ours, or a transformers module dispatched through our attention function) asks
this registry two questions on every call, both O(1) when nothing is attached:

- `key_keep(module, ...)`: does an intervention mask some keys? Returns a bool (batch, keys) tensor.
- `wants_pattern(module)`: is anything listening for this module's pattern? If so the module calls
  `emit_pattern(module, source)` with a lazy `PatternSource`, and each listener computes only the
  heads and query rows it needs. The output of the attention itself never changes: it is still
  computed by the module's own (fast) kernel.

Listeners are attached and removed by `probe.capture`, always inside a context manager; the
registry holds modules weakly, so nothing here keeps a model alive or outlives it. Everything
attached belongs to the thread that attached it: a forward in another thread sees none of it, so
one adapter can serve captures and interventions from several threads at once.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Callable, Sequence

import torch
from torch import nn

Index = int | slice | Sequence[int] | torch.Tensor | None


class PatternSource:
    """Everything needed to compute a layer's attention pattern, lazily.

    The default computation is exact softmax attention, ``softmax(Q K^T * scale + mask)``,
    softmax in float32 as transformers' eager attention does (float64 inputs stay float64). Approximate attention kinds pass
    their own `compute` for the effective token-by-token matrix.

    Args:
        query: (batch, heads, n_query, head_dim).
        key: (batch, heads, n_key, head_dim).
        scale: multiplier of ``Q K^T``.
        mask: additive mask broadcastable to (batch, heads, n_query, n_key), or None.
        compute: ``compute(heads, rows) -> (batch, len(heads), len(rows), n_key)`` replacing
            the exact softmax, for approximate kinds.
        approximate: True when the pattern is an effective matrix, not a softmax.
        zero_dead_rows: rows whose keys are all masked become zero, not uniform (set when an
            intervention removed keys: a query with nothing left to attend to reads nothing).
    """

    def __init__(
        self,
        query: torch.Tensor | None = None,
        key: torch.Tensor | None = None,
        scale: float | None = None,
        mask: torch.Tensor | None = None,
        *,
        compute: Callable[[Index, Index], torch.Tensor] | None = None,
        approximate: bool = False,
        n_heads: int | None = None,
        zero_dead_rows: bool = False,
    ) -> None:
        if compute is None and (query is None or key is None):
            raise ValueError("PatternSource needs query and key, or a compute function")
        self.query, self.key, self.mask = query, key, mask
        self.scale = scale if scale is not None else (query.shape[-1] ** -0.5 if query is not None else 1.0)
        self._compute = compute
        self.approximate = approximate
        self.zero_dead_rows = zero_dead_rows
        self.n_heads = n_heads if n_heads is not None else (query.shape[1] if query is not None else None)

    def compute(self, heads: Index = None, rows: Index = None) -> torch.Tensor:
        """Pattern for the selected heads and query rows: (batch, heads', rows', n_key)."""
        if self._compute is not None:
            return self._compute(heads, rows)
        q = select_rows(select_heads(self.query, heads), rows)
        k = select_heads(self.key, heads)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        dtype = torch.promote_types(scores.dtype, torch.float32)  # at least float32; float64 stays
        if self.mask is None:
            return torch.softmax(scores, dim=-1, dtype=dtype)
        mask = select_mask(self.mask, heads, rows)
        p = torch.softmax(scores + mask, dim=-1, dtype=dtype)
        return p * alive_rows(mask).to(p.dtype) if self.zero_dead_rows else p


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """`t` in float32, or float64 when it is float64 (patterns are never stored below float32)."""
    return t if t.dtype == torch.float64 else t.float()


def as_index(idx: Index) -> slice | torch.Tensor | list[int]:
    if idx is None:
        return slice(None)
    if isinstance(idx, int):
        return [idx]
    if isinstance(idx, slice | torch.Tensor):
        return idx
    return list(idx)


def select_heads(x: torch.Tensor, heads: Index) -> torch.Tensor:
    """Select heads on dim 1 of a (batch, heads, ...) tensor; keeps the dimension."""
    return x if heads is None else x[:, as_index(heads)]


def select_rows(x: torch.Tensor, rows: Index) -> torch.Tensor:
    """Select query rows on dim 2 of a (batch, heads, rows, ...) tensor; keeps the dimension."""
    return x if rows is None else x[:, :, as_index(rows)]


def select_mask(mask: torch.Tensor, heads: Index, rows: Index) -> torch.Tensor:
    """Apply head and row selection to a broadcastable (b|1, h|1, q|1, k) mask."""
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if heads is not None and mask.shape[1] != 1:
        mask = mask[:, as_index(heads)]
    if rows is not None and mask.shape[2] != 1:
        mask = mask[:, :, as_index(rows)]
    return mask


def alive_rows(mask: torch.Tensor) -> torch.Tensor:
    """Bool (..., q, 1): whether a row of an additive mask (..., q, k) keeps at least one key."""
    return (mask > torch.finfo(mask.dtype).min / 2).any(dim=-1, keepdim=True)


class AttentionSite(nn.Module):
    """A parameter-free attachment point, for modules that compute more than one attention
    (MMCA's text->text and text->image parts): each part asks the registry about its own site."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


PatternListener = Callable[[PatternSource], None]
#: ``fn(pattern) -> None | replacement``: receives the (batch, heads, q, k) pattern *in the autograd
#: graph*, the tensor the attention output is computed from
GradListener = Callable[[torch.Tensor], torch.Tensor | None]
KeyMaskFn = Callable[[int, int, torch.device], torch.Tensor]

# module -> {handle id: (owning thread, function)}
_pattern_listeners: weakref.WeakKeyDictionary[nn.Module, dict[int, tuple[int, PatternListener]]] = (
    weakref.WeakKeyDictionary()
)
_key_masks: weakref.WeakKeyDictionary[nn.Module, dict[int, tuple[int, KeyMaskFn]]] = weakref.WeakKeyDictionary()
_grad_listeners: weakref.WeakKeyDictionary[nn.Module, dict[int, tuple[int, GradListener]]] = (
    weakref.WeakKeyDictionary()
)
#: guards every table here: threads attach and remove concurrently
LOCK = threading.RLock()
_ids = itertools.count(1)


class SiteHandle:
    """Removes one listener or key mask; removing twice is harmless."""

    def __init__(self, table: weakref.WeakKeyDictionary, module: nn.Module, hid: int) -> None:
        self._table, self._module, self._id = table, weakref.ref(module), hid

    def remove(self) -> None:
        module = self._module()
        if module is None:
            return
        with LOCK:
            entries = self._table.get(module)
            if entries is not None:
                entries.pop(self._id, None)
                if not entries:
                    del self._table[module]


def _add(table: weakref.WeakKeyDictionary, module: nn.Module, fn: Callable) -> SiteHandle:
    with LOCK:
        hid = next(_ids)
        table.setdefault(module, {})[hid] = (threading.get_ident(), fn)
    return SiteHandle(table, module, hid)


def _mine(table: weakref.WeakKeyDictionary, module: nn.Module) -> list[Callable]:
    """The functions attached to `module` by the calling thread."""
    me = threading.get_ident()
    return [fn for owner, fn in list(table.get(module, {}).values()) if owner == me]


def add_pattern_listener(module: nn.Module, fn: PatternListener) -> SiteHandle:
    """Call `fn(source)` whenever `module` computes attention. Returns a handle to remove it."""
    return _add(_pattern_listeners, module, fn)


def add_key_mask(module: nn.Module, fn: KeyMaskFn) -> SiteHandle:
    """Make `module` ignore keys: `fn(batch, n_keys, device)` returns a bool keep-mask (batch, n_keys)."""
    return _add(_key_masks, module, fn)


def add_grad_listener(module: nn.Module, fn: GradListener) -> SiteHandle:
    """Call `fn(pattern)` with `module`'s pattern kept in the autograd graph whenever it computes
    attention (see `attend`); `fn` may return a replacement (same shape) that the output is then
    computed from. Returns a handle to remove it."""
    return _add(_grad_listeners, module, fn)


def wants_grad(module: nn.Module) -> bool:
    """Whether a gradient listener of the calling thread is attached to `module`."""
    return module in _grad_listeners and bool(_mine(_grad_listeners, module))


def attend(module: nn.Module, source: PatternSource, value: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The per-head attention output a module should use: `out` (batch, heads, q, head_dim) from its
    own kernel, or, when a gradient listener is attached, ``P @ value`` recomputed from the full
    pattern ``P = source.compute()`` (at least float32, in the autograd graph) after the listeners saw it.

    Every kind's output is its (effective) matrix times the per-head values (batch, heads, k,
    head_dim): softmax attention, Linformer's ``(P F) V``, Performer's ``D^-1 phi(Q) phi(K)^T V``,
    Nystromformer's ``F A^+ B V``. So the recomputed output equals the kernel's up to rounding, and
    ``d y / d P`` is the gradient with respect to the matrix the model actually applied.
    """
    fns = _mine(_grad_listeners, module) if module in _grad_listeners else []
    if not fns:
        return out
    p = source.compute(None, None)
    if torch.is_grad_enabled() and not p.requires_grad:
        # nothing upstream needs gradients (a frozen tower fed plain pixels): make the pattern
        # itself a leaf, so d y / d P still exists
        p = p.detach().requires_grad_()
    for fn in fns:
        new = fn(p)
        if new is not None:
            if new.shape != p.shape:
                raise ValueError(f"a gradient listener replaced a {tuple(p.shape)} pattern with {tuple(new.shape)}")
            p = new
    return (p.to(value.dtype) @ value).to(out.dtype)


#: attribute set on a masked copy of probabilities whose original was already handed to gradient
#: listeners (see `route_key_masks`)
_EMITTED = "_probe_grad_emitted"


def emit_grad(module: nn.Module, pattern: torch.Tensor) -> None:
    """Hand gradient listeners a pattern that already *is* the tensor a module's output is computed
    from (modules that compute attention themselves: MMCA, the conditioning block, BLIP, GIT's
    text stack). Replacements are not possible there and are refused."""
    if getattr(pattern, _EMITTED, False):
        return
    for fn in _mine(_grad_listeners, module) if module in _grad_listeners else []:
        if fn(pattern) is not None:
            raise ValueError(f"{type(module).__name__} computes its attention itself: its pattern cannot be "
                             "replaced by a gradient listener")


def wants_pattern(module: nn.Module) -> bool:
    """Whether anything of the calling thread listens for `module`'s pattern."""
    return module in _pattern_listeners and bool(_mine(_pattern_listeners, module))


def emit_pattern(module: nn.Module, source: PatternSource) -> None:
    for fn in _mine(_pattern_listeners, module):
        fn(source)


def key_keep(module: nn.Module, batch: int, n_keys: int, device: torch.device) -> torch.Tensor | None:
    """AND of every key mask attached to `module`: bool (batch, n_keys), or None when none is."""
    fns = _mine(_key_masks, module) if module in _key_masks else []
    if not fns:
        return None
    keep = torch.ones(batch, n_keys, dtype=torch.bool, device=device)
    for fn in fns:
        m = fn(batch, n_keys, device).to(device=device, dtype=torch.bool)
        if m.shape[-1] != n_keys:
            raise ValueError(f"key mask has {m.shape[-1]} keys; this attention has {n_keys}")
        keep = keep & m.expand(batch, n_keys)
    return keep


def keep_to_additive(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool keep-mask (batch, keys) -> additive mask (batch, 1, 1, keys): 0 kept, dtype min masked.

    The finite minimum (not -inf) gives masked keys exactly zero weight after softmax while a row
    whose keys are all masked stays finite.
    """
    add = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    add.masked_fill_(~keep, torch.finfo(dtype).min)
    return add[:, None, None, :]


def active_site_count() -> int:
    """Number of modules with anything attached (0 outside every capture/intervene context)."""
    return len(_pattern_listeners) + len(_key_masks) + len(_bridges) + len(_grad_listeners)


# ------------------------------------------------------- modules that compute attention themselves
# BLIP and GIT's text stack compute softmax(QK^T + mask) in their own forward and return the
# probabilities. Two refcounted torch hooks make them attention sites like the others: a forward
# hook emits the returned probabilities to pattern listeners, and a forward pre-hook adds the key
# masks of interventions to the module's mask argument (with a post-hook that zeroes rows left
# with no key, as `PatternSource.zero_dead_rows` does).

_bridges: weakref.WeakKeyDictionary[nn.Module, dict[str, list]] = weakref.WeakKeyDictionary()


class _BridgeHandle:
    def __init__(self, module: nn.Module, key: str) -> None:
        self._module, self._key, self._done = weakref.ref(module), key, False

    def remove(self) -> None:
        module = self._module()
        with LOCK:
            if self._done or module is None:
                return
            self._done = True
            entry = _bridges.get(module, {}).get(self._key)
            if entry is None:
                return
            entry[0] -= 1
            if entry[0] == 0:
                for h in entry[1]:
                    h.remove()
                del _bridges[module][self._key]
                if not _bridges[module]:
                    del _bridges[module]


def refcounted(module: nn.Module, key: str, install: Callable[[], list]) -> _BridgeHandle:
    """Run `install()` (-> handles with ``remove()``) once for (`module`, `key`) however many
    contexts ask, in any thread; the last handle removed removes what it installed."""
    with LOCK:
        entries = _bridges.setdefault(module, {})
        if key in entries:
            entries[key][0] += 1
        else:
            entries[key] = [1, install()]
        return _BridgeHandle(module, key)


def bridge_output_pattern(module: nn.Module, output_index: int) -> _BridgeHandle:
    """Emit the probabilities `module` returns at `output_index` (batch, heads, q, k) as its pattern."""

    def install() -> list:
        def hook(m: nn.Module, _args: tuple, out: tuple) -> None:
            probs = out[output_index]
            emit_grad(m, probs)
            if not wants_pattern(m):
                return

            def compute(heads: Index, rows: Index) -> torch.Tensor:
                return select_rows(select_heads(probs, heads), rows).float()

            emit_pattern(m, PatternSource(compute=compute, n_heads=probs.shape[1]))

        return [module.register_forward_hook(hook)]

    return refcounted(module, f"pattern@{output_index}", install)


def route_key_masks(module: nn.Module, mask_arg: str, mask_base: str | None, output_index: int) -> _BridgeHandle:
    """Make a self-computing attention module honour `add_key_mask`: before its forward, the key
    masks are added to the additive mask it reads from `mask_arg` (starting from the mask found
    in `mask_base`, default `mask_arg`); after it, rows with no key left are zeroed in its
    context output (index 0) and probabilities (`output_index`).

    The number of keys is read from ``encoder_hidden_states`` (cross-attention) or else from the
    last dimension of the base mask.
    """
    import inspect

    sig = inspect.signature(module.forward)
    for arg in {mask_arg, mask_base or mask_arg}:
        if arg not in sig.parameters:
            raise TypeError(f"{type(module).__name__}.forward has no argument {arg!r} to route a key mask through")

    def install() -> list:
        state = threading.local()  # the rows left alive, per thread, from pre- to post-hook

        def pre(m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            state.alive = None
            if not _mine(_key_masks, m):
                return None
            bound = sig.bind(*args, **kwargs)
            hidden = next(iter(bound.arguments.values()))
            base = bound.arguments.get(mask_base or mask_arg)
            enc = bound.arguments.get("encoder_hidden_states")
            if enc is not None:
                n_keys = enc.shape[1]
            elif base is not None:
                n_keys = base.shape[-1]
            else:
                raise RuntimeError(f"{type(m).__name__}: cannot tell how many keys to mask (no mask, no encoder states)")
            dtype = base.dtype if base is not None and base.is_floating_point() else hidden.dtype
            keep = key_keep(m, hidden.shape[0], n_keys, hidden.device)
            add = keep_to_additive(keep, dtype)
            if base is not None and base.dtype == torch.bool:
                base = torch.zeros(base.shape, dtype=dtype, device=base.device).masked_fill_(~base, torch.finfo(dtype).min)
            mask = add if base is None else (base.to(dtype) + add).clamp_min(torch.finfo(dtype).min)
            bound.arguments[mask_arg] = mask
            state.alive = alive_rows(mask)  # (b, 1|h, q|1, 1)
            return bound.args, bound.kwargs

        def post(_m: nn.Module, _args: tuple, out: tuple) -> tuple | None:
            alive = getattr(state, "alive", None)
            if alive is None:
                return None
            state.alive = None
            ctx, probs = out[0], out[output_index]
            # the context was computed from these probabilities: they, not the masked copy returned
            # below, are what gradients must reach
            emit_grad(_m, probs)
            probs = probs * alive.to(probs.dtype)
            setattr(probs, _EMITTED, True)
            row = alive.any(dim=1).to(ctx.dtype)  # (b, q|1, 1): a row is dead in every head alike
            ctx = ctx * row
            new = list(out)
            new[0], new[output_index] = ctx, probs
            return tuple(new)

        return [module.register_forward_pre_hook(pre, with_kwargs=True),
                module.register_forward_hook(post, prepend=True)]

    return refcounted(module, f"mask:{mask_arg}", install)
