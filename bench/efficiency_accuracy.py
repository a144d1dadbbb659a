"""Accuracy against training budget per ViT attention kind, on real handwritten digits (issue 16, item 3).

scikit-learn's digits (`probe data digits` defaults: 1,400 train / 397 test, stratified, bicubic
upscaling to 32 px) train a fresh ViT of every attention kind with the settings and the recipe of
`probe train vit` (its argparse defaults: image 32, patch 4, dim 128, depth 4, heads 4, batch 64,
lr, warm-up, clipping) through `probe.train.train_classifier`. Each budget is its own run with its
own schedule (warm-up and cosine decay over that many epochs), not a checkpoint of a longer run.
Recorded per run: test top-1 and top-5, steps, training wall time (evaluation excluded), seconds
per epoch; per kind: parameters. One torch thread.

Rounds are (budget, seed) pairs; inside a round every kind trains once, the order rotating from
round to round, so machine drift spreads over the kinds; per-epoch time ratios to standard
attention are taken inside each round, then summarised by median and range.

    python bench/efficiency_accuracy.py                        # the default plan (about 40 min, 1 thread)
    python bench/efficiency_accuracy.py --plan 1x1 --out /tmp/ea.json   # a quick check that it works
    python bench/efficiency_accuracy.py --resample nearest     # flat 4x4 blocks: the harder variant

Writes bench/results/efficiency_accuracy.json (atomically, after every run; ``complete`` says
whether the plan finished).
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from probe import registry
from probe.cli import build_parser
from probe.data import load_labelled
from probe.data.digits import write_digits
from probe.io import atomic_write_text
from probe.models.vit import ADAPTERS
from probe.train import train_classifier

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "efficiency_accuracy.json"
#: budget (epochs) x number of seeds. Chosen from one epoch per kind measured on a quiet core
#: (`--plan 1x1`: standard 4.5 s, merged QKV 4.4, Linformer 4.4, Performer 5.6, Nystromformer 5.6,
#: hybrid 10.9; 35.5 s for all six), so 65 epochs of each kind take about 39 minutes on 1 thread
DEFAULT_PLAN = "5x2,15x2,25x1"


def parse_plan(text: str) -> list[tuple[int, int]]:
    """``"5x2,15x2,30x1"`` -> [(5, 2), (15, 2), (30, 1)]: (epochs, seeds) per budget."""
    plan = []
    for item in text.split(","):
        epochs, _, seeds = item.strip().partition("x")
        plan.append((int(epochs), int(seeds or 1)))
    if not plan or any(e < 1 or s < 1 for e, s in plan):
        raise SystemExit(f"--plan {text!r}: give EPOCHSxSEEDS items, both >= 1, e.g. {DEFAULT_PLAN}")
    return plan


def train_vit_defaults() -> dict[str, Any]:
    """The model settings and the recipe `probe train vit` uses when given no flags."""
    args = build_parser().parse_args(["train", "vit", "--data", ".", "--out", "unused"])
    wd = inspect.signature(train_classifier).parameters["weight_decay"].default
    return {"image_size": args.image_size, "patch_size": args.patch_size, "dim": args.dim, "depth": args.depth,
            "heads": args.heads, "batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup,
            "clip": args.clip if args.clip > 0 else None, "weight_decay": wd}


def summarise(runs: list[dict[str, Any]], kinds: list[str], params: dict[str, int]) -> dict[str, Any]:
    """Per kind: top-1 per budget (each seed, mean), seconds per epoch (median, range) and its ratio to
    standard attention taken inside each round."""
    out: dict[str, Any] = {}
    base = {(r["epochs"], r["seed"]): r["seconds_per_epoch"] for r in runs if r["kind"] == "standard"}
    for k in kinds:
        mine = [r for r in runs if r["kind"] == k]
        if not mine:
            continue
        by_budget: dict[str, Any] = {}
        for e in sorted({r["epochs"] for r in mine}):
            rs = sorted((r for r in mine if r["epochs"] == e), key=lambda r: r["seed"])
            top1 = [r["top1"] for r in rs]
            by_budget[str(e)] = {"seeds": [r["seed"] for r in rs], "top1": top1,
                                 "top1_mean": round(float(np.mean(top1)), 4), "steps": rs[0]["steps"],
                                 "train_seconds": [r["train_seconds"] for r in rs]}
        spe = [r["seconds_per_epoch"] for r in mine]
        ratios = [r["seconds_per_epoch"] / base[(r["epochs"], r["seed"])] for r in mine
                  if (r["epochs"], r["seed"]) in base]
        out[k] = {"params": params[k], "budgets": by_budget,
                  "seconds_per_epoch": {"median": round(statistics.median(spe), 3), "min": round(min(spe), 3),
                                        "max": round(max(spe), 3), "n": len(spe)},
                  "time_ratio_to_standard": None if not ratios else {
                      "median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3),
                      "max": round(max(ratios), 3)}}
    return out


def markdown(summary: dict[str, Any], budgets: list[int]) -> str:
    head = "| kind | params | s/epoch median [min-max] | x standard | " + " | ".join(
        f"top-1 @ {e} ep" for e in budgets) + " |"
    lines = [head, "|---|---:|---:|---:|" + "---:|" * len(budgets)]
    for k, s in summary.items():
        t, r = s["seconds_per_epoch"], s["time_ratio_to_standard"]
        cells = []
        for e in budgets:
            b = s["budgets"].get(str(e))
            cells.append("" if b is None else f"{100 * b['top1_mean']:.1f}% (" +
                         " / ".join(f"{100 * v:.1f}" for v in b["top1"]) + ")")
        ratio = "" if r is None else f"{r['median']:.2f}"
        lines.append(f"| {k} | {s['params'] / 1e6:.3f}M | {t['median']:.2f} [{t['min']:.2f}-{t['max']:.2f}] | "
                     f"{ratio} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", default=DEFAULT_PLAN, help=f"EPOCHSxSEEDS per budget (default {DEFAULT_PLAN}); "
                    "seeds are 0..SEEDS-1")
    ap.add_argument("--kinds", default=",".join(ADAPTERS), help="attention kinds (default: all six)")
    ap.add_argument("--data", type=Path, default=None, help="a class-per-folder data set (default: the digits, "
                    "exported to a temporary folder with `probe data digits` defaults)")
    ap.add_argument("--resample", default="bicubic", help="upscaling of the exported digits (default bicubic)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--note", default="", help="recorded with the results (e.g. how busy the machine was)")
    ap.add_argument("--resume", action="store_true", help="keep the runs already in --out (same data, settings and "
                    "threads) and train only the missing ones")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    plan = parse_plan(args.plan)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in ADAPTERS]
    if unknown:
        raise SystemExit(f"unknown kinds {unknown}; known: {', '.join(ADAPTERS)}")
    settings = train_vit_defaults()

    with tempfile.TemporaryDirectory(prefix="probe-digits-") as tmp:
        data = args.data or write_digits(Path(tmp) / "digits", size=settings["image_size"],
                                         resample=args.resample)
        train = load_labelled(data, "train", settings["image_size"])
        test = load_labelled(data, "test", settings["image_size"])
    config = {k: settings[k] for k in ("image_size", "patch_size", "dim", "depth", "heads")}
    config |= {"num_classes": len(train.classes), "labels": tuple(train.classes)}
    rounds = [(e, s) for e, n in plan for s in range(n)]
    rounds.sort(key=lambda es: (es[1], es[0]))  # every budget once before any second seed
    header = {
        "bench": "efficiency_accuracy", "data": str(args.data) if args.data else "sklearn digits via `probe data "
        f"digits` defaults ({args.resample} upscaling)", "n_train": len(train), "n_test": len(test),
        "classes": train.classes, "settings": settings, "plan": {str(e): n for e, n in plan},
        "threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "note": args.note,
        "timing_note": "training wall time, evaluation excluded; one torch thread; on a shared machine the "
                       "absolute times are inflated, compare the in-round ratios",
    }
    params = {k: sum(p.numel() for p in registry.load_model(ADAPTERS[k].name, weights="random", seed=0,
                                                           config=config).model.parameters()) for k in kinds}
    runs: list[dict[str, Any]] = []
    if args.resume and args.out.exists():
        old = json.loads(args.out.read_text())
        same = ("data", "n_train", "n_test", "settings", "threads")
        if any(old.get(k) != header[k] for k in same):
            raise SystemExit(f"--resume: {args.out} was written with other {', '.join(same)}; drop --resume "
                             "or give another --out")
        planned = set(rounds)
        runs = [r for r in old.get("runs", []) if r["kind"] in kinds and (r["epochs"], r["seed"]) in planned]
        print(f"resuming: {len(runs)} runs kept from {args.out}", flush=True)
    done = {(r["kind"], r["epochs"], r["seed"]) for r in runs}
    t_all = time.perf_counter()
    for i, (epochs, seed) in enumerate(rounds):
        order = kinds[i % len(kinds):] + kinds[: i % len(kinds)]
        for kind in order:
            if (kind, epochs, seed) in done:
                continue
            adapter = registry.load_model(ADAPTERS[kind].name, weights="random", seed=seed, config=config)
            rep = train_classifier(adapter, train, test, epochs=epochs, batch_size=settings["batch_size"],
                                   lr=settings["lr"], weight_decay=settings["weight_decay"],
                                   warmup=settings["warmup"], clip=settings["clip"], seed=seed, progress=False)
            per_epoch = len(rep.losses) // epochs
            train_s = rep.seconds - rep.eval_seconds
            run = {"kind": kind, "epochs": epochs, "seed": seed, "round": i, "top1": round(rep.top1, 4),
                   "top5": round(rep.top5, 4), "steps": rep.steps, "train_seconds": round(train_s, 2),
                   "seconds_per_epoch": round(train_s / epochs, 3), "eval_seconds": round(rep.eval_seconds, 2),
                   "final_loss": round(float(np.mean(rep.losses[-per_epoch:])), 4)}
            runs.append(run)
            print(json.dumps(run), flush=True)
            data_out = {**header, "complete": False, "wall_seconds": round(time.perf_counter() - t_all, 1),
                        "runs": runs, "kinds": summarise(runs, kinds, params)}
            atomic_write_text(args.out, json.dumps(data_out, indent=1) + "\n")
    budgets = [e for e, _ in plan]
    summary = summarise(runs, kinds, params)
    table = markdown(summary, budgets)
    data_out = {**header, "complete": True, "wall_seconds": round(time.perf_counter() - t_all, 1), "runs": runs,
                "kinds": summary, "table_markdown": table}
    atomic_write_text(args.out, json.dumps(data_out, indent=1) + "\n")
    print(table)
    print(f"wrote {args.out} in {data_out['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
