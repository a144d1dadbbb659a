"""Faithfulness of attribution methods on probe-shapes, scored against the exact object masks.

For every method of `probe.analyses.explain.METHODS` that applies to the model:

- **grounding per caption word** (captioners): on images whose greedy caption is exact (equal to
  the ground truth, so the k-th object named is the k-th object in reading order), each colour
  and shape word is scored at the step that produced it (its first token: where the word is
  chosen; the later letters of a character captioner are all but determined by then) against its
  object's mask at patch level (`grounding.object_coverage`): the pointing game (Zhang et al.
  2016; a tie at the maximum is a miss unless every tied patch is inside) and the energy-based
  pointing game (Wang et al. 2020: coverage-weighted mass inside / total mass; signed maps by
  their positive part), each with its analytic random-map baseline. Classifiers: the map of the
  true class (``colour shape`` of the largest object) against that object's mask;
- **deletion and insertion** (Petsiuk et al. 2018): patches removed (or revealed) most relevant
  first through the family's real token removal (`grounding.remove_patches`), the teacher-forced
  log-probability of the word (or the class's log-softmax) along the way; area under each curve,
  random orders as the baseline (lower deletion and higher insertion area are better);
- **sanity** (Adebayo et al. 2018): cascading randomisation of the decoder layers (top down, to
  the bottom), then also of the encoder layers; the Spearman correlation of each word's map with
  the unrandomised one. A method whose maps stay put explains the input, not the model.

Stored ``result.json`` holds ``scores``: rows ``{method, metric, value, n, baseline}``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from probe.adapter import Captioner, Classifier
from probe.analyses import grounding
from probe.analyses.explain import METHODS, Target, check_head, with_caption_length
from probe.analysis import Analysis, ParamError, param
from probe.data import ImageSet, images_to_uint8
from probe.data.metrics import classify_classes, largest_object, normalise
from probe.data.shapes import COLOURS, SHAPES
from probe.registry import register_analysis
from probe.runs.results import Result
from probe.viz.figures import grid, no_ticks, overlay

log = logging.getLogger(__name__)

MAX_WORDS = 8


@dataclass(frozen=True)
class Word:
    """One scored target: image index, the word (or class), its kind (colour, shape or class), the
    object it names and the caption step scored (0 for classifiers)."""

    image: int
    word: str
    kind: str
    obj: int
    step: int


def object_words(adapter: Captioner, ids: Sequence[int], objects: int) -> list[tuple[str, str, int, int]]:
    """(word, kind, object index, first step) for each colour and shape word of a generated
    caption; the k-th colour (shape) word names object k."""
    out = []
    seen = {"colour": 0, "shape": 0}
    for word, steps in adapter.word_steps(ids):
        w = word.strip(".,").lower()
        kind = "colour" if w in COLOURS else "shape" if w in SHAPES else None
        if kind is None or not steps:
            continue
        if seen[kind] < objects:
            out.append((w, kind, seen[kind], steps[0]))
        seen[kind] += 1
    return out


def _method_names(spec: str) -> list[str]:
    names = list(METHODS) if spec.strip() in ("", "all") else [m.strip() for m in spec.split(",") if m.strip()]
    if not names:
        raise ParamError(f"--methods {spec!r} names no method; known: {', '.join(METHODS)} (or all)")
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ParamError(f"--methods {','.join(unknown)}: unknown; known: {', '.join(METHODS)} (or all)")
    if len(set(names)) != len(names):
        raise ParamError(f"--methods {spec!r} names a method twice")
    return names


@dataclass(frozen=True)
class FaithfulnessResult(Result):
    """Scores of every method; see the module docstring.

    Fields: model, image_names, methods, skipped (method -> why it does not apply), words (one
    dict per scored target: image, word, kind, obj, step), exact (images with an exact caption
    over images), captions, fractions (of patches removed along the curves), scores (rows
    ``{method, metric, value, n, baseline}``).
    Arrays: ``maps.<method>`` (targets, patches) the scored map of each target;
        ``coverage`` (targets, patches) its object's coverage; ``masks`` (targets, H, W) bool the
        object's exact mask (probe-shapes resolution); ``deletion.<method>``,
        ``insertion.<method>`` (targets, K) curves, ``deletion.random``/``insertion.random``;
        ``input.image`` (batch, H, W, 3) uint8.
    """

    kind: ClassVar[str] = "faithfulness"
    schema_version: ClassVar[int] = 1
    model: str = ""
    image_names: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    methods: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    words: list[dict[str, Any]] = field(default_factory=list)
    exact: list[int] = field(default_factory=list)
    captions: list[str] | None = None
    fractions: list[float] = field(default_factory=list)
    scores: list[dict[str, Any]] = field(default_factory=list)

    def score(self, method: str, metric: str) -> float | None:
        for r in self.scores:
            if r["method"] == method and r["metric"] == metric:
                return r["value"]
        return None


@register_analysis
class Faithfulness(Analysis):
    """Pointing, energy, deletion/insertion and randomisation sanity of every attribution method."""

    name = "faithfulness"
    summary = "attribution methods scored against probe-shapes masks: pointing, energy, deletion, sanity"
    default_images = "shapes"
    needs_masks = True
    checks_architecture = True

    @dataclass(frozen=True)
    class Params:
        methods: str = param("all", "comma-separated attribution methods (all: every one that applies)")
        curve_points: int = param(11, "points on the deletion and insertion curves (fractions 0..1)", min=2, max=101)
        random_orders: int = param(4, "random removal orders of the baseline curves", min=1)
        sanity: bool = param(True, "the sanity check: cascading randomisation of decoder, then encoder layers "
                                   "(--no-sanity skips it)")
        max_new_tokens: int | None = param(None, "caption tokens to generate, captioners only", min=1)
        batch_size: int = param(16, "images per caption batch", min=1)
        random_seed: int = param(0, "seed of the random orders and the randomised weights", min=0, max=2**31 - 1)

        def __post_init__(self) -> None:
            if isinstance(self.methods, str):
                _method_names(self.methods)

    def check_architecture(self, adapter: Any, params: Params) -> str | None:
        if not isinstance(adapter, Captioner | Classifier):
            return f"faithfulness scores captioners and classifiers; {adapter.name} is neither"
        names = _method_names(params.methods)
        refusals = {m: METHODS[m].refusal(adapter) for m in names}
        if all(refusals.values()):
            return "; ".join(f"{m}: {w}" for m, w in refusals.items())
        explicit = params.methods.strip() not in ("", "all")
        if explicit and any(refusals.values()):
            return "; ".join(f"{m}: {w}" for m, w in refusals.items() if w) + " (drop it from --methods)"
        return None

    def resolve(self, adapter: Any, params: Params) -> Params:
        check_head(adapter)
        return with_caption_length(adapter, params)

    def run(self, adapter: Any, inputs: ImageSet, params: Params) -> FaithfulnessResult:
        """Returns a `FaithfulnessResult` (see the module docstring)."""
        if inputs.masks is None or inputs.samples is None:
            raise ParamError(f"{self.name} scores maps against object masks: run it on probe-shapes images (--shapes N)")
        names = _method_names(params.methods)
        skipped = {m: w for m in names if (w := METHODS[m].refusal(adapter))}
        names = [m for m in names if m not in skipped]
        for m, why in skipped.items():
            log.info("%s: %s", m, why)
        fractions = np.linspace(0.0, 1.0, params.curve_points)
        px = adapter.preprocess(inputs.images)["pixel_values"]
        grid_ = tuple(adapter.grid)
        words, target, captions, exact = self._targets(adapter, inputs, px, params)
        if not words and isinstance(adapter, Classifier):
            raise ParamError(f"none of the {len(inputs)} images has a unique largest object whose class "
                             f"({', '.join(classify_classes()[:2])}, ...) is one of {adapter.name}'s labels: give more "
                             "images (--shapes N) or a model trained on the probe-shapes classes (demo weights)")
        if not words:
            short_caps = params.max_new_tokens is not None and params.max_new_tokens < adapter.max_new_tokens
            raise ParamError(f"{adapter.name} captioned none of the {len(inputs)} images exactly, so no word can be "
                             "matched to its object: "
                             + (f"--max-new-tokens {params.max_new_tokens} cuts the captions short; drop it"
                                if short_caps else "use trained weights (demo) or more images (--shapes N)"))
        coverage = np.stack([grounding.object_coverage(inputs.masks[w.image], grid_)[w.obj] for w in words])
        score_fn = self._scorer(adapter, px, target, words)
        arrays: dict[str, torch.Tensor] = {
            "coverage": torch.as_tensor(coverage, dtype=torch.float32),
            "masks": torch.as_tensor(np.stack([inputs.masks[w.image][w.obj] for w in words]))}
        rows: list[dict[str, Any]] = []
        gen_seed = params.random_seed
        per_method_maps: dict[str, np.ndarray] = {}
        for m in tqdm(names, desc=f"faithfulness {adapter.name}"):
            maps = self._maps(adapter, m, target, words)
            per_method_maps[m] = maps
            arrays[f"maps.{m}"] = torch.as_tensor(maps, dtype=torch.float32)
            rows += _grounding_rows(m, words, maps, coverage)
            for mode in ("deletion", "insertion"):
                curves = grounding.perturbation_curves(
                    score_fn, maps, fractions, mode, random_orders=params.random_orders,
                    generator=torch.Generator().manual_seed(gen_seed))
                arrays[f"{mode}.{m}"] = curves.curve
                arrays.setdefault(f"{mode}.random", curves.random)
                auc = grounding.curve_auc(curves.curve.numpy(), fractions)
                base = grounding.curve_auc(curves.random.numpy(), fractions)
                rows.append({"method": m, "metric": f"{mode}_auc", "value": float(np.mean(auc)), "n": len(words),
                             "baseline": float(np.mean(base))})
        if params.sanity:
            rows += self._sanity(adapter, names, target, words, per_method_maps, params.random_seed)
        return FaithfulnessResult(
            arrays={**arrays, "input.image": images_to_uint8(inputs.images, (adapter.image_size,) * 2)},
            model=adapter.name, image_names=inputs.names,
            meta={"grid": list(grid_), "image_size": [adapter.image_size] * 2},
            methods=names, skipped=skipped, words=[w.__dict__ for w in words], exact=exact,
            captions=captions, fractions=[float(f) for f in fractions], scores=rows)

    # ---------------------------------------------------------------- pieces
    def _targets(self, adapter: Any, inputs: ImageSet, px: torch.Tensor, params: Params,
                 ) -> tuple[list[Word], Target, list[str] | None, list[int]]:
        assert inputs.samples is not None and inputs.masks is not None
        words: list[Word] = []
        if isinstance(adapter, Classifier):
            classes = classify_classes()
            index = {c: adapter.labels.index(c) for c in classes if c in adapter.labels}
            labels = torch.zeros(len(inputs), dtype=torch.long)
            for i, s in enumerate(inputs.samples):
                k = largest_object(inputs.masks[i], s.objects)
                name = None if k is None else f"{s.objects[k].colour} {s.objects[k].shape}"
                if name in index:
                    labels[i] = index[name]
                    words.append(Word(i, name, "class", int(k), 0))
            return words, Target(px, labels=labels.to(adapter.device)), None, [w.image for w in words]
        texts: list[str] = []
        new_rows: list[list[int]] = []
        tokens: list[list[str]] = []
        for start in range(0, len(inputs), params.batch_size):
            with torch.no_grad():
                cap = adapter.caption_pixels(px[start : start + params.batch_size], params.max_new_tokens)
            texts += cap["text"]
            tokens += cap["tokens"]
            new_rows += [r.tolist() for r in cap["ids"]]
        width = max(len(r) for r in new_rows)
        new = torch.tensor([r + [adapter.specials.pad] * (width - len(r)) for r in new_rows])
        ids, mask = adapter.teacher_ids(new, tokens)
        exact = [i for i, s in enumerate(inputs.samples) if normalise(texts[i]) == normalise(s.caption)]
        for i in exact:
            for w, kind, obj, step in object_words(adapter, new_rows[i], len(inputs.samples[i].objects)):
                words.append(Word(i, w, kind, obj, step))
        steps = [[w.step for w in words if w.image == i] for i in range(len(inputs))]
        return words, Target(px, ids, mask, steps=steps), texts, exact

    @staticmethod
    def _maps(adapter: Any, method: str, target: Target, words: list[Word]) -> np.ndarray:
        maps = METHODS[method].fn(adapter, target)
        out = np.stack([maps[w.image, 0 if target.ids is None else w.step].detach().double().numpy() for w in words])
        if not np.isfinite(out).all():
            raise ValueError(f"{method} produced non-finite maps on {adapter.name}")
        return out

    @staticmethod
    def _scorer(adapter: Any, px: torch.Tensor, target: Target, words: list[Word]) -> Any:
        if isinstance(adapter, Classifier):
            rows = torch.tensor([w.image for w in words])
            assert target.labels is not None
            return grounding.class_removal_scorer(adapter, px[rows], target.labels[rows])
        assert target.ids is not None
        return grounding.caption_removal_scorer(adapter, px, target.ids, target.mask,
                                                [(w.image, w.step) for w in words])

    def _sanity(self, adapter: Any, names: list[str], target: Target, words: list[Word],
                before: dict[str, np.ndarray], seed: int) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        parts = [p for p in ("decoder", "encoder") if _has_part(adapter, p)]
        if not parts:
            return rows

        def measure(label: str) -> None:
            for m in names:
                after = self._maps(adapter, m, target, words)
                rho = grounding.rank_correlation(before[m], after)
                value, n = grounding.nan_mean(rho)
                rows.append({"method": m, "metric": f"sanity_rho/{label}", "value": value, "n": n, "baseline": None})

        with grounding.cascading_randomisation(adapter, parts[0], seed=seed) as steps:
            for _ in steps:
                pass
            measure(parts[0])
            if len(parts) > 1:
                with grounding.cascading_randomisation(adapter, parts[1], seed=seed + 1) as more:
                    for _ in more:
                        pass
                    measure(f"{parts[0]}+{parts[1]}")
        return rows

    # ---------------------------------------------------------------- output
    def render(self, result: FaithfulnessResult) -> dict[str, Figure]:
        return {"faithfulness_maps": render_word_maps(result), "faithfulness_scores": render_scores(result)}

    def summary_lines(self, result: FaithfulnessResult) -> list[str]:
        n_img = len(result.image_names)
        lines = [f"{len(result.words)} targets on {len(result.exact)} of {n_img} images"
                 + (" with an exact caption" if result.captions is not None else " with a unique largest object")]
        lines += [f"  not run: {m}: {w}" for m, w in result.skipped.items()]
        lines.append(table(result))
        return lines


def _has_part(adapter: Any, part: str) -> bool:
    try:
        grounding.part_layers(adapter, part)  # type: ignore[arg-type]
    except ValueError:
        return False
    return True


def _grounding_rows(method: str, words: list[Word], maps: np.ndarray, coverage: np.ndarray) -> list[dict[str, Any]]:
    rows = []
    for kind in sorted({w.kind for w in words}):
        sel = np.array([w.kind == kind for w in words])
        point = grounding.pointing_game(maps[sel], coverage[sel])
        energy = grounding.energy(maps[sel], coverage[sel], signed="positive")
        e_val, e_n = grounding.nan_mean(energy)
        rows.append({"method": method, "metric": f"pointing/{kind}", "value": float(point.mean()), "n": int(sel.sum()),
                     "baseline": float(grounding.random_pointing(coverage[sel]).mean())})
        rows.append({"method": method, "metric": f"energy/{kind}", "value": e_val, "n": e_n,
                     "baseline": float(grounding.random_energy(coverage[sel]).mean())})
    return rows


def table(result: FaithfulnessResult) -> str:
    """The scores as a markdown table: one row per method, one column per metric (value, and the
    random baseline in the header row below)."""
    metrics = list(dict.fromkeys(r["metric"] for r in result.scores))
    head = "| method | " + " | ".join(metrics) + " |"
    sep = "|---|" + "---:|" * len(metrics)
    lines = [head, sep]
    for m in result.methods:
        cells = []
        for metric in metrics:
            v = result.score(m, metric)
            cells.append("" if v is None or v != v else f"{v:.2f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    base = []
    for metric in metrics:
        b = next((r["baseline"] for r in result.scores if r["metric"] == metric and r["baseline"] is not None), None)
        base.append("" if b is None else f"{b:.2f}")
    lines.append("| *random* | " + " | ".join(base) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ figures
def render_word_maps(result: FaithfulnessResult) -> Figure:
    """Per scored word (rows, first `MAX_WORDS`): the image with the object's patches outlined,
    then each method's map."""
    words = result.words[:MAX_WORDS]
    n_m = len(result.methods)
    fig, axes = grid(len(words), n_m + 1, (1.6 * (n_m + 1), 1.6 * len(words) + 0.5))
    g = result.meta["grid"]
    images = result.arrays["input.image"]
    for r, w in enumerate(words):
        img = images[w["image"]].numpy()
        axes[r][0].imshow(img)
        axes[r][0].set_title(f"{w['word']} ({w['kind']})", fontsize=6)
        for c, m in enumerate(result.methods, start=1):
            amap = result.arrays[f"maps.{m}"][r].clamp(min=0).reshape(g).numpy()
            overlay(axes[r][c], img, amap, vmin=0.0, vmax=float(amap.max()) or 1.0)
            if r == 0:
                axes[r][c].set_title(m, fontsize=6)
        if "masks" in result.arrays:  # the object's exact pixel mask, scaled onto the shown image
            mask = result.arrays["masks"][r].numpy().astype(float)
            height, width = img.shape[:2]
            ys = (np.arange(mask.shape[0]) + 0.5) * height / mask.shape[0] - 0.5
            xs = (np.arange(mask.shape[1]) + 0.5) * width / mask.shape[1] - 0.5
            for ax in axes[r]:
                ax.contour(xs, ys, mask, levels=[0.5], colors="cyan", linewidths=0.8)
    no_ticks(axes)
    fig.suptitle(f"{result.model}: each method's map at the word's step (object outlined)", fontsize=8)
    fig.tight_layout()
    return fig


def render_scores(result: FaithfulnessResult) -> Figure:
    """Bars per metric and method, the random baseline as a dashed line."""
    metrics = [m for m in dict.fromkeys(r["metric"] for r in result.scores) if not m.startswith("sanity")]
    fig, axes = grid(1, max(len(metrics), 1), (2.2 * max(len(metrics), 1), 2.6))
    for c, metric in enumerate(metrics):
        ax = axes[0][c]
        vals = [result.score(m, metric) or 0.0 for m in result.methods]
        ax.bar(range(len(vals)), vals, color="tab:blue")
        base = next((r["baseline"] for r in result.scores if r["metric"] == metric), None)
        if base is not None:
            ax.axhline(base, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(len(vals)), result.methods, rotation=60, fontsize=6, ha="right")
        ax.set_title(metric, fontsize=7)
        ax.tick_params(axis="y", labelsize=6)
    fig.suptitle(f"{result.model}: faithfulness (dashed: random)", fontsize=8)
    fig.tight_layout()
    return fig


__all__ = ["Faithfulness", "FaithfulnessResult", "object_words", "table"]
