"""The efficient-attention study: what every attention kind costs from 65 to 4,097 tokens.

For each kind of `probe.models.attention` at each sequence length ``n = 1 + g * g`` (CLS plus a
g x g patch grid: images of ``g * patch`` px), on the run's device and dtype:

- parameters, and forward FLOPs counted by `torch.utils.flop_counter.FlopCounterMode` (2 per
  multiply-add of matmuls and convolutions; the CPU SDPA kernel is registered with the formula
  transformers' GPU kernels use) and checked against each kind's closed form (`closed_form_flops`);
- forward latency: median and inter-quartile range over interleaved rounds (every implementation at
  one length timed once per round, the order rotated round by round), after one warm-up call;
- peak memory of a forward and of a training step (forward + backward of a scalar loss; optimizer
  state excluded as it scales with parameters, not tokens), above the parameters and the input:
  ``torch.cuda.max_memory_allocated`` on CUDA, on CPU the peak of live tensor storage traced by
  torch's `MemTracker` (what a caching allocator would hold, minus fragmentation; kernels' private
  scratch is invisible on CPU).

Two scopes: ``attention`` (one attention layer, side by side with the reference packages
`nystrom-attention`, `performer-pytorch` and `linformer` at the same settings, when installed: the
``bench`` extra) and ``vit`` (a whole from-scratch ViT of ``depth`` blocks at that image size).
Where our definition and a package's coincide, our weights are copied into it and the outputs are
compared (`agreement`); where they differ (Performer's additive eps, Nystromformer's padding and
pseudo-inverse scaling) the difference is measured and said.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from probe.analysis import Analysis, Bench, ParamError, param
from probe.models.attention import ATTENTION_KINDS, AttentionConfig, HybridAttention, make_attention
from probe.models.vit import ViT, ViTConfig
from probe.registry import register_analysis
from probe.runs.results import Result

log = logging.getLogger(__name__)

#: the reference package of each kind that has one: (distribution, import name)
REFERENCES = {"nystrom": ("nystrom-attention", "nystrom_attention"),
              "linformer": ("linformer", "linformer"),
              "performer": ("performer-pytorch", "performer_pytorch")}

#: issue 16's targets at 4,097 tokens (dim 512, 8 heads, CPU): forward time over standard (SDPA)
TARGET_TOKENS = 4097
SPEED_TARGETS = {"nystrom": 0.25, "linformer": 0.33, "performer": 0.8, "hybrid": 0.5}
REFERENCE_SLACK = 1.1  # ours within 1.1x of the reference package's time


@dataclass(frozen=True)
class EfficiencyResult(Result):
    """The study's measurements.

    Attributes:
        rows: one dict per (scope, kind, implementation, tokens, dtype): ``scope`` (attention |
            vit), ``kind``, ``implementation`` (``probe`` or the reference package), ``tokens``,
            ``image_size``, ``dtype``, ``device``, ``params``, ``flops`` (counted),
            ``flops_closed_form`` (None for reference packages), ``latency_ms`` (median),
            ``latency_spread_ms`` (inter-quartile range), ``latency_all_ms``, ``peak_mb`` (forward),
            ``train_peak_mb`` (forward + backward; None when not measured).
        agreement: per kind with a reference: tokens, max |ours - theirs| / max |theirs| with copied
            weights, and what differs between the definitions.
        targets: per target name: value, target, met.
        settings: the study's parameters and the machine (threads, torch version).
    """

    kind: ClassVar[str] = "efficiency"
    schema_version: ClassVar[int] = 1
    rows: list[dict[str, Any]] = field(default_factory=list)
    agreement: dict[str, Any] = field(default_factory=dict)
    targets: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ building
def grid_side(tokens: int) -> int:
    """g with ``tokens == 1 + g * g``; ParamError otherwise."""
    g = math.isqrt(max(tokens - 1, 0))
    if tokens < 2 or g * g != tokens - 1:
        raise ParamError(f"--tokens {tokens}: a ViT sequence is CLS + a g x g patch grid, 1 + g*g tokens "
                         "(e.g. 65, 257, 1025, 4097)")
    return g


def attention_config(kind_options: dict[str, Any], dim: int, heads: int, tokens: int) -> AttentionConfig:
    g = grid_side(tokens)
    return AttentionConfig(dim=dim, heads=heads, seq_len=tokens, grid=(g, g), **kind_options)


def closed_form_flops(kind: str, cfg: AttentionConfig, batch: int = 1) -> int:
    """Matmul FLOPs (2 per multiply-add) of one forward of `kind` as `probe.models.attention`
    computes it, (batch, n, dim) -> (batch, n, dim). Elementwise work is not counted (as
    FlopCounterMode does not): the hybrid's banded window scores and sums, ``4 P K d`` per head,
    are such work (above `HybridAttention.dense_max_tokens`; below it the local branch is a dense
    masked softmax, counted as matmuls)."""
    n, D, h = cfg.seq_len, cfg.dim, cfg.heads
    d = D // h
    proj = 8 * n * D * D  # q, k, v and out
    if kind in ("standard", "merged_qkv"):
        f = proj + 4 * n * n * D
    elif kind == "linformer":
        k = cfg.linformer_k
        if k < n:  # q and out on n rows; E X and F X (2 k n D each), then k and v projections on k rows
            f = 4 * n * D * D + 4 * k * n * D + 4 * k * D * D + 4 * n * k * D
        else:  # k >= n: the projections on the n tokens, then E (X W_k^T), F (X W_v^T)
            f = proj + 4 * k * n * D + 4 * n * k * D
    elif kind == "performer":
        m = cfg.performer_features
        # phi(Q), phi(K): n x d @ d x m per head; phi(K)^T [V | 1]; phi(Q) (that)
        f = proj + 4 * n * m * D + 4 * n * m * (d + 1) * h
    elif kind == "nystrom":
        m, it = min(cfg.nystrom_landmarks, n), cfg.nystrom_iters
        # landmark means (2 m n D each for Q, K), F, B, A, B V, A^+ (B V), F (...), pinv iterations
        f = proj + 4 * m * n * D + 2 * n * m * D + 2 * m * n * D + 2 * m * m * D + 2 * m * n * D \
            + 2 * m * m * D + 2 * n * m * D + 8 * it * m**3 * h
    elif kind == "hybrid":
        pre = cfg.prefix_tokens
        patches = n - pre
        glob = 4 * n * d * D + 2 * n * D  # global linear attention phi(K)^T V, phi(Q) (that), the denominator
        if n <= HybridAttention.dense_max_tokens:  # short sequences: a dense masked softmax, scores + values
            f = proj + 4 * n * n * D + glob
        else:  # prefix rows over every key; patch rows against the prefix keys (scores + values)
            f = proj + 4 * pre * n * D + 4 * patches * pre * D + glob
    else:
        raise ValueError(f"unknown attention kind {kind!r}; known: {', '.join(ATTENTION_KINDS)}")
    return batch * f


def vit_closed_form_flops(kind: str, vcfg: ViTConfig, acfg: AttentionConfig, batch: int = 1) -> int:
    """Matmul FLOPs of a whole `ViT` forward: patch embedding, `depth` blocks (attention + MLP), head."""
    n, D = vcfg.seq_len, vcfg.dim
    patches = n - 1
    hidden = int(D * vcfg.mlp_ratio)
    embed = 2 * patches * 3 * vcfg.patch_size**2 * D
    block = closed_form_flops(kind, acfg) + 4 * n * D * hidden
    return batch * (embed + vcfg.depth * block + 2 * D * vcfg.num_classes)


def _sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
                **kwargs: Any) -> int:
    from torch.utils import flop_counter as fc

    return fc.sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of `fn()` counted by FlopCounterMode, with the CPU flash-attention op registered."""
    from torch.utils import flop_counter as fc

    extra = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None and cpu_sdpa not in fc.flop_registry:  # keyed by overload packet
        extra[cpu_sdpa] = _sdpa_flops
    with torch.no_grad(), fc.FlopCounterMode(display=False, custom_mapping=extra) as counter:
        fn()
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------------------ measuring
def _tensor_bytes(module: nn.Module, *xs: torch.Tensor) -> int:
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers(), *xs]:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def peak_memory_mb(module: nn.Module, x: torch.Tensor, train: bool) -> float | None:
    """Peak tensor memory (MB) of one forward (``train``: forward + backward of ``out.square().mean()``)
    above the parameters, buffers and input; None where it cannot be traced."""

    def step() -> None:
        if train:
            module.zero_grad(set_to_none=True)
            out = module(x)
            out.float().square().mean().backward()
        else:
            with torch.no_grad():
                module(x)

    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        step()
        torch.cuda.synchronize(x.device)
        peak = torch.cuda.max_memory_allocated(x.device) - base
    else:
        try:
            from torch.distributed._tools.mem_tracker import MemTracker
        except ImportError:  # pragma: no cover - torch built without distributed
            log.warning("torch.distributed._tools.mem_tracker is unavailable: no CPU peak memory")
            return None
        tracker = MemTracker()
        tracker.track_external(module, x)
        with tracker:
            step()
        snap = tracker.get_tracker_snapshot("peak")
        peak = snap.get(x.device, {}).get("Total", 0) - _tensor_bytes(module, x)
    module.zero_grad(set_to_none=True)
    return round(peak / 2**20, 3)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_latency(fns: dict[str, Callable[[], Any]], rounds: int, device: torch.device
                        ) -> dict[str, list[float]]:
    """Milliseconds of each function over `rounds` interleaved rounds (one warm-up call first; the
    order rotates each round so no function always runs first)."""
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    with torch.inference_mode():
        for k in names:
            fns[k]()
        _sync(device)
        for r in range(rounds):
            for k in names[r % len(names):] + names[:r % len(names)]:
                t = time.perf_counter()
                fns[k]()
                _sync(device)
                times[k].append((time.perf_counter() - t) * 1e3)
    return times


