"""Pure renderers: Result -> matplotlib Figure. The CLI saves figures; the app shows them."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from probe.runs.results import AttentionResult

MAX_IMAGES = 8


def render_attention(result: AttentionResult, query: str = "cls") -> Figure:
    """Per image (rows) and layer (columns): the head-mean attention of `query` over the patches,
    overlaid on the image. Approximate attention kinds are labelled 'effective'."""
    n_img = min(len(result.image_names), MAX_IMAGES)
    layers = result.layers
    cols = 1 + len(layers)
    fig, axes = plt.subplots(n_img, cols, figsize=(1.9 * cols, 2.0 * n_img + 0.4), squeeze=False)
    images = result.arrays.get("input.image")
    what = "effective attention" if result.approximate else "attention"
    for r in range(n_img):
        ax = axes[r][0]
        if images is not None:
            ax.imshow(images[r].numpy())
        title = result.image_names[r]
        if result.predictions:
            title += f"\npred: {result.predictions[r]}"
        ax.set_title(title, fontsize=7)
        for c, layer in enumerate(layers, start=1):
            ax = axes[r][c]
            amap = result.query_map(layer, query)[r].numpy()
            if images is not None:
                h, w = images.shape[1:3]
                ax.imshow(images[r].numpy())
                ax.imshow(amap, cmap="inferno", alpha=0.6, extent=(0, w, h, 0), interpolation="nearest")
            else:
                ax.imshow(amap, cmap="inferno", interpolation="nearest")
            if r == 0:
                ax.set_title(f"layer {layer}", fontsize=8)
    for row in axes:
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    more = f" (first {MAX_IMAGES} of {len(result.image_names)} images)" if len(result.image_names) > n_img else ""
    fig.suptitle(f"{result.model}: {query.upper()} {what}, mean over heads{more}", fontsize=9)
    fig.tight_layout()
    return fig
