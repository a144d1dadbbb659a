"""Activation capture throughput and peak resident memory, and the time of probes over every layer.

Each capture runs in its own process (`probe capture` through `capture_set`, one torch thread),
which reports the images per second of the capture itself (model load excluded) and its peak
resident set size (``ru_maxrss``, model and libraries included). Memory must stay flat as the data
set grows: the issue's bar is +10% from 1k to 100k images. Then the probes (`probe run probes`'
`probe_set`) over every layer of the 10k-image set are timed. Writes
bench/results/representations.json and the README block between the representations-bench markers.

    python bench/representations.py [--sizes 1000,10000,100000] [--models vit-standard,blip]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "representations.json"
README = ROOT / "README.md"
START, END = "<!-- representations-bench:start -->", "<!-- representations-bench:end -->"

CHILD = """
import json, resource, sys, time, torch
torch.set_num_threads(1)
import probe
from probe import registry
from probe.analyses.activations import capture_set
model, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
a = registry.load_model(model, weights="demo")
t0 = time.perf_counter()
ds = capture_set(a, f"shapes:{n}", out, progress=False)
dt = time.perf_counter() - t0
print(json.dumps({"model": model, "images": n, "seconds": round(dt, 2), "images_per_s": round(n / dt, 1),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "rows": ds.index["rows"], "shards": ds.index["n_chunks"]}))
"""


def capture_run(model: str, n: int, folder: Path) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", CHILD, model, str(n), str(folder / f"{model}-{n}")],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def probe_timing(folder: Path, model: str, tokens: str) -> dict[str, Any]:
    import torch

    from probe.analyses.probes import ProbesParams, probe_set
    from probe.data.activations import open_activations

    torch.set_num_threads(1)
    ds = open_activations(folder / f"{model}-10000")
    t0 = time.perf_counter()
    res = probe_set(ds, "colour", tokens, ProbesParams(target="colour", tokens=tokens))
    return {"model": model, "tokens": tokens, "layers": len(res.layers), "rows": res.scores[0]["rows"],
            "seconds": round(time.perf_counter() - t0, 2)}


def render(data: dict[str, Any]) -> str:
    lines = ["Measured on this 2-core CPU, one torch thread, zoo weights, default hooks (every block's "
             "`resid_post`) and groups (cls, mean, object, and text for captioners); regenerate with "
             "`python bench/representations.py`.", "",
             "| model | images | capture images/s | peak RSS (MiB) | shards |", "|---|---:|---:|---:|---:|"]
    for r in data["captures"]:
        lines.append(f"| {r['model']} | {r['images']} | {r['images_per_s']} | {r['peak_rss_mib']} | {r['shards']} |")
    lines.append("")
    for m, g in data["growth"].items():
        lines.append(f"- {m}: peak RSS grows {g['percent']:+.1f}% from {g['from']} to {g['to']} images.")
    for p in data["probes"]:
        lines.append(f"- probes (colour, {p['tokens']} tokens, task + control + baseline + ceiling, 5 grouped folds) over "
                     f"all {p['layers']} layers of the 10k-image {p['model']} set ({p['rows']} rows): {p['seconds']} s.")
    return "\n".join(lines) + "\n"


def write_readme(data: dict[str, Any]) -> None:
    from probe import docs  # this script measures memory in child processes: keep its own start-up light

    docs.write_readme_block(README, START, END, render(data))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--models", default="vit-standard,blip")
    ap.add_argument("--readme-only", action="store_true")
    args = ap.parse_args(argv)
    if args.readme_only:
        write_readme(json.loads(OUT.read_text()))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    captures, probes = [], []
    with tempfile.TemporaryDirectory(prefix="probe-bench-") as tmp:
        folder = Path(tmp)
        for model in args.models.split(","):
            for n in sizes:
                r = capture_run(model, n, folder)
                print(json.dumps(r), flush=True)
                captures.append(r)
            if 10000 in sizes:
                for tokens in ("cls", "object"):
                    p = probe_timing(folder, model, tokens)
                    print(json.dumps(p), flush=True)
                    probes.append(p)
            for n in sizes:
                import shutil

                shutil.rmtree(folder / f"{model}-{n}", ignore_errors=True)
    growth = {}
    for model in args.models.split(","):
        rs = [r for r in captures if r["model"] == model]
        lo, hi = rs[0], rs[-1]
        growth[model] = {"from": lo["images"], "to": hi["images"],
                         "percent": round(100 * (hi["peak_rss_mib"] / lo["peak_rss_mib"] - 1), 2)}
    data = {"captures": captures, "growth": growth, "probes": probes}
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    write_readme(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
