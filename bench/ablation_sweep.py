"""A full layer x head ablation sweep, batched variants against one forward per variant.

For each family, the model ``--weights`` resolves to (default ``demo``: the bundled zoo
checkpoint) evaluates ``none`` + every layer + every head ablation
(`probe.analyses.ablation.evaluate_variants`) on 16 probe-shapes test images: the teacher-forced
log-prob of the reference caption, and with ``--generate`` also the greedy caption under every
variant. The reference caption is computed once, outside the timing. Two ways, interleaved round
by round on the same adapter:

  batched  every variant x image row packed into batched forwards (`--batch-size` rows each)
  loop     one forward per variant over the 16 images (what the batched path must equal)

The numbers of both are compared (max |logprob difference|), medians and the speed-up go to
bench/results/ablation_sweep.json.

    python bench/ablation_sweep.py [--families blip git ...] [--rounds 5] [--threads 2] [--generate]
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


def sweep(adapter, variants, ref, loop: bool, generate: bool, batch_size: int) -> tuple[float, torch.Tensor]:
    """Time the variants' forwards only (the reference caption is computed once, outside)."""
    px, _, ids, mask = ref
    t = time.perf_counter()
    lp, _, _ = ablation.evaluate_variants(adapter, variants, px, ids, mask, loop=loop, batch_size=batch_size,
                                          generate=generate)
    return time.perf_counter() - t, lp


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", nargs="+", default=list(FAMILIES))
    ap.add_argument("--weights", default="demo", help="demo (the bundled zoo) or random, a folder, ...")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
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
    results = {}
    for name in args.families:
        adapter = registry.load_model(name, weights=args.weights)
        ref = ablation.reference(adapter, images)
        span = adapter.input_meta(adapter.preprocess(images[:1])).spans["image"]
        variants = ablation.build_variants(adapter, "all", len(images), k=1, span=span, attended=None, objects=None)
        variants = [v for v in variants if v.kind in ("none", "layer", "head")]  # the full layer x head sweep
        n_variants = len(variants)
        sweep(adapter, variants[:3], ablation.reference(adapter, images[:2]), False, args.generate, args.batch_size)
        times = {"batched": [], "loop": []}
        diff = 0.0
        for _ in range(args.rounds):
            tb, lb = sweep(adapter, variants, ref, False, args.generate, args.batch_size)
            tl, ll = sweep(adapter, variants, ref, True, args.generate, args.batch_size)
            times["batched"].append(tb)
            times["loop"].append(tl)
            diff = max(diff, float((lb - ll).abs().max()))
        med = {k: statistics.median(v) for k, v in times.items()}
        results[name] = {"weights": adapter.weights.ref, "variants": n_variants, "images": len(images),
                         "median_s": {k: round(v, 4) for k, v in med.items()},
                         "speedup": round(med["loop"] / med["batched"], 2), "max_abs_logprob_diff": diff,
                         "all_s": times}
        print(f"{name}: {n_variants} variants x {len(images)} images: batched {med['batched']:.3f} s, "
              f"loop {med['loop']:.3f} s, {results[name]['speedup']}x, max |diff| {diff:.2e}")
    out = {"benchmark": "ablation_sweep", "generate": args.generate, "threads": args.threads,
           "rounds": args.rounds, "batch_size": args.batch_size, "torch": torch.__version__,
           "machine": platform.processor() or platform.machine(), "results": results}
    atomic_write_text(args.out, json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
