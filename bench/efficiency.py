"""The efficient-attention study on this machine: `probe run efficiency` at the issue's settings,
written to bench/results/efficiency.json, its README table and a figure in docs/.

Every attention kind at 65, 257, 1,025 and 4,097 tokens (dim 512, 8 heads; Linformer k = 256,
Performer 256 features, Nystromformer 64 landmarks), one attention layer beside the reference
packages (`pip install -c constraints.txt -e ".[bench]"`) and a one-block ViT at 16 px patches;
CPU, 1 thread, interleaved rounds. Where bench/results/efficiency_accuracy.json exists (digits
accuracy per kind and training budget, `bench/efficiency_accuracy.py`), the figure also plots
accuracy against latency and memory.

    python bench/efficiency.py [--rounds 7] [--threads 1] [--device cpu] [--dtype float32]
                               [--tokens 65,257,1025,4097] [--kinds all] [--no-readme]
                               [--keep-freed-memory --out bench/results/efficiency_malloc.json]
    python bench/efficiency.py --render-only     # README table and figure from the saved results

`--keep-freed-memory` raises glibc's mmap and trim thresholds (`mallopt`) before anything runs, so
freed buffers are reused instead of being returned to the kernel and faulted in again at the next
forward: the effect of a caching allocator (jemalloc or tcmalloc, which PyTorch's CPU performance
guide recommends) on every implementation alike. It changes the process, not probe: use it with
`--out` elsewhere and `--no-readme` (implied).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from probe import docs
from probe.io import atomic_write_text
from probe.pipeline import RunSpec, execute

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "efficiency.json"
ACCURACY = ROOT / "bench" / "results" / "efficiency_accuracy.json"
FIGURE = ROOT / "docs" / "efficiency.png"
README = ROOT / "README.md"
START, END = "<!-- efficiency:start -->", "<!-- efficiency:end -->"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tokens", default="65,257,1025,4097")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--kinds", default="all")
    ap.add_argument("--no-readme", action="store_true", help="do not rewrite the README table and figure")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="glibc mallopt: keep freed memory for reuse (a caching allocator's effect); implies --no-readme")
    ap.add_argument("--render-only", action="store_true",
                    help="measure nothing: rewrite the README table and figure from --out (and the accuracy results)")
    args = ap.parse_args()
    if args.render_only:
        render(json.loads(args.out.read_text()))
        return
    if args.keep_freed_memory:
        keep_freed_memory()
        args.no_readme = True
    out = execute(RunSpec("efficiency", device=args.device, dtype=args.dtype, save=False,
                          params={"rounds": args.rounds, "threads": args.threads, "tokens": args.tokens,
                                  "kinds": args.kinds}))
    machine = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
               "allocator": "glibc, mmap/trim thresholds raised" if args.keep_freed_memory else "glibc defaults"}
    data = {"benchmark": "efficiency", "machine": machine, **out.result.to_dict()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(data, indent=1) + "\n")
    for line in out.lines:
        print(line)
    if not args.no_readme:
        render(data)
    print(f"wrote {args.out}")


def render(data: dict) -> None:
    """The README block and docs/efficiency.png from a results dict (and the accuracy results, if any)."""
    accuracy = json.loads(ACCURACY.read_text()) if ACCURACY.exists() else None
    docs.write_readme_block(README, START, END, table(data, accuracy))
    figure(data, accuracy).savefig(FIGURE, dpi=110, bbox_inches="tight")


def keep_freed_memory() -> None:
    """Raise glibc's M_MMAP_THRESHOLD and M_TRIM_THRESHOLD so large freed blocks stay in the heap."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError as e:
        raise SystemExit(f"--keep-freed-memory needs glibc ({e})") from e
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, (1 << 31) - 1)):
        raise SystemExit("--keep-freed-memory: glibc refused mallopt")


def _ratio(a: float | None, b: float | None) -> str:
    return "" if not a or not b else f"{a / b:.2f}x"


