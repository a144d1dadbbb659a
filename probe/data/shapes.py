"""probe-shapes: a synthetic data set whose right answers are known.

Each image (64x64 by default) holds one to three non-overlapping objects, each a shape (circle,
square, triangle), a colour (red, green, blue, yellow) and a size (small, large) at a position, on
a light grey background, with a caption from a small grammar::

    a large red circle
    a small blue square left of a large green triangle
    a red circle above a blue square and a yellow triangle      (the relation holds between the first two)

Objects are listed in reading order (left to right by box centre, then top to bottom), so the
caption follows from the image alone: a captioner can get it exactly right.

Per object: its exact pixel mask (the pixels its draw call painted; drawing is not anti-aliased),
its box and attributes; per image the relations used in the caption. Everything is deterministic
from (seed, split, index). The splits are disjoint by construction: a sample belongs to the split
chosen by a hash of its content, and each split keeps only its own samples.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from probe.io import atomic_dir

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (210, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 210), "yellow": (225, 195, 30)}
SIZES = {"small": 0.22, "large": 0.36}  # side of the object's box as a fraction of the image side
BACKGROUND = (235, 235, 235)
SPLITS = {"train": range(0, 8), "val": range(8, 9), "test": range(9, 10)}  # buckets of content hash mod 10


@dataclass(frozen=True)
class ShapeObject:
    """One object: attributes and its box (x0, y0, x1, y1), pixel coordinates, x1/y1 inclusive."""

    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return ((x0 + x1) / 2, (y0 + y1) / 2)

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class ShapesSample:
    """An image with its annotations. `masks`: bool (objects, H, W)."""

    image: Image.Image
    objects: tuple[ShapeObject, ...]
    masks: np.ndarray
    caption: str
    relations: tuple[tuple[int, str, int], ...]
    split: str
    index: int

    def annotation(self) -> dict[str, Any]:
        return {
            "split": self.split, "index": self.index, "caption": self.caption,
            "objects": [{**asdict(o), "box": list(o.box), "mask_rle": rle_encode(m)}
                        for o, m in zip(self.objects, self.masks, strict=True)],
            "relations": [list(r) for r in self.relations],
        }


def relation(a: ShapeObject, b: ShapeObject) -> str:
    """Where `a` is relative to `b` along the axis of the larger centre offset."""
    (ax, ay), (bx, by) = a.centre, b.centre
    if abs(ax - bx) >= abs(ay - by):
        return "left of" if ax < bx else "right of"
    return "above" if ay < by else "below"


def reading_order(objects: tuple[ShapeObject, ...]) -> tuple[ShapeObject, ...]:
    """Objects left to right by box centre (then top to bottom): the order captions use."""
    return tuple(sorted(objects, key=lambda o: (o.centre[0], o.centre[1])))


def caption_for(objects: tuple[ShapeObject, ...], relations: tuple[tuple[int, str, int], ...]) -> str:
    if len(objects) == 1:
        return objects[0].phrase
    i, rel, j = relations[0]
    text = f"{objects[i].phrase} {rel} {objects[j].phrase}"
    for k in range(2, len(objects)):
        text += f" and {objects[k].phrase}"
    return text


def _draw(draw: ImageDraw.ImageDraw, obj: ShapeObject, fill: Any) -> None:
    x0, y0, x1, y1 = obj.box
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)


def _overlap(a: tuple[int, ...], b: tuple[int, ...], gap: int) -> bool:
    return not (a[2] + gap < b[0] or b[2] + gap < a[0] or a[3] + gap < b[1] or b[3] + gap < a[1])


def _objects(rng: np.random.Generator, image_size: int) -> tuple[ShapeObject, ...] | None:
    n = int(rng.integers(1, 4))
    objs: list[ShapeObject] = []
    for _ in range(n):
        for _try in range(50):
            size = str(rng.choice(list(SIZES)))
            side = max(4, round(SIZES[size] * image_size))
            x0 = int(rng.integers(1, image_size - side - 1))
            y0 = int(rng.integers(1, image_size - side - 1))
            box = (x0, y0, x0 + side - 1, y0 + side - 1)
            if all(not _overlap(box, o.box, 2) for o in objs):
                objs.append(ShapeObject(str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), size, box))
                break
        else:
            return None
    return tuple(objs)


def _bucket(objects: tuple[ShapeObject, ...]) -> int:
    key = json.dumps([asdict(o) for o in objects]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little") % 10


def render(objects: tuple[ShapeObject, ...], image_size: int) -> tuple[Image.Image, np.ndarray]:
    """Draw objects; return the RGB image and their masks (objects, H, W) bool."""
    im = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(im)
    masks = np.zeros((len(objects), image_size, image_size), dtype=bool)
    for k, obj in enumerate(objects):
        _draw(draw, obj, COLOURS[obj.colour])
        canvas = Image.new("1", (image_size, image_size), 0)
        _draw(ImageDraw.Draw(canvas), obj, 1)
        masks[k] = np.asarray(canvas, dtype=bool)
    return im, masks


def counterfactual(sample: ShapesSample, obj: int, attribute: str) -> ShapesSample:
    """`sample` with object `obj`'s colour (or shape) changed to the next one in `COLOURS` (`SHAPES`)
    order, everything else as it was: same layout, boxes and other objects, re-rendered, with its
    masks and caption. The pair (sample, counterfactual) differs only in that object's pixels.

    `attribute`: ``colour`` or ``shape``. A shape change changes that object's mask too; the
    changed pixels are within the union of the two masks.
    """
    if attribute not in ("colour", "shape"):
        raise ValueError(f"attribute {attribute!r}: use colour or shape")
    if not 0 <= obj < len(sample.objects):
        raise ValueError(f"object {obj} out of range: this sample has {len(sample.objects)} objects")
    old = sample.objects[obj]
    values = list(COLOURS) if attribute == "colour" else list(SHAPES)
    new_value = values[(values.index(getattr(old, attribute)) + 1) % len(values)]
    objects = tuple(replace(o, **{attribute: new_value}) if k == obj else o for k, o in enumerate(sample.objects))
    image, masks = render(objects, sample.image.size[0])
    return ShapesSample(image, objects, masks, caption_for(objects, sample.relations), sample.relations,
                        sample.split, sample.index)


def iter_split(split: str, n: int, *, seed: int = 0, image_size: int = 64) -> Iterator[ShapesSample]:
    """The first `n` samples of `split` (``train``, ``val`` or ``test``); deterministic."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if image_size < 24:
        raise ValueError(f"image_size {image_size} is too small for three objects; use 24 or more")
    made, draw_index = 0, 0
    while made < n:
        rng = np.random.default_rng([seed, draw_index])
        draw_index += 1
        objs = _objects(rng, image_size)
        # the split is hashed from the drawing order (kept stable since the first release); the
        # caption then lists the objects in reading order, so that it follows from the image alone
        if objs is None or _bucket(objs) not in SPLITS[split]:
            continue
        objs = reading_order(objs)
        rels = tuple((k, relation(objs[k], objs[k + 1]), k + 1) for k in range(len(objs) - 1))
        image, masks = render(objs, image_size)
        yield ShapesSample(image, objs, masks, caption_for(objs, rels), rels, split, made)
        made += 1


