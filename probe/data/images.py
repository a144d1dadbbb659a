"""Images in, tensors out: image files and folders, CIFAR-10 batches, labelled image folders.

Nothing here downloads. Every image is converted to RGB whatever its PIL mode. Files are treated
as untrusted: the pixel count is checked from the header before decoding (`max_image_pixels`),
EXIF orientation is applied, and float pixels that are NaN or infinite are refused.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from probe.types import ProbeError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
MAX_IMAGE_PIXELS = 50_000_000
"""Largest image (width * height) that is decoded; the environment variable
``PROBE_MAX_IMAGE_PIXELS`` overrides it."""
MAX_PIXELS_ENV = "PROBE_MAX_IMAGE_PIXELS"


class ImageLoadError(ProbeError, ValueError):
    """An image that cannot be read; the message names the file and what to do."""


class ImageTooLargeError(ImageLoadError):
    """An image whose header declares more pixels than `max_image_pixels()`."""


class DatasetError(ProbeError, ValueError):
    """A labelled data set that cannot be used as it is; the message names the file and the fix."""


def max_image_pixels() -> int:
    """The pixel cap: ``$PROBE_MAX_IMAGE_PIXELS`` if set, else `MAX_IMAGE_PIXELS`."""
    env = os.environ.get(MAX_PIXELS_ENV)
    if env is None:
        return MAX_IMAGE_PIXELS
    if not env.strip().isdigit() or int(env) < 1:
        raise ProbeError(f"{MAX_PIXELS_ENV}={env!r} is not a positive whole number; set it like 50000000 or unset it")
    return int(env)


def open_rgb(path: str | Path, size: int | tuple[int, int] | None = None) -> Image.Image:
    """Open one image file as RGB (palette, grey, RGBA, 16-bit, float ... are converted, see `to_rgb`).

    The pixel count is read from the header and checked against `max_image_pixels()` before
    anything is decoded; EXIF orientation is applied. `size` (the (height, width) the caller will
    resize to) lets a JPEG much larger than that be decoded at 1/2, 1/4 or 1/8 scale, never
    smaller than `size` on either side, so the image may come back smaller than it is stored.

    Raises:
        ImageLoadError: missing, unreadable, or NaN/inf float pixels; `ImageTooLargeError` over the cap.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"image {path}: no such file")
    cap = max_image_pixels()
    try:
        with Image.open(path) as im:  # reads the header only
            if size is not None and im.format in ("JPEG", "MPO"):
                side = max(size) if isinstance(size, tuple) else size  # EXIF may swap the sides
                im.draft(None, (side, side))
            if im.width * im.height > cap:
                raise _too_large(path, im.width * im.height, cap, f"{im.width}x{im.height}")
            im.load()
            ImageOps.exif_transpose(im, in_place=True)
            return to_rgb(im)
    except Image.DecompressionBombError as e:  # Pillow's own (higher) limit, hit while reading the header
        m = re.search(r"\((\d+) pixels\)", str(e))
        n = int(m.group(1)) if m else 0
        raise _too_large(path, n, cap if n > cap else 2 * (Image.MAX_IMAGE_PIXELS or 0)) from None
    except ImageTooLargeError:
        raise
    except ImageLoadError as e:
        raise ImageLoadError(f"image {path}: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(
            f"image {path}: cannot be read as an image ({type(e).__name__}: {e}); "
            f"use a valid {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} file"
        ) from None


def _too_large(path: Path, pixels: int, cap: int, dims: str = "") -> ImageTooLargeError:
    what = f"{dims} = {pixels:,} pixels" if dims else f"{pixels:,} pixels"
    return ImageTooLargeError(
        f"image {path} ({path.stat().st_size:,} bytes) declares {what}, over the limit of {cap:,} pixels; "
        f"shrink it, or raise the limit with {MAX_PIXELS_ENV}"
    )


