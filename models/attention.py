"""The six ViT attention kinds, written from scratch.

Every kind maps (batch, n, dim) -> (batch, n, dim), has ``out_proj`` fed by the concatenated
per-head outputs (the ``attn.z`` hook), honours key masks from `probe.capture.sites` and emits its
pattern lazily: exact softmax for ``standard`` and ``merged_qkv``, the effective token-by-token
matrix for the others (formulas in ../shared/REFERENCES.md, cited per class).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from probe.capture import sites
from probe.capture.sites import Index, PatternSource, keep_to_additive, select_heads, select_rows

ATTENTION_KINDS = ("standard", "merged_qkv", "linformer", "performer", "nystrom", "hybrid")
APPROXIMATE_KINDS = frozenset({"linformer", "performer", "nystrom", "hybrid"})


@dataclass(frozen=True)
class AttentionConfig:
    """Hyper-parameters of every kind; each kind reads its own.

    Attributes:
        dim: model width; heads: number of heads; seq_len: tokens (Linformer needs it fixed).
        linformer_k: projected sequence length k of Linformer's E, F (k x n).
        performer_features: random features m of FAVOR+; performer_redraw: redraw every N
            training forwards (0: never).
        nystrom_landmarks: segments m; nystrom_iters: Moore-Penrose iterations.
        hybrid_window: half-width w of the dilated window (in dilated steps);
        hybrid_dilation: stride r on the patch grid; grid: (rows, cols) of patches.
    """

    dim: int
    heads: int
    seq_len: int
    dropout: float = 0.0
    linformer_k: int = 32
    performer_features: int = 64
    performer_redraw: int = 0
    nystrom_landmarks: int = 16
    nystrom_iters: int = 6
    hybrid_window: int = 1
    hybrid_dilation: int = 2
    grid: tuple[int, int] | None = None
    prefix_tokens: int = 1


def observed(module: nn.Module) -> bool:
    """Whether something watches or wraps `module`'s calls: a forward (pre-)hook of its own, or a
    forward replaced on the instance (nnsight instruments modules so). Fast paths that would skip
    or fuse a module's call take the plain path when it is observed. Global module hooks do not
    count: tools such as FlopCounterMode and MemTracker install them to attribute work to modules,
    and must measure the path that runs without them."""
    return bool(module._forward_pre_hooks or module._forward_hooks or "forward" in module.__dict__)


def _plain_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear and not observed(module)


class _Attention(nn.Module):
    """Shared projections and head reshaping."""

    approximate = False

    def __init__(self, cfg: AttentionConfig, merged: bool = False) -> None:
        super().__init__()
        if cfg.dim % cfg.heads:
            raise ValueError(f"dim {cfg.dim} is not divisible by heads {cfg.heads}")
        self.cfg = cfg
        self.heads = cfg.heads
        self.head_dim = cfg.dim // cfg.heads
        self.scale = self.head_dim**-0.5
        if merged:
            self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        else:
            self.q_proj = nn.Linear(cfg.dim, cfg.dim)
            self.k_proj = nn.Linear(cfg.dim, cfg.dim)
            self.v_proj = nn.Linear(cfg.dim, cfg.dim)
        self.out_proj = nn.Linear(cfg.dim, cfg.dim)

    def split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(batch, n, dim) -> q, k, v each (batch, heads, n, head_dim)."""
        if hasattr(self, "qkv"):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.split(q), self.split(k), self.split(v)

    def merge(self, out: torch.Tensor) -> torch.Tensor:
        """(batch, heads, n, head_dim) -> out_proj of (batch, n, dim)."""
        b, h, n, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * d))


