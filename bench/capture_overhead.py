"""Capture overhead on ViT-B/16 (random weights): ours against bare SDPA and eager output_attentions.

Variants, interleaved round by round (same weights, same inputs; the order alternates each round):
  sdpa             transformers ViTModel on its SDPA kernel, no capture
  eager_attn       the same model on eager attention with output_attentions=True
  capture_full     our probe_capture kernel + capture of all 12 layers' full patterns (float32);
                   the output stays SDPA's, bit for bit, so attention is computed twice
  capture_full_pv  the same capture with `output="pattern"` (`sites.output_from_pattern()`): each layer's output is
                   P @ V from the captured pattern (eager attention's numbers), SDPA is skipped
  capture_cls      head mean, CLS query row only
With --extra-routes also capture_full_fp16 / capture_full_pv_fp16: the same, stored as float16
(``capture(dtype=torch.float16)``).

Each sample records wall time (the headline, `median_s` and `ratio_vs_sdpa`), the process's CPU time
(`cpu_*`: less sensitive to other processes on a shared machine) and its minor page faults (fresh
memory touched: the patterns are new memory unless the allocator reuses freed ones).
Writes medians, every sample, ratios and whether the targets are met to
bench/results/capture_overhead.json.

    python bench/capture_overhead.py [--rounds 7] [--threads 1] [--quick] [--extra-routes]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import ViTConfig, ViTModel

import probe
from probe.capture import capture
from probe.io import atomic_write_text

PATTERNS = "vision.blocks.*.attn.pattern"
TARGETS = {"capture_full": {224: 1.10, 384: 1.25}, "capture_full_pv": {224: 1.10, 384: 1.25},
           "capture_cls": {224: 1.03, 384: 1.03}}


def build(image_size: int) -> tuple[ViTModel, ViTModel, object]:
    """The same random ViT-B/16 three times: plain SDPA, eager, and ours (`hf-vit` on probe_capture)."""
    ours = probe.load_model("hf-vit", weights="random", seed=0, config={"image_size": image_size})
    cfg = ViTConfig(**ours.model.config.to_dict())  # ViT-B/16: 768 wide, 12 layers, 12 heads
    sdpa = ViTModel._from_config(copy.deepcopy(cfg), attn_implementation="sdpa").eval()
    eager = ViTModel._from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    sdpa.load_state_dict(ours.model.state_dict())
    eager.load_state_dict(ours.model.state_dict())
    return sdpa, eager, ours


def variants(image_size: int, batch: int, extra: bool) -> dict[str, Callable[[], torch.Tensor]]:
    sdpa, eager, adapter = build(image_size)
    x = torch.randn(batch, 3, image_size, image_size)
    n_tokens = (image_size // 16) ** 2 + 1

    def run_sdpa() -> torch.Tensor:
        return sdpa(pixel_values=x).last_hidden_state

    def run_eager() -> torch.Tensor:
        out = eager(pixel_values=x, output_attentions=True)
        assert len(out.attentions) == 12
        return out.last_hidden_state

    def full(pv: bool, dtype: torch.dtype = torch.float32) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with capture(adapter, PATTERNS, dtype=dtype, output="pattern" if pv else "kernel") as cache:
                out = adapter.model(pixel_values=x).last_hidden_state
            assert len(cache) == 12 and cache["vision.blocks.11.attn.pattern"].dtype == dtype
            return out
        return run

    def run_cls() -> torch.Tensor:
        with capture(adapter, PATTERNS, rows=[0], reduce="mean") as cache:
            out = adapter.model(pixel_values=x).last_hidden_state
        assert cache["vision.blocks.11.attn.pattern"].shape == (batch, 1, 1, n_tokens)
        return out

    out = {"sdpa": run_sdpa, "eager_attn": run_eager, "capture_full": full(False),
           "capture_full_pv": full(True), "capture_cls": run_cls}
    if extra:
        out |= {"capture_full_fp16": full(False, torch.float16), "capture_full_pv_fp16": full(True, torch.float16)}
    return out


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def bench(image_size: int, batch: int, rounds: int, extra: bool = False) -> dict:
    fns = variants(image_size, batch, extra)
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    faults: dict[str, list[int]] = {k: [] for k in fns}
    ref = None
    with torch.inference_mode():
        for fn in fns.values():  # warm-up, and every variant computes the same output
            out = fn()
            ref = out if ref is None else ref
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        for r in range(rounds):
            order = list(fns) if r % 2 == 0 else list(reversed(fns))
            for name in order:
                f0, c0, t0 = _faults(), time.process_time(), time.perf_counter()
                fns[name]()
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
                faults[name].append(_faults() - f0)
    med = {k: statistics.median(v) for k, v in wall.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    ratios = {k: round(v / med["sdpa"], 4) for k, v in med.items()}
    return {
        "image_size": image_size,
        "batch": batch,
        "rounds": rounds,
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "min_s": {k: round(min(v), 4) for k, v in wall.items()},
        "max_s": {k: round(max(v), 4) for k, v in wall.items()},
        "all_s": {k: [round(t, 4) for t in v] for k, v in wall.items()},
        "ratio_vs_sdpa": ratios,
        "cpu_median_s": {k: round(v, 4) for k, v in cmed.items()},
        "cpu_all_s": {k: [round(t, 4) for t in v] for k, v in cpu.items()},
        "cpu_ratio_vs_sdpa": {k: round(v / cmed["sdpa"], 4) for k, v in cmed.items()},
        "minor_faults_median": {k: int(statistics.median(v)) for k, v in faults.items()},
        "target_met": {k: ratios[k] <= t[image_size] for k, t in TARGETS.items() if image_size in t},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test (writes nothing)")
    ap.add_argument("--extra-routes", action="store_true", help="also the float16-stored captures")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "capture_overhead.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = [(64, 2), (96, 1)] if args.quick else [(224, 8), (384, 2)]
    results = []
    for size, batch in settings:
        res = bench(size, batch, args.rounds, args.extra_routes)
        print(json.dumps({k: res[k] for k in ("image_size", "batch", "median_s", "ratio_vs_sdpa", "cpu_ratio_vs_sdpa",
                                              "minor_faults_median")}))
        results.append(res)
    report = {
        "benchmark": "capture_overhead",
        "model": "ViT-B/16 (transformers ViTModel, random weights)",
        "targets": {f"{k}@{s}": t for k, ts in TARGETS.items() for s, t in ts.items()},
        "routes": {
            "capture_full": "SDPA output (bit-identical to no capture) + P = softmax(QK^T*scale) computed once per "
                            "layer in place, block by block, shared by every listener",
            "capture_full_pv": "inside sites.output_from_pattern(): output = P @ V from the captured P (equals eager "
                               "attention; SDPA's up to float rounding), SDPA skipped",
        },
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_threads": args.threads, "device": "cpu"},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "results": results,
    }
    if not args.quick:
        atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
