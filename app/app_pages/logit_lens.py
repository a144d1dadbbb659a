"""Logit lens: every layer's residual decoded through the read-out. The labelled grids of the
result (caption positions: when is each word decided; image tokens: do patches name their
object), and the top-1 token of each patch drawn over the image, per layer."""

from __future__ import annotations

import streamlit as st
from probeapp import ui, views


@ui.guard
def page() -> None:
    st.title("Logit lens")
    v = ui.pick_run(["logit-lens"], "lens.run")
    if v is None:
        return
    ui.run_header(v)
    caps = v.field("captions") or []
    names = v.field("image_names") or []
    if caps:
        st.markdown("\n".join(f"- `{names[i] if i < len(names) else i}`: {views.md_escape(str(c))}"
                              for i, c in enumerate(caps[:12])) + ("\n- ..." if len(caps) > 12 else ""))
    for name, spec in views.grids_of(v).items():
        if name not in v.arrays:
            st.error(f"grid {name!r} is declared in result.json but {name!r} is not in arrays.safetensors")
            continue
        views.grid_panel(v, name, spec)
    views.lens_patch_view(v, "lens")
    with st.expander("Figures saved by the run"):
        ui.figures(v)


page()
