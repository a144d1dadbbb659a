"""Multi-modal causal attention (MMCA; DeepSpeed-VisualChat, Yao et al. 2023, arXiv 2309.14327).

Visual tokens attend only to visual tokens. A text token attends causally to earlier text tokens
and to all visual tokens, with *separate* softmaxes whose outputs are summed::

    V' = softmax(Q_V K_V^T / sqrt d) V_V
    T' = softmax(Q_T K_T^T / sqrt d, causal) V_T + softmax(Q_T K_V^T / sqrt d) V_V

so text-to-image weights do not compete with text-to-text weights. Both patterns are captured:
``text.blocks.{i}.attn.pattern`` (text->text, (batch, heads, text, text)) and
``text.blocks.{i}.xattn.pattern`` (text->image, (batch, heads, text, image)). Masking visual keys
(`MaskTokens` on the xattn hook) zeroes their weights *after* the softmax, so removing every image
token gives a zero image term (the blind baseline), never NaN.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from probe.capture import sites
from probe.capture.sites import AttentionSite, PatternSource, keep_to_additive
from probe.models.own_captioners import CharCaptioner
from probe.models.text import EncodeDecodeCaptioner
from probe.models.vit import ViT, ViTConfig, vit_block
from probe.registry import register_model
from probe.types import FUSION_PROJ, VISION_OUTPUT, Block, Capabilities, Hook, HookSpec, Recipe, prefixed


class MMCAAttention(nn.Module):
    """One MMCA layer's attention over a visual stream (b, nv, d) and a text stream (b, nt, d)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim**-0.5
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.vision_site, self.text_site, self.cross_site = AttentionSite(), AttentionSite(), AttentionSite()

    def _heads(self, x: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        b, n, _ = x.shape
        return proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def _merge(self, o: torch.Tensor) -> torch.Tensor:
        b, h, n, d = o.shape
        return self.out_proj(o.transpose(1, 2).reshape(b, n, h * d))

    @staticmethod
    def _softmax(scores: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        if keep is not None:
            scores = scores + keep_to_additive(keep, scores.dtype)
        p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)
        # all-masked rows: zero, not uniform
        return p if keep is None else p * keep[:, None, None, :].to(p.dtype)

    def forward(self, vis: torch.Tensor, txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, nv, _ = vis.shape
        nt = txt.shape[1]
        qv, kv, vv = (self._heads(vis, p) for p in (self.q_proj, self.k_proj, self.v_proj))
        qt, kt, vt = (self._heads(txt, p) for p in (self.q_proj, self.k_proj, self.v_proj))
        causal = torch.ones(nt, nt, dtype=torch.bool, device=txt.device).tril()
        causal_add = torch.zeros(nt, nt, dtype=qt.dtype, device=txt.device).masked_fill_(
            ~causal, torch.finfo(qt.dtype).min
        )
        # an image token removed from what the text reads is removed as a key of the visual stream
        # too: otherwise kept image tokens would relay its content to the text in later layers
        keep_ti = sites.key_keep(self.cross_site, b, nv, vis.device)
        keep_vv = sites.key_keep(self.vision_site, b, nv, vis.device)
        if keep_ti is not None:
            keep_vv = keep_ti if keep_vv is None else keep_vv & keep_ti
        p_vv = self._softmax(qv @ kv.transpose(-1, -2) * self.scale, keep_vv)
        p_tt = self._softmax(qt @ kt.transpose(-1, -2) * self.scale + causal_add,
                             sites.key_keep(self.text_site, b, nt, txt.device))
        p_ti = self._softmax(qt @ kv.transpose(-1, -2) * self.scale, keep_ti)
        for site, p in ((self.vision_site, p_vv), (self.text_site, p_tt), (self.cross_site, p_ti)):
            sites.emit_grad(site, p)
            if sites.wants_pattern(site):
                sites.emit_pattern(site, _fixed(p))
        return self._merge(p_vv @ vv), self._merge(p_tt @ vt + p_ti @ vv)


def _fixed(p: torch.Tensor) -> PatternSource:
    def compute(heads: sites.Index, rows: sites.Index) -> torch.Tensor:
        return sites.select_rows(sites.select_heads(p, heads), rows).float()

    return PatternSource(compute=compute, n_heads=p.shape[1])


class MMCABlock(nn.Module):
    """Pre-norm block: MMCA over both streams, then a shared MLP on each stream."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = MMCAAttention(dim, heads)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, vis: torch.Tensor, txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dv, dt = self.attn(self.norm1(vis), self.norm1(txt))
        vis, txt = vis + dv, txt + dt
        return vis + self.mlp(self.norm2(vis)), txt + self.mlp(self.norm2(txt))


@dataclass(frozen=True)
class MMCAConfig:
    vocab_size: int
    dim: int = 128
    depth: int = 2
    heads: int = 4
    max_len: int = 64
    vision: dict | None = None  # ViTConfig fields of the encoder

    def to_dict(self) -> dict:
        return asdict(self)


class MMCACaptioner(EncodeDecodeCaptioner):
    """A from-scratch ViT encoder (CLS + patch tokens), a linear projection, MMCA decoder blocks, a char head.

    ``forward(pixel_values (b, 3, H, W), input_ids (b, nt)) -> logits (b, nt, vocab)``.
    """

    def __init__(self, cfg: MMCAConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_config = ViTConfig(**(cfg.vision or {}))
        self.vision = ViT(self.vision_config)
        self.proj = nn.Linear(self.vision_config.dim, cfg.dim)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_emb = nn.Parameter(torch.randn(1, cfg.max_len, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(MMCABlock(cfg.dim, cfg.heads) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(b, 3, H, W) -> projected vision tokens (b, 1 + patches, dim), the ViT's CLS first, so
        the visual stream is indexed like the encoder's tokens."""
        return self.proj(self.vision(pixel_values, features=True))

    def decode(self, vis: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        nt = self.check_length(input_ids)
        txt = self.tok_emb(input_ids) + self.pos_emb[:, :nt]
        for blk in self.blocks:
            vis, txt = blk(vis, txt)
        return self.head(self.norm(txt))


class MMCAAdapter(CharCaptioner):
    """``mmca``. `load(config=...)`: `MMCAConfig` fields (``vision``: the ViT's `ViTConfig` fields)."""

    name = "mmca"
    capabilities = Capabilities(family="mmca", fusion="multimodal_causal", has_cross_attention=True, tasks=("caption",))
    model: MMCACaptioner

    @classmethod
    def _spec(cls, config: dict[str, Any], vocab_size: int, meta: bool) -> dict[str, Any]:
        return {"config": {"vocab_size": vocab_size, **config}}

    @classmethod
    def _model(cls, spec: dict[str, Any]) -> MMCACaptioner:
        return MMCACaptioner(MMCAConfig(**spec["config"]))

    def _config_json(self) -> dict[str, Any]:
        return {"config": self.model.cfg.to_dict()}

    @property
    def image_size(self) -> int:
        return self.model.vision_config.image_size

    @property
    def patch_size(self) -> int:
        return self.model.vision_config.patch_size

    def blocks(self) -> list[Block]:
        h = self.model.cfg.heads
        return [*prefixed([vit_block(self.model.vision_config)], "vision."),
                Block("text", "blocks.{i}", self.model.cfg.depth, (
                    Hook("attn.pattern", "attn.text_site", "pattern", n_heads=h,
                         shape="(batch, heads, text, text): causal text->text softmax"),
                    Hook("xattn.pattern", "attn.cross_site", "pattern", n_heads=h,
                         shape="(batch, heads, text, image): text->image softmax"),
                    Hook("vattn.pattern", "attn.vision_site", "pattern", n_heads=h,
                         shape="(batch, heads, image, image): the visual stream's softmax"),
                    Hook("attn.z", "attn.out_proj", "input", n_heads=h, calls=2,
                         shape="(batch, tokens, heads * head_dim): called twice, the visual stream then the text"),
                    Hook("resid_post", "", "output", output_index=1,
                         shape="(batch, text, dim): the text stream (the block returns (visual, text))"),
                    Hook("vresid_post", "", "output", output_index=0,
                         shape="(batch, image, dim): the visual stream"),
                ))]

    def single_hooks(self) -> list[HookSpec]:
        return [HookSpec(VISION_OUTPUT, "vision", "output"), HookSpec(FUSION_PROJ, "proj", "output")]


register_model("mmca", MMCAAdapter.load, capabilities=MMCAAdapter.capabilities,
               summary="ViT + MMCA decoder: separate text->text and text->image softmaxes",
               recipe=Recipe("mmca", "caption", {"dim": 96, "depth": 3, "heads": 4, "max_len": 96,
                                                 "vision": {"dim": 64, "depth": 3, "heads": 4, "image_size": 64,
                                                            "patch_size": 8}},
                             n_train=12000, steps=3000, lr=2e-3))
