"""Activation data sets on disk: sharded safetensors with one JSON index.

Layout of a data set folder::

    capture.json               the plan: model, weights hash, hooks, groups, data, shard size ...
    shard-000000.safetensors   chunk 0: images [0, shard_size), written atomically
    shard-000001.safetensors   ...
    index.json                 written last: the shards, their image ranges and row counts

Chunk ``c`` always holds the images ``[c * shard_size, (c + 1) * shard_size)`` of the input list,
whichever process wrote it: under ``torchrun`` rank ``r`` of ``w`` writes the chunks with
``c % w == r``, and the index lists every chunk in order, so a data set captured by several
processes is the same files as one captured by one process. A shard is written to a temporary
file and renamed (`probe.io.atomic_write_bytes`): a file named ``shard-*.safetensors`` is always
complete, which is what resuming relies on (a chunk whose shard exists is done), and a full disk
leaves every earlier shard readable.

Inside a shard, per hook and token group, ``{hook}/{group}``: (rows, dim) activations, and per
group the rows' labels ``rows/{group}/{field}`` (int64, -1 where a row has no such label):
``image`` (global image index), ``type`` (the control-task type, see `TYPES`), the targets of
`TARGETS`, and group-specific fields (``object``, ``patch``, ``text_position``, ``token``).
Version 2 renamed the text rows' token position to ``text_position``: in version 1 it overwrote the
``position`` target (the quadrant) of text rows, so version 1 sets are refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save

from probe.data.shapes import COLOURS, SHAPES, SIZES
from probe.io import atomic_write_bytes, atomic_write_text
from probe.types import ProbeError

FORMAT = "probe-activations"
VERSION = 2
PLAN_FILE = "capture.json"
INDEX_FILE = "index.json"
SHARD_RE = re.compile(r"shard-(\d{6})\.safetensors")
#: temporary files of interrupted atomic writes (`probe.io.atomic_write_bytes`: ``.NAME.XXXX.tmp``)
TEMP_RE = re.compile(r"\.(shard-\d{6}\.safetensors|index\.json|capture\.json)\..+\.tmp")

#: token groups: what one row of each is
GROUPS = {
    "cls": "the CLS token (one row per image)",
    "mean": "the mean of the patch tokens (one row per image)",
    "object": "per object, the mean of the patch tokens under its mask (one row per object)",
    "patches": "every patch token (one row per patch; large: 64 rows per image for an 8x8 grid)",
    "text": "every real text position of the teacher-forced caption (one row per token)",
}
IMAGE_GROUPS = ("cls", "mean", "object", "patches")

#: probing targets and their classes (the class index is the label stored in the shards)
POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right")
TARGETS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "size": tuple(SIZES),
    "count": ("1", "2", "3"),
    "position": POSITIONS,
}

#: what a control-task *type* (Hewitt & Liang 2019) is for each token group
TYPES = {
    "cls": "the patch under the centre of the labelled (largest) object",
    "mean": "the patch under the centre of the labelled (largest) object",
    "object": "the patch under the object's centre",
    "patches": "the patch position",
    "text": "the token id",
}


class ActivationSetError(ProbeError, ValueError):
    """A data set folder that cannot be read or resumed; the message names the fix."""


def shard_name(chunk: int) -> str:
    return f"shard-{chunk:06d}.safetensors"


def key(hook: str, group: str) -> str:
    """The tensor name of a hook's rows of one group in a shard."""
    return f"{hook}/{group}"


def row_key(group: str, name: str) -> str:
    return f"rows/{group}/{name}"


