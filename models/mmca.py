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

Generation keeps a `DecoderCache`: the visual stream does not depend on the text, so it is computed
once per generate call (with the text's first step), and each later step runs the newest text token
only, against the cached text keys and values and the cached visual keys and values. Hooks keep
what re-running the prefix gives them: text patterns and text ``resid_post``/``attn.z`` cover the
new query position (its row is the newest row of the uncached call), and whatever listens to the
visual stream gets, at every step, the cached values it had at the first step (the ``vattn``
pattern, ``vresid_post``, and ``attn.z``'s first call, the visual stream's, which `out_proj`
re-runs on the cached per-head output only while a hook is attached to it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from probe.capture import sites
from probe.capture.sites import AttentionSite, PatternSource, keep_to_additive
from probe.models.attention import observed
from probe.models.own_captioners import CharCaptioner
from probe.models.text import DecoderCache, EncodeDecodeCaptioner, keep_extends
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
        # at least float32 (float64 stays: its masked scores would overflow to -inf in float32)
        p = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(scores.dtype)
        # all-masked rows: zero, not uniform
        return p if keep is None else p * keep[:, None, None, :].to(p.dtype)

    def key_masks(self, batch: int, n_vis: int, n_text: int, device: torch.device
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Key masks of interventions (bool (batch, keys) or None): the visual stream's over its
        `n_vis` keys, text->image's over the `n_vis` image keys, text->text's over `n_text` keys."""
        # an image token removed from what the text reads is removed as a key of the visual stream
        # too: otherwise kept image tokens would relay its content to the text in later layers
        keep_ti = sites.key_keep(self.cross_site, batch, n_vis, device)
        keep_vv = sites.key_keep(self.vision_site, batch, n_vis, device)
        if keep_ti is not None:
            keep_vv = keep_ti if keep_vv is None else keep_vv & keep_ti
        return keep_vv, keep_ti, sites.key_keep(self.text_site, batch, n_text, device)

    def forward(self, vis: torch.Tensor | None, txt: torch.Tensor,
                cache: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """vis (b, nv, d), txt (b, nt, d) -> the two streams' attention outputs, same shapes.

        With `cache` (a `DecoderCache` layer; ``cache["keeps"]``: `key_masks` over every key, set by
        the caller): `txt` holds the new text positions only, appended to the cached text keys and
        values; the visual stream is computed and cached on the first call and read back on later
        ones, where `vis` may be None and the visual output returned is the cached one.
        """
        past = cache if cache is not None else {}
        b, nt = txt.shape[:2]
        first = "kv" not in past
        if cache is None:
            keep_vv, keep_ti, keep_tt = self.key_masks(b, vis.shape[1], nt, txt.device)
        else:
            keep_vv, keep_ti, keep_tt = cache["keeps"]
        if first:
            qv, kv, vv = (self._heads(vis, p) for p in (self.q_proj, self.k_proj, self.v_proj))
            p_vv = self._softmax(qv @ kv.transpose(-1, -2) * self.scale, keep_vv)
            o_vis = p_vv @ vv
        else:
            qv, kv, vv, o_vis = past["qv"], past["kv"], past["vv"], past["o_vis"]
            wanted = sites.wants_pattern(self.vision_site) or sites.wants_grad(self.vision_site)
            p_vv = self._softmax(qv @ kv.transpose(-1, -2) * self.scale, keep_vv) if wanted else None
        qt, kt, vt = (self._heads(txt, p) for p in (self.q_proj, self.k_proj, self.v_proj))
        if "kt" in past:
            kt, vt = torch.cat([past["kt"], kt], dim=2), torch.cat([past["vt"], vt], dim=2)
        n_keys = kt.shape[2]
        s_tt = qt @ kt.transpose(-1, -2) * self.scale
        if nt > 1:  # causal over the text (a newest token alone sees every key: nothing to mask)
            rows = torch.arange(n_keys - nt, n_keys, device=txt.device)[:, None]  # the new queries' positions
            s_tt = s_tt + torch.zeros(nt, n_keys, dtype=qt.dtype, device=txt.device).masked_fill_(
                torch.arange(n_keys, device=txt.device)[None, :] > rows, torch.finfo(qt.dtype).min)
        p_tt = self._softmax(s_tt, keep_tt)
        p_ti = self._softmax(qt @ kv.transpose(-1, -2) * self.scale, keep_ti)
        if cache is not None:
            cache.update(qv=qv, kv=kv, vv=vv, o_vis=o_vis, kt=kt, vt=vt)
        for site, p in ((self.vision_site, p_vv), (self.text_site, p_tt), (self.cross_site, p_ti)):
            if p is None:  # the cached visual stream, which nothing listens to
                continue
            sites.emit_grad(site, p)
            if sites.wants_pattern(site):
                sites.emit_pattern(site, _fixed(p))
        if first:
            out_vis = self._merge(o_vis)
            if cache is not None:
                cache["attn_vis"] = out_vis
        else:
            if observed(self.out_proj):  # keep the visual stream's call for what listens to out_proj
                self._merge(o_vis)
            out_vis = past["attn_vis"]
        return out_vis, self._merge(p_tt @ vt + p_ti @ vv)


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

    def forward(self, vis: torch.Tensor, txt: torch.Tensor,
                cache: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, nv, d), (b, nt, d) -> both streams' outputs. With `cache` (see `MMCAAttention`), `txt`
        holds the new text positions only; after the first call the visual stream is not recomputed:
        its cached output is returned."""
        if cache is not None and "vis_out" in cache:
            _, dt = self.attn(None, self.norm1(txt), cache)
            txt = txt + dt
            return cache["vis_out"], txt + self.mlp(self.norm2(txt))
        dv, dt = self.attn(self.norm1(vis), self.norm1(txt), cache)
        vis, txt = vis + dv, txt + dt
        vis, txt = vis + self.mlp(self.norm2(vis)), txt + self.mlp(self.norm2(txt))
        if cache is not None:
            cache["vis_out"] = vis
        return vis, txt


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

    def decode(self, vis: torch.Tensor, input_ids: torch.Tensor, cache: DecoderCache | None = None) -> torch.Tensor:
        """vis (b, nv, dim), ids (b, T) -> logits (b, T, vocab); with `cache`, of the text positions
        it does not hold yet, see `EncodeDecodeCaptioner`."""
        nt = self.check_length(input_ids)
        if cache is not None:
            return self._decode_cached(vis, input_ids, cache)
        txt = self.tok_emb(input_ids) + self.pos_emb[:, :nt]
        for blk in self.blocks:
            vis, txt = blk(vis, txt)
        return self.head(self.norm(txt))

    def _decode_cached(self, vis: torch.Tensor, input_ids: torch.Tensor, cache: DecoderCache) -> torch.Tensor:
        (b, nv), nt = vis.shape[:2], input_ids.shape[1]
        image = vis
        start = cache.start(image, input_ids)
        # the key masks of interventions, read before any block runs: cached values stay valid only
        # if the masks on their keys are unchanged (the visual stream's over all its keys)
        keeps = [blk.attn.key_masks(b, nv, nt, vis.device) for blk in self.blocks]
        if start and not all(keep_extends(old_vv, vv, nv) and keep_extends(old_ti, ti, nv)
                             and keep_extends(old_tt, tt, start)
                             for (old_vv, old_ti, old_tt), (vv, ti, tt)
                             in zip((layer["keeps"] for layer in cache.layers), keeps, strict=True)):
            cache.reset()
            cache.refills += 1
            start = 0
        txt = self.tok_emb(input_ids[:, start:]) + self.pos_emb[:, start:nt]
        for blk, layer, keep in zip(self.blocks, cache.layers, keeps, strict=True):
            layer["keeps"] = keep
            vis, txt = blk(vis, txt, layer)
        cache.hold(image, input_ids)
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
