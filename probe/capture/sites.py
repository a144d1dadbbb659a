"""Attention sites: the one place where attention modules meet the capture engine.

An attention module (ours, or a transformers module dispatched through our attention function) asks
this registry two questions on every call, both O(1) when nothing is attached:

- `key_keep(module, ...)`: does an intervention mask some keys? Returns a bool (batch, keys) tensor.
- `wants_pattern(module)`: is anything listening for this module's pattern? If so the module calls
  `emit_pattern(module, source)` with a lazy `PatternSource`, and each listener computes only the
  heads and query rows it needs. The output of the attention itself never changes: it is still
  computed by the module's own (fast) kernel, unless the caller opted in to `output_from_pattern`,
  where a module whose full pattern was computed anyway may take its output from it
  (`pattern_output`: eager attention's numbers, computed once).

Listeners are attached and removed by `probe.capture`, always inside a context manager; the
registry holds modules weakly, so nothing here keeps a model alive or outlives it. Everything
attached belongs to the thread that attached it: a forward in another thread sees none of it, so
one adapter can serve captures and interventions from several threads at once.
"""

from __future__ import annotations

import itertools
import math
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

Index = int | slice | Sequence[int] | torch.Tensor | None


class PatternSource:
    """Everything needed to compute a layer's attention pattern, lazily.

    The default computation is exact softmax attention, ``softmax(Q K^T * scale + mask)``,
    softmax in float32 as transformers' eager attention does (float64 inputs stay float64). Approximate attention kinds pass
    their own `compute` for the effective token-by-token matrix.

    The full exact pattern (every head, every query row) is computed at most once per source and
    shared: every listener that asks for it gets the same tensor (treat it as read-only), and later
    head/row selections are sliced from it. Without autograd it is built in place, one
    (batch, heads, q, k) allocation, and on CPU block by block (a few heads of one batch element
    at a time, so that each block is scaled, masked, normalised and, when `value` was given,
    multiplied by the values while it is in cache); `pattern_output` then returns that output.

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
        value: (batch, heads, n_key, head_dim_v), or None. When given, computing the full
            pattern also computes ``P @ value`` in the same pass (see `pattern_output`).
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
        value: torch.Tensor | None = None,
    ) -> None:
        if compute is None and (query is None or key is None):
            raise ValueError("PatternSource needs query and key, or a compute function")
        self.query, self.key, self.mask, self.value = query, key, mask, value
        self.scale = scale if scale is not None else (query.shape[-1] ** -0.5 if query is not None else 1.0)
        self._compute = compute
        self.approximate = approximate
        self.zero_dead_rows = zero_dead_rows
        self.n_heads = n_heads if n_heads is not None else (query.shape[1] if query is not None else None)
        self._full: torch.Tensor | None = None  # the full pattern, once computed
        self._out: torch.Tensor | None = None  # P @ value, computed with it (no autograd)

    def compute(self, heads: Index = None, rows: Index = None) -> torch.Tensor:
        """Pattern for the selected heads and query rows: (batch, heads', rows', n_key)."""
        if self._compute is not None:
            return self._compute(heads, rows)
        full = self.full_pattern()
        if full is not None:
            if heads is None and rows is None:
                return full
            part = select_rows(select_heads(full, heads), rows)
            # a selection is a tensor of its own, never a view that keeps the full pattern alive
            return part.clone() if part.untyped_storage().data_ptr() == full.untyped_storage().data_ptr() else part
        if heads is None and rows is None:
            if self._needs_graph() or not _blockable(self.query, self.key, self.mask, self.value):
                self._full, self._out = self._exact(self.query, self.key, self.mask), None
            else:
                self._full, self._out = self._blocked()
            return self._full
        mask = None if self.mask is None else select_mask(self.mask, heads, rows)
        return self._exact(select_rows(select_heads(self.query, heads), rows), select_heads(self.key, heads), mask)

    def full_pattern(self) -> torch.Tensor | None:
        """The full exact pattern (batch, heads, q, k) if a listener already computed it, and
        unless it lacks an autograd graph that the current grad mode and inputs would give it."""
        full = self._full
        if full is None or full.requires_grad or not self._needs_graph():
            return full
        return None

    def _needs_graph(self) -> bool:
        return torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (self.query, self.key, self.mask))

    def _exact(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``softmax(q k^T * scale + mask)`` in at least float32, rows zeroed per `zero_dead_rows`."""
        dtype = torch.promote_types(q.dtype, torch.float32)  # at least float32; float64 stays
        if self._needs_graph():  # out of place, so that autograd can follow
            scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
            if mask is None:
                return torch.softmax(scores, dim=-1, dtype=dtype)
            p = torch.softmax(scores + mask, dim=-1, dtype=dtype)
            return p * alive_rows(mask).to(p.dtype) if self.zero_dead_rows else p
        # no graph: one (b, h, q, k) buffer, scaled, masked and normalised in place. A power-of-two
        # scale (head_dim 64: 1/8) is applied to q first, which is exact, so the scores equal
        # eager's ``(q k^T) * scale`` bit for bit while a pass over the large buffer is saved
        if _power_of_two(self.scale):
            scores = torch.matmul(q * self.scale, k.transpose(-1, -2))
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)).mul_(self.scale)
        if mask is not None:
            same = torch.result_type(scores, mask) == scores.dtype
            if same and torch.broadcast_shapes(scores.shape, mask.shape) == scores.shape:
                scores.add_(mask)
            else:  # the sum promotes or broadcasts wider, as eager's ``scores + mask`` does
                scores = scores + mask
        if scores.dtype == dtype and scores.device.type == "cpu":
            p = torch.softmax(scores, dim=-1, out=scores)  # row by row: safe in place on CPU
        else:
            p = torch.softmax(scores, dim=-1, dtype=dtype)
        if mask is not None and self.zero_dead_rows:
            p.mul_(alive_rows(mask).to(p.dtype))
        return p

    def _blocked(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The full pattern (b, h, q, k) and, with `value`, ``P @ value`` (b, h, q, dv), computed
        block by block (see the class docstring); `_exact`'s formula and operation order, cache-friendly."""
        q, k, mask, value = self.query, self.key, self.mask, self.value
        b, h, nq, _ = q.shape
        nk = k.shape[2]
        exact_scale = _power_of_two(self.scale)
        qs = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous, for the block products
        if exact_scale:
            torch.mul(q, self.scale, out=qs)
        else:
            qs.copy_(q)
        kt = k.contiguous().transpose(-1, -2)
        v = None if value is None else value.contiguous()
        p = torch.empty(b, h, nq, nk, dtype=q.dtype, device=q.device)
        # the output is laid out (b, q, h, dv), as attention modules merge heads, and returned as a view
        out = None if v is None else torch.empty(b, nq, h, v.shape[-1], dtype=q.dtype, device=q.device).transpose(1, 2)
        m = None if mask is None else mask.view(*[1] * (4 - mask.dim()), *mask.shape)
        step = max(1, min(h, _BLOCK_BYTES // max(1, nq * nk * q.element_size())))
        for i in range(b):
            for h0 in range(0, h, step):
                hs = slice(h0, min(h, h0 + step))
                blk = p[i, hs]
                torch.bmm(qs[i, hs], kt[i, hs], out=blk)
                if not exact_scale:
                    blk.mul_(self.scale)
                if m is not None:
                    mb = m[i if m.shape[0] > 1 else 0, hs if m.shape[1] > 1 else slice(None)]
                    blk.add_(mb)
                torch.softmax(blk, dim=-1, out=blk)  # row by row: safe in place on CPU
                if m is not None and self.zero_dead_rows:
                    blk.mul_(alive_rows(mb).to(blk.dtype))
                if out is not None:
                    torch.bmm(blk, v[i, hs], out=out[i, hs])
        return p, out


def _power_of_two(x: float) -> bool:
    return x > 0 and math.frexp(x)[0] == 0.5


#: bytes of scores per block in `PatternSource._blocked` (about what stays in a core's L2 cache)
_BLOCK_BYTES = 2 << 20


def _blockable(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, value: torch.Tensor | None) -> bool:
    """Whether `PatternSource._blocked` applies: CPU, float32/float64 throughout (so that the
    softmax runs in place without a cast), 4-d q/k/value with the same batch and heads, a mask
    that broadcasts onto the scores without widening them."""
    if q.device.type != "cpu" or q.dtype not in (torch.float32, torch.float64) or q.dim() != 4:
        return False
    if k.dtype != q.dtype or k.shape[:2] != q.shape[:2] or k.device != q.device:
        return False
    if value is not None and (value.dtype != q.dtype or value.shape[:3] != k.shape[:3] or value.device != q.device):
        return False
    if mask is None:
        return True
    shape = (*q.shape[:3], k.shape[2])
    return (mask.dtype == q.dtype and mask.device == q.device and mask.dim() <= 4
            and torch.broadcast_shapes(shape, mask.shape) == shape)


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


# ------------------------------------------------- the output from the pattern (opt-in, per thread)
_local = threading.local()


@contextmanager
def output_from_pattern(enabled: bool = True) -> Iterator[None]:
    """While the block runs (in this thread), a softmax attention site whose *full* exact pattern
    ``P = softmax(Q K^T * scale + mask)`` (every head, every query row) was computed for a
    listener computes its output as ``P @ V`` from that very tensor instead of also running its
    fast kernel: attention is computed once, not twice (what makes full-map capture cheap).

    The output then equals eager attention (``softmax(..., dtype=float32).to(dtype) @ V``), which
    equals the SDPA kernel's only up to float rounding (about 1e-6 relative in float32): outputs
    are no longer bit-identical to an uncaptured forward, hence opt-in. Sites fall back to the
    kernel whenever the pattern would not give the kernel's output: only some heads or rows
    listened to, gradient listeners attached, autograd needing the pattern's graph, dropout,
    position biases, or a causal choice that differs from the kernel's.
    """
    before = getattr(_local, "pattern_output", False)
    _local.pattern_output = enabled
    try:
        yield
    finally:
        _local.pattern_output = before


def output_from_pattern_enabled() -> bool:
    """Whether `output_from_pattern` is on in the calling thread."""
    return getattr(_local, "pattern_output", False)


def pattern_output(source: PatternSource, value: torch.Tensor | None = None) -> torch.Tensor | None:
    """``P @ value`` (batch, heads, q, head_dim), in `value`'s dtype, from the full exact pattern
    `P` (batch, heads, q, k) that listeners made `source` compute, when `output_from_pattern` is on.

    `value`: (batch, heads, k, head_dim), heads already repeated for grouped-query attention;
    default ``source.value``, whose product was then computed block by block with `P`. Returns
    None when the policy is off, when no listener asked for the full pattern, for approximate
    kinds, or when `P` lacks an autograd graph that the output needs: the caller then runs its
    own kernel.
    """
    if not output_from_pattern_enabled() or source._compute is not None:
        return None
    p = source.full_pattern()
    if p is None:
        return None
    value = source.value if value is None else value
    if value is None:
        return None
    if value is source.value and source._out is not None and not (torch.is_grad_enabled() and value.requires_grad):
        return source._out
    return torch.matmul(p.to(value.dtype), value)


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

    # the class's forward, not the instance attribute: nnsight replaces `module.forward` on the
    # instance with an unbound callable whose signature starts with the module itself
    sig = inspect.signature(type(module).forward)
    sig = sig.replace(parameters=list(sig.parameters.values())[1:])  # drop self
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
