"""The logit lens (nostalgebraist 2020): read every layer's residual state through the decoder's
own read-out (`Captioner.unembed`: the final norm where the stack is pre-norm, then the prediction
head) and ask what it would say.

- **Text positions**, every captioner: the greedy caption is teacher-forced; at each caption step
  and text layer, is the lens's top-1 token already the token the model outputs (its final
  top-1)? Per layer: the share of steps that agree, the mean log-probability of the final token
  under the lens, and the share of steps *decided* at that layer (the first layer from which the
  lens agrees at every later layer). On the last layer the lens is the model (agreement 1).
- **Visual tokens**, where they sit in the decoder stream (GIT, the prefix VLM: image tokens prefix
  the one causal stack): each patch's state at each layer through the read-out; on probe-shapes,
  the share of an object's patches (any pixel of the object in the patch) whose top-k tokens name
  its colour (its shape), against the same share on the background patches (no object pixel) as
  the baseline. A token names a word when it is the first token of that word as the caption
  encodes it (the whole word for word-level vocabularies; its first letter for our character
  decoders, whose colour and shape initials are distinct).

In ViT-GPT2, BLIP and MMCA the decoder only cross-attends to the image, so there is no visual
token in its stream to read (MMCA's visual stream is not read out by the head): their result has
the text part only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from probe.adapter import Captioner
from probe.analyses.grounding import patch_coverage
from probe.analysis import Analysis, param
from probe.capture import capture
from probe.data import ImageSet, images_to_uint8
from probe.registry import register_analysis
from probe.runs.results import Result
from probe.viz.figures import grid, no_ticks

TEXT_COLS = ("top-1 = final", "decided here", "log-prob of final")
IMAGE_COLS = ("colour: object", "colour: background", "shape: object", "shape: background")


def text_layers(adapter: Captioner) -> list[str]:
    """The text stack's ``resid_post`` hooks, in layer order."""
    specs = [s for s in adapter.hook_specs() if s.name.startswith("text.blocks.") and s.name.endswith(".resid_post")]
    return [s.name for s in sorted(specs, key=lambda s: s.layer)]


def word_tokens(adapter: Captioner, word: str) -> set[int]:
    """Token ids that name `word`: its first token as a caption encodes it, at the start and after a word."""
    out = set()
    alone = adapter._encode_text(word)
    if alone:
        out.add(alone[0])
    before = adapter._encode_text("a")
    after = adapter._encode_text(f"a {word}")
    if after[: len(before)] == before:  # the word's first token that is not the separating space
        rest = [t for t in after[len(before):] if adapter._text([t]).strip()]
        if rest:
            out.add(rest[0])
    return out


def decided_layer(agree: np.ndarray) -> np.ndarray:
    """(layers, steps) bool -> (steps,) the first layer from which every later layer agrees
    (``layers`` when even the last does not: the lens never settles)."""
    n = agree.shape[0]
    settled = np.flip(np.cumprod(np.flip(agree, 0), 0), 0).astype(bool)  # agree here and at every later layer
    return np.where(settled.any(0), settled.argmax(0), n)


@dataclass(frozen=True)
class LogitLensResult(Result):
    """See `probe.analyses.logit_lens`.

    Fields: model, image_names, captions, layers (text layer indices), visual (whether visual
    tokens were read), grids (the labelled 2-D arrays the app draws), vocab (token strings of the
    ids in ``lens.image.top1``).
    Arrays: ``lens.text`` (layers, 3): share of caption steps whose lens top-1 is the final token,
    share decided at that layer, mean log-prob of the final token; ``lens.image`` (layers, 4):
    share of object / background patches whose top-k names the object's colour, then shape
    (probe-shapes only); ``lens.image.top1`` (images, layers, patches) the lens's top-1 token id per
    patch; ``input.image`` (images, H, W, 3) uint8.
    """

    kind: ClassVar[str] = "logit-lens"
    schema_version: ClassVar[int] = 1
    nan_padded: ClassVar[tuple[str, ...]] = ("lens.image",)
    model: str = ""
    image_names: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    visual: bool = False
    grids: dict[str, dict[str, Any]] = field(default_factory=dict)
    vocab: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LogitLensParams:
    top_k: int = param(1, "visual tokens: a patch names a word when it is among its top-k lens tokens", min=1)
    max_new_tokens: int | None = param(None, "caption length (default: the model's)", min=1)
    batch_size: int = param(16, "images per forward", min=1)


