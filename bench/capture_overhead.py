"""Capture overhead on ViT-B/16 (random weights): ours against bare SDPA and eager output_attentions.

Variants, interleaved round by round (same weights, same inputs):
  sdpa         transformers ViTModel on its SDPA kernel, no capture
  eager_attn   the same model on eager attention with output_attentions=True
  capture_full our probe_capture kernel + capture of all 12 layers' full patterns (float32)
  capture_cls  the same, reduced on the fly: head mean, CLS query row only

Writes medians and ratios to bench/results/capture_overhead.json.

    python bench/capture_overhead.py [--rounds 7] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import ViTConfig, ViTModel

import probe
from probe.capture import capture
from probe.io import atomic_write_text

PATTERNS = "vision.blocks.*.attn.pattern"


def build(image_size: int) -> tuple[ViTModel, ViTModel, object]:
    """The same random ViT-B/16 three times: plain SDPA, eager, and ours (`hf-vit` on probe_capture)."""
    ours = probe.load_model("hf-vit", weights="random", seed=0, config={"image_size": image_size})
    cfg = ViTConfig(**ours.model.config.to_dict())  # ViT-B/16: 768 wide, 12 layers, 12 heads
    sdpa = ViTModel._from_config(copy.deepcopy(cfg), attn_implementation="sdpa").eval()
    eager = ViTModel._from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    sdpa.load_state_dict(ours.model.state_dict())
    eager.load_state_dict(ours.model.state_dict())
    return sdpa, eager, ours


def bench(image_size: int, batch: int, rounds: int) -> dict:
    sdpa, eager, adapter = build(image_size)
    x = torch.randn(batch, 3, image_size, image_size)
    ref = None

    def run_sdpa():
        return sdpa(pixel_values=x).last_hidden_state

    def run_eager():
        out = eager(pixel_values=x, output_attentions=True)
        assert len(out.attentions) == 12
        return out.last_hidden_state

    def run_full():
        with capture(adapter, PATTERNS) as cache:
            out = adapter.model(pixel_values=x).last_hidden_state
        assert len(cache) == 12
        return out

    def run_cls():
        with capture(adapter, PATTERNS, rows=[0], reduce="mean") as cache:
            out = adapter.model(pixel_values=x).last_hidden_state
        assert cache["vision.blocks.11.attn.pattern"].shape == (batch, 1, 1, (image_size // 16) ** 2 + 1)
        return out

    variants = {"sdpa": run_sdpa, "eager_attn": run_eager, "capture_full": run_full, "capture_cls": run_cls}
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for fn in variants.values():  # warm-up
            out = fn()
            ref = out if ref is None else ref
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        for r in range(rounds):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in order:
                t0 = time.perf_counter()
                variants[name]()
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "image_size": image_size,
        "batch": batch,
        "rounds": rounds,
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "all_s": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "ratio_vs_sdpa": {k: round(v / med["sdpa"], 4) for k, v in med.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "capture_overhead.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = [(64, 2), (96, 1)] if args.quick else [(224, 8), (384, 2)]
    results = []
    for size, batch in settings:
        res = bench(size, batch, args.rounds)
        print(json.dumps({k: res[k] for k in ("image_size", "batch", "median_s", "ratio_vs_sdpa")}))
        results.append(res)
    report = {
        "benchmark": "capture_overhead",
        "model": "ViT-B/16 (transformers ViTModel, random weights)",
        "targets": {"capture_full@224": 1.10, "capture_full@384": 1.25, "capture_cls": 1.03},
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
