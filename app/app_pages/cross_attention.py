"""Cross-attention accounting (parameters and FLOPs per group) and the fusion table, from the
stored ca-params runs and their manifests; nothing is built or loaded."""

from __future__ import annotations

from pathlib import Path

import streamlit as st
from probeapp import data, ui, views

from probe.docs import readme_block


@ui.guard
def page() -> None:
    st.title("Cross-attention and fusion")
    v = ui.pick_run(["ca-params"], "ca.run")
    if v is None:
        return
    ui.run_header(v)
    st.caption(f"{'published sizes (meta device)' if v.field('full_size') else 'the weights the run resolved'}; "
               f"FLOPs for one image + {v.field('text_tokens')} caption tokens")
    for what in ("params", "flops"):
        st.subheader("Parameters" if what == "params" else "Forward FLOPs")
        st.dataframe(views.ca_table(v, what), width="stretch")
        views.chart(views.ca_chart(v, what))
    st.subheader("Fusion table")
    runs = []
    for r in data.listing():
        if r["analysis"] == "ca-params" and r["status"] == "ok":
            try:
                runs.append(data.open_run(r["id"]))
            except data.RunUnreadable:
                continue
        if len(runs) >= 20:  # the newest twenty are plenty for one row per model
            break
    st.caption("One row per model from the newest ca-params runs of this store (fusion kind and capabilities "
               "from the manifests).")
    st.dataframe(views.fusion_rows(runs), width="stretch")
    readme = Path(__file__).resolve().parents[2] / "README.md"
    if readme.is_file():
        try:
            block = readme_block(readme.read_text())
        except ValueError:
            block = ""
        if block:
            with st.expander("The fusion table generated from the adapters (README copy, `probe models --fusion`)"):
                st.markdown(block)


page()
