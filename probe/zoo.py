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
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import probe.assets

log = logging.getLogger(__name__)

ZOO_DIR = Path(probe.assets.__file__).resolve().parent / "zoo"
CARD = "card.json"
CHECK_N = 64  # the card also records the metrics on the first CHECK_N test images: a quick re-measure


def demo_path(name: str) -> Path:
    """The folder of `name`'s bundled demo checkpoint (it may not exist)."""
    return ZOO_DIR / name


def source_of(folder: Path) -> str:
    """``demo`` for a bundled zoo checkpoint, ``local`` for any other folder."""
    return "demo" if folder.resolve().is_relative_to(ZOO_DIR) else "local"


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
def classify_classes() -> list[str]:
    from probe.data.shapes import COLOURS, SHAPES

    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def largest_label(masks: np.ndarray, objects: Sequence[Any]) -> str | None:
    """``"colour shape"`` of the object with the most pixels, or None when that is not unique."""
    areas = masks.reshape(len(objects), -1).sum(1)
    top = np.flatnonzero(areas == areas.max())
    if len(top) != 1:
        return None
    o = objects[int(top[0])]
    return f"{o.colour} {o.shape}"


def classification_data(split: str, n: int, *, seed: int = 0, image_size: int = 64) -> Any:
    """`n` probe-shapes images of `split` whose largest object is unique, labelled with it."""
    from probe.data import ImageDataset
    from probe.data.shapes import iter_split

    classes = classify_classes()
    images, labels = [], []
    for s in iter_split(split, 10 * n + 100, seed=seed, image_size=image_size):
        label = largest_label(s.masks, s.objects)
        if label is None:
            continue
        images.append(np.asarray(s.image))
        labels.append(classes.index(label))
        if len(labels) == n:
            break
    return ImageDataset(np.stack(images), np.asarray(labels, dtype=np.int64), classes)


def caption_data(split: str, n: int, *, seed: int = 0, image_size: int = 64) -> list[Any]:
    """The first `n` `ShapesSample`s of `split`."""
    from probe.data.shapes import iter_split

    return list(iter_split(split, n, seed=seed, image_size=image_size))


_PAIR = re.compile(r"\b(red|green|blue|yellow) (circle|square|triangle)s?\b")