def write_shard(folder: Path, chunk: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write chunk `chunk` atomically: readers see no file or the whole one, never half."""
    # one metadata key: safetensors writes its metadata map in no fixed order, and shards written by
    # different processes must be the same bytes
    info = json.dumps({"format": FORMAT, "chunk": chunk, "meta": meta}, sort_keys=True)
    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"probe": info})
    path = Path(folder) / shard_name(chunk)
    atomic_write_bytes(path, data)
    return path


def shard_meta(path: Path) -> dict[str, Any]:
    """The JSON metadata of a shard (its header only) plus the tensor shapes (name -> shape)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type for corrupt files
        raise ActivationSetError(f"{path} cannot be read ({' '.join(str(e).split())}); delete it and run the "
                                 "same capture again to rewrite it") from None
    info = json.loads(md.get("probe", "{}"))
    if info.get("format") != FORMAT:
        raise ActivationSetError(f"{path} is not a probe activation shard")
    return {**info["meta"], "chunk": int(info["chunk"]), "shapes": shapes}


def done_chunks(folder: Path) -> list[int]:
    """Chunks whose shard exists in `folder` (complete by construction), sorted."""
    return sorted(int(m.group(1)) for p in Path(folder).iterdir() if (m := SHARD_RE.fullmatch(p.name)))


def write_index(folder: Path, plan: dict[str, Any], n_chunks: int) -> dict[str, Any]:
    """Merge every shard of `folder` into ``index.json`` (atomically). Refuses a missing chunk."""
    folder = Path(folder)
    have = set(done_chunks(folder))
    missing = [c for c in range(n_chunks) if c not in have]
    if missing:
        raise ActivationSetError(f"{folder}: chunks {missing[:8]} are missing; run the same capture again to "
                                 "finish them")
    shards, dims = [], {}
    for c in range(n_chunks):
        m = shard_meta(folder / shard_name(c))
        rows = {g: m["shapes"][row_key(g, "image")][0] for g in plan["groups"] if row_key(g, "image") in m["shapes"]}
        for name, shape in m["shapes"].items():
            if not name.startswith("rows/"):
                dims[name] = shape[1]
        shards.append({"file": shard_name(c), "chunk": c, "images": m["images"], "rows": rows})
    index = {**plan, "format": FORMAT, "version": VERSION, "n_chunks": n_chunks, "dims": dims, "shards": shards,
             "rows": {g: sum(s["rows"].get(g, 0) for s in shards) for g in plan["groups"]},
             "labelled": bool(plan.get("labelled"))}
    atomic_write_text(folder / INDEX_FILE, json.dumps(index, indent=1))
    return index


def write_plan(folder: Path, plan: dict[str, Any]) -> None:
    atomic_write_text(Path(folder) / PLAN_FILE, json.dumps(plan, indent=1, sort_keys=True))


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object file of an activation set; a corrupt one is named in one line."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ActivationSetError(f"{path} cannot be read ({type(e).__name__}: {e}); capture the data set again "
                                 "(probe capture --force)") from None
    if not isinstance(data, dict):
        raise ActivationSetError(f"{path} is not a JSON object; capture the data set again (probe capture --force)")
    return data


def read_plan(folder: Path) -> dict[str, Any] | None:
    p = Path(folder) / PLAN_FILE
    return _read_json(p) if p.is_file() else None


