"""Attribution speed and memory at published sizes (random weights), ratios measured side by side.

1. Rollout of the CLS row of ViT-B/16 at 224 px (``hf-vit``, 197 tokens, 12 layers) against
   that model's plain forward: the rollout arithmetic on captured patterns (target: at most 2% of
   the forward), and the whole capture + rollout against the plain forward.
2. Chefer relevancy for every token of a 20-token caption on published-size BLIP (``blip``,
   384 px) against one teacher-forced forward and backward of that caption (target: at most 3x),
   with the vision layers weighted per token (Chefer et al.) and shared over the caption.
3. Peak resident memory added over the loaded model (each measurement in a fresh process) on a
   ViT-B/16-size classifier (``vit-standard``, 224 px, 12 classes, random weights): one forward
   without gradients, one forward and backward, relevancy, captum integrated gradients with
   ``internal_batch_size`` 1 and 4 (target: at most 2x one forward; we report both references,
   since a method that backpropagates stores what a forward with gradients stores).

Rounds are interleaved; medians with min..max. Writes bench/results/attribution.json.

    python bench/attribution.py [--rounds 5] [--relevancy-rounds 1] [--threads 2] [--parts rollout,memory] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

import probe
from probe.analyses import relevancy as rel
from probe.analyses import rollout as ro
from probe.analyses.attribution import integrated_gradients
from probe.analyses.explain import Target
from probe.capture import capture
from probe.io import atomic_write_text

OUT = Path(__file__).resolve().parent / "results" / "attribution.json"
VISION = "vision.blocks.*.attn.pattern"


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(xs), "min_s": min(xs), "max_s": max(xs), "n": len(xs)}


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_rollout(rounds: int) -> dict:
    vit = probe.load_model("hf-vit", weights="random", seed=0)
    px = torch.randn(1, 3, 224, 224)
    batch = {"pixel_values": px}
    names = [s.name for s in ro._vision_specs(vit)]
    with torch.no_grad(), capture(vit, names) as cache:
        vit.forward(batch)
    pats = [cache[n] for n in names]
    fwd, math_, full = [], [], []

    def captured() -> None:
        with torch.no_grad(), capture(vit, names) as c:
            vit.forward(batch)
        ro.rollout([c[n] for n in names], keep=[0], rows=[0], exact=True)

    with torch.no_grad():
        for _ in range(2):
            vit.forward(batch)
            ro.rollout(pats, keep=[0], rows=[0], exact=True)
        for _ in range(rounds):
            fwd.append(_time(lambda: vit.forward(batch)))
            math_.append(_time(lambda: ro.rollout(pats, keep=[0], rows=[0], exact=True)))
            full.append(_time(captured))
    f = statistics.median(fwd)
    return {"model": "ViT-B/16 (hf-vit, random weights), 224 px, batch 1", "forward": _stats(fwd),
            "rollout_cls_row": _stats(math_), "capture_plus_rollout": _stats(full),
            "rollout_over_forward": statistics.median(math_) / f,
            "capture_plus_rollout_over_forward": statistics.median(full) / f, "target_rollout_over_forward": 0.02}


def bench_relevancy(rounds: int, tokens: int, chunk: int) -> dict:
    blip = probe.load_model("blip", weights="random", seed=0)
    size = blip.image_size
    px = torch.randn(1, 3, size, size)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (1, tokens + 1), generator=g)
    ids[0, 0] = blip.specials.start
    mask = torch.ones_like(ids)
    target = Target(px, ids, mask)

    def forward_backward() -> None:
        p = px.clone().requires_grad_()
        blip.token_logprobs(p, ids, mask).sum().backward()
        blip.model.zero_grad(set_to_none=True)

    forward_backward()
    fb: list[float] = []
    modes: dict[str, list[float]] = {"per-token": [], "shared": []}
    for _ in range(rounds):
        fb.append(_time(forward_backward))
        for mode, times in modes.items():
            times.append(_time(lambda mode=mode: rel.relevancy_maps(blip, target, chunk=chunk, vision=mode)))
    f = statistics.median(fb)
    return {"model": f"BLIP base captioning (random weights), {size} px, {tokens}-token caption, batch 1",
            "reference": "one teacher-forced forward and loss.backward() (parameter gradients included)",
            "targets_per_backward": chunk, "forward_backward": _stats(fb),
            **{f"relevancy_{m}": _stats(t) for m, t in modes.items()},
            **{f"relevancy_{m}_over_forward_backward": statistics.median(t) / f for m, t in modes.items()},
            "target": 3.0}


MEMORY_JOBS = {
    "vit_forward": "vit.forward({'pixel_values': px})",
    # the input's gradient only, as attribution methods take it (no parameter gradients)
    "vit_forward_backward": "torch.autograd.grad(vit.forward({'pixel_values': px.requires_grad_()})[0, 0], px)",
    "vit_integrated_gradients_ibs1": "integrated_gradients(vit, Target(px, labels=torch.tensor([0])), n_steps=32, "
                                     "internal_batch_size=1)",
    "vit_relevancy": "rel.relevancy_maps(vit, Target(px, labels=torch.tensor([0])))",
    "vit_integrated_gradients_ibs4": "integrated_gradients(vit, Target(px, labels=torch.tensor([0])), n_steps=32, "
                                     "internal_batch_size=4)",
}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_job(name: str) -> None:
    """Peak resident memory added by one job over the loaded model, sampled every 2 ms (ru_maxrss
    cannot say: loading peaks higher than the job)."""
    vit = probe.load_model("vit-standard", weights="random", seed=0,
                           config={"image_size": 224, "patch_size": 16, "dim": 768, "depth": 12, "heads": 12,
                                   "num_classes": 12})
    px = torch.randn(1, 3, 224, 224)
    gc.collect()
    base = _rss_mib()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    ctx = torch.no_grad() if name == "vit_forward" else torch.enable_grad()
    with ctx:
        eval(MEMORY_JOBS[name], {"vit": vit, "px": px, "rel": rel, "Target": Target, "torch": torch,
                                 "integrated_gradients": integrated_gradients})
    done.set()
    t.join()
    peak[0] = max(peak[0], _rss_mib())
    sys.stdout.write(json.dumps({"job": name, "rss_before_mib": base, "peak_mib": peak[0],
                                 "added_mib": peak[0] - base}) + "\n")


def bench_memory() -> dict:
    out = {}
    for name in MEMORY_JOBS:
        res = subprocess.run([sys.executable, __file__, "--memory-job", name], capture_output=True, text=True)
        if res.returncode:
            out[name] = {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed"}
            continue
        out[name] = json.loads(res.stdout.strip().splitlines()[-1])
    fwd = out.get("vit_forward", {}).get("added_mib")
    fb = out.get("vit_forward_backward", {}).get("added_mib")
    for v in out.values():
        if fwd and "added_mib" in v:
            v["added_over_forward"] = v["added_mib"] / fwd
        if fb and "added_mib" in v:
            v["added_over_forward_backward"] = v["added_mib"] / fb
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--chunk", type=int, default=4)
    ap.add_argument("--relevancy-rounds", type=int, default=1, help="rounds of the BLIP relevancy (minutes each)")
    ap.add_argument("--quick", action="store_true", help="one round, 4 tokens (a smoke test)")
    ap.add_argument("--parts", default="rollout,relevancy,memory", help="which measurements to (re)run; the "
                    "others keep their figures in the results file")
    ap.add_argument("--memory-job", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_job:
        memory_job(args.memory_job)
        return
    rounds, tokens = (1, 4) if args.quick else (args.rounds, args.tokens)
    parts = args.parts.split(",")
    result = json.loads(OUT.read_text()) if OUT.exists() and not args.quick else {}
    result.update({"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "threads": args.threads,
                   "torch": torch.__version__})
    if "rollout" in parts:
        result["rollout"] = bench_rollout(rounds)
    if "relevancy" in parts:
        result["relevancy"] = bench_relevancy(1 if args.quick else args.relevancy_rounds, tokens, args.chunk)
    if "memory" in parts:
        result["memory"] = bench_memory()
    atomic_write_text(OUT, json.dumps(result, indent=2) + "\n")
    sys.stdout.write(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