def to_rgb(im: Image.Image | np.ndarray) -> Image.Image:
    """Any PIL mode -> RGB. Transparent pixels are composited on white.

    Also takes a numpy array (H, W) or (H, W, 1|3|4); anything else, or an image with no pixels,
    raises a `ImageLoadError` that says what was expected. Float pixels (mode ``F`` or a float
    array) follow one rule: NaN or inf is refused; if every value is in [0, 1] they are scaled by
    255; else if every value is in [0, 255] they are taken as 8-bit values; otherwise they are
    min-max scaled to [0, 255] (a constant image becomes black). Values are rounded to the nearest
    integer. Integer modes ``I``/``I;16`` are min-max scaled; other integer arrays are clipped to [0, 255].
    """
    if isinstance(im, np.ndarray):
        im = _from_array(im)
    if not isinstance(im, Image.Image):
        raise ImageLoadError(f"expected a PIL image or a numpy array (H, W[, C]); got {type(im).__name__} "
                             "(open files with probe.data.open_rgb or load_images)")
    if im.width < 1 or im.height < 1:
        raise ImageLoadError(f"image of size {im.width}x{im.height} has no pixels")
    if im.mode == "RGB":
        return im.copy()
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if im.mode == "F":
        return Image.fromarray(_float_to_uint8(np.asarray(im))).convert("RGB")
    if im.mode in ("I", "I;16", "I;16B", "I;16L"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
        return Image.fromarray(a.astype(np.uint8)).convert("RGB")
    return im.convert("RGB")


def _from_array(a: np.ndarray) -> Image.Image:
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        raise ImageLoadError(f"array of shape {a.shape} is not an image: expected (H, W) or (H, W, 1|3|4), "
                             "channels last")
    if np.issubdtype(a.dtype, np.floating):
        a = _float_to_uint8(a)
    elif a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    return Image.fromarray(a)


def _float_to_uint8(a: np.ndarray) -> np.ndarray:
    """Float pixels -> uint8 by the rule in `to_rgb`."""
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise ImageLoadError(f"float image has {int(np.isnan(a).sum())} NaN and {int(np.isinf(a).sum())} infinite "
                             "pixel values; replace them (e.g. numpy.nan_to_num) before loading it")
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if lo >= 0.0 and hi <= 1.0:
        a = a * 255.0
    elif lo < 0.0 or hi > 255.0:
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def image_paths(inputs: str | Path | Sequence[str | Path]) -> list[Path]:
    """Expand files and folders (their image files, sorted) into a list of paths; one path alone
    is fine too."""
    out: list[Path] = []
    for item in [inputs] if isinstance(inputs, str | Path) else inputs:
        if not str(item).strip():
            raise ImageLoadError("an image path is empty; give files or folders of images")
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ImageLoadError(f"folder {p} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            out.extend(found)
        elif p.exists():
            out.append(p)
        else:
            raise ImageLoadError(f"image {p}: no such file or folder")
    return out


def load_images(inputs: str | Path | Sequence[str | Path]) -> tuple[list[Image.Image], list[str]]:
    """Images (RGB) and their names from files and folders."""
    paths = image_paths(inputs)
    return [open_rgb(p) for p in paths], [p.name for p in paths]


def images_to_tensor(
    images: Sequence[Image.Image],
    size: int | tuple[int, int],
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
) -> torch.Tensor:
    """RGB images -> normalised float tensor (batch, 3, H, W), resized with bicubic resampling."""
    if not images:
        raise ValueError("no images given")
    h, w = (size, size) if isinstance(size, int) else size
    arrs = []
    for im in images:
        im = im if isinstance(im, Image.Image) and im.mode == "RGB" and im.width and im.height else to_rgb(im)
        if im.size != (w, h):
            im = im.resize((w, h), Image.Resampling.BICUBIC)
        arrs.append(np.asarray(im, dtype=np.float32) / 255.0)
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


def images_to_uint8(images: Sequence[Image.Image], size: int | tuple[int, int]) -> torch.Tensor:
    """RGB images resized to `size` as uint8 (batch, H, W, 3), for overlays in figures."""
    h, w = (size, size) if isinstance(size, int) else size
    return torch.from_numpy(
        np.stack([np.asarray(to_rgb(im).resize((w, h), Image.Resampling.BICUBIC)) for im in images])
    )


# ------------------------------------------------------------------------- labelled data sets


@dataclass
class ImageDataset:
    """In-memory labelled images: uint8 (n, H, W, 3) and int64 labels (n,)."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def batches(
        self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        order = torch.randperm(len(self), generator=generator).numpy() if shuffle else np.arange(len(self))
        for i in range(0, len(self), batch_size):
            idx = order[i : i + batch_size]
            yield self.images[idx], self.labels[idx]


class _CifarUnpickler(pickle.Unpickler):
    """Accepts only what the CIFAR-10 python format contains: builtins and plain numpy arrays."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        ("copy_reg", "_reconstructor"),
        ("copyreg", "_reconstructor"),
        ("__builtin__", "object"),
        ("builtins", "object"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"CIFAR-10 file refers to {module}.{name}, which is not allowed")


def _read_cifar_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DatasetError(f"{path}: not a CIFAR-10 python batch ({e})") from None
    if not isinstance(d, dict):
        raise DatasetError(f"{path}: not a CIFAR-10 python batch (a {type(d).__name__}, not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def load_cifar10(folder: str | Path, split: str = "train") -> ImageDataset:
    """CIFAR-10 from a local ``cifar-10-batches-py`` folder (never downloads).

    ``train`` reads ``data_batch_*``, ``test`` reads ``test_batch``. Files are read with a
    restricted unpickler (builtins and numpy uint8 arrays only). A batch whose labels do not give
    one class index per image raises `DatasetError` naming the file.
    """
    folder = Path(folder)
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    names = sorted(folder.glob("data_batch_*")) if split == "train" else [folder / "test_batch"]
    names = [p for p in names if p.is_file()]
    if not names:
        raise FileNotFoundError(
            f"{folder}: no CIFAR-10 {split} batches (data_batch_1..5, test_batch); download "
            "cifar-10-python.tar.gz yourself and unpack it there"
        )
    xs, ys = [], []
    for p in names:
        d = _read_cifar_batch(p)
        if "data" not in d or "labels" not in d:
            raise DatasetError(f"{p}: not a CIFAR-10 python batch (no 'data' or no 'labels'); unpack it again")
        data = np.asarray(d["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DatasetError(f"{p}: 'data' must be uint8 (n, 3072), got {data.dtype} {data.shape}")
        labels = np.asarray(d["labels"])
        if labels.ndim != 1 or len(labels) != len(data) or (labels.size and labels.dtype.kind not in "iu"):
            raise DatasetError(f"{p}: {len(data)} images but {labels.size} labels ({labels.dtype}); "
                               "each image needs one integer label: the file is damaged, unpack it again")
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(labels.astype(np.int64))
    classes = [str(i) for i in range(10)]
    meta = folder / "batches.meta"
    if meta.is_file():
        m = _read_cifar_batch(meta)
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in m.get("label_names", classes)]
    y = np.concatenate(ys)
    if y.size and (y.min() < 0 or y.max() >= len(classes)):
        raise DatasetError(f"{folder}: labels run from {y.min()} to {y.max()} but there are {len(classes)} "
                           "classes; the batches are damaged, unpack them again")
    return ImageDataset(np.concatenate(xs), y, classes)


def load_image_folder(folder: str | Path, size: int) -> ImageDataset:
    """A folder with one subfolder of images per class (sorted class names), resized to `size`."""
    folder = Path(folder)
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"{folder}: expected one subfolder of images per class")
    xs, ys = [], []
    for ci, c in enumerate(classes):
        for p in image_paths([folder / c]):
            xs.append(np.asarray(open_rgb(p, size).resize((size, size), Image.Resampling.BICUBIC)))
            ys.append(ci)
    return ImageDataset(np.stack(xs), np.asarray(ys, dtype=np.int64), classes)


def load_labelled(folder: str | Path, split: str, size: int) -> ImageDataset:
    """CIFAR-10 batches if the folder has them, else a class-per-subfolder layout in ``split/``.

    ``train`` also reads a flat class-per-subfolder layout (no ``train/``, no ``test/``). Any other
    split must have its own folder: evaluating on the training images is never done silently.

    Raises:
        DatasetError: the folder has no such split; the message says how to make one.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder {folder} does not exist")
    if any(folder.glob("data_batch_*")) or (folder / "cifar-10-batches-py").is_dir() or (folder / "test_batch").is_file():
        return load_cifar10(folder, split)
    sub = folder / split
    if sub.is_dir():
        return load_image_folder(sub, size)
    if split == "train" and not (folder / "test").is_dir():
        return load_image_folder(folder, size)
    raise DatasetError(f"data folder {folder} has no {split}/ split; put training images in {folder}/train/<class>/ "
                       f"and held-out images in {folder}/{split}/<class>/ beside it")
