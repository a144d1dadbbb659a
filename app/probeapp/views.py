"""One view per result kind, drawn from the stored JSON and lazily read arrays.

Each kind has its controls (`*_controls`, drawn once per page; the Compare page shares them between
two runs) and a panel (`*_panel`) that draws one run for those controls. Maps are computed from the
stored arrays here, with the same conventions as the result classes' own methods (head mean, image
span of the keys, row-major patch grid).
"""

from __future__ import annotations

import difflib
import html
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from probeapp import render, ui
from probeapp.data import RunView

PATTERN = "vision.blocks.{i}.attn.pattern"
FUSIONS = ("mean", "max", "min")


# ------------------------------------------------------------------------------ shared geometry
def grid_of(v: RunView) -> tuple[int, int] | None:
    g = (v.field("meta") or {}).get("grid")
    return (int(g[0]), int(g[1])) if isinstance(g, list | tuple) and len(g) == 2 else None


def image_span(v: RunView, n_keys: int | None = None) -> tuple[int, int]:
    """Where the patches sit on the stored key axis: the ``image`` span, else the whole axis."""
    s = ((v.field("meta") or {}).get("spans") or {}).get("image")
    if isinstance(s, list | tuple) and len(s) == 2:
        return int(s[0]), int(s[1])
    return 0, int(n_keys or 0)


