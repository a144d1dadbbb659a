"""Probes: linear probes per layer (Hewitt & Liang's control task): accuracy with its interval,
control, baseline and selectivity as a chart and a table; for ``--tokens patches`` runs the
accuracy per patch position as a heat map per layer."""

from __future__ import annotations

import streamlit as st
from probeapp import ui, views


@ui.guard
def page() -> None:
    st.title("Probes")
    v = ui.pick_run(["probes"], "probes.run")
    if v is None:
        return
    ui.run_header(v)
    classes = ", ".join(map(str, v.field("classes") or [])) or "?"
    st.markdown(f"Target **{v.field('target', '?')}** ({classes}) from **{v.field('tokens', '?')}** tokens of "
                f"`{v.field('data', '?')}`; folds grouped by image. Control task: one label per "
                f"{v.field('type') or 'type'} (Hewitt & Liang 2019).")
    df = views.probe_frame(v)
    if df.empty:
        st.warning("This run has no per-layer scores.")
        return
    views.chart(views.probe_chart(v))
    best = df.sort_values(["accuracy", "selectivity"], ascending=False).iloc[0]
    ceiling = v.field("control_ceiling")
    st.caption(f"best layer: {best['layer']} (accuracy {best['accuracy']:.3f}, selectivity {best['selectivity']:+.3f})"
               + (f"; control ceiling (the probe on a one-hot of the type) {float(ceiling):.3f}: the control task "
                  "is learnable by memorisation" if isinstance(ceiling, int | float) else ""))
    st.dataframe(df.style.format({c: "{:.3f}" for c in (*views.PROBE_MEASURES, "ci_lo", "ci_hi")}),
                 hide_index=True, width="stretch")
    views.probe_patch_maps(v, "probes")
    with st.expander("Figures saved by the run"):
        ui.figures(v)


page()
