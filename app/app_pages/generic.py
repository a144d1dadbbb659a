"""Any run: the result.json summary, labelled grids, every array with its shape (read from the
file header), a heat map of any 2-D slice of any array, a scatter of any (n, 2) array, the figures.
Renders run kinds the app has no page for (probes, UMAP, ...)."""

from __future__ import annotations

import streamlit as st
from probeapp import ui, views


@ui.guard
def page() -> None:
    st.title("Any run")
    v = ui.pick_run(None, "generic.run")
    if v is None:
        return
    ui.run_header(v)
    if ui.page_path(v.kind) != "app_pages/generic.py":
        ui.open_link(v, label=f"This {v.kind} run has its own page: open it there")
    views.generic_panel(v, "generic")


page()
