"""The efficiency study: FLOPs against closed forms, memory that scales, agreement with the
reference packages, the run end to end."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from probe.analyses import efficiency as eff
from probe.analysis import ParamError
from probe.models.attention import APPROXIMATE_KINDS, ATTENTION_KINDS, make_attention
from probe.models.vit import ViT, ViTConfig
from probe.pipeline import RunSpec, execute
from probe.types import ProbeError

OPTS = {"linformer_k": 32, "performer_features": 48, "nystrom_landmarks": 8, "hybrid_window": 1,
        "hybrid_dilation": 2}


@pytest.mark.parametrize("tokens", [17, 65, 257])
@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_counted_flops_equal_the_closed_form(kind, tokens):  # 17 tokens: Linformer's k = 32 > n
    cfg = eff.attention_config(OPTS, 64, 4, tokens)
    m = make_attention(kind, cfg)
    assert eff.count_flops(lambda: m(torch.randn(2, tokens, 64))) == eff.closed_form_flops(kind, cfg, 2)


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_vit_flops_equal_the_closed_form(kind):
    v = ViTConfig(image_size=32, patch_size=4, dim=64, depth=2, heads=4, attention=kind, attention_options=OPTS)
    m = ViT(v)
    counted = eff.count_flops(lambda: m(torch.randn(2, 3, 32, 32)))
    assert counted == eff.vit_closed_form_flops(kind, v, eff.attention_config(OPTS, 64, 4, 65), 2)


def test_standard_flops_are_quadratic_and_the_approximate_kinds_linear():
    """Closed forms at 1,025 and 4,097 tokens: SDPA's n^2 term dominates; the others grow ~n."""
    opts = {"linformer_k": 256, "performer_features": 256, "nystrom_landmarks": 64}
    f = {k: [eff.closed_form_flops(k, eff.attention_config(opts, 512, 8, n)) for n in (1025, 4097)]
         for k in ATTENTION_KINDS}
    assert f["standard"][1] / f["standard"][0] > 6
    for k in APPROXIMATE_KINDS:
        assert f[k][1] / f[k][0] <= 4097 / 1025 * 1.001


def test_peak_memory_of_a_hand_computed_linear():
    lin = nn.Linear(64, 32)
    x = torch.randn(1, 100, 64)
    assert eff.peak_memory_mb(lin, x, train=False) == round(100 * 32 * 4 / 2**20, 3)
    # training: the output, its square, the gradients of weight, bias and output at least
    assert eff.peak_memory_mb(lin, x, train=True) > (100 * 32 * 4 + 64 * 32 * 4) / 2**20


@pytest.mark.parametrize("kind", sorted(APPROXIMATE_KINDS))
def test_forward_memory_of_approximate_kinds_grows_at_most_linearly(kind):
    mem = []
    for n in (257, 1025):
        m = make_attention(kind, eff.attention_config(OPTS, 64, 4, n))
        mem.append(eff.peak_memory_mb(m, torch.randn(1, n, 64), train=False))
    assert mem[1] / mem[0] <= 1024 / 256 * 1.01, mem  # n - 1 = 256 -> 1024 patches