def rle_encode(mask: np.ndarray) -> list[int]:
    """Run lengths of a bool mask, row-major, starting with a run of False (possibly 0)."""
    flat = mask.ravel().astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat[0] else runs


def rle_decode(runs: list[int], shape: tuple[int, int]) -> np.ndarray:
    flat = np.zeros(int(np.prod(shape)), dtype=bool)
    pos, value = 0, False
    for r in runs:
        if value:
            flat[pos : pos + r] = True
        pos += r
        value = not value
    if pos != flat.size:
        raise ValueError(f"mask runs cover {pos} pixels, expected {flat.size}")
    return flat.reshape(shape)


def write_dataset(out: str | Path, n: int, *, seed: int = 0, image_size: int = 64,
                  splits: dict[str, int] | None = None, progress: bool = True, force: bool = False) -> Path:
    """Write ``images/{split}_{index:06d}.png`` and ``annotations.jsonl`` atomically.

    `splits` maps split -> count; by default `n` train, n // 8 val and n // 8 test images. A
    non-empty `out` is refused (`probe.io.OutputExistsError`) unless `force`, which replaces it
    once the new data set is complete.
    """
    counts = splits or {"train": n, "val": max(1, n // 8), "test": max(1, n // 8)}
    out = Path(out)
    with atomic_dir(out, force=force) as tmp:
        (tmp / "images").mkdir()
        with open(tmp / "annotations.jsonl", "w") as f:
            f.write(json.dumps({"dataset": "probe-shapes", "seed": seed, "image_size": image_size,
                                "counts": counts}) + "\n")
            for split, count in counts.items():
                for s in tqdm(iter_split(split, count, seed=seed, image_size=image_size), total=count,
                              desc=f"probe-shapes {split}", disable=not progress):
                    name = f"{split}_{s.index:06d}.png"
                    s.image.save(tmp / "images" / name)
                    f.write(json.dumps({"file": f"images/{name}", **s.annotation()}) + "\n")
    return out


def read_dataset(folder: str | Path, split: str | None = None) -> list[ShapesSample]:
    """Read a folder written by `write_dataset` (optionally one split)."""
    folder = Path(folder)
    ann = folder / "annotations.jsonl"
    if not ann.is_file():
        raise FileNotFoundError(f"{folder} is not a probe-shapes folder (no annotations.jsonl); "
                                "write one with `probe data shapes --n N --out DIR`")
    lines = ann.read_text().splitlines()
    header = json.loads(lines[0])
    size = int(header["image_size"])
    out = []
    for line in lines[1:]:
        d = json.loads(line)
        if split is not None and d["split"] != split:
            continue
        objs = tuple(ShapeObject(o["shape"], o["colour"], o["size"], tuple(o["box"])) for o in d["objects"])
        masks = np.stack([rle_decode(o["mask_rle"], (size, size)) for o in d["objects"]])
        with Image.open(folder / d["file"]) as im:
            image = im.convert("RGB")
        out.append(ShapesSample(image, objs, masks, d["caption"], tuple(tuple(r) for r in d["relations"]),
                                d["split"], d["index"]))
    return out
