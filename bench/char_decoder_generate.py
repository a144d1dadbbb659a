"""Greedy generation of our character captioners with and without the decoder's key/value cache.

For each zoo checkpoint (``prefix-vlm``, ``mmca``; ``weights="demo"``) and probe-shapes test
images, time per caption of `adapter.caption_pixels`, variants interleaved round by round (their
order alternating between rounds):

  cached     the default: the prefix once, then one new position per step
  uncached   ``use_cache=False``: the whole prefix re-run at every step (what generation did before)

at two lengths: ``zoo`` (the default ``max_new_tokens`` = max_len - 1, captions end at ``<eos>``:
the zoo caption length) and ``long`` (``min_new_tokens`` = ``max_new_tokens`` = max_len - 1: every
caption runs to the longest the positions allow). Both variants must give the same ids (checked
before timing). Medians, min/max and the speed-up (uncached / cached median) to
bench/results/char_decoder_generate.json.

    python bench/char_decoder_generate.py [--rounds 7] [--images 4] [--batch 1] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers

import probe
from probe.data.shapes import iter_split
from probe.io import atomic_write_text

FAMILIES = ("prefix-vlm", "mmca")


def stats(times: list[float], per: int) -> dict:
    t = [x / per for x in times]
    return {"median_s": round(statistics.median(t), 6), "min_s": round(min(t), 6), "max_s": round(max(t), 6)}


def bench_one(adapter, px: torch.Tensor, batch: int, length: str, rounds: int) -> dict:
    n = adapter.max_caption_tokens
    kw = {"min_new_tokens": n} if length == "long" else {}
    chunks = [px[i : i + batch] for i in range(0, px.shape[0], batch)]

    def run(use_cache: bool) -> list[dict]:
        return [adapter.caption_pixels(c, n, use_cache=use_cache, **kw) for c in chunks]

    ref = run(False)
    got = run(True)  # also the warm-up
    if not all(torch.equal(a["ids"], b["ids"]) for a, b in zip(got, ref, strict=True)):
        raise AssertionError(f"{adapter.name} {length}: cached captions differ from uncached ones")
    tokens = [len(t) for c in ref for t in c["tokens"]]
    times: dict[str, list[float]] = {"cached": [], "uncached": []}
    for r in range(rounds):
        order = ("cached", "uncached") if r % 2 == 0 else ("uncached", "cached")
        for name in order:
            t0 = time.perf_counter()
            run(name == "cached")
            times[name].append(time.perf_counter() - t0)
    per = px.shape[0]
    out = {k: stats(v, per) for k, v in times.items()}
    return {
        "per_caption": out,
        "speedup_median": round(out["uncached"]["median_s"] / out["cached"]["median_s"], 3),
        "speedup_per_round": [round(u / c, 3) for u, c in zip(times["uncached"], times["cached"], strict=True)],
        "max_new_tokens": n, "min_new_tokens": kw.get("min_new_tokens", 0),
        "caption_tokens_mean": round(sum(tokens) / len(tokens), 2), "caption_tokens_max": max(tokens),
        "image_tokens": adapter.n_image_tokens,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1, help="images per generate call (times are per caption)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lengths", nargs="+", default=["zoo", "long"], choices=["zoo", "long"])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "char_decoder_generate.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results: dict = {}
    for name in FAMILIES:
        adapter = probe.load_model(name, weights="demo")
        samples = list(iter_split("test", args.images, seed=0, image_size=adapter.image_size))
        px = adapter.preprocess([s.image for s in samples])["pixel_values"]
        for length in args.lengths:
            r = bench_one(adapter, px, args.batch, length, args.rounds)
            results[f"{name}/{length}"] = r
            c, u = r["per_caption"]["cached"], r["per_caption"]["uncached"]
            print(f"{name:10s} {length:4s} {r['caption_tokens_mean']:5.1f} tokens  cached {c['median_s'] * 1e3:7.2f} ms  "
                  f"uncached {u['median_s'] * 1e3:7.2f} ms  x{r['speedup_median']:.2f}")
    report = {
        "what": "greedy caption time per caption, decoder key/value cache vs re-running the prefix each step; "
                "variants interleaved per round, medians and min/max over rounds",
        "command": "python bench/char_decoder_generate.py " + " ".join(
            f"--{k} {v}" for k, v in (("rounds", args.rounds), ("images", args.images), ("batch", args.batch),
                                      ("threads", args.threads))),
        "rounds": args.rounds, "images": args.images, "batch": args.batch, "threads": args.threads,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "machine": platform.machine(), "processor": platform.processor() or platform.machine(), "device": "cpu",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
