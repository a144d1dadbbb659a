"""Image and text token representations per layer: the modality gap, measured in the original
space, and UMAP scatters to look at.

``probe run representations --model git [--data shapes:N | DIR]`` pairs, per layer, the image
tokens (every patch) with the text tokens (every real caption position), where both live in one
vector space: the image tokens sit in the decoder stream (GIT, the prefix VLM), so both come from
the same text-stack layer. Elsewhere the pairs are skipped, with the reason in the result: in
ViT-GPT2 and BLIP the text only cross-attends to the image, and vision layer i and text layer i are
two unrelated spaces (equal widths do not make one space: a rotation of the vision basis, which the
cross-attention's key projection can undo, would change any distance between them); in MMCA the
image tokens share the decoder's space only in its visual stream (``vresid_post``), which
``probe capture`` does not record.

Per pair, following Liang et al. 2022 ("Mind the Gap"), the **modality gap** is the distance
between the means of the L2-normalised image and text embeddings,
``|| mean_i x_i/|x_i| - mean_j y_j/|y_j| ||``, and the accuracy of a linear classifier
separating the two (balanced classes, folds grouped by image, chance 0.5). Both are computed in
the original space and need no labels. UMAP (umap-learn, McInnes et al. 2018) coordinates are only
for looking: they are not reproducible bit for bit and distances in them mean little, so nothing
is measured there; the scatter by label is skipped (and the result says so) on unlabelled data.
numba compiles UMAP on its first call (20-35 s on a 2-core CPU); its cache goes to a writable
folder (``$NUMBA_CACHE_DIR``, else ``$XDG_CACHE_HOME/probe/numba`` or ``~/.cache/probe/numba``,
else a temporary folder), set both in the environment and in ``numba.config.CACHE_DIR``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from matplotlib.figure import Figure

from probe.analyses.activations import DEFAULT_HOOKS, capture_set, layout
from probe.analyses.probes import check_data, check_weights, grouped_folds, make_probe, oof_predict
from probe.analysis import Analysis, param
from probe.data.activations import TARGETS, ActivationSet, is_activation_set, open_activations
from probe.registry import register_analysis
from probe.runs.results import Result
from probe.types import ProbeError, layer_of
from probe.viz.figures import grid

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the measures
def normalise_rows(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (zero rows stay zero). (n, d) -> (n, d) float64."""
    x = np.asarray(x, np.float64)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


def modality_gap(image: np.ndarray, text: np.ndarray) -> float:
    """Liang et al. 2022: ``|| mean(normalise(image)) - mean(normalise(text)) ||``.
    image: (n, d); text: (m, d), the same d."""
    if image.shape[1] != text.shape[1]:
        raise ProbeError(f"image ({image.shape[1]}) and text ({text.shape[1]}) embeddings differ in width: "
                         "the gap needs one space")
    return float(np.linalg.norm(normalise_rows(image).mean(0) - normalise_rows(text).mean(0)))


def separability(image: np.ndarray, text: np.ndarray, image_ids: np.ndarray, text_ids: np.ndarray, *,
                 folds: int = 5, seed: int = 0, max_rows: int = 4000) -> float:
    """Accuracy of a linear probe (`probes.make_probe`) telling image from text rows, with as many
    of each (at most `max_rows`), folds grouped by the image the rows come from; chance is 0.5."""
    rng = np.random.default_rng(seed)
    n = min(len(image), len(text), max_rows)
    a, b = rng.choice(len(image), n, replace=False), rng.choice(len(text), n, replace=False)
    x = np.concatenate([image[a], text[b]])
    y = np.r_[np.zeros(n, int), np.ones(n, int)]
    groups = np.concatenate([image_ids[a], text_ids[b]])
    return float((oof_predict(make_probe(), x, y, groups, grouped_folds(groups, y, folds, seed)) == y).mean())


def numba_cache_dir() -> str:
    """A writable folder for numba's cache: ``$NUMBA_CACHE_DIR`` if set, else
    ``$XDG_CACHE_HOME/probe/numba`` (an empty or relative ``XDG_CACHE_HOME`` is ignored, as the XDG
    spec says, never the working folder) or ``~/.cache/probe/numba``, else a temporary folder. It is
    set as ``NUMBA_CACHE_DIR`` and, when numba is already imported (it reads the variable only at
    import), as ``numba.config.CACHE_DIR``, which numba reads when a cached function is decorated,
    that is when umap and pynndescent are imported."""
    chosen = os.environ.get("NUMBA_CACHE_DIR")
    if not chosen:
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
        for folder in (base / "probe" / "numba", Path(tempfile.gettempdir()) / "probe-numba-cache"):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError:
                continue
            if os.access(folder, os.W_OK):
                chosen = str(folder)
                break
        else:
            raise ProbeError("no writable folder for numba's cache: set NUMBA_CACHE_DIR to one")
        os.environ["NUMBA_CACHE_DIR"] = chosen
    numba = sys.modules.get("numba")
    if numba is not None and numba.config.CACHE_DIR != chosen:
        numba.config.CACHE_DIR = chosen
    return chosen


