"""Runs: every run of the store in a filterable table; one run's manifest; delete with confirmation."""

from __future__ import annotations

import hashlib
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
    st.info(data.no_runs_text(root))
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
dates = sorted({r["date"] for r in rows if r["date"]})  # runs whose `created` is not a date have ""
since = None
if len(dates) > 1:
    lo, hi = date.fromisoformat(dates[0]), date.fromisoformat(dates[-1])
    was = ui.kept("runs.f.dates")
    if isinstance(was, tuple | list) and len(was) == 2 and all(isinstance(d, date) for d in was):
        start, end = min(max(was[0], lo), hi), max(min(was[1], hi), lo)
        value = (start, end) if start <= end else (lo, hi)
    else:
        value = (lo, hi)
    since = st.slider("Created between", lo, hi, value, key="runs.f.dates", format="YYYY-MM-DD",
                      help="runs whose creation time is not a date are always shown")
    st.session_state[ui.KEEP + "runs.f.dates"] = tuple(since)


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
st.caption(f"{len(shown)} of {len(rows)} runs in `{data.safe_text(root)}`")
ids = [r["id"] for r in shown]
table = pd.DataFrame([{
    "run": r["id"], "analysis": r["analysis"], "model": r["model"], "weights": r["weights"],
    "created": r["created"].replace("T", " ")[:19], "tags": ", ".join(r["tags"]),
    "status": "ok" if r["status"] == "ok" else f"BROKEN: {r['problem']}",
} for r in shown])
# The table is keyed by the ids it shows: a row selected in one table is never carried, by its
# position, to another run once the filters change.
table_key = "runs.table." + hashlib.sha1("\n".join(ids).encode()).hexdigest()[:12]
event = st.dataframe(table, hide_index=True, width="stretch", height=min(38 + 35 * len(shown), 420),
                     on_select="rerun", selection_mode="single-row", key=table_key)
if not shown:
    st.stop()

# ---- one run: chosen in the table (click a row) or in the select box; remembered across pages
picked = list(getattr(getattr(event, "selection", None), "rows", []) or [])
if picked and 0 <= picked[0] < len(ids):
    clicked = (table_key, ids[picked[0]])
    if clicked != st.session_state.get("runs.table_seen"):  # a new click, not the one already followed
        st.session_state["runs.table_seen"] = clicked
        ui.keep("runs.run", ids[picked[0]])
else:
    st.session_state.pop("runs.table_seen", None)
asked = ui.url_arrived("runs")  # the address is followed when the page is opened with it, not after
if asked and asked in ids:
    ui.keep("runs.run", asked)
elif asked:
    st.warning(f"`?run={data.safe_text(asked)}` is not a run listed here (check the id and the filters).")
by_id = {r["id"]: r for r in shown}
choice = ui.sticky(st.selectbox, "Run", ids, "runs.run",
                   format_func=lambda i: f"{i}  ({by_id[i]['analysis']}, {by_id[i]['model']})"
                   + ("  [BROKEN]" if by_id[i]["status"] != "ok" else ""))
ui.url_follows("runs", choice)
if st.session_state.get("runs.delete_pending") not in (None, choice):
    st.session_state.pop("runs.delete_pending")  # a confirmation is for the run it was asked for
row = by_id[choice]

st.subheader(choice)
if row["status"] != "ok":
    st.error(f"Run {choice} is broken: {row['problem']}."
             + (f" Delete it below or with `probe runs --delete {choice}`." if row["deletable"] else ""))
else:
    try:
        v = data.open_run(choice)
    except RunUnreadable as e:
        st.error(f"Run {choice} cannot be read: {e}")
    else:
        try:
            ui.run_header(v)
            ui.open_link(v, label=f"Open it on the {data.PAGE_TITLE[ui.page_path(v.kind)]} page")
            ui.manifest_view(v)
            with st.expander("Figures saved by the run"):
                ui.figures(v)
        except Exception as e:  # an odd manifest must not hide the delete button below
            st.error(f"Part of run {choice} cannot be shown: {type(e).__name__}: {' '.join(str(e).split())[:300]}")

# ---- delete, with a confirmation step; only what is positively a run probe wrote
if data.readonly():
    st.caption(f"Deleting is off ({data.READONLY_ENV}=1).")
elif not row["deletable"]:
    what = ("a symbolic link, not a run folder" if row["link"] else
            "not positively a run written by probe (no probe marker or probe manifest naming it)")
    st.caption(f"This entry is {what}, so the app does not offer to delete it. Look at it, then remove it "
               f"yourself (`probe runs --delete ID` removes a link, never its target).")
else:
    pending = st.session_state.get("runs.delete_pending")
    if pending != choice:
        if st.button("Delete this run…", icon=":material/delete:", key="runs.delete"):
            st.session_state["runs.delete_pending"] = choice
            st.rerun()
    else:
        st.warning(f"Delete run **{choice}**? Its folder is removed from `{data.safe_text(root)}`; this cannot be "
                   "undone.")
        c1, c2 = st.columns([1, 5])
        if c1.button("Yes, delete it", type="primary", key="runs.delete_confirm"):
            try:
                s = data.store()
                if not s.is_probe_run(choice):  # checked again: the folder may have changed meanwhile
                    raise RunUnreadable(f"{choice} is no longer a run folder written by probe")
                s.delete(choice)
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
