"""A full layer x head ablation sweep, batched variants against one forward per variant.

For each family, the model ``--weights`` resolves to (default ``demo``: the bundled zoo
checkpoint; ``random``: the published architecture with random weights, e.g. BLIP base at 384 px
with 12 text layers of 12 heads) evaluates ``none`` + every layer + every head ablation
(`probe.analyses.ablation.evaluate_variants`) on ``--images`` probe-shapes test images: the
teacher-forced log-prob of the reference caption, and with ``--generate`` also the greedy caption
under every variant. The reference caption is computed once, outside the timing. Two ways,
interleaved round by round on the same adapter:

  batched  rows packed `--batch-size` at a time; for BLIP and ViT-GPT2 one unablated forward, then
           every row resumed at its variant's first ablated layer (the blocks below shared, each
           image's cross-attention keys and values computed once); others: whole forwards with
           the vision tower run once
  loop     one whole forward per variant over the images, vision tower included (the reference)

Both must give the same numbers (max |logprob difference|, and with --generate whether every
caption is equal). Medians, min and max of each, and the speed-up (ratio of medians, with the
min/max of the per-round ratios) are merged into bench/results/ablation_sweep.json (or
ablation_sweep_generate.json) under ``FAMILY`` (demo weights) or ``FAMILY@WEIGHTS``; entries
of other families and weights are kept. Run it with nothing else running:

    python bench/ablation_sweep.py --rounds 5                                   # zoo, 16 images
    python bench/ablation_sweep.py --families blip --weights random --images 2 --rounds 1 --batch-size 64
    (and both with --generate). The published-size loop is 157 whole forwards at 384 px: on one
    thread about 8 minutes a round (20 with --generate), hence one round; --batch-size 64 bounds the
    memory of generation, whose key/value cache holds 577 image tokens per row and layer.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import probe
from probe import registry
from probe.analyses import ablation
from probe.data.shapes import iter_split
from probe.io import atomic_write_text

FAMILIES = list(probe.models(task="caption"))  # every registered captioner


def sweep(adapter, variants, ref, loop: bool, generate: bool,
          batch_size: int) -> tuple[float, torch.Tensor, list[list[str]]]:
    """Time the variants' forwards only (the reference caption is computed once, outside)."""
    px, _, ids, mask = ref
    t = time.perf_counter()
    lp, texts, _ = ablation.evaluate_variants(adapter, variants, px, ids, mask, loop=loop, batch_size=batch_size,
                                              generate=generate)
    return time.perf_counter() - t, lp, texts


def spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4), "max": round(max(values), 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", nargs="+", default=list(FAMILIES))
    ap.add_argument("--weights", default="demo", help="demo (the bundled zoo), random (published size), a folder ...")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--generate", action="store_true")
    ap.add_argument("--out", type=Path, default=None,
                    help="default bench/results/ablation_sweep.json (ablation_sweep_generate.json with --generate)")
    args = ap.parse_args()
    if args.out is None:
        name = "ablation_sweep_generate.json" if args.generate else "ablation_sweep.json"
        args.out = Path(__file__).parent / "results" / name
    torch.set_num_threads(args.threads)
    images = [s.image for s in iter_split("test", args.images)]
    old = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results = dict(old.get("results", {})) if old.get("generate") == args.generate else {}
    for name in args.families:
        adapter = registry.load_model(name, weights=args.weights)
        ref = ablation.reference(adapter, images)
        span = adapter.input_meta(adapter.preprocess(images[:1])).spans["image"]
        variants = ablation.build_variants(adapter, "all", len(images), k=1, span=span, attended=None, objects=None)
        variants = [v for v in variants if v.kind in ("none", "layer", "head")]  # the full layer x head sweep
        warm = ablation.reference(adapter, images[:1])
        sweep(adapter, variants[:3], warm, False, args.generate, args.batch_size)
        sweep(adapter, variants[:1], warm, True, args.generate, args.batch_size)
        times: dict[str, list[float]] = {"batched": [], "loop": []}
        diff, same = 0.0, True
        for _ in range(args.rounds):
            tb, lb, cb = sweep(adapter, variants, ref, False, args.generate, args.batch_size)
            tl, ll, cl = sweep(adapter, variants, ref, True, args.generate, args.batch_size)
            times["batched"].append(tb)
            times["loop"].append(tl)
            diff = max(diff, float((lb - ll).abs().max()))
            same = same and cb == cl
        ratios = [tl / tb for tb, tl in zip(times["batched"], times["loop"], strict=True)]
        key = name if args.weights == "demo" else f"{name}@{args.weights}"
        results[key] = {
            "weights": adapter.weights.ref or adapter.weights.source, "image_size": adapter.image_size,
            "variants": len(variants), "images": len(images), "rounds": args.rounds, "threads": args.threads,
            "batch_size": args.batch_size, "seconds": {k: spread(v) for k, v in times.items()},
            "speedup": round(statistics.median(times["loop"]) / statistics.median(times["batched"]), 2),
            "speedup_per_round": {"min": round(min(ratios), 2), "max": round(max(ratios), 2)},
            "max_abs_logprob_diff": diff, **({"captions_equal": same} if args.generate else {}),
            "all_s": times,
        }
        r = results[key]
        print(f"{key}: {len(variants)} variants x {len(images)} images: batched {r['seconds']['batched']['median']:.3f} s, "
              f"loop {r['seconds']['loop']['median']:.3f} s, {r['speedup']}x (rounds {min(ratios):.2f}-"
              f"{max(ratios):.2f}), max |diff| {diff:.2e}" + (f", captions equal: {same}" if args.generate else ""))
    out = {"benchmark": "ablation_sweep", "generate": args.generate, "torch": torch.__version__,
           "machine": platform.processor() or platform.machine(), "results": results}
    atomic_write_text(args.out, json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
