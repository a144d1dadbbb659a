"""Compare: two runs of the same analysis side by side (two models, or two attention kinds on the
same images), with the same controls for both and the manifest fields that differ."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pandas as pd
import streamlit as st
from probeapp import data, render, ui, views
from probeapp.data import RunView

FLAT = ("model.name", "weights_requested", "attn_implementation", "dtype", "device", "seed", "parameters",
        "created", "images")


def flat(m: dict, key: str) -> str:
    x: object = m
    for part in key.split("."):
        x = x.get(part) if isinstance(x, dict) else None
    return json.dumps(x, sort_keys=True)[:200] if not isinstance(x, str) else x


def differences(a: RunView, b: RunView) -> pd.DataFrame:
    """The manifest fields whose values differ between A and B (all of them when A is B)."""
    recs = [{"field": k, "A": flat(a.manifest, k), "B": flat(b.manifest, k)} for k in FLAT]
    recs.append({"field": "weights", "A": " ".join(a.weights()), "B": " ".join(b.weights())})
    recs.append({"field": "attention kind", "A": a.attention_kind(), "B": b.attention_kind()})
    df = pd.DataFrame(recs)
    return df[df["A"] != df["B"]] if a.id != b.id else df


def side_by_side(a: RunView, b: RunView, draw: Callable[[RunView, str], None]) -> None:
    """`draw(run, panel)` for A and B in two columns; `panel` ("A", "B") keys each side's widgets."""
    cols = st.columns(2)
    for col, v, panel in zip(cols, (a, b), ("A", "B"), strict=True):
        with col:
            st.markdown(f"**{panel}: {v.model}** · `{v.id}`")
            if v.approximate():
                st.caption(":orange-badge[effective attention] approximate kind " + v.attention_kind())
            try:
                draw(v, panel)
            except Exception as e:  # one unreadable side must not hide the other
                st.error(f"{v.id} cannot be shown here: {type(e).__name__}: {e}")


def attention_difference(a: RunView, b: RunView, ctl: dict) -> None:
    """A's map minus B's for the same image, layer, query token and the same head choice: a fusion
    done at capture time on one run is matched with that fusion over the other's heads; a choice
    B does not have is refused, never replaced by another."""
    if ctl["layer"] not in (b.field("layers") or []):
        st.caption(f"no difference map: B has no layer {ctl['layer']}")
        return
    if ctl["query"] not in views.attention_queries(b)[0]:
        st.caption("no difference map: B did not capture this query token")
        return
    ha, hb = views.matching_head(a, ctl["head"]), views.matching_head(b, ctl["head"])
    if ha is None or hb is None:
        st.warning(f"No difference map: A shows {views.head_label(ctl['head'])}, and B has no such head choice "
                   f"(it has {', '.join(views.head_label(h) for h in views.attention_heads(b)[:4])}). A difference "
                   "of two different head choices would mislead; choose a head choice both runs have.")
        return
    maps = [views.attention_map(v, ctl["image"], ctl["layer"], h, ctl["query"]) for v, h in ((a, ha), (b, hb))]
    diff = maps[0] - maps[1]
    st.image(render.map_strip(a.image(ctl["image"]), [diff], [f"A - B, layer {ctl['layer']}"],
                              label="difference of attention", panel=3.0),
             caption=f"A - B (A: {views.head_label(ha)}, B: {views.head_label(hb)}; {ctl['names'][ctl['query']]}): "
                     f"mean |difference| {np.abs(diff).mean():.4f}, max {np.abs(diff).max():.4f}")