def on_grid(v: RunView, flat: np.ndarray) -> np.ndarray:
    """A vector over the patches (row-major) on the patch grid (rows, cols)."""
    g = grid_of(v)
    if g is None:
        side = int(round(np.sqrt(flat.size)))
        g = (side, flat.size // max(side, 1))
    return np.asarray(flat, dtype=np.float32).reshape(g)


def fuse(x: np.ndarray, how: str, axis: int = 0) -> np.ndarray:
    return {"mean": np.mean, "max": np.max, "min": np.min}[how](x, axis=axis)


def tokens_of(v: RunView, image: int) -> list[str]:
    toks = v.field("tokens")
    if isinstance(toks, list) and image < len(toks) and isinstance(toks[image], list):
        return [str(t) for t in toks[image]]
    return []


def chart(c: alt.TopLevelMixin, margin: int = 140, **kw: Any) -> Any:
    """Draw an Altair chart at its own height plus room for the title, axes and legend: Streamlit's
    default ("content") ignores the chart's height and squashes charts with few rows."""
    h = getattr(c, "height", None)
    height = int(h) + margin if isinstance(h, int | float) else "content"
    kw.setdefault("width", "stretch")
    return st.altair_chart(c, height=height, **kw)


def show_png(data: bytes, caption: str | None = None) -> None:
    st.image(data, caption=caption)


# ------------------------------------------------------------------------------ attention
CAPTURED = " (fused at capture)"


def attention_heads(v: RunView) -> list[Any]:
    """Head choices: the fusions plus each head, or the one fusion done at capture time."""
    layers = v.field("layers") or []
    shape = v.shape(PATTERN.format(i=layers[0])) if layers else None
    if shape is None:
        raise KeyError(f"run {v.id} has no attention pattern ({PATTERN.format(i='*')})")
    reduced = v.field("reduce_heads") or "mean"
    if shape[1] > 1 or reduced not in FUSIONS:
        return [*FUSIONS, *range(shape[1])]
    return [f"{reduced}{CAPTURED}"]


def captured_fusion(head: Any) -> str | None:
    """The fusion done at capture time that head choice `head` names, else None."""
    return head.removesuffix(CAPTURED) if isinstance(head, str) and head.endswith(CAPTURED) else None


def matching_head(v: RunView, head: Any) -> Any | None:
    """The head choice of run `v` that computes the same thing as `head` (chosen on another run):
    the same choice, a fusion over heads for that fusion done at capture time and back; None when
    `v` has no such choice (one head of a run fused at capture, or another fusion)."""
    heads = attention_heads(v)
    if head in heads:
        return head
    fused = captured_fusion(head)
    if fused in FUSIONS and fused in heads:
        return fused
    if head in FUSIONS:
        return next((h for h in heads if captured_fusion(h) == head), None)
    return None


def attention_queries(v: RunView) -> tuple[list[int], dict[int, str]]:
    """Query token positions that were captured, with a readable name each (CLS, patch r,c)."""
    layers = v.field("layers") or []
    shape = v.shape(PATTERN.format(i=layers[0]))
    assert shape is not None
    rows = v.field("rows")
    positions = [int(r) for r in rows] if isinstance(rows, list) else list(range(shape[2]))
    spans = (v.field("meta") or {}).get("spans") or {}
    lo, hi = image_span(v, shape[3])
    g = grid_of(v)
    names = {}
    for t in positions:
        if "cls" in spans and spans["cls"][0] <= t < spans["cls"][1]:
            names[t] = "CLS"
        elif lo <= t < hi and g:
            p = t - lo
            names[t] = f"patch r{p // g[1]} c{p % g[1]} (token {t})"
        else:
            names[t] = f"token {t}"
    return positions, names


def attention_map(v: RunView, image: int, layer: int, head: Any, query: int) -> np.ndarray:
    """(rows, cols): the attention of query token `query` over the patches, for one head or fused."""
    p = v.array(PATTERN.format(i=layer), image)  # (heads, rows, tokens), read lazily
    rows = v.field("rows")
    q = rows.index(query) if isinstance(rows, list) else query
    lo, hi = image_span(v, p.shape[-1])
    a = p[head, q] if isinstance(head, int) else fuse(p[:, q], head if head in FUSIONS else "mean")
    return on_grid(v, a[lo:hi])


def head_label(h: Any) -> str:
    return f"head {h}" if isinstance(h, int) else f"{h} over heads" if h in FUSIONS else str(h)


def attention_controls(v: RunView, key: str) -> dict[str, Any]:
    layers = [int(i) for i in v.field("layers") or []]
    heads = attention_heads(v)
    positions, names = attention_queries(v)
    c = st.columns([2, 1, 1, 2])
    with c[0]:
        image = ui.image_picker(v, f"{key}.image")
    with c[1]:
        layer = ui.sticky(st.selectbox, "Layer", layers, f"{key}.layer")
    with c[2]:
        head = ui.sticky(st.selectbox, "Head", heads, f"{key}.head", format_func=head_label)
    with c[3]:
        query = ui.sticky(st.selectbox, "Query token", positions, f"{key}.query", format_func=lambda t: names[t])
    return {"image": image, "layer": layer, "head": head, "query": query, "names": names}


def attention_panel(v: RunView, ctl: dict[str, Any], *, strip: bool = True) -> None:
    """The chosen layer's map over the image with its colour bar, and (with `strip`) every layer
    side by side on one colour scale, for the same head choice and query token."""
    layers = [int(i) for i in v.field("layers") or []]
    image = min(ctl["image"], len(v.field("image_names") or [0]) - 1)
    layer = ctl["layer"] if ctl["layer"] in layers else layers[-1]
    head = matching_head(v, ctl["head"])
    if head is None:
        head = attention_heads(v)[0]
        st.caption(f":orange-badge[other heads] this run has no {head_label(ctl['head'])}: it shows "
                   f"{head_label(head)}")
    positions, names = attention_queries(v)
    query = ctl["query"] if ctl["query"] in positions else positions[0]
    img = v.image(image)
    label = f"attention of {names[query]}"
    m = attention_map(v, image, layer, head, query)
    big, rest = st.columns([2, 3]) if strip and len(layers) > 1 else (st.container(), None)
    with big:
        show_png(render.map_strip(img, [m], [f"layer {layer}, {head_label(head)}"], label=label, panel=3.2),
                 caption=f"{(v.field('image_names') or ['?'])[image]}: {label}, layer {layer}")
        preds = v.field("predictions")
        if isinstance(preds, list) and image < len(preds):
            st.caption(f"prediction: {preds[image]}")
    if rest is not None:
        with rest:
            maps = [attention_map(v, image, i, head, query) for i in layers]
            show_png(render.map_strip(img, maps, [f"layer {i}" for i in layers], label=label, panel=1.7, ncols=4),
                     caption=f"every layer: {names[query]}, {head_label(head)} (one colour scale)")


# ------------------------------------------------------------------------------ flow
def flow_controls(v: RunView, key: str, panels: Sequence[str] = ("",)) -> dict[str, Any]:
    """The image and the caption token; a click on a token's row in a mass chart (one per panel
    name in `panels`, see `flow_panel`) or in the patch readout chooses that token."""
    image = ui.image_picker(v, f"{key}.image")
    caps = v.field("captions") or []
    if image < len(caps):
        st.markdown(f"**Caption**: {html.escape(str(caps[image]))}")
    tokens = tokens_of(v, image)
    token_key = f"{key}.token.{v.id}.{image}"
    for chart_key in (*(mass_chart_key(key, p) for p in panels), f"{key}.readout_chart"):  # a token row clicked
        p = followed_click(chart_key, "cell")
        if p is not None and 0 <= int(p["row_i"]) < len(tokens):
            ui.keep(token_key, int(p["row_i"]))
    step = ui.token_picker(tokens, token_key)
    return {"image": image, "step": step, "tokens": tokens, "key": key}


def mass_chart_key(key: str, panel: str = "") -> str:
    """The widget key of the image-mass chart of one panel (Compare draws two: "A" and "B")."""
    return f"{key}.mass_chart" + (f".{panel}" if panel else "")


def flow_token_maps(v: RunView, image: int, step: int) -> tuple[list[np.ndarray], list[str]]:
    rows = v.array("flow.rows", image)  # (layers, steps, keys)
    lo, hi = image_span(v, rows.shape[-1])
    layers = v.field("layers") or list(range(rows.shape[0]))
    maps = [on_grid(v, rows[k, step, lo:hi]) for k in range(rows.shape[0])]
    return [np.mean(maps, axis=0), *maps], ["mean of layers", *[f"layer {i}" for i in layers]]


def flow_panel(v: RunView, ctl: dict[str, Any], panel: str = "") -> None:
    """The chosen token's map per layer over the image, and the image mass per token and layer
    (a clickable chart keyed by the controls' key and `panel`: two panels need two names)."""
    image = ctl["image"]
    tokens = tokens_of(v, image)
    if not tokens:
        st.info("No generated tokens for this image.")
        return
    step = min(ctl["step"], len(tokens) - 1)
    maps, titles = flow_token_maps(v, image, step)
    show_png(render.map_strip(v.image(image), maps, titles, label="text->image attention", panel=1.9),
             caption=f"token {step} {tokens[step]!r}: text->image attention per layer")
    mass = v.array("flow.image_mass", image)[: len(tokens)]  # (steps, layers)
    layers = v.field("layers") or list(range(mass.shape[1]))
    heat = render.heatmap(mass, [f"{i}:{t}" for i, t in enumerate(tokens)], [f"layer {i}" for i in layers],
                          value="image mass", row_title="token", col_title="layer", zero=True,
                          title="Attention mass on the image, per token and layer (click a row: its token)",
                          select="cell" if ctl.get("key") else None)
    if ctl.get("key"):  # the page's own chart: clicking a token's row chooses that token
        chart(heat, on_select="rerun", key=mass_chart_key(ctl["key"], panel), selection_mode="cell")
    else:
        chart(heat)


def followed_click(chart_key: str, selection: str) -> dict[str, Any] | None:
    """The point just clicked in chart `chart_key` (selection `selection`), once: None when
    nothing is selected or the selection was already followed."""
    pts = selected_points(st.session_state.get(chart_key), selection)
    if not pts:
        return None
    point = (int(pts[0]["row_i"]), int(pts[0]["col_i"]))
    if st.session_state.get(chart_key + ".seen") == point:
        return None
    st.session_state[chart_key + ".seen"] = point
    return pts[0]


def selected_points(state: Any, name: str) -> list[dict[str, Any]]:
    """The points of selection `name` in an Altair chart's state (empty when nothing is selected)."""
    try:
        sel = state["selection"] if state is not None else {}
        pts = sel.get(name, []) if hasattr(sel, "get") else []
        return [p for p in pts if isinstance(p, dict) and "row_i" in p and "col_i" in p]
    except (KeyError, TypeError, AttributeError):
        return []


def flow_patch_readout(v: RunView, key: str, image: int) -> None:
    """Click a patch (or pick it): which caption tokens read it, per layer."""
    tokens = tokens_of(v, image)
    g = grid_of(v)
    img = v.image(image)
    if not tokens or g is None:
        return
    n_patches = g[0] * g[1]
    st.subheader("Which tokens read a patch")
    c1, c2 = st.columns([1, 2])
    with c1:
        chart_key = f"{key}.patch_chart"
        p = followed_click(chart_key, "patch")  # a click of the last rerun
        if p is not None and 0 <= int(p["row_i"]) * g[1] + int(p["col_i"]) < n_patches:
            ui.keep(f"{key}.patch", int(p["row_i"]) * g[1] + int(p["col_i"]))
        if img is not None:
            chosen = int(st.session_state.get(f"{key}.patch", ui.kept(f"{key}.patch", 0)) or 0)
            chart(render.patch_picker(img, g, name="patch", chosen=chosen), margin=70, on_select="rerun",
                  key=chart_key, selection_mode="patch", width="content")
        patch = ui.sticky(st.selectbox, "Patch (or click one above)", list(range(n_patches)), f"{key}.patch",
                          format_func=lambda p: f"patch {p}: row {p // g[1]}, col {p % g[1]}")
    rows = v.array("flow.rows", image)  # (layers, steps, keys)
    lo, _ = image_span(v, rows.shape[-1])
    read = rows[:, : len(tokens), lo + patch].T  # (tokens, layers)
    layers = v.field("layers") or list(range(rows.shape[0]))
    with c2:
        chart(render.heatmap(read, [f"{i}:{t}" for i, t in enumerate(tokens)], [f"layer {i}" for i in layers],
                             value="attention", row_title="token", col_title="layer", select="cell",
                             title=f"Attention each token pays to patch {patch} (click a row: its token)"),
              on_select="rerun", key=f"{key}.readout_chart", selection_mode="cell")
        mean = read.mean(1)
        order = np.argsort(-mean)[:5]
        st.markdown("Tokens reading it most (mean over layers): " + ", ".join(
            f"`{tokens[i]}` ({mean[i]:.3f})" for i in order))


# ------------------------------------------------------------------------------ ablation
def ablation_drop_chart(v: RunView) -> alt.Chart:
    drop = v.array("ablation.drop")  # (variants, images)
    variants = v.field("variants") or []
    acc = v.field("accuracy") or {}
    df = pd.DataFrame({
        "variant": [str(x.get("name", i)) for i, x in enumerate(variants)],
        "kind": [str(x.get("kind", "")) for x in variants],
        "drop": drop.mean(1).astype(float),
        "exact": [float((acc.get(str(x.get("name"))) or {}).get("exact", np.nan)) for x in variants],
        "objects": [float((acc.get(str(x.get("name"))) or {}).get("objects", np.nan)) for x in variants],
    })
    return alt.Chart(df).mark_bar().encode(
        x=alt.X("variant:N", sort=None, title="variant"), y=alt.Y("drop:Q", title="mean log-prob drop (nats/token)"),
        color=alt.Color("kind:N"),
        tooltip=["variant", "kind", alt.Tooltip("drop:Q", format=".4f"), alt.Tooltip("exact:Q", format=".2f"),
                 alt.Tooltip("objects:Q", format=".2f")],
    ).properties(title="Drop per variant (mean over images)", height=300)


def ablation_heads_chart(v: RunView) -> alt.Chart | None:
    if "ablation.heads" not in v.arrays:
        return None
    heads = v.array("ablation.heads")
    layers = v.field("layers") or list(range(heads.shape[0]))
    return render.heatmap(heads, [f"layer {i}" for i in layers], [f"head {h}" for h in range(heads.shape[1])],
                          value="drop", row_title="layer", col_title="head",
                          title=f"Log-prob drop per ablated head ({v.field('head_scope', '')}); hover for values")


def highlight_changes(reference: str, caption: str) -> str:
    """`caption` as Markdown with the words that differ from `reference` highlighted."""
    ref, new = reference.split(), caption.split()
    out = []
    for op, _, _, j1, j2 in difflib.SequenceMatcher(a=ref, b=new, autojunk=False).get_opcodes():
        words = [md_escape(w) for w in new[j1:j2]]
        if op == "equal":
            out += words
        elif words:
            out += [f":red-background[{w}]" for w in words]
        else:
            out.append(":gray-background[~~deleted~~]")
    return " ".join(out) if out else "*(empty)*"


def md_escape(s: str) -> str:
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|~<>:$])", r"\\\1", s)


