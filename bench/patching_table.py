"""The README's patching table: `probe run patching` on the zoo captioners, recoveries to a file.

Per model and corruption (colour, shape, noise) on the first N probe-shapes test images (one pair
each), writes bench/results/patching.json (the recovery grids, pair counts and the sha256 of the
weights) and rewrites the README block between the patching markers. tests/test_patching.py fails
when the README block differs from the file, and re-runs one cell to check the file is current.

    python bench/patching_table.py [--shapes 16] [--models blip,vit-gpt2,mmca] [--readme-only]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

import probe  # noqa: F401  (registers models and analyses)
from probe import docs
from probe.io import atomic_write_text
from probe.pipeline import RunSpec, execute

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "patching.json"
README = ROOT / "README.md"
START, END = "<!-- patching:start -->", "<!-- patching:end -->"
MODELS = ["blip", "vit-gpt2", "mmca", "git", "prefix-vlm"]
CORRUPTIONS = ["colour", "shape", "noise"]


def run_model(name: str, corruption: str, shapes: int) -> dict[str, Any]:
    outcome = execute(RunSpec(analysis="patching", model=name, weights="demo", shapes=shapes, save=False,
                              params={"corruption": corruption}))
    res = outcome.result
    grids = {k: {**g, "values": [[None if not np.isfinite(v) else round(float(v), 4) for v in row]
                                 for row in res.arrays[k].numpy()]} for k, g in res.grids.items()}
    gaps = [p["gap"] for p in res.pairs if p["used"]]
    return {"model": name, "corruption": corruption, "sha256": outcome.adapters[0].weights.sha256,
            "pairs": len(res.pairs), "used": sum(p["used"] for p in res.pairs),
            "median_gap": round(float(np.median(gaps)), 3) if gaps else None, "grids": grids}


def _row(grid: dict[str, Any], label: str, cols: list[str]) -> str:
    r = grid["rows"].index(label)
    cells = []
    for c in cols:
        v = grid["values"][r][grid["cols"].index(c)] if c in grid["cols"] else None
        cells.append("" if v is None else f"{v:.2f}")
    return " | ".join(cells)


def render(data: dict[str, Any]) -> str:
    """Markdown: per model and corruption, the recovery of the vision stack's first layer (object
    patches, as many other patches, CLS) and of each text layer's last position."""
    lines = [f"Recovery (patched - corrupt) / (clean - corrupt) of the clean word's log-probability, mean over "
             f"the pairs used of {data['shapes']} probe-shapes test images, zoo weights; regenerate with "
             "`python bench/patching_table.py`.", "",
             "| model | corruption | pairs used | median gap (nats) | vision L0 object | vision L0 others | "
             "vision L0 cls | vision: object, per layer | text: last position, per layer | "
             "text: all positions, per layer |",
             "|---|---|---:|---:|---:|---:|---:|---|---|---|"]
    for e in data["entries"]:
        v, t = e["grids"].get("recovery.vision"), e["grids"].get("recovery.text")
        first = _row(v, v["rows"][0], ["object", "others", "cls"]) if v else " |  | "
        def per_layer(g: dict[str, Any] | None, col: str) -> str:
            return " / ".join(_row(g, r, [col]) or "-" for r in g["rows"]) if g else ""

        lines.append(f"| {e['model']} | {e['corruption']} | {e['used']}/{e['pairs']} | {e['median_gap']} | {first} | "
                     f"{per_layer(v, 'object')} | {per_layer(t, 'last')} | {per_layer(t, 'all')} |")
    return "\n".join(lines) + "\n"


def readme_block(text: str) -> str:
    """The README's current block between the markers."""
    return docs.readme_block(text, START, END) + "\n"


def write_readme(data: dict[str, Any]) -> None:
    docs.write_readme_block(README, START, END, render(data))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", type=int, default=16)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--readme-only", action="store_true", help="rewrite the README block from the existing file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.readme_only:
        write_readme(json.loads(OUT.read_text()))
        return 0
    entries = [run_model(m, c, args.shapes) for m in args.models.split(",") for c in CORRUPTIONS]
    data = {"shapes": args.shapes, "entries": entries}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(OUT, json.dumps(data, indent=1) + "\n")
    write_readme(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
