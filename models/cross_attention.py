"""Cross-attention conditioning: an image feature map queries a text context.

Queries come from the feature map (batch, channels, h, w) through a 1x1 convolution; keys and values
from the context (batch, seq, emb) through linear maps; the attended values return through a 1x1
convolution and are added to the feature map (a residual conditioning block)::

    A = softmax(Q K^T / sqrt(d) + mask)      (batch, heads, h*w, seq)
    out = x + conv_out(A V)

`key_padding_mask` (batch, seq) is True at padding. Masked keys get exactly zero weight (the
weights are multiplied by the keep-mask after the softmax), so a row whose keys are all masked is
all zeros, never NaN, and contributes nothing. The pattern is captured as
``vision.blocks.{i}.xattn.pattern`` (batch, heads, h*w, seq): image queries, text keys.
"""

from __future__ import annotations

import torch
from torch import nn

from probe.capture import sites
from probe.capture.sites import PatternSource, keep_to_additive


def _masked_softmax(scores: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dim of (b, h, q, k) with bool keep (b, k); masked -> exactly 0."""
    if keep is None:
        return torch.softmax(scores, dim=-1)
    p = torch.softmax(scores + keep_to_additive(keep, scores.dtype), dim=-1)
    return p * keep[:, None, None, :].to(p.dtype)


def _keep(module: nn.Module, key_padding_mask: torch.Tensor | None, b: int, s: int, dev: torch.device):
    keep = None if key_padding_mask is None else ~key_padding_mask.to(device=dev, dtype=torch.bool)
    if keep is not None and keep.shape != (b, s):
        raise ValueError(f"key_padding_mask must be (batch={b}, seq={s}); got {tuple(keep.shape)}")
    extra = sites.key_keep(module, b, s, dev)
    if extra is not None:
        keep = extra if keep is None else keep & extra
    return keep


class CrossAttentionConditioning(nn.Module):
    """Multi-head conditioning block. ``forward(x (b,c,h,w), context (b,s,e), key_padding_mask) -> (b,c,h,w)``."""

    def __init__(self, channels: int, context_dim: int, heads: int = 4, head_dim: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim or max(channels // heads, 1)
        inner = heads * self.head_dim
        self.to_q = nn.Conv2d(channels, inner, kernel_size=1)
        self.to_k = nn.Linear(context_dim, inner)
        self.to_v = nn.Linear(context_dim, inner)
        self.to_out = nn.Conv2d(inner, channels, kernel_size=1)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, _, h, w = x.shape
        s = context.shape[1]
        q = self.to_q(x).flatten(2).transpose(1, 2).reshape(b, h * w, self.heads, self.head_dim).transpose(1, 2)
        k = self.to_k(context).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        v = self.to_v(context).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        keep = _keep(self, key_padding_mask, b, s, x.device)
        p = _masked_softmax(q @ k.transpose(-1, -2) * self.head_dim**-0.5, keep)
        sites.emit_grad(self, p)
        if sites.wants_pattern(self):
            sites.emit_pattern(self, PatternSource(
                compute=lambda hs, rs: sites.select_rows(sites.select_heads(p, hs), rs).float(), n_heads=self.heads))
        o = (p @ v).transpose(1, 2).reshape(b, h * w, -1).transpose(1, 2).reshape(b, -1, h, w)
        return x + self.to_out(o)


class SingleHeadCrossAttention(nn.Module):
    """The single-head block written without head reshaping (a reference for the multi-head one)."""

    def __init__(self, channels: int, context_dim: int, dim: int | None = None) -> None:
        super().__init__()
        self.dim = dim or channels
        self.to_q = nn.Conv2d(channels, self.dim, kernel_size=1)
        self.to_k = nn.Linear(context_dim, self.dim)
        self.to_v = nn.Linear(context_dim, self.dim)
        self.to_out = nn.Conv2d(self.dim, channels, kernel_size=1)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, _, h, w = x.shape
        q = self.to_q(x).flatten(2).transpose(1, 2)  # (b, hw, d)
        k, v = self.to_k(context), self.to_v(context)  # (b, s, d)
        keep = _keep(self, key_padding_mask, b, context.shape[1], x.device)
        p = _masked_softmax((q @ k.transpose(1, 2) / self.dim**0.5)[:, None], keep)[:, 0]
        o = (p @ v).transpose(1, 2).reshape(b, self.dim, h, w)
        return x + self.to_out(o)


class TextConditionedClassifier(nn.Module):
    """A small model around the block: a conv stem's feature map conditioned on a text query.

    ``forward(pixel_values (b,3,H,W), input_ids (b,s), key_padding_mask (b,s)) -> logits (b, classes)``.
    """

    def __init__(self, vocab_size: int, num_classes: int, channels: int = 32, emb: int = 32, heads: int = 2,
                 image_size: int = 32) -> None:
        super().__init__()
        #: the constructor's arguments (a checkpoint's config); `image_size`: the images it is meant for
        self.cfg = {"vocab_size": vocab_size, "num_classes": num_classes, "channels": channels, "emb": emb,
                    "heads": heads, "image_size": image_size}
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.GELU(),
        )
        self.embed = nn.Embedding(vocab_size, emb)
        self.block = CrossAttentionConditioning(channels, emb, heads=heads)
        self.head = nn.Linear(channels, num_classes)

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        fmap = self.block(self.stem(pixel_values), self.embed(input_ids), key_padding_mask)
        return self.head(fmap.mean(dim=(2, 3)))

