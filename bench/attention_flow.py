"""Attention flow (Abnar & Zuidema 2020) at ViT-B/16 size: our exact max-flow against networkx.

Ours: `probe.analyses.attention_flow.attention_flow`, the CLS row (197 sinks) of a 12-layer,
12-head, 197-token graph from random softmax attention (``softmax(randn)`` and a peakier
``softmax(4 randn)``), batch 1, several rounds; wall and CPU time (the CPU time is steadier on a
shared machine), median and spread.

Reference: the paper's networkx script, one ``networkx.maximum_flow_value`` per (output, input)
pair over the full layered graph. On a small graph (17 tokens, 4 layers) the whole CLS row is
timed with networkx's default solver (preflow-push) and with Edmonds-Karp (the paper's choice),
and the values are checked against ours; at ViT-B size one pair is timed and the CLS row
extrapolated (x 197).

Writes bench/results/attention_flow.json.

    python bench/attention_flow.py [--rounds 5] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import networkx as nx
import numpy as np
import scipy
import torch

from probe.analyses.attention_flow import attention_flow, attention_flow_values, flow_capacities
from probe.io import atomic_write_text


def patterns(n: int, layers: int, heads: int, sharpness: float, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.softmax(sharpness * torch.randn(1, heads, n, n, generator=g), -1) for _ in range(layers)]


def networkx_graph(caps: np.ndarray) -> nx.DiGraph:
    """The paper's layered graph: node (l, i), edge (l, i) -> (l - 1, j) of capacity caps[l - 1, i, j]."""
    m, n, _ = caps.shape
    g = nx.DiGraph()
    for layer in range(1, m + 1):
        for i in range(n):
            g.add_edges_from(((layer, i), (layer - 1, j), {"capacity": float(caps[layer - 1, i, j])})
                             for j in range(n) if caps[layer - 1, i, j] > 0)
    return g


def spread(xs: list[float]) -> dict[str, float]:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"median": round(statistics.median(xs), 4), "min": round(min(xs), 4), "max": round(max(xs), 4),
            "iqr": round(q[2] - q[0], 4)}


def time_ours(n: int, layers: int, heads: int, sharpness: float, rounds: int) -> dict:
    pats = patterns(n, layers, heads, sharpness, seed=0)
    attention_flow(pats, progress=False)  # warm-up
    wall, cpu = [], []
    for _ in range(rounds):
        w, c = time.perf_counter(), time.process_time()
        flow = attention_flow(pats, source=0, progress=False)
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    values = attention_flow_values(pats, source=0, progress=False)
    return {"tokens": n, "layers": layers, "heads": heads, "attention": f"softmax({sharpness:g} * randn)",
            "rounds": rounds, "wall_s": spread(wall), "cpu_s": spread(cpu), "all_wall_s": [round(t, 4) for t in wall],
            "row_sum": float(flow.sum()), "raw_min": float(values.values.min()),
            "max_certified_error": float(values.error.max())}


def networkx_small(n: int, layers: int, heads: int) -> dict:
    pats = patterns(n, layers, heads, 1.0, seed=1)
    caps = flow_capacities(pats)[:, 0].numpy()
    g = networkx_graph(caps)
    m = caps.shape[0]
    out: dict = {"tokens": n, "layers": layers, "heads": heads}
    t = time.perf_counter()
    ours = attention_flow_values(pats, source=0, progress=False).values[0, 0].numpy()
    out["ours_s"] = round(time.perf_counter() - t, 4)
    for name, fn in (("preflow_push", nx.algorithms.flow.preflow_push), ("edmonds_karp", nx.algorithms.flow.edmonds_karp)):
        t = time.perf_counter()
        ref = np.array([nx.maximum_flow_value(g, (m, 0), (0, j), flow_func=fn) for j in range(n)])
        out[f"networkx_{name}_s"] = round(time.perf_counter() - t, 4)
        out[f"max_abs_diff_vs_{name}"] = float(np.abs(ours - ref).max())
    return out


def networkx_one_pair(n: int, layers: int, heads: int) -> dict:
    pats = patterns(n, layers, heads, 1.0, seed=0)
    caps = flow_capacities(pats)[:, 0].numpy()
    t = time.perf_counter()
    g = networkx_graph(caps)
    build = time.perf_counter() - t
    t = time.perf_counter()
    value = nx.maximum_flow_value(g, (caps.shape[0], 0), (0, 1))
    pair = time.perf_counter() - t
    ours = float(attention_flow_values(pats, source=0, progress=False).values[0, 0, 1])
    return {"tokens": n, "layers": layers, "flow_func": "preflow_push (networkx default)",
            "graph_build_s": round(build, 3), "one_pair_s": round(pair, 3),
            "cls_row_extrapolated_s": round(build + n * pair, 1), "abs_diff_vs_ours": abs(value - ours)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="small sizes, nothing written")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "attention_flow.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    size = (65, 4, 4) if args.quick else (197, 12, 12)
    ours = [time_ours(*size, sharpness, args.rounds) for sharpness in (1.0, 4.0)]
    for r in ours:
        print(json.dumps({k: r[k] for k in ("tokens", "attention", "wall_s", "cpu_s", "max_certified_error")}))
    small = networkx_small(17, 4, 4)
    print(json.dumps(small))
    pair = networkx_one_pair(*size)
    print(json.dumps(pair))
    report = {
        "benchmark": "attention_flow",
        "what": "CLS row of exact attention flow (max-flow from the last layer's CLS node to every input token), batch 1",
        "ours": ours,
        "networkx_small_graph_cls_row": small,
        "networkx_vit_b_one_pair": pair,
        "speedup_vs_networkx_cls_row": round(pair["cls_row_extrapolated_s"] / ours[0]["wall_s"]["median"], 1),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": 1,
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "versions": {"scipy": scipy.__version__, "networkx": nx.__version__, "numpy": np.__version__,
                     "torch": torch.__version__, "python": platform.python_version()},
    }
    if not args.quick:
        atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