class LogitLens(Analysis):
    name = "logit-lens"
    summary = "decode every layer's residual through the read-out: when is each caption word decided, what do patches say"
    Params = LogitLensParams
    task = "caption"
    requires = ("text.blocks.*.resid_post",)
    default_images = "shapes"
    default_task = "caption"

    def run(self, adapter: Captioner, inputs: ImageSet, params: LogitLensParams) -> LogitLensResult:
        hooks = text_layers(adapter)
        n_layers = len(hooks)
        visual = adapter.capabilities.joint_attention
        t0, n_img = adapter.text_offset(), adapter.n_image_tokens
        agree_all, logp_all, captions = [], [], []
        top1_all: list[torch.Tensor] = []
        counts = np.zeros((n_layers, 4))  # named on object / background, colour then shape
        totals = np.zeros((n_layers, 4))
        chunks = range(0, len(inputs), params.batch_size)
        for start in tqdm(chunks, desc=f"logit lens {adapter.name}", disable=len(chunks) < 2):
            images = inputs.images[start : start + params.batch_size]
            px = adapter.preprocess(images)["pixel_values"]
            caps = adapter.caption_pixels(px, params.max_new_tokens)
            captions += caps["text"]
            ids, mask = adapter.teacher_ids(caps["ids"], caps["tokens"])
            with torch.no_grad(), capture(adapter, hooks) as cache:
                final = adapter.forward({"pixel_values": px, "input_ids": ids, "attention_mask": mask})
            final_top = final[:, :-1].argmax(-1)  # (b, T-1): what the model outputs at each step
            steps = mask[:, 1:].bool().cpu()
            with torch.no_grad():
                for li, h in enumerate(hooks):
                    lens = adapter.unembed(cache[h][:, t0:]).float()[:, :-1]
                    logp = torch.log_softmax(lens, -1).gather(-1, final_top[..., None])[..., 0]
                    agree_all.append((li, (lens.argmax(-1) == final_top).cpu()[steps]))
                    logp_all.append((li, logp.cpu()[steps]))
                    if visual:
                        patch_lens = adapter.unembed(cache[h][:, 1:n_img]).float()
                        top = patch_lens.topk(min(params.top_k, patch_lens.shape[-1]), -1).indices.cpu()
                        top1_all.append(top[..., 0])
                        if inputs.samples is not None:
                            _score_patches(adapter, top, inputs, start, li, counts, totals)
        agree = np.stack([torch.cat([a for i, a in agree_all if i == li]).numpy() for li in range(n_layers)])
        logps = np.stack([torch.cat([lp for i, lp in logp_all if i == li]).numpy() for li in range(n_layers)])
        decided = decided_layer(agree)
        text = np.stack([agree.mean(1), [(decided == li).mean() for li in range(n_layers)], logps.mean(1)], 1)
        layers = [int(h.split(".")[2]) for h in hooks]
        rows = [f"layer {i}" for i in layers]
        arrays: dict[str, torch.Tensor] = {"lens.text": torch.from_numpy(text).float()}
        grids = {"lens.text": {"title": "logit lens on the caption positions", "rows": rows, "cols": list(TEXT_COLS),
                               "value": "share of caption steps / mean log-prob"}}
        vocab: dict[str, str] = {}
        if visual:
            with np.errstate(invalid="ignore", divide="ignore"):
                arrays["lens.image"] = torch.from_numpy(counts / totals).float()
            grids["lens.image"] = {"title": f"logit lens on the image tokens: share of patches whose top-{params.top_k} "
                                            "names the object's colour / shape", "rows": rows, "cols": list(IMAGE_COLS),
                                   "value": "share of patches"}
            n_per = len(top1_all) // max(1, len(chunks))
            per_chunk = [torch.stack(top1_all[k * n_per : (k + 1) * n_per], 1) for k in range(len(chunks))]
            top1 = torch.cat(per_chunk, 0)  # (images, layers, patches)
            arrays["lens.image.top1"] = top1
            vocab = {str(t): adapter._tokens([t])[0] for t in sorted(set(top1.flatten().tolist()))}
        arrays["input.image"] = images_to_uint8(inputs.images, (adapter.image_size, adapter.image_size))
        return LogitLensResult(arrays=arrays, model=adapter.name, image_names=inputs.names, captions=captions,
                               layers=layers, visual=visual, grids=grids, vocab=vocab)

    def render(self, result: LogitLensResult) -> dict[str, Figure]:
        return render_lens(result)

    def summary_lines(self, result: LogitLensResult) -> list[str]:
        t = result.arrays["lens.text"].numpy()
        lines = [f"{result.model}: lens top-1 = final token per text layer: "
                 + ", ".join(f"L{layer} {v:.2f}" for layer, v in zip(result.layers, t[:, 0], strict=True))]
        if "lens.image" in result.arrays:
            im = result.arrays["lens.image"].numpy()
            for c, what in ((0, "colour"), (2, "shape")):
                lines.append(f"  image tokens naming their object's {what} (object / background): "
                             + ", ".join(f"L{layer} {a:.2f}/{b:.2f}" for layer, a, b
                                         in zip(result.layers, im[:, c], im[:, c + 1], strict=True)))
        return lines


