"""`ActivationCache`: captured tensors keyed by canonical hook name, with input metadata."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from probe.types import HookSpec, InputMeta


class ActivationCache:
    """Tensors captured by `probe.capture.capture`, keyed by canonical hook name.

    A hook that fired once maps to one tensor. A hook that fired several times (generation steps,
    several forwards inside one context) keeps every call in order: `cache.calls(name)`.

    Attributes:
        meta: input metadata of the batch (token spans, patch grid), set by whoever ran the model.
        specs: the `HookSpec` of every captured name.
        selection: how patterns were reduced: ``{"heads": ..., "rows": ..., "reduce_heads": ...}``.
    """

    def __init__(self) -> None:
        self._data: dict[str, list[torch.Tensor]] = {}
        self.specs: dict[str, HookSpec] = {}
        self.meta: InputMeta | None = None
        self.selection: dict[str, object] = {}
        #: generation captures: the names captured once per step, and per batch element how many
        #: steps produced a token (the steps after are padding of the batch)
        self.stepwise: set[str] = set()
        self.step_lengths: list[int] | None = None

    def add(self, name: str, value: torch.Tensor) -> None:
        self._data.setdefault(name, []).append(value)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._data:
            known = ", ".join(list(self._data)[:8]) or "nothing"
            raise KeyError(f"{name!r} was not captured; the cache holds {known}")
        calls = self._data[name]
        if len(calls) > 1:
            raise ValueError(f"{name!r} was captured {len(calls)} times; use cache.calls({name!r})")
        return calls[0]

    def calls(self, name: str) -> list[torch.Tensor]:
        """Every captured value of `name`, in call order."""
        return list(self._data.get(name, []))

    def stack_calls(self, name: str, dim: int = 2) -> torch.Tensor:
        """Concatenate every call of `name` along `dim` (the query dim of a pattern), zero-padding
        the last dim to the longest call: generation steps' (b, h, 1, keys_k) rows ->
        (b, h, steps, max keys). Keys that did not exist yet at a step are 0, and so are the steps
        after each caption's end (`step_lengths`, set by generation capture)."""
        calls = self.calls(name)
        if not calls:
            raise KeyError(f"{name!r} was not captured; the cache holds {', '.join(self._data) or 'nothing'}")
        n = max(c.shape[-1] for c in calls)
        padded = [torch.nn.functional.pad(c, (0, n - c.shape[-1])) for c in calls]
        out = torch.cat(padded, dim=dim)
        if name in self.stepwise and self.step_lengths is not None:  # zero the steps after each caption's end
            done = torch.arange(out.shape[dim]).view(-1, *[1] * (out.dim() - dim - 1))
            lengths = torch.tensor(self.step_lengths).view(-1, *[1] * (out.dim() - 1))
            out = out * (done < lengths).to(out.dtype)
        return out

    def map_calls(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every call of `name` by ``fn(call)`` (e.g. keep the newest position)."""
        if name in self._data:
            self._data[name] = [fn(t) for t in self._data[name]]

    def detach_(self) -> None:
        """Detach every stored tensor in place (what a gradient capture does on exit, so that no
        autograd graph outlives its context)."""
        for calls in self._data.values():
            calls[:] = [t.detach() for t in calls]

    def __contains__(self, name: object) -> bool:
        return name in self._data

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def names(self) -> list[str]:
        return list(self._data)

    def to_arrays(self) -> dict[str, torch.Tensor]:
        """Flat mapping for storage: ``name`` for single calls, ``name@k`` for call k of many."""
        out: dict[str, torch.Tensor] = {}
        for name, calls in self._data.items():
            if len(calls) == 1:
                out[name] = calls[0]
            else:
                out.update({f"{name}@{k}": t for k, t in enumerate(calls)})
        return out
