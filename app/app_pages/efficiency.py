"""Efficiency: the attention-kind study (`probe run efficiency`) read from its ``rows``: speed-up
over standard attention and peak memory against the token count, per kind and implementation
(ours solid, the reference packages dashed), the targets, and every measurement as a table."""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st
from probeapp import ui, views


@ui.guard
def page() -> None:
    st.title("Efficiency of the attention kinds")
    v = ui.pick_run(["efficiency"], "efficiency.run")
    if v is None:
        return
    ui.run_header(v)
    rows = pd.DataFrame(v.field("rows") or [])
    if rows.empty:
        st.info("This run measured nothing (no rows).")
        return
    s = v.field("settings") or {}
    st.caption(f"dim {s.get('dim')}, {s.get('heads')} heads, batch {s.get('batch')}, {s.get('device')} "
               f"{s.get('dtype')}, {s.get('threads')} thread(s), median of {s.get('rounds')} interleaved rounds")
    scopes = sorted(rows["scope"].unique())
    scope = ui.sticky(st.radio, "Scope", scopes, "efficiency.scope", horizontal=True,
                      help="attention: one attention layer, beside the reference packages; vit: a whole ViT")
    r = rows[rows["scope"] == scope].copy()
    base = r[(r["kind"] == "standard") & (r["implementation"] == "probe")].set_index("tokens")["latency_ms"]
    r["speed-up"] = r["tokens"].map(base) / r["latency_ms"]
    r["series"] = r.apply(lambda x: x["kind"] if x["implementation"] == "probe"
                          else f"{x['kind']} ({x['implementation']})", axis=1)
    r["ours"] = r["implementation"] == "probe"
    x = alt.X("tokens:Q", scale=alt.Scale(type="log"), title="tokens")
    left, right = st.columns(2)
    with left:
        if base.empty:
            st.caption("No standard-attention row at this scope: no speed-up to show.")
        else:
            c = alt.Chart(r.dropna(subset=["speed-up"])).mark_line(point=True).encode(
                x, alt.Y("speed-up:Q", title="speed-up over standard (SDPA)"), color="series:N",
                strokeDash=alt.StrokeDash("ours:N", legend=None),
                tooltip=["kind", "implementation", "tokens", "latency_ms", "latency_spread_ms", "speed-up"]
            ).properties(title="forward speed-up", height=300)
            views.chart(c)
    with right:
        mem = r.dropna(subset=["peak_mb"])
        if mem.empty:
            st.caption("Memory was not measured in this run.")
        else:
            c = alt.Chart(mem).mark_line(point=True).encode(
                x, alt.Y("peak_mb:Q", scale=alt.Scale(type="log"), title="peak forward memory (MB)"),
                color="series:N", strokeDash=alt.StrokeDash("ours:N", legend=None),
                tooltip=["kind", "implementation", "tokens", "peak_mb", "train_peak_mb"]
            ).properties(title="peak forward memory", height=300)
            views.chart(c)
    targets = v.field("targets") or {}
    if targets:
        st.subheader("Targets")
        st.dataframe(pd.DataFrame([{"target": k, "value": t.get("value"), "limit": t.get("target"),
                                    "met": bool(t.get("met"))} for k, t in targets.items()]),
                     hide_index=True, width="stretch")
    agreement = v.field("agreement") or {}
    if agreement:
        st.subheader("Against the reference packages, with copied weights")
        for kind, a in agreement.items():
            st.markdown(f"- **{kind}** vs `{a.get('reference')}` ({a.get('tokens')} tokens): max relative "
                        f"difference {float(a.get('max_rel_diff', float('nan'))):.1e}. {a.get('note', '')}")
    st.subheader("Every measurement")
    cols = ["kind", "implementation", "tokens", "image_size", "params", "flops", "flops_closed_form", "latency_ms",
            "latency_spread_ms", "peak_mb", "train_peak_mb", "dtype", "device"]
    st.dataframe(r[[c for c in cols if c in r.columns]], hide_index=True, width="stretch")
    with st.expander("Figures saved by the run"):
        ui.figures(v)


page()
