"""Real handwritten digits for training the from-scratch ViTs: scikit-learn's `load_digits`
(1,797 grey 8x8 images of the digits 0-9, bundled with scikit-learn, nothing downloads) written
in the class-per-folder layout that `probe.data.load_labelled` reads::

    OUT/train/<digit>/<index>.png   OUT/test/<digit>/<index>.png   OUT/digits.json

``<index>`` is the image's row in `load_digits`. The split is stratified and deterministic
(`stratified_split`); pixels 0..16 become 0..255 (``round(v * 255 / 16)``) and the 8x8 image is
upscaled with PIL's bicubic filter by default, the filter `load_labelled` and the ViT adapters
resize with, so an export at 32 px equals an export at 8 px read at 32 px. ``resample="nearest"``
keeps every original pixel as a flat block (at 32 px and patch 4: one grey value per patch, which
leaves a ViT's tokens almost nothing to tell apart but their positions: a 4-block standard-attention
ViT reached 60% top-1 after 15 epochs on it (mean of 4 seeds, 37-75%) against 94% on the bicubic
export, with no warm-up or clipping).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from probe.io import atomic_dir

log = logging.getLogger(__name__)

#: PIL resampling filters offered for the upscale
RESAMPLING = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
              "bicubic": Image.Resampling.BICUBIC}
DEFAULT_TEST = 397
MANIFEST = "digits.json"


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images float (1797, 8, 8) with values 0..16, labels int64 (1797,)."""
    from sklearn.datasets import load_digits  # heavy import, only when digits are asked for

    d = load_digits()
    return np.asarray(d.images, dtype=np.float64), np.asarray(d.target, dtype=np.int64)


def stratified_split(labels: np.ndarray, n_test: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test), each sorted, with `n_test` test items spread over the classes in
    proportion to their size.

    Class ``c`` of ``n_c`` items gets ``floor(n_c * n_test / n)`` test items, and the remaining
    ``n_test - sum(floors)`` go one each to the classes with the largest fractional parts (ties:
    the lower class). Which items of a class go to test is a permutation of that class drawn
    from ``numpy.random.default_rng(seed)``, classes in sorted order: the split depends only on
    `labels`, `n_test` and `seed`.

    Raises:
        ValueError: `n_test` leaves a class with no train or no test item.
    """
    labels = np.asarray(labels)
    n = len(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if not 0 < n_test < n:
        raise ValueError(f"test size {n_test}: give 1 to {n - 1} (there are {n} items)")
    exact = counts * n_test / n
    per_class = np.floor(exact).astype(np.int64)
    left = n_test - int(per_class.sum())
    order = sorted(range(len(classes)), key=lambda i: (-(exact[i] - per_class[i]), i))
    per_class[order[:left]] += 1
    short = [str(c) for c, k, m in zip(classes, per_class, counts, strict=True) if k < 1 or k >= m]
    if short:
        raise ValueError(f"test size {n_test} leaves class(es) {', '.join(short)} with no test or no train "
                         f"item; give a test size between the number of classes and {n} minus it")
    rng = np.random.default_rng(seed)
    test: list[np.ndarray] = []
    for c, k in zip(classes, per_class, strict=True):
        members = np.flatnonzero(labels == c)
        test.append(members[rng.permutation(len(members))[:k]])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(n), test_idx)
    return train_idx, test_idx


def to_uint8(images: np.ndarray, size: int, resample: str = "bicubic") -> np.ndarray:
    """Digits (n, 8, 8) with values 0..16 -> uint8 grey (n, size, size): ``round(v * 255 / 16)``,
    then PIL's `resample` filter ("nearest", "bilinear" or "bicubic") to `size` x `size`."""
    if resample not in RESAMPLING:
        raise ValueError(f"resampling {resample!r}: use one of {', '.join(RESAMPLING)}")
    if size < 1:
        raise ValueError(f"image size {size}: give a positive number of pixels")
    grey = np.clip(np.rint(np.asarray(images, dtype=np.float64) * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    if grey.shape[1:] == (size, size):
        return grey
    return np.stack([np.asarray(Image.fromarray(g, "L").resize((size, size), RESAMPLING[resample]))
                     for g in grey])


def write_digits(out: str | Path, *, size: int = 32, n_test: int = DEFAULT_TEST, seed: int = 0,
                 resample: str = "bicubic", force: bool = False) -> Path:
    """Write the digits as grey PNGs in ``out/{train,test}/<digit>/<index:04d>.png``, with a
    ``digits.json`` manifest (source, size, resampling, seed, counts per split and class, the test
    indices), atomically: a non-empty `out` is refused (`probe.io.OutputExistsError`) unless
    `force`, which replaces it (only a folder probe wrote) once the new one is complete.

    With the defaults: 1,400 train and 397 test images of 32x32 pixels.
    """
    if not 8 <= size <= 1024:
        raise ValueError(f"image size {size}: give 8 to 1024 pixels")
    images, labels = load_digits_arrays()
    train_idx, test_idx = stratified_split(labels, n_test, seed)  # refused before anything is written
    pixels = to_uint8(images, size, resample)
    out = Path(out)
    counts: dict[str, dict[str, int]] = {}
    with atomic_dir(out, force=force) as tmp:
        for split, idx in (("train", train_idx), ("test", test_idx)):
            for c in range(10):
                (tmp / split / str(c)).mkdir(parents=True)
            for i in idx:
                Image.fromarray(pixels[i], "L").save(tmp / split / str(labels[i]) / f"{i:04d}.png")
            counts[split] = {str(c): int((labels[idx] == c).sum()) for c in range(10)}
        manifest = {"dataset": "sklearn-digits", "source": "sklearn.datasets.load_digits", "image_size": size,
                    "original_size": 8, "resample": resample, "intensity": "round(v * 255 / 16), v in 0..16",
                    "seed": seed, "n_train": len(train_idx), "n_test": len(test_idx), "counts": counts,
                    "test_indices": test_idx.tolist()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    log.info("wrote %d train and %d test digits (%d px, %s) to %s", len(train_idx), len(test_idx), size,
             resample, out)
    return out
