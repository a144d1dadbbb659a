"""Linear probes per layer, with control tasks and selectivity (Hewitt & Liang 2019).

``probe run probes --model M --target colour --tokens cls [--data shapes:N | DIR]``: for every
layer that has rows of the token group (vision and text stacks), a scikit-learn
``Pipeline(StandardScaler(), LogisticRegression())`` is cross-validated with folds **grouped by
image** and stratified by the task label (`sklearn.model_selection.StratifiedGroupKFold`: no image
has rows in both train and test, so a probe cannot pass by recognising an image it saw; every fold
keeps the label distribution, so a held-out fold's majority is the training majority), the same
folds for task, control, baseline and ceiling, and reports:

- accuracy of the out-of-fold predictions, with a 95% confidence interval from a bootstrap over
  images (rows of one image are not independent, so images are resampled, not rows), computed in
  chunks of resamples so memory stays bounded whatever the number of images;
- the majority-class baseline (`sklearn.dummy.DummyClassifier`, the same folds) and the majority
  class's overall frequency;
- the control task: each input *type* gets a label drawn once, from the empirical label
  distribution, and kept for every row of that type; a probe of the same capacity on the same
  folds, and **selectivity = task accuracy - control accuracy**. What a type is per token group
  (`probe.data.activations.TYPES`): ``patches`` the patch position, ``object`` the patch under the
  object's centre, ``cls``/``mean`` the patch under the labelled (largest) object's centre (what a
  probe could memorise from position embeddings), ``text`` the token id.
- the control ceiling: the same probe on a (sparse) one-hot of the type. It shows the control
  task is learnable by memorisation, so a low control accuracy is the representation's doing.

With ``--tokens patches`` the probe is per patch, supervised by the object masks: a patch covered
at least half by an object is labelled with that object's attribute (background patches are left
out, except for ``--target count``, which belongs to the whole image); the accuracy per patch
position is kept as a heat map over the image.

The data: an activation data set (``probe capture``, `probe.data.activations`; only the rows kept
after ``max_rows`` are read, shard by shard) or, for ``shapes:N`` and probe-shapes folders, one
captured on the fly into a temporary folder.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from matplotlib.figure import Figure

from probe.analyses.activations import DEFAULT_HOOKS, capture_set, layout, parse_source
from probe.analysis import Analysis, param
from probe.data.activations import GROUPS, TARGETS, TYPES, ActivationSet, is_activation_set, open_activations
from probe.registry import register_analysis
from probe.runs.results import Result
from probe.types import ProbeError
from probe.viz.figures import grid

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the method
def control_labels(types: np.ndarray, labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Hewitt & Liang's control task: per distinct type one label drawn from the empirical
    distribution of `labels`, the same for every row of that type. types, labels: (rows,) -> (rows,)."""
    classes, counts = np.unique(labels, return_counts=True)
    uniq, inverse = np.unique(types, return_inverse=True)
    draw = np.random.default_rng(seed).choice(classes, size=len(uniq), p=counts / counts.sum())
    return draw[inverse]


def make_probe(c: float = 1.0, max_iter: int = 1000, sparse: bool = False) -> Any:
    """``Pipeline(StandardScaler(), LogisticRegression(C=c))``; for `sparse` input the scaler does not
    centre (``with_mean=False``: centring would make it dense; the unpenalised intercept absorbs the
    shift, so the fit is the same)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(with_mean=not sparse), LogisticRegression(C=c, max_iter=max_iter))


def grouped_folds(images: np.ndarray, y: np.ndarray, folds: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (train, test) row indices of `StratifiedGroupKFold` over images, stratified by `y`
    (shuffled, seeded); fewer folds when there are fewer images, or fewer rows in the largest
    class, than `folds`. One list, so task, control, baseline and ceiling share the folds."""
    from sklearn.model_selection import StratifiedGroupKFold

    n = len(np.unique(images))
    largest = int(np.unique(y, return_counts=True)[1].max()) if len(y) else 0
    k = min(folds, n, largest)
    if k < 2:
        raise ProbeError(f"probing needs rows from at least 2 images, and a class with at least 2 rows, for a "
                         f"grouped split; got {n} images, at most {largest} rows per class")
    if k < folds:
        log.info("%d folds instead of %d: %d images, at most %d rows per class", k, folds, n, largest)
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # "the least populated class has only k members": stratified as far as it goes
        warnings.simplefilter("ignore", UserWarning)
        return list(cv.split(np.zeros(len(y)), y, groups=images))


