"""Ground-truth metrics on probe-shapes: caption accuracy and the classification label.

- ``exact``: the caption equals the ground truth (whitespace- and case-normalised);
- ``objects``: the share of ground-truth objects whose ``colour shape`` pair the caption names,
  matched as multisets;
- the classification label of an image: the colour and shape of its largest object (by pixel
  area), or None when the largest is not unique (the label would be ambiguous).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

from probe.data.shapes import COLOURS, SHAPES, ShapeObject, ShapesSample

OBJECT_WORDS = re.compile(r"\b(" + "|".join(COLOURS) + r") (" + "|".join(SHAPES) + r")s?\b")


def normalise(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").split())


def named_objects(text: str) -> Counter[tuple[str, str]]:
    """The (colour, shape) pairs a caption names, with multiplicity."""
    return Counter(OBJECT_WORDS.findall(normalise(text)))


def caption_metrics(generated: Sequence[str], samples: Sequence[ShapesSample]) -> dict[str, float]:
    """``exact`` and ``objects`` of `generated` captions against their samples (see module doc)."""
    exact = named = total = 0
    for text, s in zip(generated, samples, strict=True):
        exact += normalise(text) == normalise(s.caption)
        want = Counter((o.colour, o.shape) for o in s.objects)
        got = named_objects(text)
        named += sum(min(c, got[k]) for k, c in want.items())
        total += len(s.objects)
    return {"exact": exact / max(len(samples), 1), "objects": named / max(total, 1)}


def classify_classes() -> list[str]:
    """The 12 classes of the largest-object task: ``"colour shape"``."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def largest_object(masks: np.ndarray, objects: Sequence[ShapeObject]) -> int | None:
    """Index of the object with the most pixels, or None when that is not unique."""
    areas = masks.reshape(len(objects), -1).sum(1)
    top = np.flatnonzero(areas == areas.max())
    return int(top[0]) if len(top) == 1 else None
