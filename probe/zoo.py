"""The zoo: small models of every family trained on probe-shapes, bundled as demo weights.

Each family has a `Recipe` (config, data size, steps, seed). `train_family` builds the model from
the recipe, trains it on a CPU, measures it on the test split (and, for captioners, the blind
baseline with every image token removed) and writes a checkpoint folder with a model card
(``card.json``) next to the weights, stored in float16 where that keeps the metrics.

Tasks:

- ViT kinds classify the colour and shape of the **largest** object (12 classes), on the images
  where the largest object (by pixel area) is unique; ties make the label ambiguous, so they are
  left out of the classification splits.
- Captioners caption the image with the probe-shapes grammar.

Metrics (on the first ``n_test`` images of the test split, seed ``data_seed``):

- classifiers: top-1 accuracy;
- captioners: ``exact`` (generated caption == ground truth, whitespace-normalised) and
  ``objects`` (the fraction of ground-truth objects whose ``colour shape`` pair is named, matched
  as multisets), for the model and for its blind baseline.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import probe.models  # noqa: F401  (registers the families whose recipes live here)
from probe import registry
from probe.capture import intervene
from probe.data import ImageDataset
from probe.data.metrics import caption_metrics, classify_classes, largest_object
from probe.data.shapes import ShapesSample, iter_split
from probe.io import atomic_dir, check_output
from probe.train import caption_loss, epoch_batches, evaluate_classifier, fit
from probe.types import ProbeError, Recipe
from probe.weights import ZOO_DIR

log = logging.getLogger(__name__)

CARD = "card.json"
CHECK_N = 64  # the card also records the metrics on the first CHECK_N test images: a quick re-measure


def bundled() -> list[str]:
    """Names of the families whose demo checkpoint is bundled."""
    if not ZOO_DIR.is_dir():
        return []
    return sorted(p.name for p in ZOO_DIR.iterdir() if p.is_dir() and (p / "config.json").is_file())


def card(name: str, root: Path | None = None) -> dict[str, Any]:
    """The model card of a bundled (or `root`/NAME) checkpoint."""
    path = (root or ZOO_DIR) / name / CARD
    if not path.is_file():
        raise FileNotFoundError(f"no model card at {path}; build it with `probe zoo train {name}`")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------- data
def classification_data(split: str, n: int, *, seed: int = 0, image_size: int = 64) -> ImageDataset:
    """`n` probe-shapes images of `split` whose largest object is unique, labelled with its
    ``colour shape`` class (`classification_samples` gives the samples and object indices too)."""
    return classification_samples(split, n, seed=seed, image_size=image_size)[0]


def classification_samples(split: str, n: int, *, seed: int = 0, image_size: int = 64
                           ) -> tuple[ImageDataset, list[ShapesSample], list[int]]:
    """As `classification_data`, plus each image's `ShapesSample` (masks included) and the index
    of its largest object (the labelled one)."""
    classes = classify_classes()
    samples, objects, labels = [], [], []
    for s in iter_split(split, 10 * n + 100, seed=seed, image_size=image_size):
        j = largest_object(s.masks, s.objects)
        if j is None:
            continue
        samples.append(s)
        objects.append(j)
        labels.append(classes.index(f"{s.objects[j].colour} {s.objects[j].shape}"))
        if len(labels) == n:
            break
    data = ImageDataset(np.stack([np.asarray(s.image) for s in samples]), np.asarray(labels, dtype=np.int64), classes)
    return data, samples, objects


def caption_data(split: str, n: int, *, seed: int = 0, image_size: int = 64) -> list[ShapesSample]:
    """The first `n` `ShapesSample`s of `split`."""
    return list(iter_split(split, n, seed=seed, image_size=image_size))


# ---------------------------------------------------------------------------------------- recipes
#: every family that declared a zoo recipe when it registered (`probe.types.Recipe`)
RECIPES: dict[str, Recipe] = {n: e.recipe for n, e in registry.models().items() if e.recipe is not None}


def _fresh(name: str, recipe: Recipe) -> Any:
    """A randomly initialised adapter of `name` built from its recipe's config."""
    config = dict(recipe.config)
    if recipe.task == "classify":
        labels = classify_classes()
        config |= {"num_classes": len(labels), "labels": tuple(labels)}
    return registry.load_model(name, weights="random", seed=recipe.seed, config=config)


