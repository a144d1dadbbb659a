"""Small pyplot-free figure helpers shared by the analyses' renderers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


def token_maps(images: Any, names: Sequence[str], captions: Sequence[str], tokens: Sequence[Sequence[str]],
               maps: Callable[[int], Any], mass: Callable[[int, int], float], title: str,
               max_images: int = 4, max_tokens: int = 12) -> Figure:
    """Per image (rows): the image with its caption, then one panel per generated token with its map
    over the patches overlaid, one colour scale per image (uniform looks flat otherwise).

    Args:
        images: (n, H, W, 3) uint8; maps(r): (steps_r, rows, cols) of image r; mass(r, s): the
            number shown under token s of image r.
    """
    n_img = min(len(names), max_images)
    cols = 1 + max(min(max((len(t) for t in tokens), default=0), max_tokens), 1)
    fig, axes = grid(n_img, cols, (1.6 * cols, 1.8 * n_img + 0.5))
    for r in range(n_img):
        img = images[r].numpy()
        axes[r][0].imshow(img)
        axes[r][0].set_title(short(names[r]) + "\n" + short(captions[r], 28), fontsize=6)
        m = maps(r)
        vmax = float(m.max()) if m.numel() else 1.0
        for c in range(1, cols):
            s = c - 1
            if s < len(tokens[r]):
                overlay(axes[r][c], img, m[s].numpy(), vmin=0.0, vmax=vmax or 1.0)
                axes[r][c].set_title(f"{short(tokens[r][s], 10)}\nimg {mass(r, s):.2f}", fontsize=6)
            else:
                axes[r][c].axis("off")
    no_ticks(axes)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig
