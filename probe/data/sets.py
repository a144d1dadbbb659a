"""`ImageSet`: the images an analysis runs on, with their names and, for probe-shapes, the exact
object masks and ground-truth samples."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

import probe.assets
from probe.data.images import image_paths, open_rgb
from probe.data.shapes import ShapesSample, iter_split

BUNDLED_IMAGES = Path(probe.assets.__file__).resolve().parent / "images"


@dataclass(frozen=True)
class ImageSet:
    """Images (RGB) and their names; `masks` (per image: bool (objects, H, W)) and `samples`
    (per image: its `ShapesSample`) when the images come from probe-shapes; `sources` say where
    each image came from (a path, or ``shapes:SPLIT:INDEX``)."""

    images: list[Image.Image]
    names: list[str]
    sources: list[str]
    masks: list[np.ndarray] | None = None
    samples: list[ShapesSample] | None = None

    def __post_init__(self) -> None:
        n = len(self.images)
        if not n:
            raise ValueError("no images given")
        for what, v in (("names", self.names), ("sources", self.sources), ("masks", self.masks),
                        ("samples", self.samples)):
            if v is not None and len(v) != n:
                raise ValueError(f"ImageSet: {n} images but {len(v)} {what}")

    def __len__(self) -> int:
        return len(self.images)

    @classmethod
    def from_images(cls, images: Sequence[Image.Image], names: Sequence[str] | None = None) -> ImageSet:
        names = list(names) if names is not None else [f"image_{i}" for i in range(len(images))]
        return cls(list(images), names, list(names))

    @classmethod
    def from_paths(cls, inputs: str | Path | Sequence[str | Path]) -> ImageSet:
        """Image files and folders (their image files, sorted)."""
        paths = image_paths(inputs)
        return cls([open_rgb(p) for p in paths], [p.name for p in paths], [str(p) for p in paths])

    @classmethod
    def bundled(cls) -> ImageSet:
        """The sample images shipped in ``probe/assets/images`` (probe-shapes test samples)."""
        return cls.from_paths([BUNDLED_IMAGES])

    @classmethod
    def shapes(cls, n: int, *, split: str = "test", seed: int = 0, image_size: int = 64) -> ImageSet:
        """The first `n` probe-shapes images of `split`, with masks and ground truth."""
        if n < 1:
            raise ValueError(f"--shapes {n}: give at least one image")
        samples = list(iter_split(split, n, seed=seed, image_size=image_size))
        names = [f"shapes_{split}_{s.index:03d}" for s in samples]
        return cls([s.image for s in samples], names, [f"shapes:{split}:{s.index}" for s in samples],
                   masks=[s.masks for s in samples], samples=samples)