def _score_patches(adapter: Captioner, top: torch.Tensor, inputs: ImageSet, start: int, layer: int,
                   counts: np.ndarray, totals: np.ndarray) -> None:
    """Add, per image of the chunk, the object and background patches whose top-k names each object's
    colour (columns 0, 1) and shape (2, 3)."""
    for b in range(top.shape[0]):
        sample = inputs.samples[start + b]
        cover = np.stack([patch_coverage(m, adapter.grid) > 0 for m in sample.masks])
        background = ~cover.any(0)
        for k, obj in enumerate(sample.objects):
            for col, word in ((0, obj.colour), (2, obj.shape)):
                ids = torch.tensor(sorted(word_tokens(adapter, word)))
                named = torch.isin(top[b], ids).any(-1).numpy()  # (patches,)
                counts[layer, col] += named[cover[k]].sum()
                totals[layer, col] += cover[k].sum()
                counts[layer, col + 1] += named[background].sum()
                totals[layer, col + 1] += background.sum()


def render_lens(result: LogitLensResult) -> dict[str, Figure]:
    figs: dict[str, Figure] = {}
    t = result.arrays["lens.text"].numpy()
    fig, axes = grid(1, 2 if "lens.image" in result.arrays else 1, (10 if "lens.image" in result.arrays else 5, 3.4))
    fig.set_layout_engine("constrained")
    ax = axes[0, 0]
    x = range(len(result.layers))
    ax.plot(x, t[:, 0], marker="o", label=TEXT_COLS[0])
    ax.bar(x, t[:, 1], alpha=0.3, label=TEXT_COLS[1])
    ax.set_xticks(list(x), [f"L{i}" for i in result.layers])
    ax.set_ylim(0, 1.05)
    ax.set_title("caption positions", fontsize=9)
    ax.legend(fontsize=7)
    if "lens.image" in result.arrays:
        im = result.arrays["lens.image"].numpy()
        ax = axes[0, 1]
        for c, name in enumerate(IMAGE_COLS):
            ax.plot(x, im[:, c], marker="o", linestyle="-" if c % 2 == 0 else "--", label=name)
        ax.set_xticks(list(x), [f"L{i}" for i in result.layers])
        ax.set_ylim(0, 1.05)
        ax.set_title("image tokens", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{result.model}: logit lens", fontsize=10)
    figs["lens"] = fig
    if "lens.image.top1" in result.arrays:
        top1 = result.arrays["lens.image.top1"][0].numpy()  # (layers, patches)
        img = result.arrays["input.image"][0].numpy()
        side = int(round(np.sqrt(top1.shape[1])))
        fig, axes = grid(1, len(result.layers), (3.2 * len(result.layers), 3.4))
        for j, ax in enumerate(axes[0]):
            ax.imshow(img)
            h, w = img.shape[:2]
            for p, tok in enumerate(top1[j]):
                r, c = divmod(p, side)
                ax.text((c + 0.5) * w / side, (r + 0.5) * h / side, result.vocab.get(str(int(tok)), "?")[:4],
                        ha="center", va="center", fontsize=5, color="black",
                        bbox={"boxstyle": "square,pad=0.05", "fc": "white", "alpha": 0.5, "lw": 0})
            ax.set_title(f"layer {result.layers[j]}: top-1 per patch", fontsize=8)
        no_ticks(axes)
        figs["lens_grid"] = fig
    return figs


register_analysis(LogitLens)
