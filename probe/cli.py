"""The ``probe`` command line. The only place that configures logging and prints."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from probe import registry
from probe.data import ImageLoadError, load_images
from probe.runs.store import RunStore, default_store_root

log = logging.getLogger("probe")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_MODEL = "vit-standard"


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def bundled_images() -> list[Path]:
    """The sample images shipped in ``probe/assets/images``."""
    folder = resources.files("probe.assets") / "images"
    return sorted(Path(str(p)) for p in folder.iterdir() if str(p).endswith(".png"))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device(name)


def _add_run_common(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--model", default=None,
                   help=f"registered model (default: {default}); see `probe models`")
    p.add_argument("--weights", default="auto",
                   help="auto | random | pretrained | demo | a hub id | a local folder (default auto)")
    p.add_argument("--images", nargs="+", metavar="PATH", help="image files or folders (default: bundled samples)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--out", type=Path, default=None, help=f"run store folder (default ${{PROBE_STORE}} or {default_store_root()})")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="probe", description="Probe how vision transformers and captioners attend.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors too")
    sub = parser.add_subparsers(dest="command", required=True)

    pm = sub.add_parser("models", help="list registered models and their capabilities")
    pm.add_argument("--json", action="store_true")
    pm.add_argument("--fusion", action="store_true",
                    help="the fusion table of the captioners (Markdown), generated from the adapters")

    pr = sub.add_parser("runs", help="list, show or delete saved runs")
    pr.add_argument("--out", type=Path, default=None, help="run store folder")
    pr.add_argument("--show", metavar="RUN_ID")
    pr.add_argument("--delete", metavar="RUN_ID")

    prun = sub.add_parser("run", help="run an analysis and save it as a run")
    arun = prun.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    for name, entry in registry.analyses().items():
        pa = arun.add_parser(name, help=entry.summary)
        _add_run_common(pa, getattr(entry.module, "DEFAULT_MODEL", DEFAULT_MODEL))
        entry.module.add_arguments(pa)

    pd = sub.add_parser("data", help="make data sets")
    dsub = pd.add_subparsers(dest="dataset", required=True)
    ps = dsub.add_parser("shapes", help="write the probe-shapes data set (images + annotations.jsonl)")
    ps.add_argument("--n", type=int, default=1000, help="train images (val and test get n // 8 each)")
    ps.add_argument("--out", type=Path, required=True)
    ps.add_argument("--seed", type=int, default=0)
    ps.add_argument("--size", type=int, default=64, help="image side in pixels")

    pz = sub.add_parser("zoo", help="the bundled probe-shapes models: list them, or rebuild one from its recipe")
    zsub = pz.add_subparsers(dest="zoo_command", required=True)
    zsub.add_parser("list", help="bundled checkpoints with their model-card metrics")
    zt = zsub.add_parser("train", help="train FAMILY from its recipe (see probe.zoo.RECIPES)")
    zt.add_argument("family")
    zt.add_argument("--out", type=Path, default=None, help="checkpoint folder (default probe-zoo/FAMILY)")
    zt.add_argument("--seed", type=int, default=None, help="override the recipe's seed")
    zt.add_argument("--steps", type=int, default=None, help="override the recipe's steps")
    zt.add_argument("--threads", type=int, default=None, help="torch threads (the cards record theirs)")

    pt = sub.add_parser("train", help="train a model")
    tsub = pt.add_subparsers(dest="family", required=True)
    pv = tsub.add_parser("vit", help="train a from-scratch ViT classifier")
    pv.add_argument("--attention", default="standard", help="standard, merged_qkv, linformer, performer, nystrom, hybrid")
    pv.add_argument("--data", type=Path, required=True, help="CIFAR-10 python batches, or class-per-subfolder images")
    pv.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    pv.add_argument("--epochs", type=int, default=1)
    pv.add_argument("--batch-size", type=int, default=64)
    pv.add_argument("--lr", type=float, default=1e-3)
    pv.add_argument("--max-steps", type=int, default=None)
    pv.add_argument("--image-size", type=int, default=32)
    pv.add_argument("--patch-size", type=int, default=4)
    pv.add_argument("--dim", type=int, default=128)
    pv.add_argument("--depth", type=int, default=4)
    pv.add_argument("--heads", type=int, default=4)
    pv.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    pv.add_argument("--seed", type=int, default=0)
    return parser


def cmd_models(args: argparse.Namespace) -> int:
    entries = registry.models()
    if args.fusion:
        from probe.docs import fusion_markdown

        print(fusion_markdown())
        return 0
    if args.json:
        print(json.dumps({n: {"summary": e.summary, **e.capabilities.to_dict()} for n, e in entries.items()}, indent=2))
        return 0
    rows = [("model", "family", "fusion", "cross-attn", "weights", "summary")]
    for n, e in entries.items():
        c = e.capabilities
        rows.append((n, c.family, c.fusion, "yes" if c.has_cross_attention else "no", c.attention_weights, e.summary))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(r[i].ljust(widths[i]) for i in range(5)) + "  " + r[5])
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    store = RunStore(args.out)
    if args.delete:
        store.delete(args.delete)
        print(f"deleted {args.delete}")
        return 0
    if args.show:
        run = store.load(args.show)
        print(json.dumps(run.manifest, indent=2))
        for f in run.figures:
            print(f)
        return 0
    runs = store.list()
    if not runs:
        print(f"no runs in {store.root}")
        return 0
    for r in runs:
        m = r.manifest
        print(f"{r.id}  {m.get('analysis', '?'):<10} {m.get('model', {}).get('name', '?'):<16} {m.get('created', '')}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    entry = registry.analysis_entry(args.analysis)
    if not getattr(entry.module, "NEEDS_IMAGES", True):
        return _run_without_images(args, entry)
    model_name = args.model or getattr(entry.module, "DEFAULT_MODEL", DEFAULT_MODEL)
    model_entry = registry.model_entry(model_name)  # fails early, listing the known models
    check = getattr(entry.module, "check", None)
    why = check(model_entry.capabilities) if check else None
    if why:  # before loading any weights
        raise CLIError(why)
    torch.manual_seed(args.seed)
    device, dtype = resolve_device(args.device), DTYPES[args.dtype]
    extra: dict[str, Any] = {}
    if not args.images and hasattr(entry.module, "default_inputs"):
        images, names, extra = entry.module.default_inputs(args)
        paths = list(names)
    else:
        paths = args.images or bundled_images()
        images, names = load_images(paths)
    t0 = time.perf_counter()
    adapter = model_entry.loader(weights=args.weights, seed=args.seed, device=device, dtype=dtype)
    t_load = time.perf_counter() - t0
    w = adapter.weights
    log.info("model %s, weights: %s %s (sha256 %s)", adapter.name, w.source, w.ref, (w.sha256 or "")[:12])
    if w.source == "random":
        log.warning("%s has RANDOM weights: the maps show the architecture, not learned behaviour", adapter.name)
    params = entry.module.params_from_args(args)
    t1 = time.perf_counter()
    result = entry.module.run(adapter, images, names, **params, **extra)
    t_run = time.perf_counter() - t1
    t2 = time.perf_counter()
    figures = entry.module.render(result)
    t_render = time.perf_counter() - t2
    manifest: dict[str, Any] = {
        "analysis": args.analysis,
        "model": adapter.describe(),
        "weights": w.to_dict(),
        "attn_implementation": adapter.attn_implementation,
        "dtype": args.dtype,
        "device": str(device),
        "seed": args.seed,
        "images": [str(p) for p in paths],
        "parameters": params,
        "timings_s": {"load": round(t_load, 4), "run": round(t_run, 4), "render": round(t_render, 4)},
    }
    run = RunStore(args.out).save(manifest, result, figures)
    for line in entry.module.summary_lines(result):
        print(line)
    print(f"saved run {run.id} in {run.path}")
    for f in run.figures:
        print(f"  figure {f}")
    return 0


def _run_without_images(args: argparse.Namespace, entry: registry.AnalysisEntry) -> int:
    """Analyses that read models, not images (``ca-params``): the module parses its own arguments."""
    if args.images:
        raise CLIError(f"{args.analysis} reads no images; drop --images")
    t0 = time.perf_counter()
    fields, result = entry.module.run_cli(args)
    figures = entry.module.render(result)
    manifest: dict[str, Any] = {"analysis": args.analysis, **fields, "seed": args.seed,
                                "timings_s": {"run": round(time.perf_counter() - t0, 4)}}
    run = RunStore(args.out).save(manifest, result, figures)
    for line in entry.module.summary_lines(result):
        print(line)
    print(f"saved run {run.id} in {run.path}")
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    from probe import zoo

    if args.zoo_command == "list":
        print(zoo.markdown_table())
        print(f"\ntotal bundled: {zoo.size_bytes() / 1e6:.2f} MB in {zoo.ZOO_DIR}")
        return 0
    if args.family not in zoo.RECIPES:
        raise CLIError(f"no zoo recipe for {args.family!r}; known: {', '.join(zoo.RECIPES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or Path("probe-zoo") / args.family
    _, info = zoo.train_family(args.family, out, steps=args.steps, seed=args.seed)
    print(f"{args.family}: {json.dumps(info['metrics'])} in {info['wall_seconds']:.0f} s; wrote {out}")
    print(f"use it with --model {args.family} --weights {out}")
    return 0


def cmd_data_shapes(args: argparse.Namespace) -> int:
    from probe.data.shapes import write_dataset

    t0 = time.perf_counter()
    out = write_dataset(args.out, args.n, seed=args.seed, image_size=args.size)
    print(f"wrote probe-shapes to {out} in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_train_vit(args: argparse.Namespace) -> int:
    from probe.data import load_labelled
    from probe.models.vit import ViT, ViTConfig, save_vit
    from probe.train import train_vit

    device = resolve_device(args.device)
    train = load_labelled(args.data, "train", args.image_size)
    test = load_labelled(args.data, "test", args.image_size)
    torch.manual_seed(args.seed)
    cfg = ViTConfig(image_size=args.image_size, patch_size=args.patch_size, dim=args.dim, depth=args.depth,
                    heads=args.heads, num_classes=len(train.classes), attention=args.attention,
                    labels=tuple(train.classes))
    model = ViT(cfg)
    report = train_vit(model, train, test, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       seed=args.seed, device=str(device), max_steps=args.max_steps)
    card = {"train": {"data": str(args.data), "epochs": args.epochs, "steps": report.steps, "seed": args.seed,
                      "seconds": round(report.seconds, 2), "final_loss": report.losses[-1] if report.losses else None},
            "metrics": {"test_top1": report.top1, "test_top5": report.top5, "test_n": len(test)}}
    save_vit(model.cpu(), args.out, extra=card)
    print(f"test top-1 {report.top1:.4f}  top-5 {report.top5:.4f}  ({report.steps} steps, {report.seconds:.1f} s)")
    print(f"saved checkpoint {args.out}; use it with --model vit-{args.attention.replace('_', '-')} --weights {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "huggingface_hub", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.command == "models":
            return cmd_models(args)
        if args.command == "runs":
            return cmd_runs(args)
        if args.command == "run":
            return cmd_run(args)
        if args.command == "zoo":
            return cmd_zoo(args)
        if args.command == "data":
            return cmd_data_shapes(args)
        if args.command == "train":
            return cmd_train_vit(args)
    except (CLIError, registry.UnknownNameError, ImageLoadError, FileNotFoundError, ValueError, KeyError) as e:
        if args.debug:
            raise
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"probe: error: {msg}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
