"""Streamlit app: browse the runs in a store. Reads the store only; never runs a model.

    streamlit run app/main.py             # store from $PROBE_STORE or ./probe-runs
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import streamlit as st

from probe.runs.store import DEFAULT_STORE_ENV, RunStore, default_store_root

st.set_page_config(page_title="probe runs", layout="wide")
st.title("probe: saved runs")

root = st.sidebar.text_input("Run store folder", value=os.environ.get(DEFAULT_STORE_ENV, str(default_store_root())))
store = RunStore(Path(root))
runs = store.list()
if not runs:
    st.info(f"No runs in `{store.root}` yet. Make one with `probe run attention`.")
    st.stop()

st.sidebar.caption(f"{len(runs)} runs")
table = [
    {
        "run": r.id,
        "analysis": r.manifest.get("analysis", "?"),
        "model": r.manifest.get("model", {}).get("name", "?"),
        "weights": r.manifest.get("weights", {}).get("source", "?"),
        "created": r.manifest.get("created", ""),
        "status": r.status if r.status == "ok" else f"broken: {r.problem}",
    }
    for r in runs
]
st.dataframe(table, hide_index=True, width="stretch")

choice = st.selectbox("Run", [r.id for r in runs])
run = next(r for r in runs if r.id == choice)
if run.status != "ok":
    st.error(f"Run {run.id} is broken: {run.problem}. Delete it with `probe runs --delete {run.id}`.")
    st.stop()
m = run.manifest
c1, c2, c3, c4 = st.columns(4)
c1.metric("analysis", m.get("analysis", "?"))
c2.metric("model", m.get("model", {}).get("name", "?"))
c3.metric("weights", m.get("weights", {}).get("source", "?"))
c4.metric("device / dtype", f"{m.get('device', '?')} / {m.get('dtype', '?')}")
if m.get("weights", {}).get("source") == "random":
    st.warning("This run used random weights: maps show the architecture, not learned behaviour.")

st.subheader("Figures")
if not run.figures:
    st.caption("This run saved no figures.")
for fig in run.figures:
    st.image(str(fig), caption=fig.name)

with st.expander("Manifest"):
    st.code(json.dumps(m, indent=2), language="json")