@dataclass
class ActivationSet:
    """A complete activation data set (`open_activations`), read one (hook, group) at a time, so
    memory holds one layer's rows, never the whole set.

    Attributes:
        folder: the data set folder. index: ``index.json``. captured: images this process captured
            into it (`capture_set`; fewer than ``n_images`` on a resume), None when only opened.
    """

    folder: Path
    index: dict[str, Any]
    captured: int | None = None
    _rows: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)

    @property
    def model(self) -> str:
        return str(self.index["model"])

    @property
    def hooks(self) -> list[str]:
        return list(self.index["hooks"])

    @property
    def groups(self) -> list[str]:
        return list(self.index["groups"])

    @property
    def labelled(self) -> bool:
        return bool(self.index.get("labelled"))

    def hooks_with(self, group: str) -> list[str]:
        """The hooks that have rows of `group` (e.g. only text hooks have ``text``), in order."""
        return [h for h in self.hooks if key(h, group) in self.index["dims"]]

    def load(self, hook: str, group: str, rows: np.ndarray | None = None) -> np.ndarray:
        """(rows, dim) float32: the rows of `group` at `hook`, in image order; with `rows` (indices
        into the group's rows, or a boolean mask over them) only those, read shard by shard as
        safetensors slices, so memory holds one shard's span and the kept rows, never the layer."""
        k = key(hook, group)
        if k not in self.index["dims"]:
            have = ", ".join(sorted(self.index["dims"])[:10])
            raise ActivationSetError(f"{self.folder} has no {group!r} rows at {hook!r}; it has {have}")
        dim = self.index["dims"][k]
        if rows is None:
            parts = [_load_one(self.folder / s["file"], k) for s in self.index["shards"] if s["rows"].get(group)]
            return np.concatenate(parts).astype(np.float32, copy=False) if parts else np.zeros((0, dim), np.float32)
        rows = np.asarray(rows)
        total = int(self.index["rows"][group])
        if rows.dtype == bool:
            if len(rows) != total:
                raise ActivationSetError(f"a row mask of {len(rows)} for {total} {group!r} rows")
            idx = np.flatnonzero(rows)
        else:
            idx = rows.astype(np.int64, copy=False)
            if len(idx) and (idx.min() < 0 or idx.max() >= total or (np.diff(idx) <= 0).any()):
                raise ActivationSetError(f"row indices must be increasing and within the {total} {group!r} rows")
        out = np.empty((len(idx), dim), np.float32)
        start, done = 0, 0
        for s in self.index["shards"]:
            n = int(s["rows"].get(group, 0))
            lo, hi = np.searchsorted(idx, [start, start + n])
            if hi > lo:
                local = idx[lo:hi] - start
                with safe_open(str(self.folder / s["file"]), framework="pt") as f:
                    span = f.get_slice(k)[int(local[0]) : int(local[-1]) + 1]
                out[done : done + hi - lo] = span[torch.from_numpy(local - local[0])].float().numpy()
                done += hi - lo
            start += n
        return out

    def rows(self, group: str) -> dict[str, np.ndarray]:
        """Per-row fields of `group` (``image``, ``type``, the targets ...), each (rows,) int64."""
        if group not in self._rows:
            if group not in self.groups:
                raise ActivationSetError(f"{self.folder} holds the groups {', '.join(self.groups)}, not {group!r}; "
                                         f"capture it with --groups {group}")
            out: dict[str, list[np.ndarray]] = {}
            prefix = f"rows/{group}/"
            for s in self.index["shards"]:
                if not s["rows"].get(group):
                    continue
                with safe_open(str(self.folder / s["file"]), framework="pt") as f:
                    for name in f.keys():
                        if name.startswith(prefix):
                            out.setdefault(name[len(prefix):], []).append(f.get_tensor(name).numpy())
            self._rows[group] = {k: np.concatenate(v) for k, v in out.items()}
        return self._rows[group]


def _load_one(path: Path, name: str) -> np.ndarray:
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name).float().numpy()


def open_activations(folder: str | Path) -> ActivationSet:
    """Read a complete data set written by ``probe capture``.

    Raises:
        ActivationSetError: not a data set, or an unfinished one (the message says how to finish it).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ActivationSetError(f"{folder} is not a folder; give an activation data set written by `probe capture`")
    idx = folder / INDEX_FILE
    if not idx.is_file():
        if (folder / PLAN_FILE).is_file():
            raise ActivationSetError(f"{folder} is an unfinished capture (no {INDEX_FILE}); run the same "
                                     "`probe capture` command again to resume it")
        raise ActivationSetError(f"{folder} is not an activation data set (no {INDEX_FILE}); write one with "
                                 "`probe capture --model M --data shapes:N --out DIR`")
    index = _read_json(idx)
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ActivationSetError(f"{folder}: {INDEX_FILE} is format {index.get('format')!r} version "
                                 f"{index.get('version')!r}; this probe reads {FORMAT} version {VERSION}: capture "
                                 "it again (probe capture --force)")
    return ActivationSet(folder, index)


def is_activation_set(folder: str | Path) -> bool:
    """Whether `folder` has an index or a plan file (complete or unfinished; not checked further)."""
    p = Path(folder)
    return p.is_dir() and ((p / INDEX_FILE).is_file() or (p / PLAN_FILE).is_file())


def holds_activation_set(folder: str | Path) -> bool:
    """Whether `folder`'s index or plan file says it is a probe activation data set (the only kind
    of folder ``probe capture --force`` may replace)."""
    p = Path(folder)
    for name in (INDEX_FILE, PLAN_FILE):
        try:
            if json.loads((p / name).read_text()).get("format") == FORMAT:
                return True
        except (OSError, ValueError, AttributeError):
            continue
    return False


def own_files(folder: str | Path) -> list[Path]:
    """The files of `folder` that a capture writes: plan, index, shards and interrupted temporary files."""
    return sorted(p for p in Path(folder).iterdir() if p.name in (PLAN_FILE, INDEX_FILE) or SHARD_RE.fullmatch(p.name)
                  or TEMP_RE.fullmatch(p.name))

