"""Attribution maps: captum methods, Chefer relevancy, rollout and attention flow, per image and
per caption token, drawn over the image."""

from __future__ import annotations

import streamlit as st
from probeapp import ui, views

KINDS = ["attribution", "relevancy", "rollout", "attention-flow"]


@ui.guard
def page() -> None:
    st.title("Attribution")
    v = ui.pick_run(KINDS, "attribution.run")
    if v is None:
        return
    ui.run_header(v)
    ui.approximate_marker(v)
    ctl = views.attribution_controls(v, "attribution")
    sources = list(views.attribution_sources(v))
    chosen = sources
    if len(sources) > 1:
        chosen = st.multiselect("Maps", sources, default=[m for m in ui.kept(f"attribution.maps.{v.id}", sources)
                                                           if m in sources], key=f"attribution.maps.{v.id}")
        st.session_state[ui.KEEP + f"attribution.maps.{v.id}"] = chosen
    views.attribution_panel(v, ctl, chosen or sources)
    views.attribution_details(v)
    with st.expander("Figures saved by the run"):
        ui.figures(v)


page()
