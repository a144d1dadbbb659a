"""Captioning with all text->image attention captured against captioning without, per family.

For each captioner with a published architecture (`Capabilities.published`) at two sizes -- `tiny`
(``weights="random", config={}``: the test configs) and `full` (``weights="random"``: the published
architecture built from its config in code, random weights) -- one image is captioned
with a 20-token greedy decode (``min_new_tokens`` = ``max_new_tokens``, so both variants decode
exactly 20 tokens), KV cache on. Variants, interleaved round by round on the same adapter:

  plain    adapter.caption, nothing attached
  xattn    generate_with_cache of the flow hook (cross-attention, or GIT's joint attention) of
           every text layer, all heads, newest query row per step, float32 on the CPU
  all      generate_with_cache of every pattern hook (vision once + text self + cross)

Medians and ratios to bench/results/caption_capture.json.

    python bench/caption_capture.py [--rounds 5] [--threads 1] [--sizes tiny full] [--tokens 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

import probe
from probe.io import atomic_write_text

FAMILIES = [n for n, e in probe.models(task="caption").items() if e.capabilities.published]


def n_params(adapter) -> int:
    return sum(p.numel() for p in adapter.model.parameters())


def build(name: str, size: str):
    """`tiny`: the test config; `full`: random weights at the published size, or None where a
    family's random build is not its published size (the prefix VLM: only its ViT is published)."""
    adapter = probe.load_model(name, weights="random", seed=0, config={} if size == "tiny" else None)
    if size == "full" and n_params(adapter) != n_params(probe.load_model(name, weights="meta")):
        return None
    return adapter


def bench_one(adapter, tokens: int, rounds: int) -> dict:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (adapter.image_size, adapter.image_size, 3), dtype=np.uint8))
    hook = adapter.flow_hook.format(i="*")
    kw = {"max_new_tokens": tokens, "min_new_tokens": tokens}

    def plain():
        return adapter.caption([image], **kw)["ids"]

    def xattn():
        caps, cache = adapter.generate_with_cache([image], hook, **kw)
        return caps["ids"]

    def every():
        caps, cache = adapter.generate_with_cache([image], "*.pattern", **kw)
        return caps["ids"]

    variants = {"plain": plain, "xattn": xattn, "all": every}
    ref = plain()
    assert ref.shape[1] == tokens
    for fn in variants.values():  # warm-up, and the captions must not change
        assert torch.equal(fn(), ref)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "median_s": {k: round(v, 5) for k, v in med.items()},
        "ratio_xattn": round(med["xattn"] / med["plain"], 4),
        "ratio_all": round(med["all"] / med["plain"], 4),
        "parameters": sum(p.numel() for p in adapter.model.parameters()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "full"], choices=["tiny", "full"])
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "caption_capture.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results: dict = {}
    for size in args.sizes:
        for name in args.families:
            adapter = build(name, size)
            if adapter is None:
                print(f"{name:9s} {size:5s} skipped: its random build is not the published size")
                continue
            r = bench_one(adapter, args.tokens, args.rounds)
            results[f"{name}/{size}"] = r
            print(f"{name:9s} {size:5s} plain {r['median_s']['plain']:.4f}s  xattn x{r['ratio_xattn']:.3f}  "
                  f"all x{r['ratio_all']:.3f}")
            del adapter
    report = {
        "what": "20-token greedy caption of one image, capture of text->image attention vs none; medians",
        "target": "ratio_xattn <= 1.10 on CPU",
        "rounds": args.rounds, "threads": args.threads, "tokens": args.tokens,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
        "device": "cpu",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