def _iqr(v: Sequence[float]) -> float:
    if len(v) < 2:
        return 0.0
    q = statistics.quantiles(v, n=4, method="inclusive")
    return q[2] - q[0]


# ------------------------------------------------------------------------------------ references
def reference_installed(kind: str) -> bool:
    return kind in REFERENCES and importlib.util.find_spec(REFERENCES[kind][1]) is not None


def build_reference(kind: str, cfg: AttentionConfig) -> nn.Module:
    """The reference package's attention module at `cfg`'s settings (no residual conv, no local heads)."""
    d = cfg.dim // cfg.heads
    if kind == "nystrom":
        from nystrom_attention import NystromAttention

        return NystromAttention(cfg.dim, dim_head=d, heads=cfg.heads, num_landmarks=cfg.nystrom_landmarks,
                                pinv_iterations=cfg.nystrom_iters, residual=False)
    if kind == "linformer":
        from linformer import LinformerSelfAttention

        return LinformerSelfAttention(cfg.dim, cfg.seq_len, k=cfg.linformer_k, heads=cfg.heads)
    if kind == "performer":
        from performer_pytorch import SelfAttention

        return SelfAttention(cfg.dim, heads=cfg.heads, dim_head=d, nb_features=cfg.performer_features)
    raise ValueError(f"{kind} has no reference package; those with one: {', '.join(REFERENCES)}")


