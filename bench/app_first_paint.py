"""Time to first paint of the app's Runs page on a store of 1,000 runs.

Builds a store in a temporary folder: one small real run of each analysis (zoo or random weights,
two probe-shapes images), then copies of them up to ``--runs`` (hard links for the arrays and
figures, a new manifest with its own id and date), as a store that has been in use for a while.
Then measures, several rounds each, medians and spread:

  apptest cold   `AppTest` runs of the Runs page with the app's caches cleared (every manifest read)
  apptest warm   the same with the listing cached (a second visitor, or a rerun)
  browser        Chromium (headless, driven over the DevTools protocol) opens the page of a
                 `streamlit run` server: ``text`` when the rendered page shows the store's run count
                 and the newest run, ``painted`` when the app is idle and no skeleton is left (the
                 table, a canvas, drawn). ``cold_server``: from the server process start (Python
                 start-up and imports included); ``new_browser``: a fresh browser (no HTTP cache) on
                 a running server; ``reload``: the page opened again in the same browser.

    python bench/app_first_paint.py [--runs 1000] [--rounds 5] [--no-browser]

Writes bench/results/app_first_paint.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "app"))

from probeapp.devtools import Chromium, chromium_binary, streamlit_server  # noqa: E402

from probe.io import atomic_write_text  # noqa: E402

TEMPLATES = [
    ["attention", "--model", "vit-standard", "--weights", "demo", "--shapes", "2"],
    ["attention", "--model", "vit-performer", "--weights", "demo", "--shapes", "2"],
    ["flow", "--model", "blip", "--weights", "demo", "--shapes", "2"],
    ["ablation", "--model", "blip", "--weights", "demo", "--shapes", "2"],
    ["ca-params", "--model", "git,mmca", "--weights", "demo"],
    ["rollout", "--model", "vit-standard", "--weights", "demo", "--shapes", "2"],
    ["attention-flow", "--model", "vit-standard", "--weights", "demo", "--shapes", "2"],
    ["relevancy", "--model", "mmca", "--weights", "demo", "--shapes", "1", "--max-new-tokens", "4"],
    ["attribution", "--model", "vit-standard", "--weights", "demo", "--shapes", "2", "--methods", "occlusion"],
    ["faithfulness", "--model", "vit-standard", "--weights", "demo", "--shapes", "2", "--methods",
     "attention,occlusion"],
]


def build_store(root: Path, n: int) -> list[str]:
    """`n` runs: one real run per template, then copies with their own ids and dates."""
    from probe.cli import main

    templates = root.parent / "templates"
    for argv in TEMPLATES:
        if main(["run", *argv, "--out", str(templates)]) != 0:
            raise SystemExit(f"could not make the template run {argv}")
    sources = sorted(templates.iterdir())
    root.mkdir(parents=True)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    ids = []
    for k in range(n):
        src = sources[k % len(sources)]
        m = json.loads((src / "manifest.json").read_text())
        when = start + timedelta(minutes=37 * k)
        rid = f"{when:%Y%m%d-%H%M%S}-{m['analysis']}-{m['model']['name']}-{k:06x}"
        dst = root / rid
        shutil.copytree(src, dst, copy_function=os.link)  # hard links: 1,000 runs cost little disk
        (dst / "manifest.json").unlink()  # never write through a hard link into the template
        (dst / "manifest.json").write_text(json.dumps({**m, "id": rid, "created": when.isoformat(timespec="seconds")}))
        ids.append(rid)
    return ids


def stats(xs: list[float]) -> dict[str, float | list[float]]:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"median_s": round(statistics.median(xs), 4), "min_s": round(min(xs), 4), "max_s": round(max(xs), 4),
            "iqr_s": round(q[2] - q[0], 4), "rounds_s": [round(x, 4) for x in xs]}


def apptest_rounds(root: Path, rounds: int, newest: str, cold: bool) -> list[float]:
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    times = []
    for _ in range(rounds + 1):  # the first round warms imports and is dropped
        if cold:
            st.cache_data.clear()
        at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=120)
        at.session_state["probe.store"] = str(root)
        t = time.perf_counter()
        at.run()
        times.append(time.perf_counter() - t)
        assert not at.exception, at.exception
        assert at.selectbox(key="runs.run").value == newest and len(at.dataframe[0].value) == len(list(root.iterdir()))
    return times[1:]


def browser_rounds(root: Path, rounds: int, n: int, newest: str, logs: Path) -> dict[str, list[float]]:
    """Seconds from navigation to: the page's text showing the run count and the newest run
    (``text``), and the app idle with no skeleton left, i.e. the table drawn (``painted``)."""
    binary = chromium_binary()
    if binary is None:
        raise SystemExit("no chromium (apt-get install chromium), or pass --no-browser")
    needles = [f"{n} of {n} runs", newest]
    out: dict[str, list[float]] = {k: [] for k in ("cold_server_painted", "new_browser_text", "new_browser_painted",
                                                  "reload_text", "reload_painted")}

    def visit(b: Chromium, url: str, text_key: str | None, painted_key: str) -> None:
        t = time.perf_counter()
        b.navigate(url)
        if text_key:
            b.wait_for_text(needles, timeout=120, ready=False)
            out[text_key].append(time.perf_counter() - t)
        b.wait_for_text(needles, timeout=120)
        out[painted_key].append(time.perf_counter() - t)

    for r in range(rounds):
        with Chromium(binary, logs / "chromium.log") as b:
            t0 = time.perf_counter()
            with streamlit_server(root, logs / "streamlit.log") as url:
                t_health = time.perf_counter() - t0
                visit(b, url, None, "cold_server_painted")
                out["cold_server_painted"][-1] += t_health  # from the process start
                if r == 0:  # warm server: fresh browsers (no HTTP cache), then reloads in one browser
                    for _ in range(rounds + 1):
                        with Chromium(binary, logs / "chromium.log") as b2:
                            visit(b2, url, "new_browser_text", "new_browser_painted")
                    for _ in range(rounds + 1):
                        b.navigate("about:blank")
                        time.sleep(0.3)
                        visit(b, url, "reload_text", "reload_painted")
    for k in ("new_browser_text", "new_browser_painted", "reload_text", "reload_painted"):
        out[k] = out[k][1:]  # the first of each is a warm-up
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-browser", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "app_first_paint.json")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="probe-app-bench-"))
    try:
        t = time.perf_counter()
        ids = build_store(tmp / "runs", args.runs)
        build_s = time.perf_counter() - t
        newest = max(ids)
        root = tmp / "runs"
        results: dict[str, object] = {
            "runs": args.runs, "rounds": args.rounds, "store_build_s": round(build_s, 2),
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "cpus": os.cpu_count()},
            "what": "time to first paint of the Runs page (the table of every run, and the newest run selected)",
        }
        results["apptest_cold"] = stats(apptest_rounds(root, args.rounds, newest, cold=True))
        results["apptest_warm"] = stats(apptest_rounds(root, args.rounds, newest, cold=False))
        if not args.no_browser:
            for k, xs in browser_rounds(root, args.rounds, args.runs, newest, tmp).items():
                results[f"browser_{k}"] = stats(xs)
        atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
        for k, v in results.items():
            if isinstance(v, dict) and "median_s" in v:
                print(f"{k:22s} median {v['median_s']:.3f} s  (min {v['min_s']:.3f}, max {v['max_s']:.3f}, "
                      f"IQR {v['iqr_s']:.3f}) over {len(v['rounds_s'])} rounds")
        print(f"wrote {args.out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