def table(data: dict, accuracy: dict | None) -> str:
    """The README block: one attention layer per kind and length, targets, agreement, accuracy."""
    s = data["settings"]
    rows = [r for r in data["rows"] if r["scope"] == "attention"]
    std = {r["tokens"]: r for r in rows if r["kind"] == "standard" and r["implementation"] == "probe"}
    lines = [
        f"One attention layer, dim {s['dim']}, {s['heads']} heads, batch {s['batch']}, {s['device']} {s['dtype']}, "
        f"{s['threads']} thread(s), median of {s['rounds']} interleaved rounds (IQR in brackets); Linformer "
        f"k = {s['linformer_k']}, Performer {s['performer_features']} features, Nystromformer "
        f"{s['nystrom_landmarks']} landmarks, hybrid window {s['hybrid_window']} at dilation {s['hybrid_dilation']}. "
        "FLOPs counted by FlopCounterMode (matmuls; each equals the kind's closed form, checked by the tests); "
        "memory: peak tensor memory above parameters and input. Regenerate with `python bench/efficiency.py`.",
        "",
        "| tokens | kind | implementation | GFLOPs | ms | time / standard | peak MB (forward) | peak MB (train step) |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["tokens"], r["kind"], r["implementation"] != "probe")):
        base = std.get(r["tokens"])
        lines.append(
            f"| {r['tokens']} | {r['kind']} | {r['implementation']} | {r['flops'] / 1e9:.2f} | "
            f"{r['latency_ms']:.1f} ({r['latency_spread_ms']:.1f}) | "
            f"{_ratio(r['latency_ms'], base['latency_ms'] if base else None)} | "
            f"{'' if r['peak_mb'] is None else round(r['peak_mb'], 1)} | "
            f"{'' if r['train_peak_mb'] is None else round(r['train_peak_mb'], 1)} |")
    lines += ["", "| target | value | limit | met |", "|---|---:|---:|---|"]
    for name, t in data["targets"].items():
        lines.append(f"| {name} | {t['value']} | {t['target']} | {'yes' if t['met'] else '**no**'} |")
    lines += ["", "With our weights copied into the reference package (same settings, smaller width):", ""]
    for kind, a in data["agreement"].items():
        lines.append(f"- {kind} vs `{a['reference']}` ({a['tokens']} tokens): max relative difference "
                     f"{a['max_rel_diff']:.1e}; {a['note']}.")
    vit = [r for r in data["rows"] if r["scope"] == "vit"]
    if vit:
        vstd = {r["tokens"]: r for r in vit if r["kind"] == "standard"}
        toks = sorted({r["tokens"] for r in vit})
        lines += ["", f"A whole ViT ({s['depth']} block(s), patch {s['patch']}, MLP included): forward ms and "
                  "speed-up over standard attention", "",
                  "| kind | " + " | ".join(f"{t} tokens ({vstd[t]['image_size']} px)" for t in toks) + " |",
                  "|---|" + "---:|" * len(toks)]
        for kind in dict.fromkeys(r["kind"] for r in vit):
            cells = []
            for t in toks:
                r = next(x for x in vit if x["kind"] == kind and x["tokens"] == t)
                cells.append(f"{r['latency_ms']:.1f} ({_ratio(vstd[t]['latency_ms'], r['latency_ms'])})")
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    if accuracy and accuracy.get("runs"):
        lines += ["", accuracy_table(accuracy)]
    return "\n".join(lines)


def _accuracy_runs(acc: dict) -> list[dict]:
    """(kind, epochs, top1) of every training run in bench/results/efficiency_accuracy.json."""
    return [{"kind": r["kind"], "epochs": int(r["epochs"]), "top1": float(r["top1"])} for r in acc.get("runs", [])]


def accuracy_table(acc: dict) -> str:
    """Digits top-1 per kind and training budget (bench/efficiency_accuracy.py's results)."""
    runs = _accuracy_runs(acc)
    budgets = sorted({r["epochs"] for r in runs})
    kinds = list(dict.fromkeys(r["kind"] for r in runs))
    st = acc.get("settings", {})
    lines = [f"Test top-1 on scikit-learn's digits ({acc.get('n_train')} train / {acc.get('n_test')} test, "
             f"{st.get('image_size')} px, patch {st.get('patch_size')}, dim {st.get('dim')}, depth {st.get('depth')}, "
             f"{st.get('heads')} heads; AdamW lr {st.get('lr')}, warm-up {st.get('warmup')} of the steps, clip "
             f"{st.get('clip')}) per training budget, each budget its own run; mean over seeds (their count in "
             "brackets); training seconds per epoch on 1 thread, median over runs, and its ratio to standard "
             "attention taken inside each round. Regenerate with `python bench/efficiency_accuracy.py`.", "",
             "| kind | s / epoch | x standard | " + " | ".join(f"{b} epochs" for b in budgets) + " |",
             "|---|---:|---:|" + "---:|" * len(budgets)]
    summary = acc.get("kinds", {})
    for k in kinds:
        cells = []
        for b in budgets:
            accs = [r["top1"] for r in runs if r["kind"] == k and r["epochs"] == b]
            cells.append(f"{100 * sum(accs) / len(accs):.1f}% ({len(accs)})" if accs else "")
        spe = (summary.get(k) or {}).get("seconds_per_epoch") or {}
        ratio = (summary.get(k) or {}).get("time_ratio_to_standard") or {}
        timing = [f"{spe['median']:.2f}" if "median" in spe else "",
                  f"{ratio['median']:.2f}x" if "median" in ratio else ""]
        lines.append(f"| {k} | " + " | ".join(timing + cells) + " |")
    return "\n".join(lines)


def figure(data: dict, accuracy: dict | None) -> Figure:

    rows = [r for r in data["rows"] if r["scope"] == "attention"]
    accuracy = accuracy if accuracy and accuracy.get("runs") else None
    n = 3 if accuracy else 2
    fig = Figure(figsize=(5 * n, 3.8))
    axes = fig.subplots(1, n)
    std = {r["tokens"]: r["latency_ms"] for r in rows if r["kind"] == "standard" and r["implementation"] == "probe"}
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    for i, kind in enumerate(kinds):
        for impl in dict.fromkeys(r["implementation"] for r in rows if r["kind"] == kind):
            rs = sorted((r for r in rows if r["kind"] == kind and r["implementation"] == impl), key=lambda r: r["tokens"])
            ours = impl == "probe"
            style = {"color": f"C{i}", "ls": "-" if ours else "--", "marker": "o" if ours else "x",
                     "label": kind if ours else f"{kind} ({impl})"}
            axes[0].plot([r["tokens"] for r in rs], [std[r["tokens"]] / r["latency_ms"] for r in rs], **style)
            axes[1].plot([r["tokens"] for r in rs], [r["peak_mb"] or float("nan") for r in rs], **style)
    axes[0].set(xscale="log", xlabel="tokens", ylabel="speed-up over standard (SDPA)",
                title="one attention layer: speed-up")
    axes[0].axhline(1, color="grey", lw=0.8)
    axes[1].set(xscale="log", yscale="log", xlabel="tokens", ylabel="peak forward memory (MB)", title="memory")
    for ax in axes[:2]:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    if accuracy:
        # each kind a line through its budgets: mean top-1 against the budget's training time
        # (epochs x the kind's median seconds per epoch), so speed of learning and cost show together
        runs = _accuracy_runs(accuracy)
        per_epoch = {k: v.get("seconds_per_epoch", {}).get("median") for k, v in accuracy.get("kinds", {}).items()}
        for i, kind in enumerate(kinds):
            if not per_epoch.get(kind):
                continue
            budgets = sorted({r["epochs"] for r in runs if r["kind"] == kind})
            xs = [e * per_epoch[kind] for e in budgets]
            ys = [100 * float(np.mean([r["top1"] for r in runs if r["kind"] == kind and r["epochs"] == e]))
                  for e in budgets]
            if xs:
                axes[2].plot(xs, ys, marker="o", color=f"C{i}", label=kind)
        axes[2].set(xlabel="training time on digits (s, 1 thread, 65 tokens)", ylabel="digits test top-1 (%)",
                    title="accuracy against training cost (digits ViT)")
        axes[2].grid(alpha=0.3)
        axes[2].legend(fontsize=6)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
