"""Flow and per-token views: the caption as clickable tokens; the chosen token's text->image map
per layer over the image; the image mass per token and layer; click a patch to see which tokens
read it."""

from __future__ import annotations

import streamlit as st
from probeapp import ui, views


@ui.guard
def page() -> None:
    st.title("Flow and tokens")
    v = ui.pick_run(["flow"], "flow.run")
    if v is None:
        return
    ui.run_header(v)
    st.caption(f"fusion: {v.field('fusion')}; "
               + ("text->image rows are the image span of a joint self-attention" if v.field("joint")
                  else "text->image rows are the cross-attention"))
    ctl = views.flow_controls(v, "flow")
    views.flow_panel(v, ctl)
    views.flow_patch_readout(v, "flow", ctl["image"])


page()
