"""A capturing attention function for transformers' `AttentionInterface`.

Registered as ``probe_capture``. It computes every layer's output with transformers' own SDPA
function (the fast kernel; output bit-identical to ``sdpa``) and, only for modules that a capture
listens to, hands `probe.capture.sites` a lazy `PatternSource` from which the listener computes
``softmax(Q K^T * scale + mask)`` for just the heads and query rows it asked for. Key masks from
interventions are added to the attention mask. The name avoids "sdpa" on purpose: transformers
matches that substring and would run its own SDPA checks.
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
    """Drop-in for transformers' SDPA attention function; see the module docstring."""
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
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if alive is not None:
        # a query whose keys were all removed reads nothing (SDPA would spread it uniformly)
        out = out * alive.any(dim=1, keepdim=True).transpose(1, 2).to(out.dtype)
    grad = sites.wants_grad(module)
    if grad or sites.wants_pattern(module):
        mask = _additive(attention_mask, query.dtype)
        if mask is None and getattr(module, "is_causal", False) and query.shape[2] > 1:
            mask = _causal(query.shape[2], key.shape[2], query.dtype, query.device)
        n_rep = query.shape[1] // key.shape[1]
        k = repeat_kv(key, n_rep) if n_rep > 1 else key
        scale = kwargs.get("scaling")
        source = PatternSource(query, k, scale, mask, zero_dead_rows=alive is not None)
        sites.emit_pattern(module, source)
        if grad:  # recompute the output from the pattern so that gradients reach it (see sites.attend)
            v = repeat_kv(value, n_rep) if n_rep > 1 else value
            out = sites.attend(module, source, v, out.transpose(1, 2)).transpose(1, 2).contiguous()
    return out, None


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
