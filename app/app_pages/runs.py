"""Runs: every run of the store in a filterable table; one run's manifest; delete with confirmation."""

from __future__ import annotations

from datetime import date

import pandas as pd
import streamlit as st
from probeapp import data, ui
from probeapp.data import RunUnreadable

st.title("Runs")
if st.session_state.get("runs.deleted"):
    st.success(f"Deleted {st.session_state.pop('runs.deleted')}.")
rows = data.listing()
root = data.store_root()
if not rows:
    st.info(f"No runs in `{root}` yet. Make one with `probe run attention`, or choose another store in the sidebar.")
    st.stop()

# ---- filters (their values are kept across page switches)
f = st.columns([2, 2, 1, 2, 2])


def kept_in(key: str, options: list) -> list:
    return [x for x in ui.kept(key, []) or [] if x in options]


with f[0]:
    opts = sorted({r["analysis"] for r in rows})
    analyses = st.multiselect("Analysis", opts, key="runs.f.analysis", default=kept_in("runs.f.analysis", opts))
with f[1]:
    opts = sorted({r["model"] for r in rows})
    models = st.multiselect("Model", opts, key="runs.f.model", default=kept_in("runs.f.model", opts))
with f[2]:
    opts = sorted({w for r in rows for w in r["weights"].split(",")})
    weights = st.multiselect("Weights", opts, key="runs.f.weights", default=kept_in("runs.f.weights", opts))
with f[3]:
    opts = sorted({t for r in rows for t in r["tags"]})
    tags = st.multiselect("Tags", opts, key="runs.f.tags", default=kept_in("runs.f.tags", opts))
with f[4]:
    text = st.text_input("Search (id, model, analysis)", key="runs.f.text", value=ui.kept("runs.f.text", ""))
for k, val in (("analysis", analyses), ("model", models), ("weights", weights), ("tags", tags), ("text", text)):
    st.session_state[ui.KEEP + f"runs.f.{k}"] = val
dates = sorted({r["date"] for r in rows if r["date"]})
since = None
if len(dates) > 1:
    lo, hi = date.fromisoformat(dates[0]), date.fromisoformat(dates[-1])
    since = st.slider("Created between", lo, hi, (lo, hi), key="runs.f.dates", format="YYYY-MM-DD")


def keep_row(r: dict) -> bool:
    if analyses and r["analysis"] not in analyses:
        return False
    if models and r["model"] not in models:
        return False
    if weights and not set(r["weights"].split(",")) & set(weights):
        return False
    if tags and not set(r["tags"]) >= set(tags):
        return False
    if text and text.lower() not in f"{r['id']} {r['model']} {r['analysis']}".lower():
        return False
    if since and r["date"]:
        d = date.fromisoformat(r["date"])
        if not since[0] <= d <= since[1]:
            return False
    return True


shown = [r for r in rows if keep_row(r)]
st.caption(f"{len(shown)} of {len(rows)} runs in `{root}`")
table = pd.DataFrame([{
    "run": r["id"], "analysis": r["analysis"], "model": r["model"], "weights": r["weights"],
    "created": r["created"].replace("T", " ")[:19], "tags": ", ".join(r["tags"]),
    "status": "ok" if r["status"] == "ok" else f"BROKEN: {r['problem']}",
} for r in shown])
event = st.dataframe(table, hide_index=True, width="stretch", height=min(38 + 35 * len(shown), 420),
                     on_select="rerun", selection_mode="single-row", key="runs.table")
if not shown:
    st.stop()

# ---- one run: chosen in the table (click a row) or in the select box; remembered across pages
ids = [r["id"] for r in shown]
picked = list(getattr(getattr(event, "selection", None), "rows", []) or [])
if picked and picked[0] < len(ids) and ids[picked[0]] != st.session_state.get("runs.table_seen"):
    st.session_state["runs.table_seen"] = ids[picked[0]]
    ui.keep("runs.run", ids[picked[0]])
asked = ui.url_run()
if asked and asked in ids and asked != ui.kept("runs.run"):
    ui.keep("runs.run", asked)
elif asked and asked not in ids:
    st.warning(f"`?run={asked}` is not a run listed here (check the id and the filters).")
by_id = {r["id"]: r for r in shown}
choice = ui.sticky(st.selectbox, "Run", ids, "runs.run",
                   format_func=lambda i: f"{i}  ({by_id[i]['analysis']}, {by_id[i]['model']})"
                   + ("  [BROKEN]" if by_id[i]["status"] != "ok" else ""))
row = by_id[choice]

st.subheader(choice)
if row["status"] != "ok":
    st.error(f"Run {choice} is broken: {row['problem']}. Delete it below or with `probe runs --delete {choice}`.")
else:
    try:
        v = data.open_run(choice)
    except RunUnreadable as e:
        st.error(f"Run {choice} cannot be read: {e}")
    else:
        ui.run_header(v)
        ui.open_link(v, label=f"Open it on the {data.PAGE_TITLE[ui.page_path(v.kind)]} page")
        ui.manifest_view(v)
        with st.expander("Figures saved by the run"):
            ui.figures(v)

# ---- delete, with a confirmation step
if data.readonly():
    st.caption(f"Deleting is off ({data.READONLY_ENV}=1).")
else:
    pending = st.session_state.get("runs.delete_pending")
    if pending != choice:
        if st.button("Delete this run…", icon=":material/delete:", key="runs.delete"):
            st.session_state["runs.delete_pending"] = choice
            st.rerun()
    else:
        st.warning(f"Delete run **{choice}**? Its folder is removed from `{root}`; this cannot be undone.")
        c1, c2 = st.columns([1, 5])
        if c1.button("Yes, delete it", type="primary", key="runs.delete_confirm"):
            try:
                data.store().delete(choice)
            except Exception as e:  # an id that vanished meanwhile, a permission problem
                st.error(f"Not deleted: {e}")
            else:
                data.clear_caches()
                st.session_state.pop("runs.delete_pending", None)
                st.session_state.pop(ui.KEEP + "runs.run", None)
                st.session_state["runs.deleted"] = choice
                st.rerun()
        if c2.button("Cancel", key="runs.delete_cancel"):
            st.session_state.pop("runs.delete_pending", None)
            st.rerun()
