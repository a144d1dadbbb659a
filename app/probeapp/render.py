"""Pure figure and chart builders: numpy in, PNG bytes or an Altair chart out. No Streamlit, no store.

Maps over the patch grid are drawn over the image as the model saw it, with a colour bar; a map
with negative values (integrated gradients, occlusion) gets a diverging scale centred on 0.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import altair as alt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

SEQUENTIAL = "inferno"
DIVERGING = "RdBu_r"


def png(fig: Figure, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def limits(maps: Sequence[np.ndarray]) -> tuple[float, float, str]:
    """(vmin, vmax, colour map) shared by `maps`: 0..max for non-negative maps, symmetric
    around 0 with a diverging map when any value is negative."""
    finite = [m[np.isfinite(m)] for m in maps if m.size]
    vals = np.concatenate(finite) if finite else np.zeros(1)
    if vals.size == 0:
        vals = np.zeros(1)
    lo, hi = float(vals.min()), float(vals.max())
    if lo < 0:
        a = max(abs(lo), abs(hi)) or 1.0
        return -a, a, DIVERGING
    return 0.0, hi if hi > 0 else 1.0, SEQUENTIAL


def map_strip(image: np.ndarray | None, maps: Sequence[np.ndarray], titles: Sequence[str], *,
              label: str = "attention", suptitle: str = "", panel: float = 2.3, shared: bool = True,
              masks: Sequence[np.ndarray | None] | None = None, cells: Sequence[np.ndarray | None] | None = None,
              alpha: float = 0.6, ncols: int = 6, fixed: tuple[float, float] | None = None) -> bytes:
    """Panels of maps (rows, cols), each stretched over `image` (H, W, 3), `ncols` to a row, with a
    colour bar (one for all when `shared`, else one per panel; over `fixed` (lo, hi) when given).
    `masks` (H, W) bool are outlined in cyan; `cells` (rows, cols) bool are drawn as hatched patches
    (removed tokens)."""
    n = max(len(maps), 1)
    nc = min(n, ncols)
    nr = -(-n // nc)
    fig = Figure(figsize=(panel * nc + (0.9 if shared else 0.6 * nc), panel * nr + (0.5 if suptitle else 0.25)),
                 layout="constrained")
    axes = fig.subplots(nr, nc, squeeze=False).ravel()
    scale = (fixed[0], fixed[1], SEQUENTIAL) if fixed else limits(maps) if shared else None
    artist = None
    for k, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if k >= len(maps):
            ax.axis("off")
            continue
        m = np.asarray(maps[k], dtype=np.float32)
        vmin, vmax, cmap = scale if scale else limits([m])
        if image is not None:
            h, w = image.shape[:2]
            ax.imshow(image)
            artist = ax.imshow(m, cmap=cmap, alpha=alpha, extent=(0, w, h, 0), interpolation="nearest",
                               vmin=vmin, vmax=vmax)
        else:
            h, w = m.shape
            artist = ax.imshow(m, cmap=cmap, interpolation="nearest", vmin=vmin, vmax=vmax)
        if masks is not None and k < len(masks) and masks[k] is not None and np.asarray(masks[k]).any():
            mk = np.asarray(masks[k], dtype=float)
            ax.contour(np.linspace(0, w, mk.shape[1]), np.linspace(0, h, mk.shape[0]), mk, levels=[0.5],
                       colors="cyan", linewidths=1.2)
        if cells is not None and k < len(cells) and cells[k] is not None:
            draw_cells(ax, np.asarray(cells[k], dtype=bool), h, w)
        ax.set_title(titles[k] if k < len(titles) else "", fontsize=8)
        if not shared:
            fig.colorbar(artist, ax=ax, shrink=0.8).ax.tick_params(labelsize=6)
    if shared and artist is not None:
        cb = fig.colorbar(artist, ax=list(axes), shrink=0.85, label=label)
        cb.ax.tick_params(labelsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    return png(fig)


def token_grid(image: np.ndarray | None, tokens: Sequence[str], grid: tuple[int, int], title: str = "",
               size: float = 6.0, top: int = 12) -> bytes:
    """Tokens (one per patch, row-major) written over `image` (H, W, 3) on its patch grid (rows,
    cols); the `top` most frequent tokens get a colour each (the others grey), with a legend."""
    rows, cols = grid
    toks = [str(t) for t in tokens][: rows * cols]
    counts = pd.Series(toks).value_counts()
    palette = _tab20()[:top]
    colour = {t: palette[i] for i, t in enumerate(counts.index[:top])}
    fig = Figure(figsize=(size + 1.8, size + 0.4), layout="constrained")
    ax = fig.subplots()
    h, w = (image.shape[:2] if image is not None else (rows * 10, cols * 10))
    if image is not None:
        ax.imshow(image)
    else:
        ax.imshow(np.full((h, w, 3), 255, np.uint8))
    ch, cw = h / rows, w / cols
    font = max(3.5, min(9.0, 60.0 / max(cols, 1)))
    for p, t in enumerate(toks):
        r, c = divmod(p, cols)
        rgb = colour.get(t, (0.6, 0.6, 0.6))
        ax.add_patch(Rectangle((c * cw, r * ch), cw, ch, facecolor=(*rgb, 0.35), edgecolor=(1, 1, 1, 0.5),
                               linewidth=0.4))
        ax.text((c + 0.5) * cw, (r + 0.5) * ch, t.strip()[:8] or repr(t), ha="center", va="center",
                fontsize=font, color="black")
    handles = [Rectangle((0, 0), 1, 1, facecolor=(*colour[t], 0.7)) for t in colour]
    ax.legend(handles, [f"{t.strip() or repr(t)} ({counts[t]})" for t in colour], loc="upper left",
              bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False, title="top-1 token (patches)", title_fontsize=7)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    return png(fig)


def _tab20() -> list[tuple[float, float, float]]:
    from matplotlib import colormaps

    return [tuple(c[:3]) for c in colormaps["tab20"].colors]  # type: ignore[attr-defined]


def draw_cells(ax: object, cells: np.ndarray, h: float, w: float) -> None:
    """Hatched red rectangles over the grid cells set in `cells` (rows, cols)."""
    r, c = cells.shape
    ch, cw = h / r, w / c
    for i, j in zip(*np.nonzero(cells), strict=True):
        ax.add_patch(Rectangle((j * cw, i * ch), cw, ch, fill=True, facecolor=(1, 0, 0, 0.35),  # type: ignore[attr-defined]
                               edgecolor="red", hatch="//", linewidth=0.6))


def image_with_cells(image: np.ndarray, cells: np.ndarray | None, title: str = "", panel: float = 2.6) -> bytes:
    """The image with the grid cells in `cells` drawn as removed (hatched red)."""
    fig = Figure(figsize=(panel, panel + 0.3), layout="constrained")
    ax = fig.subplots()
    ax.imshow(image)
    h, w = image.shape[:2]
    if cells is not None:
        draw_cells(ax, cells, h, w)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8)
    return png(fig)


def array_png(a: np.ndarray, title: str = "", label: str = "value") -> bytes:
    """A 2-D array of any size as an image with a colour bar (for arrays too big for a chart)."""
    a = np.asarray(a, dtype=np.float32)
    vmin, vmax, cmap = limits([a])
    fig = Figure(figsize=(6, 6 * min(a.shape[0] / max(a.shape[1], 1), 2.0) + 0.5), layout="constrained")
    ax = fig.subplots()
    art = ax.imshow(a, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    fig.colorbar(art, ax=ax, label=label)
    ax.set_title(title, fontsize=9)
    return png(fig)


def unique_labels(labels: Sequence[str]) -> list[str]:
    """Labels made unique by their position where they repeat (caption tokens do)."""
    labels = [str(x) for x in labels]
    if len(set(labels)) == len(labels):
        return labels
    return [f"{i}:{x}" for i, x in enumerate(labels)]


def heatmap(values: np.ndarray, rows: Sequence[str], cols: Sequence[str], *, value: str = "value",
            row_title: str = "", col_title: str = "", title: str = "", select: str | None = None,
            height: int | None = None, zero: bool = False, domain: tuple[float, float] | None = None) -> alt.Chart:
    """A labelled grid as an Altair heat map: hover shows row, column and value; NaN cells are grey.
    With `select`, clicking a cell selects it (a point selection of that name on ``row_i``, ``col_i``).
    Non-negative values get a scale from their minimum, from 0 with `zero` (shares, masses), or
    over `domain`; signed values a diverging scale centred on 0."""
    values = np.asarray(values, dtype=np.float64)
    r_lab, c_lab = unique_labels(rows), unique_labels(cols)
    rr, cc = np.meshgrid(np.arange(values.shape[0]), np.arange(values.shape[1]), indexing="ij")
    df = pd.DataFrame({"row": [r_lab[i] for i in rr.ravel()], "col": [c_lab[j] for j in cc.ravel()],
                       "row_i": rr.ravel(), "col_i": cc.ravel(), value: values.ravel()})
    finite = df[value].replace([np.inf, -np.inf], np.nan)
    lo, hi = (float(finite.min()), float(finite.max())) if finite.notna().any() else (0.0, 1.0)
    a = max(abs(lo), abs(hi)) or 1.0
    # signed values: one symmetric scale, white at 0, so a small negative value stays pale
    if domain is not None:
        scheme = alt.Scale(scheme="inferno", domain=list(domain))
    elif lo < 0:
        scheme = alt.Scale(scheme="redblue", domain=[-a, a], reverse=True)
    else:
        scheme = alt.Scale(scheme="inferno", domain=[0.0, hi if hi > 0 else 1.0]) if zero else alt.Scale(scheme="inferno")
    base = alt.Chart(df).encode(
        x=alt.X("col:N", sort=c_lab, title=col_title), y=alt.Y("row:N", sort=r_lab, title=row_title),
        tooltip=[alt.Tooltip("row:N", title=row_title or "row"), alt.Tooltip("col:N", title=col_title or "col"),
                 alt.Tooltip(f"{value}:Q", format=".4g")])
    rect = base.mark_rect().encode(
        color=alt.condition(f"isValid(datum['{value}']) && isFinite(datum['{value}'])",
                            alt.Color(f"{value}:Q", scale=scheme, title=value if len(value) <= 20 else value[:19] + "…"),
                            alt.value("#bbbbbb")))
    if select:
        sel = alt.selection_point(name=select, fields=["row_i", "col_i"], on="click", clear="dblclick")
        rect = rect.add_params(sel).encode(opacity=alt.condition(sel, alt.value(1.0), alt.value(0.55)))
    chart = rect.properties(title=title) if title else rect
    if height:
        chart = chart.properties(height=height)
    return chart


def patch_picker(image: np.ndarray, grid: tuple[int, int], name: str = "patch", chosen: int | None = None,
                 size: int = 260) -> alt.Chart:
    """The image as one clickable cell per patch (each filled with its patch's mean colour): clicking a
    cell selects ``row_i``, ``col_i`` under the point selection `name`; `chosen` is outlined."""
    rows, cols = grid
    h, w = image.shape[:2]
    recs = []
    for i in range(rows):
        for j in range(cols):
            y0, y1 = int(i * h / rows), max(int((i + 1) * h / rows), int(i * h / rows) + 1)
            x0, x1 = int(j * w / cols), max(int((j + 1) * w / cols), int(j * w / cols) + 1)
            rgb = image[y0:y1, x0:x1].reshape(-1, 3).mean(0).astype(int)
            recs.append({"row_i": i, "col_i": j, "patch": i * cols + j,
                         "hex": "#{:02x}{:02x}{:02x}".format(*rgb), "chosen": i * cols + j == chosen})
    df = pd.DataFrame(recs)
    sel = alt.selection_point(name=name, fields=["row_i", "col_i"], on="click", clear=False)
    return alt.Chart(df).mark_rect().encode(
        x=alt.X("col_i:O", title="patch column"), y=alt.Y("row_i:O", title="patch row"),
        color=alt.Color("hex:N", scale=None),
        stroke=alt.condition("datum.chosen", alt.value("#00e5ff"), alt.value(None)),
        strokeWidth=alt.condition("datum.chosen", alt.value(3), alt.value(0)),
        tooltip=["patch:Q", "row_i:O", "col_i:O"],
    ).add_params(sel).properties(width=size, height=int(size * rows / cols))