def ablation_captions(v: RunView, image: int) -> None:
    variants = v.field("variants") or []
    reference = (v.field("reference") or [""])[image] if image < len(v.field("reference") or []) else ""
    captions = v.field("captions") or []
    changed = v.field("changed") or []
    drop = v.array("ablation.drop")
    st.markdown(f"**Reference caption**: {md_escape(reference)}")
    lines = []
    for k, var in enumerate(variants):
        cap = captions[k][image] if k < len(captions) and image < len(captions[k]) else ""
        if not cap:
            continue
        n_changed = len(changed[k][image]) if k < len(changed) and image < len(changed[k]) else 0
        lines.append(f"- `{var.get('name', k)}` (drop {float(drop[k, image]):+.3f}, {n_changed} token positions "
                     f"changed): {highlight_changes(reference, cap)}")
    if lines:
        st.markdown("\n".join(lines))
    else:
        st.caption("This run generated no captions per variant (`--no-generate`).")


def removed_cells(v: RunView, variant: int, image: int) -> np.ndarray | None:
    """(rows, cols) bool of the patches a variant removed, when the run stored them
    (``ablation.removed``: (variants, images, image tokens or patches))."""
    shape = v.shape("ablation.removed")
    g = grid_of(v)
    if shape is None or len(shape) != 3:
        return None
    r = v.array("ablation.removed", variant, image).astype(bool)
    n = r.shape[-1]
    if g is None:
        side = int(round(np.sqrt(n - 1 if int(np.sqrt(n)) ** 2 != n else n)))
        g = (side, side)
    cells = g[0] * g[1]
    if n == cells:
        return r.reshape(g)
    lo, hi = image_span(v, n)
    if hi - lo == cells:
        return r[lo:hi].reshape(g)
    return r[n - cells:].reshape(g) if n > cells else None


def ablation_removed(v: RunView, image: int, key: str) -> None:
    variants = v.field("variants") or []
    region = [k for k, x in enumerate(variants) if x.get("removed_tokens") is not None]
    if not region:
        st.caption("No variant of this run removes image patches.")
        return
    k = ui.sticky(st.selectbox, "Variant that removes patches", region, f"{key}.variant",
                  format_func=lambda i: str(variants[i].get("name", i)))
    counts = variants[k].get("removed_tokens") or []
    n = counts[image] if isinstance(counts, list) and image < len(counts) else "?"
    img = v.image(image)
    cells = removed_cells(v, k, image)
    if img is not None and cells is not None:
        what = f"{variants[k].get('name')}: {int(cells.sum())} patches removed"
        show_png(render.image_with_cells(img, cells, what), caption=what)
    else:
        st.info(f"`{variants[k].get('name')}` removed {n} image tokens of this image. This run did not store which "
                "ones (no `ablation.removed` and `input.image` arrays), so they cannot be drawn.")


# ------------------------------------------------------------------------------ attribution kinds
MapSource = Callable[[int, int], np.ndarray]  # (image, step) -> (rows, cols)