@torch.no_grad()
def measure(adapter: Any, task: str, *, n_test: int = 512, data_seed: int = 0, image_size: int = 64,
            batch_size: int = 128, blind: bool = True) -> dict[str, float]:
    """Metrics of `adapter` on the first `n_test` images of the probe-shapes test split.

    Classifiers: ``top1``. Captioners: ``exact`` and ``objects``, and with `blind`
    ``blind_exact`` and ``blind_objects`` (every image token removed from what the text reads).
    """
    if task == "classify":
        data = classification_data("test", n_test, seed=data_seed, image_size=image_size)
        return {"top1": evaluate_classifier(adapter, data, batch_size=batch_size)[0]}
    samples = caption_data("test", n_test, seed=data_seed, image_size=image_size)
    out: dict[str, float] = {}
    for prefix, ivs in [("", []), ("blind_", None)] if blind else [("", [])]:
        texts: list[str] = []
        for i in range(0, len(samples), batch_size):
            chunk = [s.image for s in samples[i : i + batch_size]]
            with intervene(adapter, adapter.mask_image_tokens(None) if ivs is None else ivs):
                texts += adapter.caption(chunk)["text"]
        out.update({prefix + k: v for k, v in caption_metrics(texts, samples).items()})
    return out


def quality(task: str, metrics: dict[str, float], note: str = "") -> dict[str, Any]:
    """The zoo's quality bar: classifiers >= 90% top-1; captioners naming >= 90% of objects with
    exact-match accuracy >= 30 points above their blind baseline. `note` says why a miss happened."""
    if task == "classify":
        met = metrics["top1"] >= 0.90
        bar = "top1 >= 0.90"
    else:
        met = metrics["objects"] >= 0.90 and metrics["exact"] >= metrics["blind_exact"] + 0.30
        bar = "objects >= 0.90 and exact >= blind_exact + 0.30"
    return {"bar": bar, "met": met, "note": "" if met else note}


def _round_trip_dtype(adapter: Any, dtype: str) -> None:
    """Round the weights through `dtype` in place, so that the metrics are those of what is saved."""
    if dtype == "float32":
        return
    with torch.no_grad():
        for t in list(adapter.model.parameters()) + list(adapter.model.buffers()):
            if t.is_floating_point():
                t.copy_(t.to(getattr(torch, dtype)).to(t.dtype))


