"""The ``probe`` command line. The only place that configures logging and prints.

Every ``probe run ANALYSIS`` goes through `probe.pipeline.execute`; its flags are the common
run flags plus the ones generated from the analysis's `Params` (`probe.analysis.add_arguments`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import NoReturn

import torch
from safetensors import SafetensorError

import probe.analyses  # noqa: F401  (registers the analyses)
from probe import registry, zoo
from probe.analyses.activations import DEFAULT_HOOKS, capture_set, check_out, parse_source, rank_device
from probe.analysis import Analysis, add_arguments, params_from_args
from probe.data import ImageLoadError, load_labelled
from probe.data.activations import GROUPS
from probe.data.digits import DEFAULT_TEST as DIGITS_TEST
from probe.data.digits import RESAMPLING as DIGITS_RESAMPLING
from probe.data.digits import write_digits
from probe.data.shapes import write_dataset
from probe.docs import fusion_markdown
from probe.io import check_output
from probe.models.vit import ADAPTERS as VIT_KINDS
from probe.pipeline import DTYPES, RunSpec, execute, resolve_device
from probe.runs.store import RunStore, default_store_root
from probe.train import DEFAULT_CLIP, DEFAULT_WARMUP, train_classifier
from probe.types import ProbeError

log = logging.getLogger("probe")


class CLIError(ProbeError):
    """A user-facing error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (its default prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"probe: error: {message} (see `{self.prog} -h`)\n")