def attribution_sources(v: RunView) -> dict[str, MapSource]:
    """Named maps of an attribution-like run: name -> f(image, step) on the patch grid."""
    kind = v.kind
    if kind == "attribution":
        methods = [str(m) for m in v.field("methods") or []]
        if v.field("objects") and "attribution.feature-ablation.objects" in v.arrays:
            methods.append("feature-ablation.objects")
        return {m: (lambda i, s, m=m: on_grid(v, v.array(f"attribution.{m}", i, s))) for m in methods
                if f"attribution.{m}" in v.arrays}
    if kind == "relevancy":
        return {str(v.field("method", "relevancy")): lambda i, s: on_grid(v, v.array("relevancy", i, s))}
    if kind == "rollout":
        if not v.field("captioner"):
            return {"rollout (CLS row)": lambda i, s: np.asarray(v.array("rollout.cls_map", i), dtype=np.float32)}

        def composed(i: int, s: int, name: str = "rollout") -> np.ndarray:
            row = v.array(name, i, s)
            lo, hi = image_span(v, row.shape[-1])
            return on_grid(v, row[lo:hi])

        out: dict[str, MapSource] = {"rollout (composed)": composed}
        if "rollout.text_rows" in v.arrays:
            out["text rows before composition"] = lambda i, s: composed(i, s, "rollout.text_rows")
        return out
    if kind == "attention-flow":
        def rollout_row(i: int, s: int) -> np.ndarray:
            row = v.array("flow.rollout", i, 0)
            lo, hi = image_span(v, row.shape[-1])
            return on_grid(v, row[lo:hi])

        return {"attention flow": lambda i, s: np.asarray(v.array("flow.map", i), dtype=np.float32),
                "rollout (same layers)": rollout_row}
    return {}


def attribution_controls(v: RunView, key: str) -> dict[str, Any]:
    image = ui.image_picker(v, f"{key}.image")
    tokens = tokens_of(v, image) if (v.field("captioner") or v.kind == "attribution") else []
    caps = v.field("captions") or []
    if v.field("captioner") and image < len(caps):
        st.markdown(f"**Caption**: {html.escape(str(caps[image]))}")
    step = ui.token_picker(tokens, f"{key}.token.{v.id}.{image}") if len(tokens) > 1 else 0
    if len(tokens) == 1:
        st.caption(f"target: {tokens[0]}")
    return {"image": image, "step": step, "tokens": tokens}


def attribution_panel(v: RunView, ctl: dict[str, Any], methods: Sequence[str] | None = None) -> None:
    sources = attribution_sources(v)
    if not sources:
        st.info(f"No maps in this {v.kind} run.")
        return
    names = [m for m in (methods or sources) if m in sources] or list(sources)
    image = ctl["image"]
    tokens = tokens_of(v, image)
    step = min(ctl["step"], max(len(tokens) - 1, 0))
    maps = [sources[m](image, step) for m in names]
    what = f"token {step} {tokens[step]!r}" if v.field("captioner") and tokens else "the target"
    signed = any(float(np.nanmin(m)) < 0 for m in maps if m.size)
    show_png(render.map_strip(v.image(image), maps, names, label="attribution", shared=False, panel=2.3,
                              suptitle=f"{v.kind}: maps of {what}" + (" (red: raises the target, blue: lowers it)"
                                                                        if signed else "")))
    top = v.field("top_patches")
    if isinstance(top, list) and image < len(top) and top[image]:
        t = top[image][step] if isinstance(top[image][0], list) and step < len(top[image]) else top[image]
        st.caption(f"top patches (row-major): {t}")


def attribution_details(v: RunView) -> None:
    if v.kind == "attribution":
        refs = v.field("references") or {}
        if refs:
            st.markdown("\n".join(f"- **{k}**: {md_escape(str(r))}" for k, r in refs.items()))
        ig = "attribution.integrated-gradients"
        if f"{ig}.delta" in v.arrays:
            d = np.abs(v.array(f"{ig}.delta"))
            gap = np.abs(v.array(f"{ig}.f_in") - v.array(f"{ig}.f_base"))
            asked = np.abs(v.array(ig)).sum(-1) > 0
            ok = asked & (gap > 0)
            st.markdown(f"Integrated-gradients completeness: median |delta| {np.median(d[asked]) if asked.any() else 0:.3g}, "
                        f"median |delta| / |f(x) - f(baseline)| {np.median(d[ok] / gap[ok]) if ok.any() else 0:.3g} "
                        f"over {int(asked.sum())} targets ({v.field('n_steps')} steps, baseline {v.field('baseline')}).")
    elif v.kind in ("rollout", "attention-flow"):
        keys = ["fusion", "discard_ratio", "start_layer", "signed", "depth", "max_error", "source_span"]
        st.caption(", ".join(f"{k} = {v.field(k)}" for k in keys if v.field(k) is not None))
        stats = v.field("pattern_stats")
        if isinstance(stats, list) and stats:
            with st.expander("Raw pattern statistics per layer (negative share, row-sum range)"):
                st.dataframe(pd.DataFrame(stats), width="stretch")
    elif v.kind == "relevancy" and "relevancy.target" in v.arrays:
        st.caption(f"method {v.field('method')}; the explained score per step is stored as `relevancy.target`.")


# ------------------------------------------------------------------------------ faithfulness
def faithfulness_table(v: RunView) -> pd.DataFrame:
    rows = v.field("scores") or []
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    table = df.pivot_table(index="method", columns="metric", values="value", aggfunc="first")
    order = [m for m in v.field("methods") or [] if m in table.index]
    table = table.loc[order + [m for m in table.index if m not in order]]
    base = df.dropna(subset=["baseline"]).groupby("metric")["baseline"].first() if "baseline" in df else None
    if base is not None and len(base):
        table.loc["random baseline"] = base.reindex(table.columns)
    return table


def faithfulness_curves(v: RunView, which: str) -> alt.Chart | None:
    fractions = v.field("fractions") or []
    recs = []
    for name in v.arrays:
        if not name.startswith(which + "."):
            continue
        curves = v.array(name)  # (targets, K)
        if curves.size == 0:
            continue
        mean = curves.mean(0)
        for k, y in enumerate(mean):
            recs.append({"method": name.split(".", 1)[1], "fraction removed" if which == "deletion" else
                         "fraction inserted": fractions[k] if k < len(fractions) else k, "log-prob": float(y)})
    if not recs:
        return None
    x = "fraction removed" if which == "deletion" else "fraction inserted"
    return alt.Chart(pd.DataFrame(recs)).mark_line(point=True).encode(
        x=alt.X(f"{x}:Q"), y=alt.Y("log-prob:Q", title="mean log-prob of the word"),
        color="method:N", strokeDash=alt.condition("datum.method == 'random'", alt.value([4, 3]), alt.value([1, 0])),
        tooltip=["method", alt.Tooltip(f"{x}:Q", format=".2f"), alt.Tooltip("log-prob:Q", format=".3f")],
    ).properties(title=f"{which.capitalize()} curves (mean over targets)", height=280)