def train_family(name: str, out: str | Path | None = None, *, steps: int | None = None, seed: int | None = None,
                 n_test: int | None = None, n_train: int | None = None, progress: bool = True,
                 force: bool = False) -> tuple[Any, dict[str, Any]]:
    """Train `name` from its recipe; write the checkpoint and ``card.json`` to `out` if given (an
    existing non-empty `out` is refused before training unless `force`).

    Returns (adapter, card). `steps`, `seed`, `n_test` and `n_train` override the recipe (short
    runs in tests).
    """
    if name not in RECIPES:
        raise ProbeError(f"no zoo recipe for {name!r}; known: {', '.join(RECIPES)}")
    for what, v in (("steps", steps), ("n_test", n_test), ("n_train", n_train)):
        if v is not None and v < 1:
            raise ProbeError(f"{what} must be >= 1, got {v}")
    if out is not None:
        check_output(out, force)
    r = RECIPES[name]
    over = {"steps": steps, "seed": seed, "n_test": n_test, "n_train": n_train}
    if any(v is not None for v in over.values()):
        r = Recipe(**{**asdict(r), **{k: v for k, v in over.items() if v is not None}})
    torch.manual_seed(r.seed)
    adapter = _fresh(name, r)
    t0 = time.perf_counter()
    model = adapter.model
    params = [p for p in model.parameters() if p.requires_grad]
    batches = epoch_batches(r.n_train, r.batch_size, r.steps, r.seed)
    if r.task == "classify":
        data = classification_data("train", r.n_train, seed=r.data_seed, image_size=r.image_size)
        x = adapter.preprocess([Image.fromarray(a) for a in data.images])["pixel_values"]
        y = torch.from_numpy(data.labels)

        def loss_at(step: int) -> torch.Tensor:
            idx = torch.from_numpy(batches[step])
            return torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
    else:
        samples = caption_data("train", r.n_train, seed=r.data_seed, image_size=r.image_size)
        x = torch.cat([adapter.preprocess([s.image for s in samples[i : i + 512]])["pixel_values"]
                       for i in range(0, len(samples), 512)])
        text = adapter.encode_captions([s.caption for s in samples])

        def loss_at(step: int) -> torch.Tensor:
            idx = torch.from_numpy(batches[step])
            batch = {"pixel_values": x[idx], **{k: v[idx] for k, v in text.items()}}
            return caption_loss(adapter, batch)

    model.train()
    losses = fit(params, r.steps, loss_at, lr=r.lr, desc=f"zoo {name}", progress=progress)
    model.eval()
    seconds = time.perf_counter() - t0
    _round_trip_dtype(adapter, r.dtype)
    metrics = measure(adapter, r.task, n_test=r.n_test, data_seed=r.data_seed, image_size=r.image_size)
    check = {"n_test": min(CHECK_N, r.n_test),
             "metrics": measure(adapter, r.task, n_test=min(CHECK_N, r.n_test), data_seed=r.data_seed,
                                image_size=r.image_size)}
    info = {
        "name": name, "task": r.task, "recipe": asdict(r), "data": "probe-shapes", "data_seed": r.data_seed,
        "steps": r.steps, "wall_seconds": round(seconds, 1), "threads": torch.get_num_threads(),
        "final_loss": float(np.mean(losses[-50:])), "metrics": metrics, "check": check,
        "quality_bar": quality(r.task, metrics, r.extra.get("note", "")), "weights_dtype": r.dtype,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in params),
        "torch": torch.__version__,
    }
    log.info("%s: %s", name, metrics)
    if out is not None:
        save_checkpoint(adapter, Path(out), info, force=force)
    return adapter, info


def save_checkpoint(adapter: Any, folder: Path, info: dict[str, Any], *, force: bool = False) -> Path:
    """Write the adapter's checkpoint (weights in ``info['weights_dtype']``) plus ``card.json``,
    atomically; an existing non-empty `folder` is replaced only with `force`."""
    dtype = getattr(torch, info.get("weights_dtype", "float32"))
    model = adapter.model
    original = next(model.parameters()).dtype
    with atomic_dir(folder, force=force) as tmp:
        model.to(dtype)
        try:
            adapter.save(tmp / "ckpt")
        finally:
            model.to(original)
        for p in (tmp / "ckpt").iterdir():
            p.rename(tmp / p.name)
        (tmp / "ckpt").rmdir()
        (tmp / CARD).write_text(json.dumps(info, indent=2) + "\n")
    return folder


def size_bytes(root: Path | None = None) -> int:
    """Bytes of everything under the zoo folder."""
    root = root or ZOO_DIR
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0


def markdown_table() -> str:
    """The bundled checkpoints and their model-card metrics, as Markdown (``probe zoo list``)."""
    head = "| model | task | test metrics | blind baseline | params | steps | train s (threads) | MB |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    have = set(bundled())
    for name, r in RECIPES.items():
        if name not in have:
            lines.append(f"| {name} | {r.task} | not bundled | | | | | |")
            continue
        c = card(name)
        m = c["metrics"]
        main = ", ".join(f"{k} {v:.1%}" for k, v in m.items() if not k.startswith("blind_"))
        blind = ", ".join(f"{k[6:]} {v:.1%}" for k, v in m.items() if k.startswith("blind_")) or "-"
        lines.append(f"| {name} | {c['task']} | {main} | {blind} | {c['parameters']:,} | {c['steps']} | "
                     f"{c['wall_seconds']:.0f} ({c['threads']}) | {size_bytes(ZOO_DIR / name) / 1e6:.2f} |")
    return "\n".join(lines)