def _add_run_common(p: argparse.ArgumentParser, analysis: Analysis) -> None:
    if not analysis.loads_model:  # builds its own modules: --model/--weights would be refused
        p.set_defaults(model=None, weights="auto")
    elif analysis.many_models:
        default = "all (every model it applies to), or a comma-separated list"
    else:
        default = registry.default_model(analysis.task or analysis.default_task)
    if analysis.loads_model:
        p.add_argument("--model", default=None, help=f"registered model (default: {default}); see `probe models`")
        p.add_argument("--weights", default="auto",
                       help="auto | random | pretrained | demo | meta | a hub id | a local folder (default auto)")
    if analysis.reads_images:
        p.add_argument("--images", nargs="+", metavar="PATH", default=(),
                       help="image files or folders (default: " + ("16 probe-shapes test images"
                            if analysis.default_images == "shapes" else "the bundled samples") + ")")
        p.add_argument("--shapes", type=int, default=None, metavar="N",
                       help="run on N probe-shapes test images, with their masks and ground truth")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--out", type=_folder, default=None,
                   help=f"run store folder (default ${{PROBE_STORE}} or {default_store_root()})")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="probe", description="Probe how vision transformers and captioners attend.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors too")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    pm = sub.add_parser("models", help="list registered models and their capabilities")
    pm.add_argument("--json", action="store_true")
    pm.add_argument("--fusion", action="store_true",
                    help="the fusion table of the captioners (Markdown), generated from the adapters")

    pr = sub.add_parser("runs", help="list, show or delete saved runs")
    pr.add_argument("--out", type=_folder, default=None, help="run store folder")
    what = pr.add_mutually_exclusive_group()
    what.add_argument("--show", metavar="RUN_ID")
    what.add_argument("--delete", metavar="RUN_ID")

    prun = sub.add_parser("run", help="run an analysis and save it as a run")
    arun = prun.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    for name, analysis in registry.analyses().items():
        pa = arun.add_parser(name, help=analysis.summary, description=analysis.summary)
        _add_run_common(pa, analysis)
        add_arguments(pa, analysis.Params)

    pc = sub.add_parser("capture", help="write an activation data set: reduced activations per token group, "
                        "sharded safetensors + index (torchrun --nproc_per_node N shards it by rank)")
    pc.add_argument("--model", required=True, help="registered model; see `probe models`")
    pc.add_argument("--weights", default="auto", help="auto | demo | random | pretrained | a hub id | a folder")
    pc.add_argument("--hooks", default=DEFAULT_HOOKS, help=f"comma-separated globs of token-stream hooks "
                    f"(default {DEFAULT_HOOKS})")
    pc.add_argument("--data", required=True, help="shapes:N[:SPLIT] (probe-shapes, labelled), a probe-shapes "
                    "folder (labelled) or a folder of images (no labels)")
    pc.add_argument("--out", type=_folder, required=True, help="data set folder (an unfinished one is resumed)")
    pc.add_argument("--groups", default=None, help="comma-separated token groups: " + ", ".join(GROUPS)
                    + " (default cls,mean,object, and text for captioners)")
    pc.add_argument("--shard-size", type=int, default=256, help="images per shard (default 256)")
    pc.add_argument("--batch-size", type=int, default=64)
    pc.add_argument("--store-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                    help="dtype of the stored activations")
    pc.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    pc.add_argument("--seed", type=int, default=0)
    pc.add_argument("--force", action="store_true", help="replace the activation data set in --out (only a folder "
                    "holding one; --out may not be, contain or lie inside --data)")
    pc.add_argument("--no-progress", action="store_true", help="no progress bar")

    pd = sub.add_parser("data", help="make data sets")
    dsub = pd.add_subparsers(dest="dataset", required=True)
    ps = dsub.add_parser("shapes", help="write the probe-shapes data set (images + annotations.jsonl)")
    ps.add_argument("--n", type=int, default=1000, help="train images (val and test get n // 8 each)")
    ps.add_argument("--out", type=_folder, required=True)
    ps.add_argument("--seed", type=int, default=0)
    ps.add_argument("--size", type=int, default=64, help="image side in pixels")
    ps.add_argument("--force", action="store_true", help="replace a non-empty --out folder (it is replaced only once the new one is complete)")

    pdg = dsub.add_parser("digits", help="write scikit-learn's handwritten digits (1,797 8x8 images, no download) "
                          "as class-per-folder PNGs (train/<digit>/, test/<digit>/) for `probe train vit`")
    pdg.add_argument("--out", type=_folder, required=True)
    pdg.add_argument("--size", type=int, default=32, help="image side in pixels, upscaled from 8 (default 32)")
    pdg.add_argument("--test", type=int, default=DIGITS_TEST, metavar="N",
                     help=f"test images, stratified by digit; the rest train (default {DIGITS_TEST}: 1,400 train)")
    pdg.add_argument("--resample", choices=sorted(DIGITS_RESAMPLING), default="bicubic",
                     help="upscaling filter (default bicubic, as `probe train vit` resizes; nearest keeps each "
                          "original pixel as a flat block)")
    pdg.add_argument("--seed", type=int, default=0, help="seed of the split")
    pdg.add_argument("--force", action="store_true", help="replace a non-empty --out folder (it is replaced only once the new one is complete)")

    pz = sub.add_parser("zoo", help="the bundled probe-shapes models: list them, or rebuild one from its recipe")
    zsub = pz.add_subparsers(dest="zoo_command", required=True)
    zsub.add_parser("list", help="bundled checkpoints with their model-card metrics")
    zt = zsub.add_parser("train", help="train FAMILY from its recipe (see probe.zoo.RECIPES)")
    zt.add_argument("family")
    zt.add_argument("--out", type=_folder, default=None, help="checkpoint folder (default probe-zoo/FAMILY)")
    zt.add_argument("--seed", type=int, default=None, help="override the recipe's seed")
    zt.add_argument("--steps", type=int, default=None, help="override the recipe's steps")
    zt.add_argument("--threads", type=int, default=None, help="torch threads (the cards record theirs)")
    zt.add_argument("--force", action="store_true", help="replace a non-empty --out folder (it is replaced only once the new one is complete)")

    pt = sub.add_parser("train", help="train a model")
    tsub = pt.add_subparsers(dest="family", required=True)
    pv = tsub.add_parser("vit", help="train a from-scratch ViT classifier")
    pv.add_argument("--attention", default="standard", help="standard, merged_qkv, linformer, performer, nystrom, hybrid")
    pv.add_argument("--data", type=Path, required=True, help="CIFAR-10 python batches, or class-per-subfolder images")
    pv.add_argument("--out", type=_folder, required=True, help="checkpoint folder to write")
    pv.add_argument("--epochs", type=int, default=1)
    pv.add_argument("--batch-size", type=int, default=64)
    pv.add_argument("--lr", type=float, default=1e-3)
    pv.add_argument("--warmup", type=float, default=DEFAULT_WARMUP, metavar="FRACTION",
                    help="fraction of the steps spent in linear warm-up before the cosine decay "
                         f"(default {DEFAULT_WARMUP}; 0: none)")
    pv.add_argument("--clip", type=float, default=DEFAULT_CLIP or 0.0, metavar="NORM",
                    help=f"clip the gradient norm to NORM (default {DEFAULT_CLIP or 0.0}; 0: no clipping)")
    pv.add_argument("--max-steps", type=int, default=None)
    pv.add_argument("--image-size", type=int, default=32)
    pv.add_argument("--patch-size", type=int, default=4)
    pv.add_argument("--dim", type=int, default=128)
    pv.add_argument("--depth", type=int, default=4)
    pv.add_argument("--heads", type=int, default=4)
    pv.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    pv.add_argument("--seed", type=int, default=0)
    pv.add_argument("--force", action="store_true", help="replace a non-empty --out folder (it is replaced only once the new one is complete)")
    return parser


def cmd_models(args: argparse.Namespace) -> int:
    entries = registry.models()
    if args.fusion:
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
    if store.root.is_file():
        raise CLIError(f"--out {store.root} is a file: give the run store folder")
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
        if r.status != "ok":
            print(f"{r.id}  BROKEN: {r.problem} (probe runs --delete {r.id})")
            continue
        print(f"{r.id}  {m.get('analysis', '?'):<10} {m.get('model', {}).get('name', '?'):<16} {m.get('created', '')}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    analysis = registry.analysis(args.analysis)
    spec = RunSpec(
        analysis=args.analysis, model=args.model, weights=args.weights, images=tuple(getattr(args, "images", ())),
        shapes=getattr(args, "shapes", None), device=args.device, dtype=args.dtype, seed=args.seed,
        params=params_from_args(args, analysis.Params), store=args.out,
    )
    outcome = execute(spec)
    for line in outcome.lines:
        print(line)
    assert outcome.run is not None
    print(f"saved run {outcome.run.id} in {outcome.run.path}")
    for f in outcome.run.figures:
        print(f"  figure {f}")
    return 0


def cmd_capture(args: argparse.Namespace) -> int:
    _seed(args.seed)
    groups = None if args.groups is None else [g.strip() for g in args.groups.split(",") if g.strip()]
    source = parse_source(args.data)  # refused before the model loads
    check_out(args.out, source, args.force)
    torch.manual_seed(args.seed)
    adapter = registry.load_model(args.model, weights=args.weights, seed=args.seed,
                                  device=rank_device(resolve_device(args.device)))
    t0 = time.perf_counter()
    ds = capture_set(adapter, source, args.out, hooks=args.hooks, groups=groups, shard_size=args.shard_size,
                     batch_size=args.batch_size, dtype=args.store_dtype, force=args.force,
                     progress=not args.no_progress)
    if ds is not None:  # rank 0
        dt = time.perf_counter() - t0
        rows = ", ".join(f"{g} {n}" for g, n in ds.index["rows"].items())
        new = ds.captured if ds.captured is not None else source.n
        what = (f"wrote {source.n} images" if new == source.n else
                f"resumed: captured {new} new images ({source.n - new} of {source.n} were already there)")
        print(f"{what} ({rows} rows; {len(ds.hooks)} hooks, {ds.index['n_chunks']} shards) to {args.out} in "
              f"{dt:.1f} s")
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    if args.zoo_command == "list":
        print(zoo.markdown_table())
        print(f"\ntotal bundled: {zoo.size_bytes() / 1e6:.2f} MB in {zoo.ZOO_DIR}")
        return 0
    if args.threads is not None and not 1 <= args.threads <= 4 * (os.cpu_count() or 1):
        raise CLIError(f"--threads {args.threads}: give 1 to {4 * (os.cpu_count() or 1)} (this machine has "
                       f"{os.cpu_count()} cores)")
    _seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or Path("probe-zoo") / args.family
    _, info = zoo.train_family(args.family, out, steps=args.steps, seed=args.seed, force=args.force)
    print(f"{args.family}: {json.dumps(info['metrics'])} in {info['wall_seconds']:.0f} s; wrote {out}")
    print(f"use it with --model {args.family} --weights {out}")
    return 0


def cmd_data_shapes(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    _seed(args.seed)
    if args.n < 1 or not 8 <= args.size <= 1024:
        raise CLIError(f"--n {args.n} / --size {args.size}: give at least 1 image of 8 to 1024 pixels")
    out = write_dataset(args.out, args.n, seed=args.seed, image_size=args.size, force=args.force)
    print(f"wrote probe-shapes to {out} in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_data_digits(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    _seed(args.seed)
    if not 8 <= args.size <= 1024:
        raise CLIError(f"--size {args.size}: give 8 to 1024 pixels")
    out = write_digits(args.out, size=args.size, n_test=args.test, seed=args.seed, resample=args.resample,
                       force=args.force)
    print(f"wrote the digits ({args.resample} upscaling to {args.size} px) to {out} in "
          f"{time.perf_counter() - t0:.1f} s; train with `probe train vit --data {out} ...`")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    return cmd_data_digits(args) if args.dataset == "digits" else cmd_data_shapes(args)


def cmd_train_vit(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    _seed(args.seed)
    if args.data.is_file():
        raise CLIError(f"--data {args.data} is a file: give a folder of CIFAR-10 batches or of class folders")
    for flag, v in (("--dim", args.dim), ("--depth", args.depth), ("--heads", args.heads),
                    ("--patch-size", args.patch_size), ("--image-size", args.image_size)):
        if v < 1:
            raise CLIError(f"{flag} {v}: give a positive number")
    if not math.isfinite(args.lr) or args.lr <= 0:
        raise CLIError(f"--lr {args.lr}: give a positive finite learning rate")
    if not 0 <= args.warmup < 1:
        raise CLIError(f"--warmup {args.warmup}: give the fraction of the steps, from 0 to below 1")
    if not (math.isfinite(args.clip) and args.clip >= 0):
        raise CLIError(f"--clip {args.clip}: give a positive gradient norm, or 0 for no clipping")
    if args.attention not in VIT_KINDS:
        raise CLIError(f"--attention {args.attention!r}: use one of {', '.join(VIT_KINDS)}")
    check_output(args.out, args.force)  # before any training
    train = load_labelled(args.data, "train", args.image_size)
    test = load_labelled(args.data, "test", args.image_size)
    if test.classes != train.classes:
        raise CLIError(f"--data {args.data}: the test classes {test.classes} differ from the training classes "
                       f"{train.classes}; give test/ the same class folders as train/")
    name = VIT_KINDS[args.attention].name
    config = {"image_size": args.image_size, "patch_size": args.patch_size, "dim": args.dim, "depth": args.depth,
              "heads": args.heads, "num_classes": len(train.classes), "labels": tuple(train.classes)}
    adapter = registry.load_model(name, weights="random", seed=args.seed, config=config, device=device)
    clip = args.clip or None
    report = train_classifier(adapter, train, test, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                              warmup=args.warmup, clip=clip, seed=args.seed, max_steps=args.max_steps)
    card = {"train": {"data": str(args.data), "epochs": args.epochs, "steps": report.steps, "seed": args.seed,
                      "batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup, "clip": clip,
                      "seconds": round(report.seconds, 2), "final_loss": report.losses[-1] if report.losses else None},
            "metrics": {"test_top1": report.top1, "test_top5": report.top5, "test_n": len(test)}}
    adapter.to("cpu").save(args.out, extra=card, force=args.force)
    print(f"test top-1 {report.top1:.4f}  top-5 {report.top5:.4f}  ({report.steps} steps, {report.seconds:.1f} s)")
    print(f"saved checkpoint {args.out}; use it with --model {name} --weights {args.out}")
    return 0


def _seed(seed: int | None) -> None:
    if seed is not None and not 0 <= seed < 2**63:
        raise CLIError(f"--seed {seed}: give a whole number from 0 to 2**63 - 1")


def _folder(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("empty: give a folder")
    return Path(text)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # -h, or a one-line usage error (see `_Parser`)
        return int(e.code or 0)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "huggingface_hub", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.DEBUG if args.verbose else logging.ERROR)  # load reports
    if not args.verbose and args.command in ("run", "zoo", "train", "capture"):  # these load models: no per-load bars
        from transformers.utils import logging as hf_logging  # heavy: only for commands that load models

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()  # transformers resets its logger's level when it configures it
    commands = {"models": cmd_models, "runs": cmd_runs, "run": cmd_run, "zoo": cmd_zoo, "data": cmd_data,
                "train": cmd_train_vit, "capture": cmd_capture}
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        print("probe: interrupted; nothing half-written was kept", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        print(f"probe: error: {_one_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, USER_ERRORS) else 1


#: errors whose message is for the user (project errors, bad files and values); anything else is a bug
USER_ERRORS = (ProbeError, ImageLoadError, OSError, ValueError, KeyError, SafetensorError)


def _one_line(e: BaseException) -> str:
    """A one-line message; an unexpected error also saves its traceback to a file and names it."""
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    msg = " ".join(msg.split()) or type(e).__name__
    if isinstance(e, SafetensorError):
        msg = f"a safetensors file is corrupt or truncated ({msg}); re-save or re-download it"
    if isinstance(e, USER_ERRORS):
        return msg
    fd, path = tempfile.mkstemp(prefix="probe-traceback-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        traceback.print_exception(e, file=f)
    return f"unexpected {type(e).__name__}: {msg} (a bug: the traceback is in {path}; --debug shows it)"


if __name__ == "__main__":
    sys.exit(main())