def faithfulness_targets(v: RunView, key: str) -> None:
    words = v.field("words") or []
    if not words:
        st.caption("No scored targets.")
        return
    t = ui.sticky(st.selectbox, "Scored word", list(range(len(words))), f"{key}.target",
                  format_func=lambda i: f"{i}: image {words[i].get('image')} · {words[i].get('word')} "
                                        f"({words[i].get('kind')}, object {words[i].get('obj')})")
    w = words[t]
    methods = [m for m in v.field("methods") or [] if f"maps.{m}" in v.arrays]
    maps = [on_grid(v, v.array(f"maps.{m}", t)) for m in methods]
    mask = v.array("masks", t) if "masks" in v.arrays else None
    img = v.image(int(w.get("image", 0)))
    show_png(render.map_strip(img, maps, methods, label="map", shared=False, panel=1.8,
                              masks=[mask] * len(maps), suptitle=f"{w.get('word')!r}: each method's map, "
                                                                  "the object's exact mask outlined"))


# ------------------------------------------------------------------------------ cross-attention accounting
def ca_table(v: RunView, what: str) -> pd.DataFrame:
    """Per model: each group's count (millions), the total and the cross-attention share (%)."""
    models = v.field("models") or {}
    recs = {}
    for name, d in models.items():
        part = (d or {}).get(what) or {}
        row = {g: round(float(x) / 1e6, 3) for g, x in (part.get("groups") or {}).items()}
        row["total"] = round(float(part.get("total") or 0) / 1e6, 3)
        row["cross-attention %"] = round(100 * float(part.get("cross_attention_share") or 0), 2)
        recs[name] = row
    df = pd.DataFrame(recs).T
    df.columns = [f"{c} (M)" if c != "cross-attention %" else c for c in df.columns]
    return df


def ca_chart(v: RunView, what: str) -> alt.Chart:
    models = v.field("models") or {}
    recs = [{"model": n, "group": g, what: float(x), "share": float(x) / max(float((d.get(what) or {}).get("total") or 1), 1)}
            for n, d in models.items() for g, x in ((d.get(what) or {}).get("groups") or {}).items()]
    return alt.Chart(pd.DataFrame(recs)).mark_bar().encode(
        y=alt.Y("model:N"), x=alt.X(f"{what}:Q", stack="normalize", title=f"share of {what}"),
        color=alt.Color("group:N"), tooltip=["model", "group", alt.Tooltip(f"{what}:Q", format=",.0f"),
                                             alt.Tooltip("share:Q", format=".1%")],
    ).properties(title=f"{what} per group (share of the total)", height=70 * len(models) + 40)


def fusion_rows(runs: Sequence[RunView]) -> pd.DataFrame:
    """One row per model over the stored ca-params runs (newest first wins): fusion kind, cross-
    attention presence and share, from the results and the manifests' capabilities."""
    rows: dict[str, dict[str, Any]] = {}
    for v in runs:
        caps = {}
        m = v.manifest.get("model") or {}
        for d in (m.get("models") if isinstance(m.get("models"), list) else [m]):
            if isinstance(d, dict) and isinstance(d.get("capabilities"), dict):
                caps[d.get("name")] = d["capabilities"]
        for name, d in (v.field("models") or {}).items():
            if name in rows:
                continue
            c = caps.get(name, {})
            p, f = d.get("params") or {}, d.get("flops") or {}
            rows[name] = {
                "fusion": d.get("fusion", c.get("fusion", "?")),
                "cross-attention modules": "yes" if c.get("has_cross_attention") else "no" if c else "?",
                "attention weights": c.get("attention_weights", "?"),
                "cross-attention params": (p.get("groups") or {}).get("cross_attention"),
                "x-attn % params": round(100 * float(p.get("cross_attention_share") or 0), 2),
                "x-attn % FLOPs": round(100 * float(f.get("cross_attention_share") or 0), 2),
                "size counted": d.get("size", "?"), "run": v.id,
            }
    return pd.DataFrame(rows).T


# ------------------------------------------------------------------------------ labelled grids (patching and any run)
def grids_of(v: RunView) -> dict[str, dict[str, Any]]:
    g = v.field("grids")
    return {str(k): d for k, d in g.items() if isinstance(d, dict)} if isinstance(g, dict) else {}


def grid_panel(v: RunView, name: str, spec: dict[str, Any]) -> None:
    """A labelled grid of a result's ``grids`` field: heat map with hover, and its values as a table."""
    a = v.array(name)
    if a.ndim != 2:
        st.warning(f"grid {name!r} is {a.shape}, not 2-D; shown flattened to 2-D.")
        a = a.reshape(a.shape[0] if a.ndim else 1, -1)
    rows = [str(x) for x in spec.get("rows") or range(a.shape[0])]
    cols = [str(x) for x in spec.get("cols") or range(a.shape[1])]
    if (len(rows), len(cols)) != a.shape:
        st.warning(f"grid {name!r}: {len(rows)} row and {len(cols)} column labels for an array of shape {a.shape}; "
                   "positions are used instead")
        rows, cols = [str(i) for i in range(a.shape[0])], [str(j) for j in range(a.shape[1])]
    value = str(spec.get("value") or "value")
    chart(render.heatmap(a, rows, cols, value=value, title=str(spec.get("title") or name),
                         height=max(120, min(26 * len(rows), 600))))
    with st.expander(f"values of {name}"):
        st.dataframe(pd.DataFrame(a, index=render.unique_labels(rows), columns=render.unique_labels(cols)),
                     width="stretch")


# ------------------------------------------------------------------------------ generic
def summary_frame(result: dict[str, Any]) -> pd.DataFrame:
    """The result's fields, one line each: scalars as they are, lists and dicts by their size."""
    recs = []
    for k, x in result.items():
        if isinstance(x, list):
            desc = f"list of {len(x)}: " + json.dumps(x)[:120]
        elif isinstance(x, dict):
            desc = f"{len(x)} keys: " + ", ".join(map(str, list(x)[:12]))
        else:
            desc = json.dumps(x)
        recs.append({"field": k, "value": desc})
    return pd.DataFrame(recs)


def arrays_frame(v: RunView) -> pd.DataFrame:
    return pd.DataFrame([{"array": k, "shape": " x ".join(map(str, s)) or "scalar", "dtype": d,
                          "values": int(np.prod(s)) if s else 1} for k, (s, d) in sorted(v.arrays.items())])


