"""Linear probes per layer, with control tasks and selectivity (Hewitt & Liang 2019).

``probe run probes --model M --target colour --tokens cls [--data shapes:N | DIR]``: for every
layer that has rows of the token group (vision and text stacks), a scikit-learn
``Pipeline(StandardScaler(), LogisticRegression())`` is cross-validated with folds **grouped by
image** (`sklearn.model_selection.GroupKFold`: no image has rows in both train and test, so a
probe cannot pass by recognising an image it saw), and reports:

- accuracy of the out-of-fold predictions, with a 95% confidence interval from a bootstrap over
  images (rows of one image are not independent, so images are resampled, not rows);
- the majority-class baseline (`sklearn.dummy.DummyClassifier`, the same folds);
- the control task: each input *type* gets a label drawn once, from the empirical label
  distribution, and kept for every row of that type; a probe of the same capacity on the same
  folds, and **selectivity = task accuracy - control accuracy**. What a type is per token group
  (`probe.data.activations.TYPES`): ``patches`` the patch position, ``object`` the patch under the
  object's centre, ``cls``/``mean`` the patch under the labelled (largest) object's centre (what a
  probe could memorise from position embeddings), ``text`` the token id.
- the control ceiling: the same probe on a one-hot of the type. It shows the control task is
  learnable by memorisation, so a low control accuracy is the representation's doing.

With ``--tokens patches`` the probe is per patch, supervised by the object masks: a patch covered
at least half by an object is labelled with that object's attribute (background patches are left
out); the accuracy per patch position is kept as a heat map over the image.

The data: an activation data set (``probe capture``, `probe.data.activations`) or, for
``shapes:N`` and probe-shapes folders, one captured on the fly into a temporary folder.
"""

from __future__ import annotations

import logging
import tempfile
import time
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


def make_probe(c: float = 1.0, max_iter: int = 1000) -> Any:
    """``Pipeline(StandardScaler(), LogisticRegression(C=c))``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))


def grouped_folds(images: np.ndarray, folds: int, seed: int = 0) -> Any:
    """`GroupKFold` over images (shuffled, seeded); fewer folds when there are fewer images."""
    from sklearn.model_selection import GroupKFold

    n = len(np.unique(images))
    if n < 2:
        raise ProbeError(f"probing needs rows from at least 2 images for a grouped split; got {n}")
    return GroupKFold(n_splits=min(folds, n), shuffle=True, random_state=seed)


def oof_predict(estimator: Any, x: np.ndarray, y: np.ndarray, images: np.ndarray, cv: Any) -> np.ndarray:
    """Out-of-fold predictions (rows,) with folds grouped by image (`cross_val_predict`)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import cross_val_predict
    from threadpoolctl import threadpool_limits

    # one BLAS thread: on a small shared machine two threads made lbfgs up to 30x slower (measured)
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        return cross_val_predict(estimator, x, y, groups=images, cv=cv)