AGREEMENT_NOTES = {
    "linformer": "same definition: K' = E K, V' = F V (E, F copied as proj_k^T, proj_v^T); the package has no "
                 "q/k/v biases, so ours are zeroed",
    "performer": "same FAVOR+ features and projection (copied), but the package adds eps = 1e-4 to every feature "
                 "(a floor that pulls each row towards uniform); ours adds none",
    "nystrom": "same landmarks when n is a multiple of the landmark count (the package pads the front with zero "
               "tokens otherwise; ours splits unequal segments); the pseudo-inverse's initial scaling is per "
               "head here and one maximum over all heads there, so 6 iterations land on slightly different A^+",
}


@torch.no_grad()
def copy_into_reference(kind: str, ours: nn.Module, ref: nn.Module) -> nn.Module:
    """A copy of `ours` with zero q/k/v biases, after writing its weights into `ref` (in place)."""
    ours = copy.deepcopy(ours)
    for name in ("q_proj", "k_proj", "v_proj"):
        getattr(ours, name).bias.zero_()
    if kind == "nystrom":
        ref.to_qkv.weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        out = ref.to_out[0]
    else:
        ref.to_q.weight.copy_(ours.q_proj.weight)
        ref.to_k.weight.copy_(ours.k_proj.weight)
        ref.to_v.weight.copy_(ours.v_proj.weight)
        out = ref.to_out
        if kind == "linformer":
            ref.proj_k.copy_(ours.E.T)
            ref.proj_v.copy_(ours.F.T)
        else:
            ref.fast_attention.projection_matrix.copy_(ours.W)
    out.weight.copy_(ours.out_proj.weight)
    out.bias.copy_(ours.out_proj.bias)
    return ours