def array_explorer(v: RunView, key: str) -> None:
    """A heat map of any 2-D view of any stored array: leading indices chosen, the last two shown."""
    names = [k for k, (s, _) in sorted(v.arrays.items()) if len(s) >= 1]
    if not names:
        st.caption("This run stored no arrays.")
        return
    name = ui.sticky(st.selectbox, "Array", names, f"{key}.array.{v.id}")
    shape = v.arrays[name][0]
    if 0 in shape:
        st.caption(f"{name} is empty (shape {' x '.join(map(str, shape))}): nothing to draw.")
        return
    index: list[int] = []
    if len(shape) > 2:
        cols = st.columns(len(shape) - 2)
        for d in range(len(shape) - 2):
            with cols[d]:
                index.append(int(st.number_input(f"index {d} (0-{shape[d] - 1})", 0, shape[d] - 1, 0,
                                                 key=f"{key}.idx.{v.id}.{name}.{d}")))
    a = np.asarray(v.array(name, *index))
    if a.dtype == np.uint8 and a.ndim == 3 and a.shape[-1] == 3:
        st.image(a, caption=f"{name}[{', '.join(map(str, index))}] as an image")
        return
    if a.ndim == 1:
        a = a[None, :]
    a = a.astype(np.float32)
    title = f"{name}[{', '.join(map(str, index))}]" if index else name
    if a.size <= 4096:
        chart(render.heatmap(a, [str(i) for i in range(a.shape[0])], [str(j) for j in range(a.shape[1])],
                             value="value", row_title="row", col_title="column", title=title,
                             height=max(80, min(14 * a.shape[0], 500))))
    else:
        show_png(render.array_png(a, title))
    finite = a[np.isfinite(a)]
    if finite.size:
        st.caption(f"{a.shape}: min {finite.min():.4g}, max {finite.max():.4g}, mean {finite.mean():.4g}"
                   + (f", {a.size - finite.size} non-finite" if finite.size < a.size else ""))


def scatter_explorer(v: RunView, key: str) -> None:
    """An interactive scatter of any (n, 2) array, coloured by any per-point list of the result
    (labels, modality): the generic form of an embedding view such as UMAP."""
    pairs = [k for k, (s, _) in sorted(v.arrays.items()) if len(s) == 2 and s[1] == 2 and s[0] >= 8]
    hint = re.compile(r"umap|embed|xy|2d|coord|proj", re.I)
    pairs.sort(key=lambda k: not hint.search(k))  # embedding-like names first
    if not pairs:
        return
    st.subheader("Scatter of a 2-D embedding")
    name = ui.sticky(st.selectbox, "Points (n x 2 array)", pairs, f"{key}.scatter.{v.id}")
    xy = v.array(name)
    n = xy.shape[0]
    colour_fields = [k for k, x in v.result.items() if isinstance(x, list) and len(x) == n
                     and all(isinstance(e, str | int | float | bool) for e in x)]
    colour = ui.sticky(st.selectbox, "Colour by", ["(none)", *colour_fields], f"{key}.scatter_colour.{v.id}")
    df = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "point": np.arange(n)})
    enc: dict[str, Any] = {"x": "x:Q", "y": "y:Q", "tooltip": ["point:Q", "x:Q", "y:Q"]}
    if colour != "(none)":
        df[colour] = [str(e) for e in v.result[colour]]
        enc["color"] = f"{colour}:N"
        enc["tooltip"] = [*enc["tooltip"], f"{colour}:N"]
    chart(alt.Chart(df).mark_circle(size=40, opacity=0.8).encode(**enc).interactive()
          .properties(height=420, title=name), margin=80)


def record_tables(v: RunView) -> dict[str, pd.DataFrame]:
    """The result's fields that are lists of flat records (rows of scores, pairs, layers), as tables."""
    out = {}
    for k, x in v.result.items():
        if isinstance(x, list) and x and all(isinstance(e, dict) for e in x) and len(x) <= 5000:
            flat = [{c: (json.dumps(val) if isinstance(val, list | dict) else val) for c, val in e.items()} for e in x]
            out[k] = pd.DataFrame(flat)
    return out


def generic_panel(v: RunView, key: str, explore: bool = True, grids: bool = True) -> None:
    """Any run: its fields, labelled grids, tables of records, arrays (shapes from the header, any
    2-D slice as a heat map, any (n, 2) array as a scatter) and figures."""
    st.dataframe(summary_frame(v.result), hide_index=True, width="stretch")
    with st.expander("result.json"):
        st.json(v.result, expanded=False)
    for name, spec in grids_of(v).items() if grids else ():
        if name in v.arrays:
            grid_panel(v, name, spec)
    for name, table in record_tables(v).items():
        with st.expander(f"{name}: {len(table)} rows"):
            st.dataframe(table, hide_index=True, width="stretch")
    st.subheader("Arrays")
    st.dataframe(arrays_frame(v), hide_index=True, width="stretch")
    if explore:
        array_explorer(v, key)
        scatter_explorer(v, key)
    st.subheader("Figures")
    ui.figures(v)


# ------------------------------------------------------------------------------ probes
PROBE_MEASURES = ("accuracy", "control", "baseline", "selectivity")


def layer_name(hook: str) -> str:
    """A short layer name: ``vision.blocks.3.resid_post`` -> ``vision 3``."""
    m = re.fullmatch(r"([a-z_]+)\.blocks\.(\d+)\.resid_post", str(hook))
    return f"{m.group(1)} {m.group(2)}" if m else str(hook)


def probe_frame(v: RunView) -> pd.DataFrame:
    """Per layer: accuracy with its 95% bootstrap interval, control, baseline and selectivity, from
    the arrays (``accuracy``, ``ci``, ...), else from the ``scores`` field."""
    hooks = [str(h) for h in v.field("layers") or []]
    scores = [s for s in v.field("scores") or [] if isinstance(s, dict)]
    n = len(hooks) or len(scores)
    cols: dict[str, np.ndarray] = {}
    for m in PROBE_MEASURES:
        if m in v.arrays and v.shape(m) == (n,):
            cols[m] = np.asarray(v.array(m), dtype=float)
        else:
            cols[m] = np.array([float(s.get(m, np.nan)) for s in scores[:n]] + [np.nan] * (n - len(scores[:n])))
    if "ci" in v.arrays and v.shape("ci") == (n, 2):
        ci = np.asarray(v.array("ci"), dtype=float)
    else:
        ci = np.array([[float(s.get("ci_lo", np.nan)), float(s.get("ci_hi", np.nan))] for s in scores[:n]]
                      + [[np.nan, np.nan]] * (n - len(scores[:n]))).reshape(n, 2)
    names = [layer_name(h) for h in hooks] if hooks else [layer_name(s.get("hook", i)) for i, s in enumerate(scores)]
    df = pd.DataFrame({"layer": names, **cols, "ci_lo": ci[:, 0], "ci_hi": ci[:, 1]})
    for extra in ("rows", "images"):
        if scores and all(extra in s for s in scores[:n]) and len(scores) >= n:
            df[extra] = [s[extra] for s in scores[:n]]
    df["hook"] = hooks or [str(s.get("hook", "")) for s in scores[:n]]
    return df