def image_bootstrap_ci(correct: np.ndarray, images: np.ndarray, n_boot: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of the accuracy, resampling images (clusters) with replacement.
    correct: (rows,) bool; images: (rows,) image ids."""
    _, inv = np.unique(images, return_inverse=True)
    hits = np.bincount(inv, weights=correct.astype(np.float64))
    sizes = np.bincount(inv).astype(np.float64)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(sizes), size=(n_boot, len(sizes)))
    acc = hits[pick].sum(1) / sizes[pick].sum(1)
    a = (1 - level) / 2
    return float(np.quantile(acc, a)), float(np.quantile(acc, 1 - a))


def onehot(types: np.ndarray) -> np.ndarray:
    """(rows,) -> (rows, distinct types) float32 one-hot."""
    _, inv = np.unique(types, return_inverse=True)
    out = np.zeros((len(types), inv.max() + 1), np.float32)
    out[np.arange(len(types)), inv] = 1
    return out


def probe_layer(x: np.ndarray, y: np.ndarray, images: np.ndarray, types: np.ndarray, *, folds: int = 5,
                c: float = 1.0, max_iter: int = 1000, seed: int = 0, n_boot: int = 1000,
                control: np.ndarray | None = None) -> dict[str, Any]:
    """Task and control probes of one layer. x: (rows, dim); y, images, types: (rows,).

    Returns accuracy, ci (lo, hi), baseline (majority class), control, selectivity, and
    ``correct`` (rows,) bool of the task's out-of-fold predictions.
    """
    from sklearn.dummy import DummyClassifier

    cv = grouped_folds(images, folds, seed)
    ctrl = control_labels(types, y, seed) if control is None else control
    pred = oof_predict(make_probe(c, max_iter), x, y, images, cv)
    correct = pred == y
    acc = float(correct.mean())
    base = float((oof_predict(DummyClassifier(strategy="most_frequent"), x, y, images, cv) == y).mean())
    ctrl_acc = float((oof_predict(make_probe(c, max_iter), x, ctrl, images, cv) == ctrl).mean())
    lo, hi = image_bootstrap_ci(correct, images, n_boot, seed)
    return {"accuracy": acc, "ci": (lo, hi), "baseline": base, "control": ctrl_acc, "selectivity": acc - ctrl_acc,
            "correct": correct}


def control_ceiling(types: np.ndarray, control: np.ndarray, images: np.ndarray, *, folds: int = 5,
                    c: float = 1.0, max_iter: int = 1000, seed: int = 0) -> float:
    """Accuracy of the same probe on a one-hot of the type, on the control labels: how far
    memorising types alone gets (the control task is learnable by memorisation)."""
    x = onehot(types)
    return float((oof_predict(make_probe(c, max_iter), x, control, images, grouped_folds(images, folds, seed))
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

    Fields: model, target, tokens, classes (the target's class names), data (the data set), type
    (what a control type is), layers (hook names, in order), scores (per layer: hook, accuracy,
    ci_lo, ci_hi, baseline, control, selectivity, rows, images), control_ceiling, grid.
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
    type: str = ""
    layers: list[str] = field(default_factory=list)
    scores: list[dict[str, Any]] = field(default_factory=list)
    control_ceiling: float = float("nan")
    grid: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def best(self) -> dict[str, Any]:
        """The layer with the highest task accuracy (ties: the higher selectivity)."""
        return max(self.scores, key=lambda s: (round(s["accuracy"], 6), s["selectivity"]))


def check_data(model: str, data: str, tokens: str, target: str) -> str | None:
    """Why `data` cannot serve a probe of `target` on `tokens` for `model`, or None (no work done)."""
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
        if not ds.labelled:
            return (f"--data {data} has no labels (captured from images without annotations), so there is no "
                    f"{target!r} to probe; capture probe-shapes (shapes:N or a `probe data shapes` folder)")
        return None
    try:
        source = parse_source(data)
    except ProbeError as e:
        return str(e)
    if not source.labelled:
        return (f"--data {data}: images without annotations have no {target!r} labels; probe probe-shapes "
                "(shapes:N or a `probe data shapes` folder)")
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
    if keep.sum() < 10 or len(np.unique(images[keep])) < p.folds:
        raise ProbeError(f"only {int(keep.sum())} labelled {tokens} rows from {len(np.unique(images[keep]))} images "
                         f"for {target!r}; capture more images (at least {p.folds} for {p.folds} folds)")
    y, img, types = rows[target][keep], images[keep], rows["type"][keep]
    ctrl = control_labels(types, y, p.control_seed)
    hooks = ds.hooks_with(tokens)
    g = list(ds.index.get("grid", [0, 0]))
    scores, patch_maps = [], []
    from tqdm.auto import tqdm

    for h in tqdm(hooks, desc=f"probes {target} on {tokens}", unit="layer"):
        x = ds.load(h, tokens)[keep]
        s = probe_layer(x, y, img, types, folds=p.folds, c=p.c, max_iter=p.max_iter, seed=p.control_seed,
                        n_boot=p.n_boot, control=ctrl)
        scores.append({"hook": h, "accuracy": s["accuracy"], "ci_lo": s["ci"][0], "ci_hi": s["ci"][1],
                       "baseline": s["baseline"], "control": s["control"], "selectivity": s["selectivity"],
                       "rows": int(len(y)), "images": int(len(np.unique(img)))})
        if tokens == "patches":
            patch = rows["patch"][keep]
            acc = np.full(g[0] * g[1], np.nan)
            hit = np.bincount(patch, weights=s["correct"].astype(float), minlength=len(acc))
            n = np.bincount(patch, minlength=len(acc))
            acc[n > 0] = hit[n > 0] / n[n > 0]
            patch_maps.append(acc.reshape(g))
    ceiling = control_ceiling(types, ctrl, img, folds=p.folds, c=p.c, max_iter=p.max_iter, seed=p.control_seed)
    arrays = {name: torch.tensor([s[name] for s in scores], dtype=torch.float32)
              for name in ("accuracy", "baseline", "control", "selectivity")}
    arrays["ci"] = torch.tensor([[s["ci_lo"], s["ci_hi"]] for s in scores], dtype=torch.float32)
    if patch_maps:
        arrays["patch_accuracy"] = torch.from_numpy(np.stack(patch_maps)).float()
    return ProbesResult(arrays=arrays, model=model or ds.model, target=target, tokens=tokens,
                        classes=list(TARGETS[target]), data=str(ds.index.get("data", ds.folder)), type=TYPES[tokens],
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
        return check_data(adapter.name, params.data, params.tokens, params.target)

    def run(self, adapter: Any, inputs: Any, params: ProbesParams) -> ProbesResult:
        why = self.check_architecture(adapter, params)
        if why:
            raise ProbeError(why)
        if not params.data.startswith("shapes:") and is_activation_set(params.data):
            ds = open_activations(params.data)
            want = (ds.index.get("weights") or {}).get("sha256")
            if want and adapter.weights and adapter.weights.sha256 and want != adapter.weights.sha256:
                raise ProbeError(f"--data {params.data} was captured from other weights of {ds.model} (sha256 "
                                 f"{want[:12]}, loaded {adapter.weights.sha256[:12]}); pass those --weights")
            return probe_set(ds, params.target, params.tokens, params, adapter.name)
        with tempfile.TemporaryDirectory(prefix="probe-activations-") as tmp:
            ds = capture_set(adapter, params.data, Path(tmp) / "set", groups=[params.tokens])
            assert ds is not None
            return probe_set(ds, params.target, params.tokens, params, adapter.name)

    def render(self, result: ProbesResult) -> dict[str, Figure]:
        return render_probes(result)

    def summary_lines(self, result: ProbesResult) -> list[str]:
        lines = [f"{result.model}: {result.target} from {result.tokens} tokens; control type = {result.type}; "
                 f"control ceiling (one-hot of the type) {result.control_ceiling:.3f}"]
        for s in result.scores:
            lines.append(f"  {s['hook']:<28} acc {s['accuracy']:.3f} [{s['ci_lo']:.3f}, {s['ci_hi']:.3f}]  "
                         f"baseline {s['baseline']:.3f}  control {s['control']:.3f}  selectivity {s['selectivity']:+.3f}")
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
