"""Prefix VLM: a frozen ViT, one trained linear projection, a small causal character decoder.

Every vision token (the ViT's CLS and its patches) becomes a prefix token through
``Linear(vision_dim -> d_model)``. The decoder runs one self-attention stack over
``[prefix; text]``: prefix tokens attend to each other (bidirectional), text tokens attend to the
whole prefix and causally to earlier text. Only the projection trains by default (`train_decoder`
unfreezes the decoder too). Its text->image flow is the prefix span of the joint attention
(``text.blocks.{i}.attn.pattern``); there is no cross-attention.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from probe.models.attention import AttentionConfig, StandardAttention
from probe.models.text import EncodeDecodeCaptioner


@dataclass(frozen=True)
class PrefixDecoderConfig:
    vocab_size: int
    d_model: int = 128
    depth: int = 2
    heads: int = 4
    max_len: int = 64
    train_decoder: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DecoderBlock(nn.Module):
    """Pre-norm block with our standard attention under a joint (prefix + causal) mask."""

    def __init__(self, dim: int, heads: int, n: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = StandardAttention(AttentionConfig(dim=dim, heads=heads, seq_len=n))
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attn_mask=mask)
        return x + self.mlp(self.norm2(x))


def joint_mask(n_prefix: int, n_text: int, device: torch.device | None = None) -> torch.Tensor:
    """Bool (n, n), True where a query may attend: prefix<->prefix, text->prefix, text->earlier text."""
    n = n_prefix + n_text
    allowed = torch.zeros(n, n, dtype=torch.bool, device=device)
    allowed[:n_prefix, :n_prefix] = True
    allowed[n_prefix:, :n_prefix] = True
    allowed[n_prefix:, n_prefix:] = torch.ones(n_text, n_text, dtype=torch.bool, device=device).tril()
    return allowed


class PrefixVLM(EncodeDecodeCaptioner):
    """``forward(pixel_values, input_ids) -> logits (batch, n_text, vocab)``.

    Args:
        vision: a transformers ``ViTModel`` (frozen here: no gradients, always in eval mode).
    """

    def __init__(self, vision: nn.Module, cfg: PrefixDecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = vision.requires_grad_(False).eval()
        vcfg = vision.config
        self.n_prefix = (vcfg.image_size // vcfg.patch_size) ** 2 + 1
        self.proj = nn.Linear(vcfg.hidden_size, cfg.d_model)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Parameter(torch.randn(1, cfg.max_len, cfg.d_model) * 0.02)
        self.blocks = nn.ModuleList(
            DecoderBlock(cfg.d_model, cfg.heads, self.n_prefix + cfg.max_len) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size)
        for m in (self.tok_emb, self.blocks, self.norm, self.head):
            m.requires_grad_(cfg.train_decoder)
        self.pos_emb.requires_grad_(cfg.train_decoder)

    def train(self, mode: bool = True) -> PrefixVLM:
        super().train(mode)
        self.vision.eval()  # frozen: dropout and the like stay off
        return self

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) -> prefix (b, 1 + patches, d_model)."""
        with torch.no_grad():
            feats = self.vision(pixel_values=pixel_values).last_hidden_state
        return self.proj(feats)

    def decode(self, prefix: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        nt = self.check_length(input_ids)
        x = torch.cat([prefix, self.tok_emb(input_ids) + self.pos_emb[:, :nt]], dim=1)
        mask = joint_mask(prefix.shape[1], nt, x.device)
        for blk in self.blocks:
            x = blk(x, mask)
        return self.head(self.norm(x[:, prefix.shape[1] :]))