def probe_chart(v: RunView, height: int = 300) -> alt.Chart:
    """Accuracy (with its interval), control, baseline and selectivity per layer."""
    df = probe_frame(v)
    order = list(df["layer"])
    long = df.melt(id_vars=["layer"], value_vars=list(PROBE_MEASURES), var_name="measure", value_name="value")
    x = alt.X("layer:N", sort=order, title="layer")
    lines = alt.Chart(long).mark_line(point=True).encode(
        x=x, y=alt.Y("value:Q", title="accuracy / selectivity"),
        color=alt.Color("measure:N", scale=alt.Scale(domain=list(PROBE_MEASURES),
                                                     range=["#1f77b4", "#ff7f0e", "#7f7f7f", "#2ca02c"])),
        strokeDash=alt.condition("datum.measure == 'baseline' || datum.measure == 'control'",
                                 alt.value([4, 3]), alt.value([1, 0])),
        tooltip=["layer", "measure", alt.Tooltip("value:Q", format=".3f")])
    bars = alt.Chart(df).mark_errorbar(ticks=True, color="#1f77b4").encode(
        x=x, y=alt.Y("ci_lo:Q", title="accuracy / selectivity"), y2="ci_hi:Q",
        tooltip=["layer", alt.Tooltip("accuracy:Q", format=".3f"), alt.Tooltip("ci_lo:Q", format=".3f", title="95% lo"),
                 alt.Tooltip("ci_hi:Q", format=".3f", title="95% hi")])
    what = f"{v.field('target', '?')} from {v.field('tokens', '?')} tokens"
    return (bars + lines).properties(height=height, title=alt.TitleParams(
        f"Probe of {what}, per layer", subtitle="accuracy with its 95% bootstrap interval over images; control task; "
        "majority baseline; selectivity = accuracy - control", anchor="start"))


def probe_patch_maps(v: RunView, key: str) -> None:
    """``patch_accuracy`` (layers, rows, cols): the chosen layer's heat map (hover for values) and
    every layer side by side on one scale; NaN where no patch was labelled."""
    shape = v.shape("patch_accuracy")
    if shape is None or len(shape) != 3 or 0 in shape:
        return
    names = list(probe_frame(v)["layer"])
    names = names if len(names) == shape[0] else [f"layer {i}" for i in range(shape[0])]
    st.subheader("Accuracy per patch position")
    k = ui.sticky(st.selectbox, "Layer", list(range(shape[0])), f"{key}.patch_layer", format_func=lambda i: names[i])
    acc = np.asarray(v.array("patch_accuracy", k), dtype=np.float32)
    c1, c2 = st.columns([2, 3])
    with c1:
        chart(render.heatmap(acc, [f"r{i}" for i in range(shape[1])], [f"c{j}" for j in range(shape[2])],
                             value="accuracy", row_title="patch row", col_title="patch column", domain=(0.0, 1.0),
                             title=f"{names[k]}: accuracy per patch",
                             height=max(160, min(24 * shape[1], 480))), margin=90)
    with c2:
        maps = [np.asarray(v.array("patch_accuracy", i), dtype=np.float32) for i in range(shape[0])]
        show_png(render.map_strip(None, maps, names, label="accuracy", panel=1.6, ncols=4, fixed=(0.0, 1.0)),
                 caption="every layer on one scale (0 to 1); blank: no labelled patch at that position")


# ------------------------------------------------------------------------------ representations (UMAP)
UMAP_CAVEAT = ("UMAP is for looking: its coordinates are not reproducible bit for bit, and distances and cluster "
               "sizes in it mean little. The modality gap and the separability are measured in the original space.")


def representation_frame(v: RunView) -> pd.DataFrame:
    """Per layer pair: its name and hooks, the modality gap and the separability (from the arrays
    ``gap``, ``separability``; NaN for skipped pairs), the counts, and why a pair was skipped."""
    pairs = [p for p in v.field("pairs") or [] if isinstance(p, dict)]
    n = len(pairs)

    def measure(name: str) -> list[float]:
        if name in v.arrays and v.shape(name) == (n,):
            return [float(x) for x in np.asarray(v.array(name), dtype=float)]
        return [float(p[name]) if isinstance(p.get(name), int | float) else np.nan for p in pairs]

    df = pd.DataFrame({"pair": [str(p.get("name", k)) for k, p in enumerate(pairs)],
                       "gap": measure("gap"), "separability": measure("separability")})
    for c in ("image_hook", "text_hook", "n_image", "n_text", "dim", "skipped"):
        if any(c in p for p in pairs):
            df[c] = [p.get(c, "") for p in pairs]
    df["umap"] = [f"umap.{k}" in v.arrays for k in range(n)]
    return df


def representation_chart(v: RunView) -> alt.Chart:
    """The modality gap and the linear separability (chance 0.5) per layer pair."""
    df = representation_frame(v)
    order = list(df["pair"])
    gap = alt.Chart(df).mark_line(point=True).encode(
        x=alt.X("pair:N", sort=order, title="layer"), y=alt.Y("gap:Q", title="modality gap", scale=alt.Scale(zero=True)),
        tooltip=["pair", alt.Tooltip("gap:Q", format=".4f")]).properties(
        title="Modality gap |mean(img/|img|) - mean(txt/|txt|)|", height=220, width=320)
    sep = alt.Chart(df).mark_line(point=True, color="#e45756").encode(
        x=alt.X("pair:N", sort=order, title="layer"),
        y=alt.Y("separability:Q", title="accuracy", scale=alt.Scale(domain=[0.4, 1.0])),
        tooltip=["pair", alt.Tooltip("separability:Q", format=".3f")])
    chance = alt.Chart(pd.DataFrame({"y": [0.5]})).mark_rule(strokeDash=[4, 3], color="grey").encode(y="y:Q")
    return alt.hconcat(gap, (sep + chance).properties(
        title="Linear separability of image vs text (grouped CV; chance 0.5)", height=220, width=320))


def label_names(v: RunView) -> tuple[str, ...]:
    """The class names of the result's ``label`` (colour, shape, ...), as the activation data set names them."""
    from probe.data.activations import TARGETS  # light: class names only

    return tuple(TARGETS.get(str(v.field("label", "")), ()))


