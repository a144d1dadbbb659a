"""Faithfulness: pointing, energy, deletion and insertion and randomisation sanity of every
attribution method, and each scored word's maps against its object's mask."""

from __future__ import annotations

import streamlit as st
from probeapp import ui, views


@ui.guard
def page() -> None:
    st.title("Faithfulness")
    v = ui.pick_run(["faithfulness"], "faithfulness.run")
    if v is None:
        return
    ui.run_header(v)
    table = views.faithfulness_table(v)
    if table.empty:
        st.info("This run holds no scores.")
    else:
        st.dataframe(table.style.format("{:.3f}", na_rep=""), width="stretch")
    skipped = v.field("skipped") or {}
    if skipped:
        st.caption("Skipped: " + "; ".join(f"{k}: {w}" for k, w in skipped.items()))
    c1, c2 = st.columns(2)
    for col, which in ((c1, "deletion"), (c2, "insertion")):
        curves = views.faithfulness_curves(v, which)
        if curves is not None:
            with col:
                views.chart(curves)
    st.subheader("Maps of a scored word")
    views.faithfulness_targets(v, "faithfulness")


page()
