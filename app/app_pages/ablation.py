"""Ablation: the layer x head heat map, the drop per variant, the captions per variant with the
changed words highlighted, and the removed patches over the image."""

from __future__ import annotations

import pandas as pd
import streamlit as st
from probeapp import ui, views


@ui.guard
def page() -> None:
    st.title("Ablation")
    v = ui.pick_run(["ablation"], "ablation.run")
    if v is None:
        return
    ui.run_header(v)
    c1, c2 = st.columns([1, 2])
    heads = views.ablation_heads_chart(v)
    with c1:
        if heads is not None:
            views.chart(heads)
        else:
            st.caption("No head sweep in this run.")
    with c2:
        views.chart(views.ablation_drop_chart(v))
    acc = v.field("accuracy")
    if acc:
        with st.expander("Caption accuracy per variant"):
            st.dataframe(pd.DataFrame(acc).T, width="stretch")
    st.subheader("Captions per variant")
    image = ui.image_picker(v, "ablation.image")
    c3, c4 = st.columns([2, 1])
    with c3:
        views.ablation_captions(v, image)
    with c4:
        views.ablation_removed(v, image, "ablation")


page()