def umap_points(v: RunView, k: int) -> pd.DataFrame:
    """The UMAP points of layer pair `k`: x, y, modality (image / text) and the label's class name."""
    xy = np.asarray(v.array(f"umap.{k}"), dtype=np.float32)
    n = len(xy)
    mod = np.asarray(v.array(f"umap_modality.{k}")).astype(int) if f"umap_modality.{k}" in v.arrays else np.full(n, -1)
    lab = np.asarray(v.array(f"umap_label.{k}")).astype(int) if f"umap_label.{k}" in v.arrays else np.full(n, -1)
    if len(mod) != n or len(lab) != n:
        raise ValueError(f"umap.{k} has {n} points but its modality / label arrays have {len(mod)} / {len(lab)}")
    classes = label_names(v)
    return pd.DataFrame({
        "x": xy[:, 0], "y": xy[:, 1], "point": np.arange(n),
        "modality": [{0: "image", 1: "text"}.get(int(m), "?") for m in mod],
        "label": ["none" if c < 0 else classes[c] if c < len(classes) else str(c) for c in lab]})


def umap_chart(df: pd.DataFrame, colour: str, title: str, size: int = 420, label: str = "label",
               zoom: str = "zoom") -> alt.Chart:
    """An interactive scatter (zoom and pan, the selection `zoom`; hover for the point) coloured by
    ``modality`` or ``label`` (then the modality is the marker's shape)."""
    enc: dict[str, Any] = {
        "x": alt.X("x:Q", axis=None), "y": alt.Y("y:Q", axis=None),
        "tooltip": ["point:Q", "modality:N", alt.Tooltip("label:N", title=label)]}
    if colour == "modality":
        enc["color"] = alt.Color("modality:N", scale=alt.Scale(domain=["image", "text"], range=["#4c78a8", "#f58518"]))
    else:
        enc["color"] = alt.Color("label:N", title=label)
        enc["shape"] = alt.Shape("modality:N", scale=alt.Scale(domain=["image", "text"], range=["circle", "triangle"]))
    return (alt.Chart(df).mark_point(size=28, filled=True, opacity=0.75).encode(**enc)
            .add_params(alt.selection_interval(bind="scales", name=zoom)).properties(title=title, height=size))


def umap_panel(v: RunView, ctl: dict[str, Any]) -> None:
    """One run's UMAP of the chosen layer pair, coloured as chosen, with that pair's gap and separability."""
    df = representation_frame(v)
    k = int(ctl["pair"])
    if k >= len(df) or f"umap.{k}" not in v.arrays:
        st.info(f"This run has no UMAP for layer pair {k}" + (" (it was run with --no-umap)" if not df["umap"].any()
                                                             else "") + ".")
        return
    row = df.iloc[k]
    what = str(v.field("label", "label"))
    chart(umap_chart(umap_points(v, k), ctl["colour"], f"{row['pair']}: image and text tokens, by "
                     + ("modality" if ctl["colour"] == "modality" else what), label=what), margin=80)
    st.caption(f"{row['pair']}: modality gap {row['gap']:.3f}, separability {row['separability']:.3f} "
               "(both in the original space)")


def umap_every_layer(v: RunView, colour: str, limit: int = 16) -> None:
    """The UMAP of every layer pair (up to `limit`), small, coloured alike: how the modalities
    separate or mix with depth."""
    df = representation_frame(v)
    ks = [k for k in range(len(df)) if df["umap"].iloc[k]][:limit]
    if len(ks) < 2:
        return
    what = str(v.field("label", "label"))
    charts = [umap_chart(umap_points(v, k), colour, str(df["pair"].iloc[k]), size=200, label=what, zoom=f"zoom{k}")
              .properties(width=200) for k in ks]
    chart(alt.concat(*charts, columns=4).resolve_scale(color="shared", shape="shared"), width="content")


def umap_controls(v: RunView, key: str) -> dict[str, Any]:
    df = representation_frame(v)
    pairs = [k for k in range(len(df)) if df["umap"].iloc[k]] or list(range(len(df)))
    what = str(v.field("label", "label"))
    c1, c2 = st.columns(2)
    with c1:
        k = ui.sticky(st.selectbox, "Layer", pairs, f"{key}.pair", format_func=lambda i: str(df["pair"].iloc[i]))
    with c2:
        colour = ui.sticky(st.radio, "Colour by", ["modality", "label"], f"{key}.colour", horizontal=True,
                           format_func=lambda c: "modality (image / text)" if c == "modality" else f"label ({what})")
    return {"pair": k if k is not None else 0, "colour": colour}


# ------------------------------------------------------------------------------ logit lens
def lens_tokens(v: RunView, image: int, layer: int) -> list[str]:
    """The lens's top-1 token per patch (row-major) of one image at one layer index, as strings."""
    ids = np.asarray(v.array("lens.image.top1", image, layer)).astype(int).ravel()
    vocab = v.field("vocab") or {}
    return [str(vocab.get(str(t), f"#{t}")) for t in ids]


def lens_patch_view(v: RunView, key: str) -> None:
    """The per-patch top-1 lens token drawn over the image, per layer, and the most frequent tokens."""
    shape = v.shape("lens.image.top1")
    if shape is None or len(shape) != 3 or 0 in shape:
        st.caption("This run read no visual tokens (a model whose image tokens are not in the decoder stream).")
        return
    layers = [int(i) for i in v.field("layers") or []]
    layers = layers if len(layers) == shape[1] else list(range(shape[1]))
    st.subheader("What each patch says at each layer")
    c1, c2 = st.columns([1, 1])
    with c1:
        image = ui.image_picker(v, f"{key}.image")
    with c2:
        li = ui.sticky(st.selectbox, "Layer", list(range(len(layers))), f"{key}.layer",
                       format_func=lambda i: f"layer {layers[i]}")
    image = min(image, shape[0] - 1)
    n = shape[2]
    side = int(round(np.sqrt(n)))
    grid = (side, n // side) if side and side * (n // side) == n else (1, n)
    img = v.image(image)
    toks = lens_tokens(v, image, li)
    caps = v.field("captions") or []
    cap = f" (caption: {caps[image]})" if image < len(caps) else ""
    show_png(render.token_grid(img, toks, grid, title=f"layer {layers[li]}: the lens's top-1 token per patch"),
             caption=f"image {image}, layer {layers[li]}: top-1 token per patch{cap}")
    recs = []
    for j, layer in enumerate(layers):
        counts = pd.Series(lens_tokens(v, image, j)).value_counts()
        recs.append({"layer": f"layer {layer}", "most frequent top-1 tokens (patches)":
                     ", ".join(f"{t!r} ({c})" for t, c in counts.head(6).items())})
    st.dataframe(pd.DataFrame(recs), hide_index=True, width="stretch")