class StandardAttention(_Attention):
    """``softmax(Q K^T / sqrt(d)) V`` through PyTorch's SDPA kernel (exact pattern)."""

    def __init__(self, cfg: AttentionConfig, merged: bool = False) -> None:
        super().__init__(cfg, merged=merged)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                cache: dict[str, Any] | None = None) -> torch.Tensor:
        """`attn_mask`: optional bool (n, keys) or (batch, 1, n, keys), True where a query may attend.

        `cache` (a decoder's key/value cache layer, `probe.models.text.DecoderCache`): `x` holds
        the new positions only; their keys and values are appended to ``cache["k"]``, ``cache["v"]``
        (batch, heads, past, head_dim) and the queries attend to all past + n keys. The key mask of
        interventions is then ``cache["keep"]`` (bool (batch, past + n) or None), read by the caller
        before any block runs; the pattern is emitted for the new query rows only.
        """
        q, k, v = self.qkv_heads(x)
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
            keep = cache.get("keep")
        else:
            keep = sites.key_keep(self, x.shape[0], k.shape[2], x.device)
        mask = None if keep is None else keep_to_additive(keep, q.dtype)
        if attn_mask is not None:
            allowed = torch.zeros(attn_mask.shape, dtype=q.dtype, device=x.device)
            allowed.masked_fill_(~attn_mask.to(x.device), torch.finfo(q.dtype).min)
            mask = allowed if mask is None else (mask + allowed).clamp_min(torch.finfo(q.dtype).min)
        p = self.cfg.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        if sites.wants_pattern(self) or sites.wants_grad(self):
            source = PatternSource(q, k, self.scale, mask)
            sites.emit_pattern(self, source)
            out = sites.attend(self, source, v, out)
        return self.merge(out)


class MergedQKVAttention(StandardAttention):
    """Standard attention with one ``Linear(dim, 3*dim)`` producing q, k, v (in that order)."""

    def __init__(self, cfg: AttentionConfig) -> None:
        super().__init__(cfg, merged=True)


