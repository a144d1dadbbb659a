"""A full layer x head ablation sweep, batched variants against one forward per variant.

For each family, the model ``--weights`` resolves to (default ``demo``: the bundled zoo
checkpoint; ``tiny`` builds the small test config) runs `probe.analyses.ablation.run` with
``kind="heads"`` plus ``kind="layers"`` (``none`` + every layer + every head) on 16 probe-shapes
test images, log-probs only (``--generate`` adds the greedy caption of every variant). Variants,
interleaved round by round on the same adapter:

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

from probe import registry
from probe.analyses import ablation
from probe.io import atomic_write_text
from probe.shapes import iter_split

FAMILIES = ("vit-gpt2", "blip", "git", "prefix-vlm", "mmca")


def sweep(adapter, images, loop: bool, generate: bool, batch_size: int) -> tuple[float, torch.Tensor]:
    t = time.perf_counter()
    lp = []
    for kind in ("layers", "heads"):
        r = ablation.run(adapter, images, kind=kind, loop=loop, generate=generate, batch_size=batch_size,
                         progress=False)
        lp.append(r.arrays["ablation.logprob"])
    return time.perf_counter() - t, torch.cat(lp)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", nargs="+", default=list(FAMILIES))
    ap.add_argument("--weights", default="demo", help="demo (the bundled zoo) or random, a folder, ...")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--generate", action="store_true")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ablation_sweep.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    images = [s.image for s in iter_split("test", args.images)]
    results = {}
    for name in args.families:
        adapter = registry.load_model(name, weights=args.weights)
        n_variants = sum(len(ablation.build_variants(adapter, kind, len(images), k=1, attended=None, objects=None))
                         for kind in ("layers", "heads"))  # each run includes its own "none"
        sweep(adapter, images[:2], False, args.generate, args.batch_size)  # warm-up
        times = {"batched": [], "loop": []}
        diff = 0.0
        for _ in range(args.rounds):
            tb, lb = sweep(adapter, images, False, args.generate, args.batch_size)
            tl, ll = sweep(adapter, images, True, args.generate, args.batch_size)
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