def test_eager_quadratic_memory_is_seen():
    """The tracer sees an (n, n) pattern: a forward that materialises one grows ~n^2."""

    class Eager(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(x @ x.transpose(-1, -2), -1) @ x

    mem = [eff.peak_memory_mb(Eager(), torch.randn(1, n, 16), train=False) for n in (256, 1024)]
    assert mem[1] / mem[0] > 10


def test_grid_side_and_bad_parameters():
    assert eff.grid_side(4097) == 64
    with pytest.raises(ParamError, match="1 \\+ g\\*g"):
        eff.grid_side(100)
    with pytest.raises(ParamError, match="unknown nope"):
        execute(RunSpec("efficiency", params={"kinds": "standard,nope"}, save=False))
    with pytest.raises(ParamError, match="--tokens 64"):
        execute(RunSpec("efficiency", params={"tokens": "64"}, save=False))
    with pytest.raises(ProbeError, match="loads no model"):
        execute(RunSpec("efficiency", model="vit-standard", save=False))


def test_linformer_equals_the_reference_package_with_copied_weights():
    a = eff.agreement("linformer", OPTS, 64, 4, seed=0)
    assert a["reference"] == "linformer" and a["max_rel_diff"] < 1e-5


def test_performer_differs_from_the_reference_only_by_its_eps(monkeypatch):
    from performer_pytorch import performer_pytorch as pp

    a = eff.agreement("performer", OPTS, 64, 4, seed=0)
    assert a["max_rel_diff"] > 1e-4  # the package's eps = 1e-4 floor on every feature
    kernel = pp.softmax_kernel
    monkeypatch.setattr(pp, "softmax_kernel", lambda *args, **kw: kernel(*args, **{**kw, "eps": 0.0}))
    assert eff.agreement("performer", OPTS, 64, 4, seed=0)["max_rel_diff"] < 1e-4


def test_nystrom_differs_from_the_reference_only_by_the_pseudo_inverse():
    """In float64 with enough iterations both pseudo-inverses converge to A^-1 and the outputs
    meet to rounding; at 6 iterations their different initial scalings show."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        few = eff.agreement("nystrom", OPTS, 64, 4, seed=0)["max_rel_diff"]
        many = eff.agreement("nystrom", {**OPTS, "nystrom_iters": 30}, 64, 4, seed=0)["max_rel_diff"]
    finally:
        torch.set_default_dtype(default)
    assert few > 1e-4 and many < 1e-10


def test_the_study_runs_end_to_end_and_its_targets_read_its_rows(tmp_path):
    out = execute(RunSpec("efficiency", params={"tokens": "17,65", "dim": 32, "heads": 4, "rounds": 2,
                                                "linformer_k": 16, "performer_features": 16,
                                                "nystrom_landmarks": 4, "patch": 4}, store=tmp_path))
    rows = out.result.rows
    ours = [r for r in rows if r["implementation"] == "probe"]
    assert {(r["scope"], r["kind"], r["tokens"]) for r in ours} == {
        (s, k, t) for s in ("attention", "vit") for k in ATTENTION_KINDS for t in (17, 65)}
    refs = {r["implementation"] for r in rows} - {"probe"}
    assert refs == {"nystrom-attention", "linformer", "performer-pytorch"}
    for r in ours:
        assert r["flops"] == r["flops_closed_form"]
        assert len(r["latency_all_ms"]) == 2 and r["latency_ms"] > 0 and r["peak_mb"] > 0
        assert r["train_peak_mb"] >= r["peak_mb"]
    assert set(out.result.agreement) == {"nystrom", "linformer", "performer"}
    assert out.run is not None and (out.run.path / "result.json").exists()
    assert out.manifest["model"]["name"] == "none"
    assert {"latency", "speedup", "memory"} <= set(out.figures)


def test_targets_from_hand_made_rows():
    def row(kind, impl, tokens, ms, mb):
        return {"scope": "attention", "kind": kind, "implementation": impl, "tokens": tokens,
                "latency_ms": ms, "peak_mb": mb}

    rows = [row("standard", "probe", 4097, 400, 10), row("nystrom", "probe", 4097, 90, 8),
            row("nystrom", "nystrom-attention", 4097, 100, 9), row("nystrom", "probe", 1025, 30, 1.9),
            row("hybrid", "probe", 4097, 220, 9)]
    t = eff.targets(rows)
    assert t["nystrom / standard @ 4097"] == {"value": 0.225, "target": 0.25, "met": True}
    assert t["nystrom / nystrom-attention @ 4097"]["met"] is True
    assert t["hybrid / standard @ 4097"]["met"] is False
    assert t["nystrom forward memory 4097 / 1025"]["met"] is False  # 8 / 1.9 > 4.0
    assert math.isclose(t["nystrom forward memory 4097 / 1025"]["target"], 3.997, abs_tol=1e-3)


def test_performer_float16_stays_close_to_float32():
    """D = phi(Q) phi(K)^T 1 is kept below n (the 1 / m of the fused product), so float16 does not
    overflow to zero rows with many keys and features."""
    torch.manual_seed(0)
    cfg = eff.AttentionConfig(dim=64, heads=2, seq_len=1025, performer_features=256)
    m = make_attention("performer", cfg).eval()
    x = torch.randn(1, 1025, 64) * 0.05
    with torch.no_grad():
        ref = m(x)
        half = m.half()(x.half()).float()
    assert torch.isfinite(half).all()
    assert (half - ref).norm() / ref.norm() < 1e-2


@pytest.mark.parametrize("kind", ["linformer", "nystrom"])
def test_fast_projections_still_call_and_honour_the_projection_modules(kind):
    """Linformer's sequence-first projection and Nystromformer's fused one keep the modules' calls:
    a forward hook on k_proj fires and what it returns is what the layer uses."""
    torch.manual_seed(0)
    m = make_attention(kind, eff.attention_config(OPTS, 64, 4, 257)).eval()
    x = torch.randn(2, 257, 64)
    with torch.no_grad():
        plain = m(x)
        fired = []
        h = m.k_proj.register_forward_hook(lambda mod, args, out: fired.append(1) or out * 2)
        try:
            hooked = m(x)
        finally:
            h.remove()
        again = m(x)
    assert fired and not torch.allclose(plain, hooked)
    torch.testing.assert_close(again, plain)
    # the hooked result is the formula with k doubled: scale the weights instead and compare
    with torch.no_grad():
        m.k_proj.weight.mul_(2)
        m.k_proj.bias.mul_(2)
        torch.testing.assert_close(m(x), hooked, atol=1e-5, rtol=1e-5)


def test_half_precision_study_skips_references_that_cannot_run_it(caplog):
    out = execute(RunSpec("efficiency", dtype="bfloat16", save=False,
                          params={"tokens": "17", "dim": 32, "heads": 4, "rounds": 1, "scopes": "attention",
                                  "linformer_k": 8, "performer_features": 8, "nystrom_landmarks": 4,
                                  "memory": False}))
    impls = {r["implementation"] for r in out.result.rows}
    assert "probe" in impls and "nystrom-attention" not in impls  # its pseudo-inverse is float32 only
    assert "nystrom-attention cannot run" in caplog.text
    assert all(r["dtype"] == "bfloat16" for r in out.result.rows)


def test_agreement_at_a_width_whose_heads_do_not_divide_128():
    a = eff.agreement("linformer", OPTS, 192, 3, seed=0)  # ViT-Tiny's width and heads
    assert a["max_rel_diff"] < 1e-5
