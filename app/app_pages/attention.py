"""Attention: one run's maps over its images: a layer and a head (or the head fusion), the CLS row
or any query token, the chosen layer large with its colour bar and every layer side by side."""

from __future__ import annotations

import streamlit as st
from probeapp import ui, views


@ui.guard
def page() -> None:
    st.title("Attention")
    v = ui.pick_run(["attention"], "attention.run")
    if v is None:
        return
    ui.run_header(v)
    ui.approximate_marker(v)
    ctl = views.attention_controls(v, "attention")
    views.attention_panel(v, ctl)
    with st.expander("Figures saved by the run"):
        ui.figures(v)


page()