class LinformerAttention(_Attention):
    """Linformer (Wang et al. 2020): ``K' = E K``, ``V' = F V`` with learned E, F (k x n) shared by heads.

    ``P = softmax(Q K'^T / sqrt(d))`` (n x k), output ``P V'``; effective matrix ``P F`` (n x n),
    whose rows need not sum to 1. A masked key j has column j of E and F zeroed, so it contributes
    nothing and gets zero effective weight. With k < n the key and value projections run on the k
    sequence-projected rows (``E (X W^T + 1 b^T) = (E X) W^T + (E 1) b^T``, `_projected`) unless
    something observes them.
    """

    approximate = True

    def __init__(self, cfg: AttentionConfig) -> None:
        super().__init__(cfg)
        n, k = cfg.seq_len, cfg.linformer_k
        self.E = nn.Parameter(torch.randn(k, n) / math.sqrt(k))
        self.F = nn.Parameter(torch.randn(k, n) / math.sqrt(k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        if n != self.cfg.seq_len:
            raise ValueError(
                f"linformer attention was built for {self.cfg.seq_len} tokens, got {n}: "
                "resize images to the model's image size (the adapter's preprocess does this)"
            )
        E, Fm = self.E, self.F  # (k, n)
        keep = sites.key_keep(self, b, n, x.device)
        if keep is not None:
            E, Fm = E * keep[:, None, :].to(E.dtype), Fm * keep[:, None, :].to(Fm.dtype)  # (b, k, n)
        kp = self._projected(E, x, self.k_proj)
        vp = self._projected(Fm, x, self.v_proj)
        q = self.split(self.q_proj(x))
        P = torch.softmax(torch.matmul(q, kp.transpose(-1, -2)) * self.scale, dim=-1)
        out = torch.matmul(F.dropout(P, self.cfg.dropout, self.training), vp)
        if sites.wants_pattern(self) or sites.wants_grad(self):
            Fb = Fm.expand(b, -1, -1)

            def effective(heads: Index, rows: Index) -> torch.Tensor:
                Ps = select_rows(select_heads(P, heads), rows)
                return sites.at_least_float32(torch.einsum("bhqk,bkn->bhqn", Ps, Fb))

            source = PatternSource(compute=effective, approximate=True, n_heads=self.heads)
            sites.emit_pattern(self, source)
            out = sites.attend(self, source, self.split(self.v_proj(x)), out)
        return self.merge(out)

    def _projected(self, proj: torch.Tensor, x: torch.Tensor, lin: nn.Module) -> torch.Tensor:
        """``proj @ lin(x)`` for a (k, n) or (b, k, n) sequence projection, as (b, heads, k, head_dim).

        With k < n and a plain, unobserved `nn.Linear` (`observed`) it is computed as
        ``(proj @ x) W^T + (proj 1) b``, the same affine map (``E (X W^T + 1 b^T) = (E X) W^T +
        (E 1) b^T``) with the projection on k rows instead of n; otherwise `lin` is called on the n
        tokens as the formula is written, so hooks and wrappers see what they expect.
        """
        n, k = x.shape[1], proj.shape[-2]
        if k >= n or not _plain_linear(lin):
            return self.split(torch.matmul(proj, lin(x)))
        y = F.linear(torch.matmul(proj, x), lin.weight)  # (b, k, dim)
        if lin.bias is not None:
            y = y + proj.sum(-1, keepdim=True) * lin.bias
        return self.split(y)


def orthogonal_gaussian(m: int, d: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(m, d) rows: blocks of orthogonal directions with chi(d)-distributed norms (FAVOR+ ORFs)."""
    blocks = []
    for _ in range(math.ceil(m / d)):
        g = torch.randn(d, d, generator=generator)
        qmat, _ = torch.linalg.qr(g)
        blocks.append(qmat.T)
    w = torch.cat(blocks, dim=0)[:m]
    norms = torch.randn(m, d, generator=generator).norm(dim=1, keepdim=True)
    return w * norms


class PerformerAttention(_Attention):
    """Performer, FAVOR+ (Choromanski et al. 2021), positive orthogonal random features.

    ``phi(x) = exp(W x - |x|^2 / 2) / sqrt(m)`` on ``q / d^{1/4}`` and ``k / d^{1/4}``; output
    ``D^-1 phi(Q) (phi(K)^T V)`` with ``D = diag(phi(Q) phi(K)^T 1)``. Effective matrix
    ``D^-1 phi(Q) phi(K)^T``, rows sum to 1. Stabilisers (a per-query-row max and one max over all
    keys) cancel in ``D^-1``. `redraw_features()` draws new W; in training it is called every
    ``performer_redraw`` forwards. A masked key has ``phi(k) = 0``.
    """

    approximate = True

    def __init__(self, cfg: AttentionConfig) -> None:
        super().__init__(cfg)
        self.m = cfg.performer_features
        self.register_buffer("W", orthogonal_gaussian(self.m, self.head_dim))
        self._calls = 0

    @torch.no_grad()
    def redraw_features(self, generator: torch.Generator | None = None) -> None:
        self.W.copy_(orthogonal_gaussian(self.m, self.head_dim, generator).to(self.W))

    def features(self, x: torch.Tensor, is_query: bool) -> torch.Tensor:
        """(batch, heads, n, d) -> phi (batch, heads, n, m), stabilised."""
        x = x * self.head_dim**-0.25
        wx = torch.matmul(x, self.W.T.to(x.dtype))
        sq = 0.5 * (x * x).sum(-1, keepdim=True)
        if is_query:
            stab = wx.amax(dim=-1, keepdim=True)
        else:
            stab = wx.amax(dim=(-1, -2), keepdim=True)
        return torch.exp(wx - sq - stab.detach()) / math.sqrt(self.m)

    def _phi(self, x: torch.Tensor, is_query: bool) -> torch.Tensor:
        """`features` up to a positive constant per (batch, head), which cancels in ``D^-1``: the
        ``1 / sqrt(m)`` is dropped and the subtraction and exp run in place (one pass each)."""
        c = self.head_dim**-0.25
        wx = torch.matmul(x, (self.W * c).T.to(x.dtype))
        stab = wx.amax(dim=-1 if is_query else (-1, -2), keepdim=True).detach()
        return wx.sub_((0.5 * c * c) * (x * x).sum(-1, keepdim=True) + stab).exp_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.cfg.performer_redraw:
            self._calls += 1
            if self._calls % self.cfg.performer_redraw == 0:
                self.redraw_features()
        b, n, _ = x.shape
        q, k, v = self.qkv_heads(x)
        pq, pk = self._phi(q, True), self._phi(k, False)
        keep = sites.key_keep(self, b, n, x.device)
        if keep is not None:
            pk = pk * keep[:, None, :, None].to(pk.dtype)
        # numerator and denominator D in one product: phi(K)^T [V | 1], over m so that D stays
        # below n (float16 holds it) as with the 1 / sqrt(m) of both feature maps
        kv = torch.matmul(pk.transpose(-1, -2), F.pad(v, (0, 1), value=1.0)) / self.m  # (b, h, m, d + 1)
        num = torch.matmul(pq, kv)  # (b, h, n, d + 1)
        out = num[..., :-1] / num[..., -1:].clamp_min(1e-30)
        if sites.wants_pattern(self) or sites.wants_grad(self):

            def effective(heads: Index, rows: Index) -> torch.Tensor:
                a = torch.matmul(select_rows(select_heads(pq, heads), rows), select_heads(pk, heads).transpose(-1, -2))
                return sites.at_least_float32(a / a.sum(-1, keepdim=True).clamp_min(1e-30))

            source = PatternSource(compute=effective, approximate=True, n_heads=self.heads)
            sites.emit_pattern(self, source)
            out = sites.attend(self, source, v, out)
        return self.merge(out)


def iterative_pinv(a: torch.Tensor, iters: int) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of (..., m, m) by the iteration of Nyströmformer (Razavi et al.)."""
    shape, m = a.shape, a.shape[-1]
    a = a.reshape(-1, m, m)
    eye = torch.eye(m, dtype=a.dtype, device=a.device).expand_as(a)
    col = a.abs().sum(dim=-2).amax(dim=-1, keepdim=True)
    row = a.abs().sum(dim=-1).amax(dim=-1, keepdim=True)
    z = a.transpose(-1, -2) / (col * row).unsqueeze(-1)
    for _ in range(iters):
        # z <- 0.25 z (13 I - az (15 I - az (7 I - az))); each "c I - az @ t" is one baddbmm
        az = torch.bmm(a, z)
        t = torch.add(7 * eye, az, alpha=-1)
        t = torch.baddbmm(eye, az, t, beta=15, alpha=-1)
        t = torch.baddbmm(eye, az, t, beta=13, alpha=-1)
        z = torch.bmm(z, t).mul_(0.25)
    return z.reshape(shape)


class NystromAttention(_Attention):
    """Nyströmformer (Xiong et al. 2021): segment-mean landmarks and an iterative pseudo-inverse.

    ``F = softmax(Q K~^T/sqrt d)``, ``A = softmax(Q~ K~^T/sqrt d)``, ``B = softmax(Q~ K^T/sqrt d)``;
    output ``F A^+ (B V)``. Effective matrix ``F A^+ B``. Segments are as equal as the sequence
    allows (no padding). A masked key is removed from B's softmax (zero effective weight, no value)
    and from the landmark means, so nothing of it reaches the output.
    """

    approximate = True

    def __init__(self, cfg: AttentionConfig) -> None:
        super().__init__(cfg)
        self.m = min(cfg.nystrom_landmarks, cfg.seq_len)
        self.iters = cfg.nystrom_iters

    def landmarks(self, t: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(b, h, n, d) -> (b, h, m, d) segment means; with a bool keep (b, n), means over the kept
        tokens of each segment only (a segment with none kept is 0), so a removed token's content
        reaches no landmark. Segments are `torch.tensor_split`'s (the first n % m one longer)."""
        return torch.matmul(self._averaging(t.shape[2], t, keep), t)

    def _scaled_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(q / sqrt(d), k, v)``, each (batch, heads, n, head_dim), from one fused projection with
        the scale folded into the query weights; only for plain, unobserved `nn.Linear` projections
        (`observed`), whose calls it skips. They are strided views of the projection's output
        (BLAS reads a head's rows at stride 3 * dim), which saves a 3 x n x dim copy per forward."""
        b, n, _ = x.shape
        w, bias = self._fused_qkv_weights()
        qkv = F.linear(x, w, bias).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def _fused_qkv_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``[Wq / sqrt(d); Wk; Wv]`` (3 dim, dim) and its bias. Built anew whenever autograd could
        need them; otherwise kept until a projection's tensor is replaced or changed in place
        (its storage or version counter moves), so eval forwards skip the concatenation."""
        ps = (self.q_proj.weight, self.q_proj.bias, self.k_proj.weight, self.k_proj.bias, self.v_proj.weight,
              self.v_proj.bias)
        if torch.is_grad_enabled() and any(p.requires_grad for p in ps):
            self._fused_cache = None
            return (torch.cat([ps[0] * self.scale, ps[2], ps[4]]), torch.cat([ps[1] * self.scale, ps[3], ps[5]]))
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in ps)
        cached = getattr(self, "_fused_cache", None)
        if cached is None or cached[0] != key:
            with torch.inference_mode(False), torch.no_grad():  # usable later with or without autograd
                cached = (key, torch.cat([ps[0] * self.scale, ps[2], ps[4]]),
                          torch.cat([ps[1] * self.scale, ps[3], ps[5]]))
            self._fused_cache = cached
        return cached[1], cached[2]

    def _averaging(self, n: int, like: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """(m, n), or (b, 1, m, n) with `keep`: row s averages segment s (one matmul, not m means).
        Without `keep` the matrix depends only on n, dtype and device, and is kept for the next call."""
        key = (n, self.m, like.dtype, like.device)
        cached = getattr(self, "_averaging_cache", None)
        if keep is None and cached is not None and cached[0] == key:
            return cached[1]
        if keep is not None:
            return self._segment_means(n, like, keep)
        with torch.inference_mode(False), torch.no_grad():  # usable later with or without autograd
            avg = self._segment_means(n, like, None)
        self._averaging_cache = (key, avg)
        return avg

    def _segment_means(self, n: int, like: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        m = min(self.m, n)  # never an empty segment
        ids = torch.arange(m, device=like.device)
        sizes = n // m + (ids < n % m).long()
        member = (torch.repeat_interleave(ids, sizes)[None, :] == ids[:, None]).to(like.dtype)  # (m, n)
        if keep is not None:
            member = member * keep[:, None, None, :].to(like.dtype)
        return member / member.sum(-1, keepdim=True).clamp_min(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        if all(_plain_linear(p) for p in (self.q_proj, self.k_proj, self.v_proj)):
            q, k, v = self._scaled_qkv(x)  # q carries the 1/sqrt(d)
        else:  # something watches or wraps a projection: call each as a module
            q, k, v = self.qkv_heads(x)
            q = q * self.scale
        keep = sites.key_keep(self, b, n, x.device)
        avg = self._averaging(n, q, keep)
        qt, kt = torch.matmul(avg, q), torch.matmul(avg, k)
        Fm = torch.softmax(q @ kt.transpose(-1, -2), dim=-1)
        A = torch.softmax(qt @ kt.transpose(-1, -2), dim=-1)
        scores_b = qt @ k.transpose(-1, -2)
        if keep is not None:
            scores_b = scores_b + keep_to_additive(keep, scores_b.dtype)
        B = torch.softmax(scores_b, dim=-1)
        Ainv = iterative_pinv(A, self.iters)
        out = Fm @ (Ainv @ (B @ v))
        if sites.wants_pattern(self) or sites.wants_grad(self):

            def effective(heads: Index, rows: Index) -> torch.Tensor:
                left = select_rows(select_heads(Fm, heads), rows) @ select_heads(Ainv, heads)
                return sites.at_least_float32(left @ select_heads(B, heads))

            source = PatternSource(compute=effective, approximate=True, n_heads=self.heads)
            sites.emit_pattern(self, source)
            out = sites.attend(self, source, v, out)
        return self.merge(out)


def dilated_window_mask(grid: tuple[int, int], prefix: int, window: int, dilation: int) -> torch.Tensor:
    """Bool (n, n) allowed-mask of dilated local attention on a patch grid.

    Patch (r, c) sees patches (r + i*dilation, c + j*dilation) for |i|, |j| <= window. The
    `prefix` tokens (CLS) see and are seen by every token.
    """
    rows, cols = grid
    r = torch.arange(rows).repeat_interleave(cols)
    c = torch.arange(cols).repeat(rows)
    dr, dc = r[:, None] - r[None, :], c[:, None] - c[None, :]
    local = (dr % dilation == 0) & (dc % dilation == 0)
    local &= (dr.abs() <= window * dilation) & (dc.abs() <= window * dilation)
    n = prefix + rows * cols
    allowed = torch.ones(n, n, dtype=torch.bool)
    allowed[prefix:, prefix:] = local
    return allowed


def dilated_window_neighbours(grid: tuple[int, int], prefix: int, window: int,
                              dilation: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys each patch query of `dilated_window_mask` may attend, as a band.

    Returns ``(index, valid)``, both (patches, prefix + (2 * window + 1) ** 2): key positions
    (the prefix tokens first, then the window's offsets in row-major order) and whether each is on
    the grid. ``index`` holds 0 where not valid. Row p equals ``dilated_window_mask(...)[prefix + p]``
    as a set: O(patches * window^2) instead of O(n^2).
    """
    rows, cols = grid
    r = torch.arange(rows).repeat_interleave(cols)[:, None]
    c = torch.arange(cols).repeat(rows)[:, None]
    offs = torch.arange(-window, window + 1) * dilation
    dr, dc = offs.repeat_interleave(len(offs))[None, :], offs.repeat(len(offs))[None, :]
    rr, cc = r + dr, c + dc
    on = (rr >= 0) & (rr < rows) & (cc >= 0) & (cc < cols)
    local = torch.where(on, prefix + rr * cols + cc, torch.zeros_like(rr))
    pre = torch.arange(prefix).expand(rows * cols, prefix)
    return torch.cat([pre, local], 1), torch.cat([torch.ones_like(pre, dtype=torch.bool), on], 1)


class HybridAttention(_Attention):
    """Ours: dilated local softmax attention mixed per head with global linear attention.

    Local part: softmax over the dilated window of `dilated_window_mask` (patch (r, c) sees the
    patches at offsets that are multiples of the dilation r, up to `hybrid_window` steps away;
    CLS is global). Global part: linear attention with ``phi = elu + 1`` (Katharopoulos et al. 2020),
    ``D^-1 phi(Q) (phi(K)^T V)``. Output ``g_h * local + (1 - g_h) * global`` with a learned gate
    ``g_h = sigmoid(a_h)`` per head (initially 0.5). Effective matrix: the same mixture of the two
    row-stochastic matrices, so rows sum to 1.

    The local part is banded: each patch query gathers only its window's keys
    (`dilated_window_neighbours`), O(n * window^2) time and memory; the prefix (CLS) queries attend
    to every key, O(n). The dense rows of the effective matrix are built only when a capture listens,
    and only the rows it asks for. A query whose every window key is removed (`MaskTokens`) reads
    nothing from the local branch (zero weights, as `PatternSource.zero_dead_rows` does for softmax).

    Up to `dense_max_tokens` tokens the local part runs instead as one softmax over the dense
    allowed-mask (`dilated_window_mask`): the same weights to float rounding, and for short
    sequences far fewer, larger kernels. Forward + backward on one CPU thread, dense against band:
    65 tokens (width 128, batch 64) 48 against 115 ms; 197 tokens (ViT-B width, batch 2) 63 against
    83 ms; at 257 tokens they are even and from there the band wins (1.6x at 1,025).
    """

    approximate = True
    #: sequence length up to which the local branch runs as a dense masked softmax
    dense_max_tokens = 256

    def __init__(self, cfg: AttentionConfig) -> None:
        super().__init__(cfg)
        if cfg.grid is None:
            raise ValueError("hybrid attention needs the patch grid (AttentionConfig.grid)")
        self.gate = nn.Parameter(torch.zeros(cfg.heads))
        index, valid = dilated_window_neighbours(cfg.grid, cfg.prefix_tokens, cfg.hybrid_window,
                                                 cfg.hybrid_dilation)
        self.register_buffer("band_index", index, persistent=False)
        self.register_buffer("band_valid", valid, persistent=False)
        self.n_tokens = cfg.prefix_tokens + cfg.grid[0] * cfg.grid[1]

    @property
    def allowed(self) -> torch.Tensor:
        """Bool (n, n): the local branch's allowed mask (`dilated_window_mask`), for inspection."""
        c = self.cfg
        return dilated_window_mask(c.grid, c.prefix_tokens, c.hybrid_window, c.hybrid_dilation)

    def _local_dense(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Local softmax over the dense allowed-mask: output (b, h, n, d) and weights (b, h, n, n),
        with `_local`'s rules: keys outside the window never weigh, a removed key gets the finite
        minimum score, and a query with no window key left reads nothing."""
        lowest = torch.finfo(q.dtype).min
        n = q.shape[2]
        allowed = getattr(self, "_allowed_cache", None)
        if allowed is None or allowed.device != q.device or allowed.shape[0] != n:
            with torch.inference_mode(False):  # usable later with or without autograd
                allowed = self.allowed.to(q.device)
            self._allowed_cache = allowed
        s = (q @ k.transpose(-1, -2)) * self.scale
        if keep is None:
            w = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
            return w @ v, w
        ok = allowed & keep[:, None, None, :]  # (b, 1, n, n)
        s = s.masked_fill(allowed & ~ok, lowest).masked_fill(~allowed, float("-inf"))
        w = torch.softmax(s, dim=-1) * ok.any(-1, keepdim=True).to(s.dtype)
        return w @ v, w

    def _local(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Banded local softmax: output (b, h, n, d), and the patch rows' weights (b, h, P, K)
        over `band_index` plus the prefix rows' (b, h, prefix, n), for the effective matrix."""
        pre = self.cfg.prefix_tokens
        lowest = torch.finfo(q.dtype).min
        mask_pre = None if keep is None else keep_to_additive(keep, q.dtype)
        s_pre = (q[:, :, :pre] @ k.transpose(-1, -2)) * self.scale
        if mask_pre is not None:
            s_pre = s_pre + mask_pre
        w_pre = torch.softmax(s_pre.clamp_min(lowest), dim=-1)
        if keep is not None:  # no key left: read nothing
            w_pre = w_pre * keep.any(-1).to(w_pre.dtype)[:, None, None, None]
        s, vg, shifts = self._band_scores(q, k, v)  # (b, h, P, prefix + K)
        idx = self.band_index
        ok = self.band_valid[None, None] if keep is None else self.band_valid & keep[:, idx][:, None]
        # off-grid slots get -inf (never weighted); removed keys the finite minimum, so a query
        # whose window keys are all removed stays finite (uniform over its window)
        s = s.masked_fill(~self.band_valid[None, None], float("-inf")).masked_fill(self.band_valid & ~ok, lowest)
        w = torch.softmax(s, dim=-1)
        if keep is not None:
            w = w * ok.any(-1, keepdim=True).to(w.dtype)
        b, h = q.shape[:2]
        rows, cols = self.cfg.grid
        out_p = torch.matmul(w[..., :pre], v[:, :, :pre]).view(b, h, rows, cols, -1)
        wg = w.view(b, h, rows, cols, -1)
        for o, (di, dj) in enumerate(shifts):
            out_p.addcmul_(wg[..., pre + o:pre + o + 1], vg[:, :, di:di + rows, dj:dj + cols])
        out = torch.cat([w_pre @ v, out_p.view(b, h, rows * cols, -1)], dim=2)
        return out, w, w_pre

    def _band_scores(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        """Scaled scores of every patch query against its band (b, h, P, prefix + K), in the order of
        `band_index`, the zero-padded value grid (b, h, rows + 2p, cols + 2p, d) and the K window
        offsets as start indices into it.

        Each window offset is a shifted view of the zero-padded key grid, so the scores cost
        O(n * K * d) with no (n, K, d) gather; off-grid slots read padding (masked by the caller).
        """
        c = self.cfg
        pre, (rows, cols) = c.prefix_tokens, c.grid
        b, h, _, d = q.shape
        pad = c.hybrid_window * c.hybrid_dilation
        qp = q[:, :, pre:] * self.scale  # (b, h, P, d)
        grid = (b, h, rows, cols, d)
        qg = qp.reshape(grid)
        kg = F.pad(k[:, :, pre:].reshape(grid), (0, 0, pad, pad, pad, pad))
        vg = F.pad(v[:, :, pre:].reshape(grid), (0, 0, pad, pad, pad, pad))
        offs = [pad + i * c.hybrid_dilation for i in range(-c.hybrid_window, c.hybrid_window + 1)]
        shifts = [(di, dj) for di in offs for dj in offs]  # row offset outer: `dilated_window_neighbours`
        s = torch.empty(b, h, rows, cols, pre + len(shifts), dtype=q.dtype, device=q.device)
        s[..., :pre] = torch.matmul(qp, k[:, :, :pre].transpose(-1, -2)).view(b, h, rows, cols, pre)
        for o, (di, dj) in enumerate(shifts):
            s[..., pre + o] = (qg * kg[:, :, di:di + rows, dj:dj + cols]).sum(-1)
        return s.view(b, h, rows * cols, -1), vg, shifts

    def _dense_local(self, w: torch.Tensor, w_pre: torch.Tensor, rows: Index = None) -> torch.Tensor:
        """(b, h, rows, n) local weights of the query rows `rows` (None: all) from the banded ones."""
        pre, n = self.cfg.prefix_tokens, self.n_tokens
        ids = torch.arange(n, device=w.device)
        if rows is not None:
            ids = ids[sites.as_index(rows)].reshape(-1)
        b, h = w.shape[:2]
        out = torch.zeros(b, h, len(ids), n, dtype=w.dtype, device=w.device)
        is_pre = ids < pre
        out[:, :, is_pre] = w_pre[:, :, ids[is_pre]]
        p = ids[~is_pre] - pre
        if len(p):
            band = self.band_index[p].expand(b, h, -1, -1)
            vals = w[:, :, p] * self.band_valid[p].to(w.dtype)
            out[:, :, ~is_pre] = torch.zeros(b, h, len(p), n, dtype=w.dtype, device=w.device).scatter_add(-1, band, vals)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv_heads(x)
        if n != self.n_tokens:
            raise ValueError(f"hybrid attention was built for {self.n_tokens} tokens, got {n}")
        keep = sites.key_keep(self, b, n, x.device)
        pk = F.elu(k) + 1
        if keep is not None:
            pk = pk * keep[:, None, :, None].to(pk.dtype)
        dense = n <= self.dense_max_tokens
        if dense:
            local, w = self._local_dense(q, k, v, keep)
        else:
            local, w, w_pre = self._local(q, k, v, keep)
        pq = F.elu(q) + 1
        denom = pq @ pk.sum(dim=2, keepdim=True).transpose(-1, -2)
        glob = (pq @ (pk.transpose(-1, -2) @ v)) / denom.clamp_min(1e-30)
        g = torch.sigmoid(self.gate).view(1, -1, 1, 1).to(q.dtype)
        out = g * local + (1 - g) * glob
        if sites.wants_pattern(self) or sites.wants_grad(self):

            def effective(heads: Index, rows: Index) -> torch.Tensor:
                if dense:
                    pl = select_rows(select_heads(w, heads), rows)
                else:
                    pl = select_heads(self._dense_local(w, w_pre, rows), heads)
                a = select_rows(select_heads(pq, heads), rows) @ select_heads(pk, heads).transpose(-1, -2)
                pg = a / a.sum(-1, keepdim=True).clamp_min(1e-30)
                gs = select_heads(g.expand(1, self.heads, 1, 1), heads)
                return sites.at_least_float32(gs * pl + (1 - gs) * pg)

            source = PatternSource(compute=effective, approximate=True, n_heads=self.heads)
            sites.emit_pattern(self, source)
            out = sites.attend(self, source, v, out)
        return self.merge(out)


def make_attention(kind: str, cfg: AttentionConfig) -> _Attention:
    """Build an attention module of `kind` (one of `ATTENTION_KINDS`)."""
    classes = {
        "standard": StandardAttention,
        "merged_qkv": MergedQKVAttention,
        "linformer": LinformerAttention,
        "performer": PerformerAttention,
        "nystrom": NystromAttention,
        "hybrid": HybridAttention,
    }
    if kind not in classes:
        raise ValueError(f"unknown attention kind {kind!r}; known: {', '.join(ATTENTION_KINDS)}")
    return classes[kind](cfg)