def oof_predict(estimator: Any, x: Any, y: np.ndarray, images: np.ndarray,
                cv: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Out-of-fold predictions (rows,) on the given folds (`grouped_folds`; `cross_val_predict`)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import cross_val_predict
    from threadpoolctl import threadpool_limits

    # one BLAS thread: on a small shared machine two threads made lbfgs up to 30x slower (measured)
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        return cross_val_predict(estimator, x, y, groups=images, cv=cv)


#: at most this many (resample, image) entries at once in the bootstrap (int64 picks and two float64
#: gathers: about 24 MB)
BOOT_CHUNK = 1 << 20


def image_bootstrap_ci(correct: np.ndarray, images: np.ndarray, n_boot: int = 1000, seed: int = 0,
                       level: float = 0.95, chunk: int = BOOT_CHUNK) -> tuple[float, float]:
    """Percentile CI of the accuracy, resampling images (clusters) with replacement.
    correct: (rows,) bool; images: (rows,) image ids. Resamples are drawn `chunk` // images at a
    time, so memory is O(chunk + n_boot), not O(n_boot x images); the numbers depend on the chunk
    size only through the order of the random draws."""
    _, inv = np.unique(images, return_inverse=True)
    hits = np.bincount(inv, weights=correct.astype(np.float64))
    sizes = np.bincount(inv).astype(np.float64)
    n = len(sizes)
    rng = np.random.default_rng(seed)
    acc = np.empty(n_boot)
    step = max(1, chunk // max(n, 1))
    for lo in range(0, n_boot, step):
        pick = rng.integers(0, n, size=(min(step, n_boot - lo), n))
        acc[lo : lo + len(pick)] = hits[pick].sum(1) / sizes[pick].sum(1)
    a = (1 - level) / 2
    return float(np.quantile(acc, a)), float(np.quantile(acc, 1 - a))


def onehot(types: np.ndarray) -> Any:
    """(rows,) -> (rows, distinct types) sparse (CSR) float32 one-hot: token-id types number in the
    tens of thousands, a dense one would not fit."""
    from scipy import sparse

    _, inv = np.unique(types, return_inverse=True)
    return sparse.csr_matrix((np.ones(len(types), np.float32), (np.arange(len(types)), inv)),
                             shape=(len(types), int(inv.max()) + 1 if len(inv) else 0))


def majority_frequency(y: np.ndarray) -> float:
    """The overall frequency of the most frequent class of `y` (the in-sample majority baseline)."""
    _, counts = np.unique(y, return_counts=True)
    return float(counts.max() / counts.sum())


def probe_layer(x: np.ndarray, y: np.ndarray, images: np.ndarray, types: np.ndarray, *, folds: int = 5,
                c: float = 1.0, max_iter: int = 1000, seed: int = 0, n_boot: int = 1000,
                control: np.ndarray | None = None,
                cv: list[tuple[np.ndarray, np.ndarray]] | None = None) -> dict[str, Any]:
    """Task and control probes of one layer on the same folds. x: (rows, dim); y, images, types: (rows,).

    Returns accuracy, ci (lo, hi), baseline (majority class of each training fold, out of fold),
    majority (the majority class's overall frequency), control, selectivity, and ``correct``
    (rows,) bool of the task's out-of-fold predictions.
    """
    from sklearn.dummy import DummyClassifier

    cv = grouped_folds(images, y, folds, seed) if cv is None else cv
    ctrl = control_labels(types, y, seed) if control is None else control
    pred = oof_predict(make_probe(c, max_iter), x, y, images, cv)
    correct = pred == y
    acc = float(correct.mean())
    base = float((oof_predict(DummyClassifier(strategy="most_frequent"), x, y, images, cv) == y).mean())
    ctrl_acc = float((oof_predict(make_probe(c, max_iter), x, ctrl, images, cv) == ctrl).mean())
    lo, hi = image_bootstrap_ci(correct, images, n_boot, seed)
    return {"accuracy": acc, "ci": (lo, hi), "baseline": base, "majority": majority_frequency(y), "control": ctrl_acc,
            "selectivity": acc - ctrl_acc, "correct": correct}


def control_ceiling(types: np.ndarray, control: np.ndarray, images: np.ndarray, *, folds: int = 5,
                    c: float = 1.0, max_iter: int = 1000, seed: int = 0,
                    cv: list[tuple[np.ndarray, np.ndarray]] | None = None) -> float:
    """Accuracy of the same probe on a sparse one-hot of the type, on the control labels: how far
    memorising types alone gets (the control task is learnable by memorisation). `cv`: the task's
    folds (default: folds stratified by the control labels)."""
    cv = grouped_folds(images, control, folds, seed) if cv is None else cv
    return float((oof_predict(make_probe(c, max_iter, sparse=True), onehot(types), control, images, cv)
                  == control).mean())


# ----------------------------------------------------------------------------- the analysis
@dataclass(frozen=True)
class ProbesParams:
    target: str = param("colour", "what to decode", choices=tuple(TARGETS))
    tokens: str = param("cls", "token group: " + "; ".join(f"{k}: {v}" for k, v in GROUPS.items()),
                        choices=tuple(GROUPS))
    data: str = param("shapes:1000:test", "an activation data set folder (probe capture), shapes:N[:SPLIT] or a "
                      "probe-shapes folder (captured on the fly)")
    folds: int = param(5, "cross-validation folds, grouped by image", min=2, max=20)
    c: float = param(1.0, "inverse regularisation strength C of the logistic regression", min=1e-6)
    max_iter: int = param(1000, "LogisticRegression max_iter", min=10)
    max_rows: int = param(200_000, "at most this many rows per layer (whole images are subsampled)", min=100)
    control_seed: int = param(0, "seed of the control labels, the folds and the bootstrap", min=0)
    n_boot: int = param(1000, "bootstrap resamples (over images) of the confidence interval", min=10)


@dataclass(frozen=True)
class ProbesResult(Result):
    """Per-layer probe scores; see `probe.analyses.probes`.

    Fields: model, target, tokens, classes (the target's class names), data (the images: the data
    set's ``--data``), activations (the activation data set folder read; empty when captured on the
    fly into a temporary folder), type (what a control type is), layers (hook names, in order),
    scores (per layer: hook, accuracy, ci_lo, ci_hi, baseline (out of fold), majority (overall
    frequency of the majority class), control, selectivity, rows, images), control_ceiling, grid.
    Arrays: ``accuracy``, ``baseline``, ``control``, ``selectivity`` (layers,), ``ci`` (layers, 2);
    with tokens ``patches``: ``patch_accuracy`` (layers, rows, cols), NaN where no patch was labelled.
    """

    kind: ClassVar[str] = "probes"
    schema_version: ClassVar[int] = 1
    nan_padded: ClassVar[tuple[str, ...]] = ("patch_accuracy",)
    model: str = ""
    target: str = ""
    tokens: str = ""
    classes: list[str] = field(default_factory=list)
    data: str = ""
    activations: str = ""
    type: str = ""
    layers: list[str] = field(default_factory=list)
    scores: list[dict[str, Any]] = field(default_factory=list)
    control_ceiling: float = float("nan")
    grid: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def best(self) -> dict[str, Any]:
        """The layer with the highest task accuracy (ties: the higher selectivity)."""
        return max(self.scores, key=lambda s: (round(s["accuracy"], 6), s["selectivity"]))


def min_images(tokens: str, folds: int) -> int:
    """Images a probe needs: one per fold, and 10 rows (one per image for ``cls``/``mean``)."""
    return max(folds, MIN_ROWS) if tokens in ("cls", "mean") else folds


#: fewest labelled rows a probe is fitted on
MIN_ROWS = 10


def check_data(model: str, data: str, tokens: str, target: str, *, folds: int = 5,
               labels: bool = True) -> str | None:
    """Why `data` cannot serve a probe of `target` on `tokens` for `model`, or None (no work done:
    a ``shapes:N`` or image folder too small for `folds` is refused before it is captured).
    `labels`: whether the analysis needs labels (the modality gap does not)."""
    path = Path(data)
    if not data.startswith("shapes:") and is_activation_set(path):
        try:
            ds = open_activations(path)
        except ProbeError as e:
            return str(e)
        if ds.model != model:
            return (f"--data {data} was captured from {ds.model}, not {model}: pass --model {ds.model} or capture "
                    f"{model} into another folder")
        if tokens not in ds.groups:
            return f"--data {data} holds the token groups {', '.join(ds.groups)}, not {tokens!r}; capture it with --groups {tokens}"
        if labels and not ds.labelled:
            return (f"--data {data} has no labels (captured from images without annotations), so there is no "
                    f"{target!r} to probe; capture probe-shapes (shapes:N or a `probe data shapes` folder)")
        return None
    try:
        source = parse_source(data)
    except ProbeError as e:
        return str(e)
    if labels and not source.labelled:
        return (f"--data {data}: images without annotations have no {target!r} labels; probe probe-shapes "
                "(shapes:N or a `probe data shapes` folder)")
    need = min_images(tokens, folds)
    if source.n < need:
        return (f"--data {data} has {source.n} images; {folds} folds grouped by image need at least {need} "
                f"(and at least {MIN_ROWS} labelled rows)")
    return None


def check_weights(ds: ActivationSet, adapter: Any, data: str) -> str | None:
    """Why the loaded weights are not those `ds` was captured from (sha256 differs), or None."""
    want = (ds.index.get("weights") or {}).get("sha256")
    have = adapter.weights.sha256 if adapter.weights else None
    if want and have and want != have:
        return (f"--data {data} was captured from other weights of {ds.model} (sha256 {want[:12]}, loaded "
                f"{have[:12]}); pass those --weights")
    return None


def probe_set(ds: ActivationSet, target: str, tokens: str, params: ProbesParams | None = None,
              model: str | None = None) -> ProbesResult:
    """Probe every layer of an activation data set that has `tokens` rows."""
    p = params or ProbesParams(target=target, tokens=tokens)
    t0 = time.perf_counter()
    if target not in TARGETS:
        raise ProbeError(f"--target {target!r}: choose from {', '.join(TARGETS)}")
    if not ds.labelled:
        raise ProbeError(f"{ds.folder} has no labels, so there is no {target!r} to probe")
    rows = ds.rows(tokens)
    keep = rows[target] >= 0
    images = rows["image"]
    uniq = np.unique(images[keep])
    if p.max_rows and keep.sum() > p.max_rows:  # subsample whole images
        per = keep.sum() / max(len(uniq), 1)
        chosen = np.random.default_rng(p.control_seed).choice(uniq, size=max(2, int(p.max_rows / per)), replace=False)
        keep &= np.isin(images, chosen)
    n_rows, n_img = int(keep.sum()), len(np.unique(images[keep]))
    if n_rows < MIN_ROWS or n_img < p.folds:
        raise ProbeError(f"only {n_rows} labelled {tokens} rows from {n_img} images for {target!r}; {p.folds} folds "
                         f"grouped by image need at least {MIN_ROWS} rows from at least {p.folds} images: capture more "
                         "images")
    y, img, types = rows[target][keep], images[keep], rows["type"][keep]
    ctrl = control_labels(types, y, p.control_seed)
    cv = grouped_folds(img, y, p.folds, p.control_seed)
    kept = np.flatnonzero(keep)
    hooks = ds.hooks_with(tokens)
    g = list(ds.index.get("grid", [0, 0]))
    scores, patch_maps = [], []
    from tqdm.auto import tqdm

    for h in tqdm(hooks, desc=f"probes {target} on {tokens}", unit="layer"):
        x = ds.load(h, tokens, rows=kept)  # only the kept rows are read
        s = probe_layer(x, y, img, types, folds=p.folds, c=p.c, max_iter=p.max_iter, seed=p.control_seed,
                        n_boot=p.n_boot, control=ctrl, cv=cv)
        del x
        scores.append({"hook": h, "accuracy": s["accuracy"], "ci_lo": s["ci"][0], "ci_hi": s["ci"][1],
                       "baseline": s["baseline"], "majority": s["majority"], "control": s["control"],
                       "selectivity": s["selectivity"], "rows": int(len(y)), "images": int(len(np.unique(img)))})
        if tokens == "patches":
            patch = rows["patch"][keep]
            acc = np.full(g[0] * g[1], np.nan)
            hit = np.bincount(patch, weights=s["correct"].astype(float), minlength=len(acc))
            n = np.bincount(patch, minlength=len(acc))
            acc[n > 0] = hit[n > 0] / n[n > 0]
            patch_maps.append(acc.reshape(g))
    ceiling = control_ceiling(types, ctrl, img, folds=p.folds, c=p.c, max_iter=p.max_iter, seed=p.control_seed, cv=cv)
    arrays = {name: torch.tensor([s[name] for s in scores], dtype=torch.float32)
              for name in ("accuracy", "baseline", "control", "selectivity")}
    arrays["ci"] = torch.tensor([[s["ci_lo"], s["ci_hi"]] for s in scores], dtype=torch.float32)
    if patch_maps:
        arrays["patch_accuracy"] = torch.from_numpy(np.stack(patch_maps)).float()
    return ProbesResult(arrays=arrays, model=model or ds.model, target=target, tokens=tokens,
                        classes=list(TARGETS[target]), data=str(ds.index.get("data", "")),
                        activations=str(Path(ds.folder).resolve()), type=TYPES[tokens],
                        layers=hooks, scores=scores, control_ceiling=ceiling, grid=g,
                        seconds=round(time.perf_counter() - t0, 3))


class Probes(Analysis):
    name = "probes"
    summary = "linear probes per layer with control tasks and selectivity (Hewitt & Liang), grouped by image"
    Params = ProbesParams
    reads_images = False
    checks_architecture = True

    def check_architecture(self, adapter: Any, params: ProbesParams) -> str | None:
        try:
            layout(adapter, DEFAULT_HOOKS, [params.tokens])
        except ProbeError as e:
            return f"--tokens {params.tokens}: {e}"
        return check_data(adapter.name, params.data, params.tokens, params.target, folds=params.folds)

    def run(self, adapter: Any, inputs: Any, params: ProbesParams) -> ProbesResult:
        why = self.check_architecture(adapter, params)
        if why:
            raise ProbeError(why)
        if not params.data.startswith("shapes:") and is_activation_set(params.data):
            ds = open_activations(params.data)
            why = check_weights(ds, adapter, params.data)
            if why:
                raise ProbeError(why)
            return probe_set(ds, params.target, params.tokens, params, adapter.name)
        with tempfile.TemporaryDirectory(prefix="probe-activations-") as tmp:
            ds = capture_set(adapter, params.data, Path(tmp) / "set", groups=[params.tokens])
            assert ds is not None
            res = probe_set(ds, params.target, params.tokens, params, adapter.name)
            return dataclasses.replace(res, activations="")  # the temporary folder is gone

    def render(self, result: ProbesResult) -> dict[str, Figure]:
        return render_probes(result)

    def summary_lines(self, result: ProbesResult) -> list[str]:
        lines = [f"{result.model}: {result.target} from {result.tokens} tokens; control type = {result.type}; "
                 f"control ceiling (one-hot of the type) {result.control_ceiling:.3f}"]
        for s in result.scores:
            lines.append(f"  {s['hook']:<28} acc {s['accuracy']:.3f} [{s['ci_lo']:.3f}, {s['ci_hi']:.3f}]  "
                         f"baseline {s['baseline']:.3f} (majority {s.get('majority', float('nan')):.3f})  "
                         f"control {s['control']:.3f}  selectivity {s['selectivity']:+.3f}")
        b = result.best()
        lines.append(f"  best: {b['hook']} accuracy {b['accuracy']:.3f}, selectivity {b['selectivity']:+.3f} "
                     f"({result.seconds:.1f} s)")
        return lines


def _short(hook: str) -> str:
    parts = hook.split(".")
    return f"{parts[0][0]}{parts[2]}" if len(parts) > 2 else hook


def render_probes(result: ProbesResult) -> dict[str, Figure]:
    """Accuracy (with its CI), control and baseline per layer, selectivity beside; per-patch heat maps."""
    figs: dict[str, Figure] = {}
    names = [_short(h) for h in result.layers]
    xs = np.arange(len(names))
    a = result.arrays
    fig, axes = grid(1, 2, (10, 3.6))
    ax = axes[0][0]
    ci = a["ci"].numpy()
    ax.plot(xs, a["accuracy"].numpy(), marker="o", label="task")
    ax.fill_between(xs, ci[:, 0], ci[:, 1], alpha=0.25)
    ax.plot(xs, a["control"].numpy(), marker="s", label="control")
    ax.plot(xs, a["baseline"].numpy(), ls="--", color="grey", label="majority")
    ax.set_xticks(xs, names, fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy (grouped CV)")
    ax.legend(fontsize=7)
    ax.set_title(f"{result.model}: {result.target} from {result.tokens}", fontsize=9)
    ax = axes[0][1]
    ax.bar(xs, a["selectivity"].numpy())
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xticks(xs, names, fontsize=8)
    ax.set_title("selectivity = task - control", fontsize=9)
    fig.tight_layout()
    figs["probes"] = fig
    if "patch_accuracy" in a:
        maps = a["patch_accuracy"].numpy()
        fig, axes = grid(1, len(maps), (2.2 * len(maps), 2.6))
        for k, ax in enumerate(np.asarray(axes).ravel()):
            im = ax.imshow(maps[k], vmin=0, vmax=1, cmap="viridis")
            ax.set_title(names[k], fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(im, ax=list(np.asarray(axes).ravel()), fraction=0.03)
        fig.suptitle(f"per-patch probe accuracy of the {result.target} of the object under each patch", fontsize=9)
        figs["patch_accuracy"] = fig
    return figs


register_analysis(Probes)