def agreement(kind: str, options: dict[str, Any], dim: int, heads: int, seed: int) -> dict[str, Any]:
    """Ours against the reference package with copied weights, on a length where the definitions
    can coincide (a multiple of the landmark count for Nystromformer)."""
    tokens = 4 * options.get("nystrom_landmarks", 16) if kind == "nystrom" else 257
    heads = min(heads, 4)
    dim = heads * min(dim // heads, 32)  # a smaller width of the same head count, always divisible
    cfg = AttentionConfig(dim=dim, heads=heads, seq_len=tokens, **options)
    torch.manual_seed(seed)
    ours = make_attention(kind, cfg).eval()
    ref = build_reference(kind, cfg).eval()
    ours = copy_into_reference(kind, ours, ref)
    x = torch.randn(2, tokens, dim)
    a, b = ours(x), ref(x)
    err = (a - b).abs().max().item() / b.abs().max().item()
    return {"reference": REFERENCES[kind][0], "tokens": tokens, "max_rel_diff": err, "note": AGREEMENT_NOTES[kind]}


# ------------------------------------------------------------------------------------ the analysis
def _csv(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ParamError(f"--{what} {text!r}: give a comma-separated list")
    return items


@register_analysis
class Efficiency(Analysis):
    """Cost of every attention kind against sequence length, beside the reference packages."""

    name = "efficiency"
    summary = "params, FLOPs, latency and peak memory of every attention kind from 65 to 4,097 tokens"
    reads_images = False
    loads_model = False

    @dataclass(frozen=True)
    class Params:
        kinds: str = param("all", f"attention kinds, comma-separated ({', '.join(ATTENTION_KINDS)}) or all")
        tokens: str = param("65,257,1025,4097", "sequence lengths 1 + g*g (CLS + a g x g grid), comma-separated")
        dim: int = param(512, "model width", min=8, max=8192)
        heads: int = param(8, "attention heads", min=1, max=128)
        depth: int = param(1, "ViT blocks of the vit scope", min=1, max=48)
        patch: int = param(16, "patch size of the vit scope (image size = g * patch)", min=1, max=64)
        batch: int = param(1, "images per forward", min=1, max=1024)
        scopes: str = param("attention,vit", "attention (one layer, with the references) and/or vit (a whole ViT)")
        rounds: int = param(5, "interleaved timing rounds", min=1, max=1000)
        threads: int = param(1, "torch CPU threads for the timings (0: torch's default)", min=0, max=1024)
        references: bool = param(True, "(--no-references: skip) the reference packages timed beside ours")
        memory: bool = param(True, "(--no-memory: skip) peak memory of a forward and of a training step")
        linformer_k: int = param(256, "Linformer's projected length k", min=1, max=65536)
        performer_features: int = param(256, "Performer's random features m", min=1, max=65536)
        nystrom_landmarks: int = param(64, "Nystromformer's landmarks m", min=1, max=65536)
        hybrid_window: int = param(1, "hybrid's window half-width (dilated steps)", min=0, max=64)
        hybrid_dilation: int = param(2, "hybrid's dilation", min=1, max=64)

    def run(self, bench: Bench, inputs: None, params: Params) -> EfficiencyResult:
        kinds = list(ATTENTION_KINDS) if params.kinds == "all" else _csv(params.kinds, "kinds")
        unknown = [k for k in kinds if k not in ATTENTION_KINDS]
        if unknown:
            raise ParamError(f"--kinds: unknown {', '.join(unknown)}; known: {', '.join(ATTENTION_KINDS)} or all")
        try:
            tokens = sorted({int(t) for t in _csv(params.tokens, "tokens")})
        except ValueError as e:
            raise ParamError(f"--tokens {params.tokens!r}: give integers such as 65,257,1025,4097") from e
        for t in tokens:
            grid_side(t)
        scopes = _csv(params.scopes, "scopes")
        if set(scopes) - {"attention", "vit"}:
            raise ParamError(f"--scopes {params.scopes!r}: choose attention and/or vit")
        if params.dim % params.heads:
            raise ParamError(f"--dim {params.dim} is not divisible by --heads {params.heads}")
        options = {"linformer_k": params.linformer_k, "performer_features": params.performer_features,
                   "nystrom_landmarks": params.nystrom_landmarks, "hybrid_window": params.hybrid_window,
                   "hybrid_dilation": params.hybrid_dilation}
        device, dtype = torch.device(bench.device), bench.dtype
        threads = torch.get_num_threads()
        if params.threads and device.type == "cpu":
            torch.set_num_threads(params.threads)
        try:
            rows = []
            for t in tokens:
                for scope in scopes:
                    rows += self._measure(scope, kinds, t, params, options, device, dtype, bench.seed)
            agree = {}
            if params.references and "attention" in scopes:
                for k in kinds:
                    if reference_installed(k):
                        agree[k] = agreement(k, options, params.dim, params.heads, bench.seed)
        finally:
            torch.set_num_threads(threads)
        settings = {**{k: getattr(params, k) for k in params.__dataclass_fields__}, "device": str(device),
                    "dtype": str(dtype).removeprefix("torch."), "threads": params.threads or threads,
                    "torch": torch.__version__}
        return EfficiencyResult(rows=rows, agreement=agree, targets=targets(rows), settings=settings)

    def _measure(self, scope: str, kinds: list[str], tokens: int, params: Params, options: dict[str, Any],
                 device: torch.device, dtype: torch.dtype, seed: int) -> list[dict[str, Any]]:
        g = grid_side(tokens)
        acfg = attention_config(options, params.dim, params.heads, tokens)
        torch.manual_seed(seed)
        subjects: dict[tuple[str, str], tuple[nn.Module, int | None]] = {}
        vcfg = None
        for k in kinds:
            if scope == "attention":
                subjects[(k, "probe")] = (make_attention(k, acfg), closed_form_flops(k, acfg, params.batch))
                if params.references and reference_installed(k):
                    subjects[(k, REFERENCES[k][0])] = (build_reference(k, acfg), None)
            else:
                vcfg = ViTConfig(image_size=g * params.patch, patch_size=params.patch, dim=params.dim,
                                 depth=params.depth, heads=params.heads, attention=k, attention_options=options)
                subjects[(k, "probe")] = (ViT(vcfg), vit_closed_form_flops(k, vcfg, acfg, params.batch))
        if scope == "attention":
            x = torch.randn(params.batch, tokens, params.dim, device=device, dtype=dtype)
        else:
            x = torch.randn(params.batch, 3, g * params.patch, g * params.patch, device=device, dtype=dtype)
        for key, (m, _) in list(subjects.items()):
            m.to(device=device, dtype=dtype).eval()
            if key[1] != "probe":
                try:
                    with torch.inference_mode():
                        m(x)
                except Exception as e:  # a package that cannot run this dtype/device: time ours alone
                    log.warning("efficiency: %s cannot run at %s on %s (%s: %s); skipped", key[1], dtype, device,
                                type(e).__name__, e)
                    del subjects[key]
        log.info("efficiency: %s scope, %d tokens, %d implementations", scope, tokens, len(subjects))
        times = interleaved_latency({f"{k}|{i}": (lambda m=m: m(x)) for (k, i), (m, _) in subjects.items()},
                                    params.rounds, device)
        rows = []
        for (k, impl), (m, closed) in subjects.items():
            ms = times[f"{k}|{impl}"]
            row = {"scope": scope, "kind": k, "implementation": impl, "tokens": tokens,
                   "image_size": g * params.patch if scope == "vit" else None,
                   "dtype": str(dtype).removeprefix("torch."), "device": str(device),
                   "params": sum(p.numel() for p in m.parameters()), "flops": count_flops(lambda m=m: m(x)),
                   "flops_closed_form": closed, "latency_ms": round(statistics.median(ms), 3),
                   "latency_spread_ms": round(_iqr(ms), 3), "latency_all_ms": [round(v, 3) for v in ms],
                   "peak_mb": None, "train_peak_mb": None}
            if params.memory:
                row["peak_mb"] = peak_memory_mb(m, x, train=False)
                m.train()
                row["train_peak_mb"] = peak_memory_mb(m, x, train=True)
                m.eval()
            rows.append(row)
        return rows

    def render(self, result: EfficiencyResult) -> dict[str, Figure]:
        return render(result)

    def summary_lines(self, result: EfficiencyResult) -> list[str]:
        return summary_lines(result)


def _find(rows: Sequence[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def targets(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Issue 16's targets, from rows measured side by side: speed over standard at 4,097 tokens,
    ours against the reference package, and forward memory at most linear from 1,025 to 4,097."""
    out: dict[str, Any] = {}
    att = [r for r in rows if r["scope"] == "attention"]
    std = _find(att, kind="standard", implementation="probe", tokens=TARGET_TOKENS)
    for kind, limit in SPEED_TARGETS.items():
        ours = _find(att, kind=kind, implementation="probe", tokens=TARGET_TOKENS)
        if ours is None:
            continue
        if std is not None:
            v = ours["latency_ms"] / std["latency_ms"]
            out[f"{kind} / standard @ {TARGET_TOKENS}"] = {"value": round(v, 3), "target": limit, "met": v <= limit}
        if kind in REFERENCES:
            ref = _find(att, kind=kind, implementation=REFERENCES[kind][0], tokens=TARGET_TOKENS)
            if ref is not None:
                v = ours["latency_ms"] / ref["latency_ms"]
                out[f"{kind} / {REFERENCES[kind][0]} @ {TARGET_TOKENS}"] = {
                    "value": round(v, 3), "target": REFERENCE_SLACK, "met": v <= REFERENCE_SLACK}
    for kind in SPEED_TARGETS:
        lo = _find(att, kind=kind, implementation="probe", tokens=1025)
        hi = _find(att, kind=kind, implementation="probe", tokens=TARGET_TOKENS)
        if lo and hi and lo["peak_mb"] and hi["peak_mb"] is not None:
            v = hi["peak_mb"] / lo["peak_mb"]
            out[f"{kind} forward memory 4097 / 1025"] = {"value": round(v, 3), "target": round(4097 / 1025, 3),
                                                         "met": v <= 4097 / 1025}
    return out


# ------------------------------------------------------------------------------------ rendering
def render(result: EfficiencyResult) -> dict[str, Figure]:
    """Latency, speed-up over standard and peak memory against tokens, per kind (references dashed)."""
    from probe.viz.figures import grid

    figs: dict[str, Figure] = {}
    scopes = sorted({r["scope"] for r in result.rows})
    fig, axes = grid(1, len(scopes), (5.2 * len(scopes), 3.8))
    for ax, scope in zip(np.atleast_1d(axes).ravel(), scopes, strict=True):
        _lines(ax, [r for r in result.rows if r["scope"] == scope], "latency_ms")
        ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="forward latency (ms, median)",
               title=f"{scope}: latency")
    figs["latency"] = fig
    fig, axes = grid(1, len(scopes), (5.2 * len(scopes), 3.8))
    for ax, scope in zip(np.atleast_1d(axes).ravel(), scopes, strict=True):
        rows = [r for r in result.rows if r["scope"] == scope]
        base = {r["tokens"]: r["latency_ms"] for r in rows if r["kind"] == "standard" and r["implementation"] == "probe"}
        sped = [{**r, "speedup": base[r["tokens"]] / r["latency_ms"]} for r in rows if r["tokens"] in base]
        _lines(ax, sped, "speedup")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set(xscale="log", xlabel="tokens", ylabel="speed-up over standard (SDPA)", title=f"{scope}: speed-up")
    figs["speedup"] = fig
    if any(r.get("peak_mb") is not None for r in result.rows):
        fig, axes = grid(1, len(scopes), (5.2 * len(scopes), 3.8))
        for ax, scope in zip(np.atleast_1d(axes).ravel(), scopes, strict=True):
            _lines(ax, [r for r in result.rows if r["scope"] == scope and r.get("peak_mb")], "peak_mb")
            ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="peak forward memory (MB)",
                   title=f"{scope}: memory")
        figs["memory"] = fig
    return figs


def _lines(ax: Any, rows: Sequence[dict[str, Any]], key: str) -> None:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["kind"], r["implementation"]), []).append(r)
    colours = {k: f"C{i}" for i, k in enumerate(ATTENTION_KINDS)}
    for (kind, impl), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["tokens"])
        ours = impl == "probe"
        ax.plot([r["tokens"] for r in rs], [r[key] for r in rs], marker="o" if ours else "x",
                ls="-" if ours else "--", color=colours.get(kind, "k"), label=kind if ours else f"{kind} ({impl})")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def summary_lines(result: EfficiencyResult) -> list[str]:
    lines = [f"{'scope':<9} {'kind':<11} {'implementation':<18} {'tokens':>6} {'MFLOPs':>10} {'ms':>9} "
             f"{'IQR':>7} {'peak MB':>8}"]
    for r in result.rows:
        peak = "" if r.get("peak_mb") is None else f"{r['peak_mb']:.1f}"
        lines.append(f"{r['scope']:<9} {r['kind']:<11} {r['implementation']:<18} {r['tokens']:>6} "
                     f"{r['flops'] / 1e6:>10.1f} {r['latency_ms']:>9.2f} {r['latency_spread_ms']:>7.2f} {peak:>8}")
    for name, t in result.targets.items():
        lines.append(f"target {name}: {t['value']} (<= {t['target']}) {'met' if t['met'] else 'MISSED'}")
    for kind, a in result.agreement.items():
        lines.append(f"{kind} vs {a['reference']} with copied weights ({a['tokens']} tokens): max relative "
                     f"difference {a['max_rel_diff']:.2e}")
    return lines
