"""The README's probe table: do the zoo ViTs encode the colour of the largest object?

Per ViT kind of the zoo, `probe run probes --target colour --tokens cls` on N probe-shapes test images
(captured on the fly; the zoo trained on the train split), every layer: accuracy with its image-bootstrap CI, majority baseline
(out of fold, and the majority class's overall frequency), control task (Hewitt & Liang) and selectivity, on the same
folds (grouped by image, stratified by colour). Writes bench/results/representations_probes.json
and rewrites the README block between the probes markers; tests/test_probes.py fails when the
block differs from the file, and re-runs one kind to check the file is current.

    python bench/probes_table.py [--n 2000] [--models vit-standard,...] [--readme-only]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

import probe  # noqa: F401  (registers models and analyses)
from probe import docs
from probe.io import atomic_write_text
from probe.pipeline import RunSpec, execute

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "representations_probes.json"
README = ROOT / "README.md"
START, END = "<!-- probes:start -->", "<!-- probes:end -->"
MODELS = ["vit-standard", "vit-merged-qkv", "vit-linformer", "vit-performer", "vit-nystrom", "vit-hybrid"]


def run_model(name: str, n: int, target: str = "colour", tokens: str = "cls") -> dict[str, Any]:
    torch.set_num_threads(1)
    outcome = execute(RunSpec(analysis="probes", model=name, weights="demo", save=False,
                              params={"target": target, "tokens": tokens, "data": f"shapes:{n}:test"}))
    res = outcome.result
    return {"model": name, "target": target, "tokens": tokens, "sha256": outcome.adapters[0].weights.sha256,
            "control_ceiling": round(res.control_ceiling, 4), "seconds": res.seconds,
            "layers": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()} for s in res.scores]}


def best(entry: dict[str, Any]) -> dict[str, Any]:
    """The most selective layer among those with accuracy >= 0.9 (else the most accurate one)."""
    good = [s for s in entry["layers"] if s["accuracy"] >= 0.9]
    return max(good, key=lambda s: s["selectivity"]) if good else max(entry["layers"], key=lambda s: s["accuracy"])


def render(data: dict[str, Any]) -> str:
    lines = [f"Colour of the largest object from the CLS token, {data['n']} probe-shapes test images, zoo "
             "weights, 5 folds grouped by image and stratified by colour (the same folds for task, control and "
             "baseline); per kind the most selective layer with accuracy >= 0.9. Majority: the out-of-fold "
             "majority-class baseline / the majority class's overall frequency. "
             "Regenerate with `python bench/probes_table.py`.", "",
             "| model | layer | accuracy [95% CI] | majority | control | selectivity | control ceiling | "
             "accuracy per layer | control per layer |",
             "|---|---|---|---:|---:|---:|---:|---|---|"]
    for e in data["entries"]:
        b = best(e)
        per = " / ".join(f"{s['accuracy']:.3f}" for s in e["layers"])
        ctrl = " / ".join(f"{s['control']:.3f}" for s in e["layers"])
        lines.append(f"| {e['model']} | {b['hook'].split('.')[2]} | {b['accuracy']:.3f} [{b['ci_lo']:.3f}, "
                     f"{b['ci_hi']:.3f}] | {b['baseline']:.3f} / {b['majority']:.3f} | {b['control']:.3f} | "
                     f"{b['selectivity']:+.3f} | "
                     f"{e['control_ceiling']:.3f} | {per} | {ctrl} |")
    return "\n".join(lines) + "\n"


def readme_block(text: str) -> str:
    return docs.readme_block(text, START, END) + "\n"


def write_readme(data: dict[str, Any]) -> None:
    docs.write_readme_block(README, START, END, render(data))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--readme-only", action="store_true", help="rewrite the README block from the existing file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.readme_only:
        write_readme(json.loads(OUT.read_text()))
        return 0
    data = {"n": args.n, "entries": [run_model(m, args.n) for m in args.models.split(",")]}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(OUT, json.dumps(data, indent=1) + "\n")
    write_readme(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
