"""UMAP and modality gap: per layer pair, the modality gap and the linear separability of image
vs text tokens (measured in the original space), and an interactive UMAP of the tokens coloured
by modality or by label (for looking only)."""

from __future__ import annotations

import streamlit as st
from probeapp import ui, views


@ui.guard
def page() -> None:
    st.title("UMAP and modality gap")
    v = ui.pick_run(["representations"], "umap.run")
    if v is None:
        return
    ui.run_header(v)
    st.caption(("image tokens sit in the decoder stream: image and text come from the same layer" if v.field("joint")
                else "image and text tokens do not share one space in this family: the gap is not measured")
               + f"; data `{v.field('data', '?')}`")
    for note in v.field("notes") or []:
        st.caption(str(note))
    df = views.representation_frame(v)
    if df.empty:
        st.warning("This run compared no layers.")
        return
    views.chart(views.representation_chart(v), margin=90)
    st.dataframe(df.style.format({"gap": "{:.4f}", "separability": "{:.3f}"}), hide_index=True, width="stretch")
    st.subheader("UMAP of the image and text tokens")
    st.info(views.UMAP_CAVEAT, icon=":material/visibility:")
    if not df["umap"].any():
        st.caption("This run stored no UMAP (`--no-umap`).")
        return
    ctl = views.umap_controls(v, "umap")
    views.umap_panel(v, ctl)
    st.caption("Every layer, coloured alike:")
    views.umap_every_layer(v, ctl["colour"])
    with st.expander("Figures saved by the run"):
        ui.figures(v)


page()
