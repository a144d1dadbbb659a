"""Small pyplot-free figure helpers shared by the analyses' renderers."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure


def grid(rows: int, cols: int, figsize: tuple[float, float]) -> tuple[Figure, Any]:
    """A `Figure` with a (rows, cols) array of axes; no pyplot, no global state."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, cols, squeeze=False)


def overlay(ax: Axes, image: np.ndarray, amap: np.ndarray | None, *, vmin: float | None = None,
            vmax: float | None = None, alpha: float = 0.6) -> Any:
    """Show `image` (H, W, 3) with `amap` (rows, cols) stretched over it; returns the map's artist."""
    ax.imshow(image)
    if amap is None:
        return None
    h, w = image.shape[:2]
    return ax.imshow(amap, cmap="inferno", alpha=alpha, extent=(0, w, h, 0), interpolation="nearest",
                     vmin=vmin, vmax=vmax)


def no_ticks(axes: Any) -> None:
    for ax in np.asarray(axes).ravel():
        ax.set_xticks([])
        ax.set_yticks([])


def short(s: str, n: int = 18) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def text_figure(lines: list[str], width: float = 9.0) -> Figure:
    """A figure that shows monospace text lines."""
    fig = Figure(figsize=(width, 0.25 * len(lines) + 0.4))
    fig.text(0.01, 0.98, "\n".join(lines), va="top", family="monospace", fontsize=8)
    return fig
