"""Cross-modal flow: how much each generated caption token attends to the image, and where.

For every generated token and text layer, the query row that predicted the token is read from the
pattern the adapter names in `InputMeta.flow_hook`: the cross-attention
(``text.blocks.{i}.xattn.pattern``: ViT-GPT2, BLIP, MMCA) or the joint self-attention over
``[image; text]`` (``text.blocks.{i}.attn.pattern``: GIT, the prefix VLM). Heads are averaged.
Per token and layer it reports the attention mass on the image patches, on the image CLS token
and (joint attention only) on the text, the patch map, and the top patches. These are raw
attention weights (what the layer reads), not attributions: rollout and relevancy build on them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from probe.analysis import Analysis, param
from probe.data import ImageSet, images_to_uint8
from probe.registry import register_analysis
from probe.runs.results import FlowResult
from probe.types import InputMeta, layer_of
from probe.viz.figures import grid, short, token_maps

MAX_IMAGES = 4
MAX_TOKENS = 12


@register_analysis
class Flow(Analysis):
    """Caption the images greedily while capturing the text->image attention of every step."""

    name = "flow"
    summary = "per generated token and layer: attention mass on the image, top patches, token x patch maps"
    task = "caption"

    @dataclass(frozen=True)
    class Params:
        max_new_tokens: int | None = param(None, "caption tokens to generate (default: the model's)", min=1)
        top_k: int = param(5, "top patches per token to list", min=1)
        batch_size: int = param(8, "images per generation batch", min=1)

    def resolve(self, adapter: Any, params: Params) -> Params:
        n = params.max_new_tokens or adapter.max_new_tokens
        return dataclasses.replace(params, max_new_tokens=n, top_k=min(params.top_k, adapter.grid[0] * adapter.grid[1]))

    def run(self, adapter: Any, inputs: ImageSet, params: Params) -> FlowResult:
        """Returns a `FlowResult`; arrays ``flow.rows`` (images, layers, steps, keys) hold the head-mean
        rows (keys beyond a step's length and steps beyond a caption's end are 0)."""
        images = inputs.images
        hook = adapter.flow_hook
        rows_parts: list[torch.Tensor] = []
        tokens: list[list[str]] = []
        captions: list[str] = []
        meta: InputMeta | None = None
        layers: list[int] = []
        starts = range(0, len(images), params.batch_size)
        for start in tqdm(starts, desc=f"flow {adapter.name}", disable=len(starts) < 2):
            chunk = images[start : start + params.batch_size]
            caps, cache = adapter.generate_with_cache(chunk, hook.format(i="*"), max_new_tokens=params.max_new_tokens,
                                                      reduce="mean")
            meta = cache.meta
            layers = sorted(layer_of(n) for n in cache.names())
            per_layer = [cache.stack_calls(hook.format(i=i))[:, 0] for i in layers]  # (b, steps, keys) each
            rows_parts.append(_pad_stack(per_layer))
            tokens += caps["tokens"]
            captions += caps["text"]
        assert meta is not None
        steps = max(p.shape[2] for p in rows_parts)
        keys = max(p.shape[3] for p in rows_parts)
        rows = torch.cat([torch.nn.functional.pad(p, (0, keys - p.shape[3], 0, steps - p.shape[2]))
                          for p in rows_parts])
        joint = adapter.capabilities.joint_attention
        lo, hi = meta.spans["image"]
        c0, c1 = meta.spans.get("cls", (lo, lo))
        image_mass = rows[..., lo:hi].sum(-1).transpose(1, 2)  # (b, steps, layers)
        cls_mass = rows[..., c0:c1].sum(-1).transpose(1, 2)
        arrays = {"flow.rows": rows, "flow.image_mass": image_mass, "flow.cls_mass": cls_mass,
                  "input.image": images_to_uint8(images, meta.image_size or (224, 224))}
        if joint:
            t0 = meta.spans["text"][0]
            arrays["flow.text_mass"] = rows[..., t0:].sum(-1).transpose(1, 2)
        patch = rows[..., lo:hi].mean(1)  # layer-mean patch attention (b, steps, patches)
        k = min(params.top_k, hi - lo)
        top = [[patch[i, s].topk(k).indices.tolist() for s in range(len(t))] for i, t in enumerate(tokens)]
        return FlowResult(
            arrays=arrays, model=adapter.name, image_names=inputs.names, meta=_meta_dict(meta), layers=layers,
            tokens=tokens, captions=captions, fusion=adapter.capabilities.fusion, joint=joint, top_patches=top,
        )

    def render(self, result: FlowResult) -> dict[str, Figure]:
        return {"flow_tokens": render_token_maps(result), "flow_mass": render_mass(result)}

    def summary_lines(self, result: FlowResult) -> list[str]:
        what = ("image mass (joint attention; rest on text)" if result.joint
                else "patch mass (cross-attention; rest on CLS)")
        lines = [f"{len(result.image_names)} images, {len(result.layers)} text layers; per token: {what}, "
                 "mean over layers"]
        g = result.meta.get("grid")
        for i, name in enumerate(result.image_names):
            lines.append(f"  {name}: {result.captions[i]!r}")
            mass = result.arrays["flow.image_mass"][i].mean(-1)
            parts = []
            for s, tok in enumerate(result.tokens[i]):
                top = result.top_patches[i][s][:3]
                where = [f"({p // g[1]},{p % g[1]})" for p in top] if g else [str(p) for p in top]
                parts.append(f"{tok}:{float(mass[s]):.2f}@{'/'.join(where)}")
            lines.append("    " + "  ".join(parts))
        return lines


def _pad_stack(per_layer: list[torch.Tensor]) -> torch.Tensor:
    keys = max(t.shape[-1] for t in per_layer)
    return torch.stack([torch.nn.functional.pad(t, (0, keys - t.shape[-1])) for t in per_layer], dim=1)


def _meta_dict(meta: InputMeta) -> dict[str, Any]:
    d = meta.to_dict()
    d.pop("tokens", None)  # the result keeps the generated tokens itself
    return d


def render_token_maps(result: FlowResult, layer: int | None = None) -> Figure:
    """Per image: one panel per generated token with its head-mean attention over the patches
    (mean over layers, or one `layer`) overlaid on the image."""
    where = "mean over layers" if layer is None else f"layer {layer}"
    return token_maps(result.arrays["input.image"], result.image_names, result.captions, result.tokens,
                      lambda r: result.patch_maps(r, layer),
                      lambda r, s: float(result.arrays["flow.image_mass"][r, s].mean()),
                      f"{result.model}: attention of each generated token on the patches ({where}, mean over heads)",
                      MAX_IMAGES, MAX_TOKENS)


def render_mass(result: FlowResult) -> Figure:
    """Per image: a token x layer heatmap of the attention mass on image patches."""
    n_img = min(len(result.image_names), MAX_IMAGES)
    fig, axes = grid(1, n_img, (0.4 * len(result.layers) + 2.2 * n_img, 3.2))
    for r in range(n_img):
        ax = axes[0][r]
        n = len(result.tokens[r])
        im = ax.imshow(result.arrays["flow.image_mass"][r, :n].numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_yticks(range(n), [short(t, 10) for t in result.tokens[r]], fontsize=6)
        ax.set_xticks(range(len(result.layers)), [str(i) for i in result.layers], fontsize=6)
        ax.set_xlabel("layer", fontsize=7)
        ax.set_title(short(result.image_names[r]), fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.05)
    what = "image mass in the joint attention" if result.joint else "cross-attention mass on patches (rest: CLS)"
    fig.suptitle(f"{result.model}: {what}", fontsize=8)
    fig.tight_layout()
    return fig