@ui.guard
def page() -> None:
    st.title("Compare two runs")
    rows = [r for r in data.listing() if r["status"] == "ok"]
    count: dict[str, int] = {}
    for r in rows:
        count[r["analysis"]] = count.get(r["analysis"], 0) + 1
    kinds = sorted(count, key=lambda k: (count[k] < 2, k))  # analyses with two runs or more first
    if not kinds:
        st.info(f"No runs in `{data.store_root()}` to compare.")
        return
    asked = ui.url_run()  # opened with ?run=ID: compare that run's analysis (pick_run then follows the id)
    if asked and asked != st.session_state.get("probe.url.compare"):
        kind_of = {r["id"]: r["analysis"] for r in rows}
        if asked in kind_of:
            ui.keep("compare.kind", kind_of[asked])
    kind = ui.sticky(st.selectbox, "Analysis", kinds, "compare.kind",
                     format_func=lambda k: f"{k} ({count[k]} run{'s' if count[k] != 1 else ''})")
    ca, cb = st.columns(2)
    with ca:
        a = ui.pick_run([kind], f"compare.a.{kind}", label="Run A", url_key="compare")
    ids = [r["id"] for r in rows if r["analysis"] == kind]
    if a is None:
        return
    others = [i for i in ids if i != a.id] or ids
    by_id = {r["id"]: r for r in rows}
    with cb:
        b_id = ui.sticky(st.selectbox, "Run B", others, f"compare.b.{kind}",
                         format_func=lambda i: f"{by_id[i]['created'][:16].replace('T', ' ')} · {by_id[i]['model']} · {i}")
    b = data.open_run(b_id)
    if len(ids) < 2:
        st.info("Only one run of this analysis: it is shown against itself. Save another to compare.")
    st.subheader("What differs")
    st.dataframe(differences(a, b), hide_index=True, width="stretch")
    same_images = (a.field("image_names") or []) == (b.field("image_names") or [])
    st.caption("same images in both runs" if same_images else "the runs have different images: image i is "
               "compared with image i")
    if kind == "attention":
        ctl = views.attention_controls(a, "compare.att")
        side_by_side(a, b, lambda v, _: views.attention_panel(v, ctl, strip=False))
        if same_images and views.grid_of(a) == views.grid_of(b):
            attention_difference(a, b, ctl)
    elif kind == "flow":
        ctl = views.flow_controls(a, "compare.flow", panels=("A", "B"))
        side_by_side(a, b, lambda v, panel: views.flow_panel(v, ctl, panel))
    elif kind in ("attribution", "relevancy", "rollout", "attention-flow"):
        ctl = views.attribution_controls(a, "compare.attr")
        side_by_side(a, b, lambda v, _: views.attribution_panel(v, ctl))
    elif kind == "probes":
        def probes(v: RunView, _: str) -> None:
            views.chart(views.probe_chart(v, height=240))
            st.dataframe(views.probe_frame(v), hide_index=True, width="stretch")

        side_by_side(a, b, probes)
    elif kind == "representations":
        side_by_side(a, b, lambda v, _: st.dataframe(views.representation_frame(v), hide_index=True, width="stretch"))
        st.caption(views.UMAP_CAVEAT)
        ctl = views.umap_controls(a, "compare.umap")
        side_by_side(a, b, lambda v, _: views.umap_panel(v, ctl))
    elif kind == "ablation":
        image = ui.image_picker(a, "compare.abl.image")

        def abl(v: RunView, _: str) -> None:
            chart = views.ablation_heads_chart(v)
            if chart is not None:
                views.chart(chart)
            views.chart(views.ablation_drop_chart(v))
            views.ablation_captions(v, min(image, len(v.field("image_names") or [0]) - 1))

        side_by_side(a, b, abl)
    elif kind == "faithfulness":
        side_by_side(a, b, lambda v, _: st.dataframe(views.faithfulness_table(v), width="stretch"))
    elif kind == "ca-params":
        side_by_side(a, b, lambda v, _: st.dataframe(views.ca_table(v, "params"), width="stretch"))
    else:  # patching, logit-lens and kinds without a page: their labelled grids, fields and figures
        def generic(v: RunView, _: str) -> None:
            for name, spec in views.grids_of(v).items():
                if name in v.arrays:
                    views.grid_panel(v, name, spec)
            st.dataframe(views.summary_frame(v.result), hide_index=True, width="stretch")
            ui.figures(v, limit=3)

        side_by_side(a, b, generic)


page()