def normalise(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").split())


def caption_metrics(generated: Sequence[str], samples: Sequence[Any]) -> dict[str, float]:
    """``exact``: fraction of captions equal to the ground truth (whitespace-normalised);
    ``objects``: fraction of ground-truth objects whose colour and shape the caption names."""
    exact = named = total = 0
    for text, s in zip(generated, samples, strict=True):
        exact += normalise(text) == normalise(s.caption)
        want = Counter((o.colour, o.shape) for o in s.objects)
        got = Counter(_PAIR.findall(normalise(text)))
        named += sum(min(c, got[k]) for k, c in want.items())
        total += len(s.objects)
    return {"exact": exact / max(len(samples), 1), "objects": named / max(total, 1)}


# ---------------------------------------------------------------------------------------- recipes
VIT_KINDS = ("standard", "merged_qkv", "linformer", "performer", "nystrom", "hybrid")


@dataclass(frozen=True)
class Recipe:
    """How one family's zoo checkpoint is made. `config`: family-specific model config."""

    name: str
    task: str  # "classify" | "caption"
    config: dict[str, Any]
    n_train: int
    steps: int
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    data_seed: int = 0
    n_test: int = 512
    image_size: int = 64
    dtype: str = "float16"
    extra: dict[str, Any] = field(default_factory=dict)


_VIT = {"dim": 64, "depth": 4, "heads": 4, "patch_size": 8, "image_size": 64}
_HF = {"image_size": 64, "patch_size": 8, "hidden": 64, "layers": 3, "heads": 4, "positions": 32}

RECIPES: dict[str, Recipe] = {
    **{f"vit-{k.replace('_', '-')}": Recipe(f"vit-{k.replace('_', '-')}", "classify",
                                            {**_VIT, "attention": k}, n_train=12000, steps=2500, lr=2e-3)
       for k in VIT_KINDS},
    "vit-gpt2": Recipe("vit-gpt2", "caption", _HF, n_train=12000, steps=2500, lr=2e-3),
    "blip": Recipe("blip", "caption", _HF, n_train=12000, steps=2500, lr=2e-3),
    # GIT's single joint stack learns this task slower than the encoder-decoder families: at 2500
    # steps it ends at 80% objects (training loss 0.26 against 0.08); 4500 steps reach the bar
    "git": Recipe("git", "caption", _HF, n_train=12000, steps=4500, lr=2e-3),
    "prefix-vlm": Recipe("prefix-vlm", "caption",
                         {"decoder": {"d_model": 96, "depth": 3, "heads": 4, "max_len": 96, "train_decoder": True},
                          "vision": {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
                                     "intermediate_size": 256, "image_size": 64, "patch_size": 8}},
                         n_train=12000, steps=3000, lr=2e-3,
                         extra={"note": "misses the 90% objects bar (88.6%): by design only the projection and decoder "
                                "train, and the frozen ViT here is random (no pretrained ViT can be downloaded), so "
                                "the prefix carries random patch features; most errors are relations (above/left "
                                "of) and small-object shapes. Pretraining the frozen ViT on probe-shapes first, or "
                                "more than 3000 steps, should lift it."}),
    "mmca": Recipe("mmca", "caption",
                   {"dim": 96, "depth": 3, "heads": 4, "max_len": 96,
                    "vision": {"dim": 64, "depth": 3, "heads": 4, "image_size": 64, "patch_size": 8}},
                   n_train=12000, steps=3000, lr=2e-3),
}


def _fresh(name: str, recipe: Recipe) -> Any:
    """A randomly initialised adapter of `name` built from its recipe."""
    from probe import registry

    cfg = recipe.config
    if recipe.task == "classify":
        from probe.models.vit import ViTAdapter

        labels = classify_classes()
        return ViTAdapter.load(attention=cfg["attention"], weights="random", seed=recipe.seed,
                               config={k: v for k, v in cfg.items() if k != "attention"}
                               | {"num_classes": len(labels), "labels": tuple(labels)})
    if name in ("vit-gpt2", "blip", "git"):
        return _hf_class(name).tiny(seed=recipe.seed, **cfg)
    if name == "prefix-vlm":
        return registry.load_model(name, weights="random", seed=recipe.seed, decoder=cfg["decoder"], vision=cfg["vision"])
    if name == "mmca":
        return registry.load_model(name, weights="random", seed=recipe.seed, config=cfg)
    raise KeyError(name)


def _hf_class(name: str) -> Any:
    from probe.models.blip import BlipAdapter
    from probe.models.git import GitAdapter
    from probe.models.vit_gpt2 import ViTGPT2Adapter

    return {"vit-gpt2": ViTGPT2Adapter, "blip": BlipAdapter, "git": GitAdapter}[name]


def caption_loss(adapter: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Teacher-forced next-token cross-entropy over the real (unpadded) caption tokens."""
    logits = adapter.forward(batch)
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    keep = (ids != adapter.tokenizer.pad_id) if mask is None else mask.bool()
    target = ids[:, 1:].masked_fill(~keep[:, 1:], -100)
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             target.reshape(-1), ignore_index=-100)


def _cosine(opt: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(s - warmup, steps - warmup) / max(steps - warmup, 1)))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def _train_loop(params: list[torch.Tensor], steps: int, lr: float, loss_at: Callable[[int], torch.Tensor],
                desc: str, progress: bool) -> list[float]:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = _cosine(opt, steps, warmup=min(100, steps // 10 + 1))
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    for step in bar:
        loss = loss_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def _batches(n: int, batch_size: int, steps: int, seed: int) -> list[np.ndarray]:
    g = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    while len(out) < steps:
        order = g.permutation(n)
        out += [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
    return out[:steps]


@torch.no_grad()
def measure(adapter: Any, task: str, *, n_test: int = 512, data_seed: int = 0, image_size: int = 64,
            batch_size: int = 128, blind: bool = True) -> dict[str, float]:
    """Metrics of `adapter` on the first `n_test` images of the probe-shapes test split.

    Classifiers: ``top1``. Captioners: ``exact`` and ``objects``, and with `blind`
    ``blind_exact`` and ``blind_objects`` (every image token removed from what the text reads).
    """
    if task == "classify":
        from probe.train import evaluate

        data = classification_data("test", n_test, seed=data_seed, image_size=image_size)
        return {"top1": evaluate(adapter.model, data, batch_size=batch_size)[0]}
    from probe.capture import intervene

    samples = caption_data("test", n_test, seed=data_seed, image_size=image_size)
    out: dict[str, float] = {}
    for prefix, ivs in [("", []), ("blind_", None)] if blind else [("", [])]:
        texts: list[str] = []
        for i in range(0, len(samples), batch_size):
            chunk = [s.image for s in samples[i : i + batch_size]]
            with intervene(adapter, adapter.mask_image_tokens(None) if ivs is None else ivs):
                texts += adapter.caption(chunk, max_new_tokens=_max_new(adapter))["text"]
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


def _max_new(adapter: Any) -> int:
    return 90 if adapter.name in ("prefix-vlm", "mmca") else 24


def _round_trip_dtype(adapter: Any, dtype: str) -> None:
    """Round the weights through `dtype` in place, so that the metrics are those of what is saved."""
    if dtype == "float32":
        return
    with torch.no_grad():
        for t in list(adapter.model.parameters()) + list(adapter.model.buffers()):
            if t.is_floating_point():
                t.copy_(t.to(getattr(torch, dtype)).to(t.dtype))


def train_family(name: str, out: str | Path | None = None, *, steps: int | None = None, seed: int | None = None,
                 n_test: int | None = None, n_train: int | None = None,
                 progress: bool = True) -> tuple[Any, dict[str, Any]]:
    """Train `name` from its recipe; write the checkpoint and ``card.json`` to `out` if given.

    Returns (adapter, card). `steps`, `seed`, `n_test` and `n_train` override the recipe (short
    runs in tests).
    """
    if name not in RECIPES:
        raise KeyError(f"no zoo recipe for {name!r}; known: {', '.join(RECIPES)}")
    r = RECIPES[name]
    over = {"steps": steps, "seed": seed, "n_test": n_test, "n_train": n_train}
    if any(v is not None for v in over.values()):
        r = Recipe(**{**asdict(r), **{k: v for k, v in over.items() if v is not None}})
    torch.manual_seed(r.seed)
    adapter = _fresh(name, r)
    t0 = time.perf_counter()
    model = adapter.model
    params = [p for p in model.parameters() if p.requires_grad]
    batches = _batches(r.n_train, r.batch_size, r.steps, r.seed)
    if r.task == "classify":
        data = classification_data("train", r.n_train, seed=r.data_seed, image_size=r.image_size)
        x = adapter.preprocess([_pil(a) for a in data.images])["pixel_values"]
        y = torch.from_numpy(data.labels)

        def loss_at(step: int) -> torch.Tensor:
            idx = torch.from_numpy(batches[step])
            return torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
    else:
        samples = caption_data("train", r.n_train, seed=r.data_seed, image_size=r.image_size)
        x = torch.cat([adapter.preprocess([s.image for s in samples[i : i + 512]])["pixel_values"]
                       for i in range(0, len(samples), 512)])
        text = _encode(adapter, [s.caption for s in samples])

        def loss_at(step: int) -> torch.Tensor:
            idx = torch.from_numpy(batches[step])
            batch = {"pixel_values": x[idx], **{k: v[idx] for k, v in text.items()}}
            return caption_loss(adapter, batch)

    model.train()
    losses = _train_loop(params, r.steps, r.lr, loss_at, f"zoo {name}", progress)
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
        save_checkpoint(adapter, Path(out), info)
    return adapter, info


def _pil(a: np.ndarray) -> Any:
    from PIL import Image

    return Image.fromarray(a)


def _encode(adapter: Any, captions: list[str]) -> dict[str, torch.Tensor]:
    if hasattr(adapter, "encode_captions"):
        return adapter.encode_captions(captions)
    return {"input_ids": adapter.tokenizer.batch(captions)}


def save_checkpoint(adapter: Any, folder: Path, info: dict[str, Any]) -> Path:
    """Write the adapter's checkpoint (weights in ``info['weights_dtype']``) plus ``card.json``, atomically."""
    from probe.io import atomic_dir

    dtype = getattr(torch, info.get("weights_dtype", "float32"))
    model = adapter.model
    original = next(model.parameters()).dtype
    with atomic_dir(folder) as tmp:
        model.to(dtype)
        try:
            if hasattr(adapter, "save_pretrained"):
                adapter.save_pretrained(tmp / "ckpt")
            elif hasattr(adapter, "save"):
                adapter.save(tmp / "ckpt")
            else:
                from probe.models.vit import save_vit

                save_vit(model, tmp / "ckpt")
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
                     f"{c['wall_seconds']:.0f} ({c['threads']}) | {size_bytes(demo_path(name)) / 1e6:.2f} |")
    return "\n".join(lines)


def add_check(folder: str | Path) -> dict[str, Any]:
    """Load the checkpoint in `folder` through the public API, measure it on the first `CHECK_N`
    test images and write that to its card as ``check`` (cards made before the field existed)."""
    from probe import registry
    from probe.io import atomic_write_text

    folder = Path(folder)
    info = json.loads((folder / CARD).read_text())
    a = registry.load_model(info["name"], weights=str(folder))
    n = min(CHECK_N, info["recipe"]["n_test"])
    info["quality_bar"] = quality(info["task"], info["metrics"], RECIPES[info["name"]].extra.get("note", ""))
    info["check"] = {"n_test": n, "metrics": measure(a, info["task"], n_test=n, data_seed=info["data_seed"],
                                                     image_size=info["recipe"]["image_size"])}
    atomic_write_text(folder / CARD, json.dumps(info, indent=2) + "\n")
    return info
