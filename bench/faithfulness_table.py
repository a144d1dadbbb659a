"""The README's faithfulness table: `probe run faithfulness` on every zoo model, scores to a file.

Runs the analysis (all methods that apply, the bundled zoo weights, the first N probe-shapes test
images) per model, writes bench/results/faithfulness.json (the score rows and the sha256 of the
weights each model ran with) and rewrites the README block between the faithfulness markers.
tests/test_faithfulness.py fails when the README block differs from the file, or when a zoo
checkpoint changed since the file was written.

    python bench/faithfulness_table.py [--shapes 8] [--models blip,mmca] [--readme-only]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import probe  # noqa: F401  (registers models and analyses)
from probe import docs
from probe.io import atomic_write_text
from probe.pipeline import RunSpec, execute
from probe.registry import models

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "faithfulness.json"
README = ROOT / "README.md"
START, END = "<!-- faithfulness:start -->", "<!-- faithfulness:end -->"
ZOO = ["vit-gpt2", "blip", "mmca", "git", "prefix-vlm", "vit-standard", "vit-merged-qkv", "vit-linformer",
       "vit-performer", "vit-nystrom", "vit-hybrid"]


def run_model(name: str, shapes: int) -> dict[str, Any]:
    outcome = execute(RunSpec(analysis="faithfulness", model=name, weights="demo", shapes=shapes, save=False))
    res = outcome.result
    return {"model": name, "sha256": outcome.adapters[0].weights.sha256, "targets": len(res.words),
            "images": len(res.image_names), "scored_images": len(res.exact), "methods": res.methods,
            "scores": res.scores}


def _cell(rows: list[dict[str, Any]], method: str, metric: str) -> str:
    for r in rows:
        if r["method"] == method and r["metric"] == metric:
            return "" if r["value"] is None or r["value"] != r["value"] else f"{r['value']:.2f}"
    return ""


def _base(rows: list[dict[str, Any]], metric: str) -> str:
    b = next((r["baseline"] for r in rows if r["metric"] == metric and r["baseline"] is not None), None)
    return "" if b is None else f"{b:.2f}"


def render(data: dict[str, Any]) -> str:
    """Markdown: per model, one row per method (pointing/energy per word kind, deletion and
    insertion AUC of the word's log-prob, sanity rank correlations) and the random row."""
    lines = [f"{data['shapes']} probe-shapes test images per model, zoo weights; regenerate with "
             "`python bench/faithfulness_table.py`.", ""]
    for entry in data["models"]:
        rows = entry["scores"]
        metrics = list(dict.fromkeys(r["metric"] for r in rows))
        lines.append(f"**{entry['model']}** ({entry['targets']} targets on {entry['scored_images']} of "
                     f"{entry['images']} images)")
        lines.append("")
        lines.append("| method | " + " | ".join(metrics) + " |")
        lines.append("|---|" + "---:|" * len(metrics))
        for m in entry["methods"]:
            lines.append(f"| {m} | " + " | ".join(_cell(rows, m, x) for x in metrics) + " |")
        lines.append("| *random* | " + " | ".join(_base(rows, x) for x in metrics) + " |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def readme_block(text: str) -> str:
    """The README's current block between the markers."""
    return docs.readme_block(text, START, END) + "\n"


def write_readme(data: dict[str, Any]) -> None:
    docs.write_readme_block(README, START, END, render(data))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", type=int, default=8)
    ap.add_argument("--models", default=",".join(ZOO))
    ap.add_argument("--readme-only", action="store_true", help="re-render the README from the file")
    ap.add_argument("--fresh", action="store_true", help="start a new table when --shapes differs from the file's")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not args.readme_only:
        known = models()
        names = [m for m in args.models.split(",") if m]
        unknown = [m for m in names if m not in known]
        if unknown:
            sys.exit(f"unknown models {unknown}; known: {', '.join(known)}")
        data = json.loads(OUT.read_text()) if OUT.exists() else {"shapes": args.shapes, "models": []}
        if data.get("shapes") != args.shapes:
            if not args.fresh:
                sys.exit(f"{OUT} holds runs on {data.get('shapes')} images, not {args.shapes}: rerun with --shapes "
                         f"{data.get('shapes')}, or give --fresh to start a new table (the other models' rows go)")
            data = {"shapes": args.shapes, "models": []}
        for name in names:
            entry = run_model(name, args.shapes)
            data["models"] = [e for e in data["models"] if e["model"] != name] + [entry]
            data["models"].sort(key=lambda e: ZOO.index(e["model"]) if e["model"] in ZOO else len(ZOO))
            atomic_write_text(OUT, json.dumps(data, indent=1) + "\n")  # after each model: resumable
    if not OUT.exists():
        sys.exit(f"{OUT} does not exist yet: run without --readme-only first")
    write_readme(json.loads(OUT.read_text()))


if __name__ == "__main__":
    main()
