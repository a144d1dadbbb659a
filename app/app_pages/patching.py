"""Patching: the labelled grids of a patching run (``result.json`` field ``grids``: per array
name its title, row and column labels and value name), each as a heat map with hover values."""

from __future__ import annotations

import streamlit as st
from probeapp import ui, views


@ui.guard
def page() -> None:
    st.title("Patching")
    v = ui.pick_run(["patching"], "patching.run", accept=lambda r: "patch" in r["analysis"])
    if v is None:
        return
    ui.run_header(v)
    grids = views.grids_of(v)
    if not grids:
        st.warning("This run has no `grids` field; its files are shown as on the Any run page.")
    for name, spec in grids.items():
        if name not in v.arrays:
            st.error(f"grid {name!r} is declared in result.json but {name!r} is not in arrays.safetensors")
            continue
        views.grid_panel(v, name, spec)
    st.subheader("The rest of the result")
    views.generic_panel(v, "patching", explore=False, grids=False)


page()