_UMAP_FITS = [0]


def umap_2d(x: np.ndarray, *, seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """UMAP (umap-learn) to 2-D, for looking only. x: (n, d) -> (n, 2) float32.

    Raises:
        ProbeError: fewer than 4 points (UMAP's spectral layout needs n > 3).
    """
    if len(x) <= 3:
        raise ProbeError(f"UMAP needs at least 4 points; got {len(x)}")
    folder = numba_cache_dir()
    if "umap" in sys.modules and _UMAP_FITS[0] == 0:
        log.debug("umap was imported before probe set numba's cache folder: its compiled functions may be "
                  "cached where numba chose then")
    t0 = time.perf_counter()
    first = _UMAP_FITS[0] == 0
    if first:
        log.info("UMAP: the first fit in a process compiles numba (20-35 s on a 2-core CPU; cache in %s)", folder)
    import umap  # heavy (numba): only when a UMAP is asked for, after the cache folder is set

    out = umap.UMAP(n_components=2, n_neighbors=min(n_neighbors, len(x) - 1), random_state=seed,
                    n_jobs=1).fit_transform(np.asarray(x, np.float32))
    _UMAP_FITS[0] += 1
    if first:
        log.info("UMAP: first fit (with numba compilation) took %.1f s", time.perf_counter() - t0)
    return np.asarray(out, np.float32)


# ----------------------------------------------------------------------------- pairing layers
def one_space(fusion: str, model: str) -> str | None:
    """None where image and text tokens live in one vector space (one decoder stream: ``prefix``
    fusion, GIT and the prefix VLM), else why no pair of layers can be compared."""
    if fusion == "prefix":
        return None
    if fusion == "multimodal_causal":
        return (f"{model}'s image tokens share the decoder's space only in its visual stream "
                "(text.blocks.{i}.vresid_post), which probe capture does not record; vision layer i and text "
                "layer i are different spaces")
    return (f"{model}'s text only cross-attends to the image: vision layer i and text layer i are unrelated "
            "spaces (a rotation of the vision basis would change any distance between them), so no gap is "
            "measured")


def layer_pairs(ds: ActivationSet) -> list[tuple[str, str, str]]:
    """(label, image hook, text hook) per text-stack layer that holds both the image tokens
    (``patches``) and the text tokens (`one_space` families only)."""
    patches = set(ds.hooks_with("patches"))
    return [(f"t{layer_of(h)}", h, h) for h in ds.hooks_with("text") if h in patches]


@dataclass(frozen=True)
class RepresentationsParams:
    data: str = param("shapes:200:test", "an activation data set with patches and text groups (probe capture --groups "
                      "patches,text), shapes:N, a probe-shapes folder or a folder of images (captured on the fly; "
                      "without labels the UMAP is coloured by modality only)")
    label: str = param("colour", "what colours the second UMAP row (on labelled data)", choices=tuple(TARGETS))
    umap: bool = param(True, "also fit a UMAP per layer, for looking only (--no-umap: none, and no 20-35 s numba "
                       "compilation; the gap is measured in the original space either way)")
    max_points: int = param(600, "points per modality in each UMAP", min=20)
    folds: int = param(5, "folds of the separability probe, grouped by image", min=2, max=20)
    draw_seed: int = param(0, "seed of the subsamples, folds and UMAP", min=0)


@dataclass(frozen=True)
class RepresentationsResult(Result):
    """Modality gap and UMAP per layer; see `probe.analyses.representations`.

    Fields: model, data (the images: the data set's ``--data``), activations (the activation data
    set folder read; empty when captured on the fly or when nothing was read), label, joint (image
    tokens in the decoder stream), pairs (per compared layer: name, image_hook, text_hook, gap,
    separability, n_image, n_text, dim; or skipped with the reason), notes (what was left out and
    why, e.g. the label UMAP on unlabelled data), umap_seconds, first_umap_seconds.
    Arrays: ``gap``, ``separability`` (pairs,) (NaN for skipped pairs); with UMAP, per pair k
    ``umap.{k}`` (points, 2), ``umap_modality.{k}`` (points,) 0 image / 1 text, and on labelled
    data ``umap_label.{k}`` (points,) the label's class index (-1: none).
    """

    kind: ClassVar[str] = "representations"
    schema_version: ClassVar[int] = 1
    nan_padded: ClassVar[tuple[str, ...]] = ("gap", "separability")
    model: str = ""
    data: str = ""
    activations: str = ""
    label: str = ""
    joint: bool = False
    pairs: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    umap_seconds: float = 0.0
    first_umap_seconds: float = 0.0


def skipped(model: str, data: str, reason: str, label: str) -> RepresentationsResult:
    """The result of a family whose image and text tokens share no space: one skipped entry."""
    return RepresentationsResult(arrays={"gap": torch.full((1,), float("nan")),
                                         "separability": torch.full((1,), float("nan"))},
                                 model=model, data=data, label=label, joint=False,
                                 pairs=[{"name": "all", "image_hook": None, "text_hook": None, "gap": None,
                                         "separability": None, "skipped": reason}])


def represent(ds: ActivationSet, params: RepresentationsParams, model: str) -> RepresentationsResult:
    """Gap, separability and UMAPs of a data set of a one-space family (`one_space`)."""
    pairs = layer_pairs(ds)
    if not pairs:
        raise ProbeError(f"{ds.folder} has no text-stack layer with both image and text tokens: capture --groups "
                         "patches,text with text hooks (text.blocks.*.resid_post) of a model whose image tokens "
                         "sit in the decoder stream (GIT, the prefix VLM)")
    img_rows, txt_rows = ds.rows("patches"), ds.rows("text")
    notes = []
    labelled = ds.labelled
    if params.umap and not labelled:
        notes.append(f"no labels (images without annotations): the UMAP by {params.label} is skipped, the one by "
                     "modality is drawn")
    rng = np.random.default_rng(params.draw_seed)
    out, arrays = [], {}
    t_umap, t_first = 0.0, 0.0
    for k, (name, ih, th) in enumerate(pairs):
        img, txt = ds.load(ih, "patches"), ds.load(th, "text")
        gap = modality_gap(img, txt)
        sep = separability(img, txt, img_rows["image"], txt_rows["image"], folds=params.folds, seed=params.draw_seed)
        out.append({"name": name, "image_hook": ih, "text_hook": th, "gap": gap, "separability": sep,
                    "n_image": len(img), "n_text": len(txt), "dim": img.shape[1]})
        if not params.umap:
            continue
        a = rng.choice(len(img), min(len(img), params.max_points), replace=False)
        b = rng.choice(len(txt), min(len(txt), params.max_points), replace=False)
        if len(a) + len(b) <= 3:
            notes.append(f"{name}: {len(a) + len(b)} points, too few for a UMAP")
            continue
        t0 = time.perf_counter()
        xy = umap_2d(np.concatenate([img[a], txt[b]]), seed=params.draw_seed)
        dt = time.perf_counter() - t0
        t_first = t_first or dt
        t_umap += dt
        arrays[f"umap.{k}"] = torch.from_numpy(xy)
        arrays[f"umap_modality.{k}"] = torch.tensor(np.r_[np.zeros(len(a), int), np.ones(len(b), int)])
        if labelled:
            arrays[f"umap_label.{k}"] = torch.from_numpy(np.concatenate([img_rows[params.label][a],
                                                                         txt_rows[params.label][b]]))
    arrays["gap"] = torch.tensor([p["gap"] for p in out], dtype=torch.float32)
    arrays["separability"] = torch.tensor([p["separability"] for p in out], dtype=torch.float32)
    return RepresentationsResult(arrays=arrays, model=model, data=str(ds.index.get("data", "")),
                                 activations=str(Path(ds.folder).resolve()), label=params.label, joint=True, pairs=out,
                                 notes=notes, umap_seconds=round(t_umap, 2), first_umap_seconds=round(t_first, 2))


class Representations(Analysis):
    name = "representations"
    summary = "modality gap per layer (Liang et al. 2022, original space) and UMAP of image vs text tokens"
    Params = RepresentationsParams
    task = "caption"
    reads_images = False
    checks_architecture = True
    default_task = "caption"

    def check_architecture(self, adapter: Any, params: RepresentationsParams) -> str | None:
        try:
            layout(adapter, DEFAULT_HOOKS, ["patches", "text"])
        except ProbeError as e:
            return str(e)
        why = check_data(adapter.name, params.data, "text", params.label, folds=params.folds, labels=False)
        if why is None and is_activation_set(params.data) and "patches" not in open_activations(params.data).groups:
            why = f"--data {params.data} has no patches group; capture it with --groups patches,text"
        return why

    def run(self, adapter: Any, inputs: Any, params: RepresentationsParams) -> RepresentationsResult:
        why = self.check_architecture(adapter, params)
        if why:
            raise ProbeError(why)
        stored = not params.data.startswith("shapes:") and is_activation_set(params.data)
        ds = open_activations(params.data) if stored else None
        if ds is not None and (why := check_weights(ds, adapter, params.data)):
            raise ProbeError(why)
        reason = one_space(adapter.capabilities.fusion, adapter.name)
        if reason:  # nothing to compare: nothing is captured or read
            return skipped(adapter.name, str(ds.index.get("data", "")) if ds else params.data, reason, params.label)
        if ds is not None:
            return represent(ds, params, adapter.name)
        with tempfile.TemporaryDirectory(prefix="probe-activations-") as tmp:
            ds = capture_set(adapter, params.data, Path(tmp) / "set", groups=["patches", "text"])
            assert ds is not None
            return dataclasses.replace(represent(ds, params, adapter.name), activations="")

    def render(self, result: RepresentationsResult) -> dict[str, Figure]:
        return render_representations(result)

    def summary_lines(self, result: RepresentationsResult) -> list[str]:
        lines = [f"{result.model}: modality gap (distance of normalised means) and linear separability, per layer"
                 + (f"; UMAP {result.umap_seconds:.1f} s (first fit {result.first_umap_seconds:.1f} s, numba "
                    "compilation included)" if result.umap_seconds else "")]
        for p in result.pairs:
            if p["gap"] is None:
                lines.append(f"  {p['name']:<8} skipped: {p['skipped']}")
            else:
                lines.append(f"  {p['name']:<8} gap {p['gap']:.3f}  separability {p['separability']:.3f}")
        lines += [f"  note: {n}" for n in result.notes]
        return lines


def render_representations(result: RepresentationsResult) -> dict[str, Figure]:
    """Gap and separability per layer; UMAP scatters per layer by modality and (labelled data) by label."""
    figs: dict[str, Figure] = {}
    names = [p["name"] for p in result.pairs]
    xs = np.arange(len(names))
    fig, axes = grid(1, 2, (9, 3.2))
    axes[0][0].plot(xs, result.arrays["gap"].numpy(), marker="o")
    axes[0][0].set_title("modality gap |mean(img/|img|) - mean(txt/|txt|)|", fontsize=9)
    axes[0][1].plot(xs, result.arrays["separability"].numpy(), marker="o")
    axes[0][1].axhline(0.5, color="grey", ls="--", lw=0.8)
    axes[0][1].set_ylim(0.4, 1.02)
    axes[0][1].set_title("linear separability of image vs text (grouped CV)", fontsize=9)
    for ax in (axes[0][0], axes[0][1]):
        ax.set_xticks(xs, names, fontsize=8)
    why = [p["skipped"] for p in result.pairs if p.get("skipped")]
    if why and len(why) == len(result.pairs):
        axes[0][0].text(0.02, 0.5, "\n".join(textwrap.wrap(f"skipped: {why[0]}", 60)), fontsize=7,
                        transform=axes[0][0].transAxes, va="center")
    fig.suptitle(result.model, fontsize=9)
    fig.tight_layout()
    figs["modality_gap"] = fig
    ks = [k for k in range(len(result.pairs)) if f"umap.{k}" in result.arrays]
    if ks:
        by_label = all(f"umap_label.{k}" in result.arrays for k in ks)
        rows = 2 if by_label else 1
        fig, axes = grid(rows, len(ks), (2.8 * len(ks), 2.8 * rows))
        classes = TARGETS.get(result.label, ())
        for col, k in enumerate(ks):
            xy = result.arrays[f"umap.{k}"].numpy()
            mod = result.arrays[f"umap_modality.{k}"].numpy()
            for m, (name, colour) in enumerate((("image", "tab:blue"), ("text", "tab:orange"))):
                axes[0][col].scatter(*xy[mod == m].T, s=3, c=colour, label=name)
            axes[0][col].set_title(names[k], fontsize=8)
            if by_label:
                lab = result.arrays[f"umap_label.{k}"].numpy()
                axes[1][col].scatter(*xy[lab < 0].T, s=2, c="lightgrey")
                for c, cname in enumerate(classes):
                    axes[1][col].scatter(*xy[lab == c].T, s=3, label=cname)
        axes[0][0].legend(fontsize=6, markerscale=3)
        if by_label:
            axes[1][0].legend(fontsize=6, markerscale=3)
        for ax in np.asarray(axes).ravel():
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle("UMAP per layer (for looking only): by modality" + (f", by {result.label}" if by_label else
                     " (no labels)"), fontsize=9)
        fig.tight_layout()
        figs["umap"] = fig
    return figs


register_analysis(Representations)
