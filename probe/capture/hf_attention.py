"""A capturing attention function for transformers' `AttentionInterface`.

Registered as ``probe_capture``. It computes every layer's output with transformers' own SDPA
function (the fast kernel; output bit-identical to ``sdpa``) and, only for modules that a capture
listens to, hands `probe.capture.sites` a lazy `PatternSource` from which the listener computes
``softmax(Q K^T * scale + mask)`` for just the heads and query rows it asked for. Key masks from
interventions are added to the attention mask. The name avoids "sdpa" on purpose: transformers
matches that substring and would run its own SDPA checks.

Inside `probe.capture.sites.output_from_pattern()` (opt-in), a layer whose full pattern (every
head, every query row) is listened to computes its output as ``P @ V`` from that pattern and
skips the kernel: attention is computed once. That output equals transformers' eager attention
(``softmax(..., dtype=float32).to(dtype) @ V``), so it differs from SDPA's by float rounding only;
calls that P @ V would not reproduce (dropout, position bias, gradient listeners, autograd
through the pattern, a causal choice unlike SDPA's) keep the kernel.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from probe.capture import sites
from probe.capture.sites import PatternSource, keep_to_additive

NAME = "probe_capture"
_registered = False


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None or mask.dtype != torch.bool:
        return mask
    add = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return add.masked_fill_(~mask, torch.finfo(dtype).min)


def capturing_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Drop-in for transformers' SDPA attention function; see the module docstring.

    query (batch, heads, q, head_dim), key and value (batch, kv_heads, k, head_dim); returns the
    output (batch, q, heads, head_dim) and None for the weights, as ``sdpa_attention_forward`` does.
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    keep = sites.key_keep(module, query.shape[0], key.shape[2], query.device)
    alive = None
    if keep is not None:
        add = keep_to_additive(keep, query.dtype)
        base = _additive(attention_mask, query.dtype)
        if base is None and getattr(module, "is_causal", False) and query.shape[2] > 1:
            base = _causal(query.shape[2], key.shape[2], query.dtype, query.device)
        attention_mask = add if base is None else (base + add).clamp_min(torch.finfo(query.dtype).min)
        alive = sites.alive_rows(attention_mask)  # (b, 1|h, q|1, 1)
    kwargs.pop("output_attentions", None)

    def kernel() -> torch.Tensor:
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        if alive is not None:
            # a query whose keys were all removed reads nothing (SDPA would spread it uniformly)
            out = out * alive.any(dim=1, keepdim=True).transpose(1, 2).to(out.dtype)
        return out

    grad = sites.wants_grad(module)
    listen = sites.wants_pattern(module)
    if not (grad or listen):
        return kernel(), None
    mask = _additive(attention_mask, query.dtype)
    causal = mask is None and getattr(module, "is_causal", False) and query.shape[2] > 1
    if causal:
        mask = _causal(query.shape[2], key.shape[2], query.dtype, query.device)
    n_rep = query.shape[1] // key.shape[1]
    k = repeat_kv(key, n_rep) if n_rep > 1 else key
    # under `sites.output_from_pattern`, the values go with the pattern: if a listener computes the
    # full pattern, P @ V is computed with it and replaces the kernel (attention computed once)
    from_pattern = (not grad and sites.output_from_pattern_enabled()
                    and not (torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)))
                    and _pattern_gives_kernel_output(module, query, key, attention_mask, causal, kwargs))
    v = (repeat_kv(value, n_rep) if n_rep > 1 else value) if from_pattern else None
    source = PatternSource(query, k, kwargs.get("scaling"), mask, zero_dead_rows=alive is not None, value=v)
    if listen:
        sites.emit_pattern(module, source)
    if from_pattern:
        out = sites.pattern_output(source)
        if out is not None:
            if attention_mask is not None and attention_mask.dtype == torch.bool:
                # SDPA reads nothing in a row whose bool mask keeps no key (the pattern is uniform there)
                out = out * attention_mask.any(dim=-1, keepdim=True).to(out.dtype)
            return out.transpose(1, 2).contiguous(), None
    out = kernel()
    if grad:  # recompute the output from the pattern so that gradients reach it (see sites.attend)
        v = repeat_kv(value, n_rep) if n_rep > 1 else value
        out = sites.attend(module, source, v, out.transpose(1, 2)).transpose(1, 2).contiguous()
    return out, None


def _pattern_gives_kernel_output(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                                 attention_mask: torch.Tensor | None, causal: bool, kwargs: dict) -> bool:
    """Whether ``softmax(Q K^T * scale + mask) @ V`` with our mask is what ``sdpa_attention_forward``
    computes for this call: no dropout, no position bias, no paged cache or softcap, and the same
    causal choice (SDPA's: the ``is_causal`` argument, else the module's, default True; it also
    crops keys when a causal prefill has more keys than queries)."""
    if kwargs.get("dropout") or any(kwargs.get(k) is not None for k in ("position_bias", "cache", "softcap")):
        return False
    flag = kwargs.get("is_causal")
    flag = getattr(module, "is_causal", True) if flag is None else flag
    sdpa_causal = bool(query.shape[2] > 1 and attention_mask is None and flag)
    return sdpa_causal == causal and not (causal and key.shape[2] != query.shape[2])


def _causal(nq: int, nk: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    allowed = torch.arange(nq, device=device)[:, None] + (nk - nq) >= torch.arange(nk, device=device)[None, :]
    return torch.zeros(nq, nk, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)


def register() -> str:
    """Register ``probe_capture`` in transformers' attention interface (idempotent); return the name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

        AttentionInterface.register(NAME, capturing_attention)
        # without a mask function of its own, transformers builds no mask at all for a custom
        # attention name (padding would be ignored); ours takes the same masks as SDPA
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
        _registered = True
    return NAME
