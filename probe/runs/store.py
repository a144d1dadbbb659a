"""The run store: one folder per run, written atomically.

Layout of a run folder::

    manifest.json        model, weights and their hash, versions, attention implementation,
                         dtype, device, seed, parameters, timings
    result.json          Result.to_dict()
    arrays.safetensors   Result.arrays, keyed by canonical hook names
    figures/*.png

A run is staged in a hidden ``.incomplete-*`` folder and renamed into place only when every
file is written, so a crash never leaves a half-written run in the listing.

Run ids are plain folder names (``[A-Za-z0-9._-]+``, not starting with ``.``) checked by the store
itself, so no caller can reach outside the root. One bad run folder never breaks the store: it is
listed as broken with its problem, `load` names the problem, and `delete` still removes it.

Viewers that must not load every array (the app) read a run file by file: `run_path`, `run_file`,
`read_json`, `array_info` (shapes from the safetensors header) and `read_array` (one array or a
slice of it). They refuse what `load` refuses, and also any run folder or run file that is a
symbolic link, so no id can make them read outside the store root.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import platform
import re
import secrets
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from probe.io import MARKER, OutputExistsError, atomic_dir
from probe.runs.results import Result, result_from_dict
from probe.types import ProbeError

DEFAULT_STORE_ENV = "PROBE_STORE"
MANIFEST_VERSION = 1
RUN_ID_RE = re.compile(r"[A-Za-z0-9._-]+")
STAGING_RE = re.compile(r"\.(incomplete|deleting|old)-.+-[A-Za-z0-9_]{6,8}")  # what atomic_dir and delete name
GENERATED_ID_RE = re.compile(r"\d{8}-\d{6}-[A-Za-z0-9_.-]+-[0-9a-f]{6}")  # `RunStore.new_id`
RUN_FILES = ("manifest.json", "result.json", "arrays.safetensors")
STALE_AFTER_S = 24 * 3600  # staging folders younger than this may belong to a save in progress

logger = logging.getLogger(__name__)


def default_store_root() -> Path:
    """``$PROBE_STORE`` if set (and not empty), else ``./probe-runs``."""
    return Path(os.environ.get(DEFAULT_STORE_ENV, "").strip() or "probe-runs")


class RunIdError(ProbeError, ValueError):
    """A run id that is not a plain folder name inside the store."""


class UnknownRunError(ProbeError, KeyError):
    """No run with that id in the store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class BrokenRunError(ProbeError, ValueError):
    """A run folder that cannot be read; the message names the problem."""


@dataclass(frozen=True)
class Run:
    """A saved run: its id, folder, manifest, result and figure files.

    `status` is ``ok`` or ``broken``; `problem` says what is wrong with a broken run, whose
    `manifest` is {} unless it was readable and fits the schema.
    """

    id: str
    path: Path
    manifest: dict[str, Any]
    result: Result | None
    figures: list[Path]
    status: Literal["ok", "broken"] = "ok"
    problem: str = ""


def environment_info() -> dict[str, Any]:
    import transformers  # heavy: only when a run is saved

    try:
        version = importlib.metadata.version("vlm-probe")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "probe": version,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }


class RunStore:
    """Save, list, load and delete runs under one root folder."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_store_root()

    def new_id(self, analysis: str, model: str) -> str:
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{analysis}-{model}")
        return f"{stamp}-{slug}-{secrets.token_hex(3)}"

    def save(
        self,
        manifest: dict[str, Any],
        result: Result,
        figures: dict[str, Any] | None = None,
        run_id: str | None = None,
    ) -> Run:
        """Write a run atomically. `figures` maps a name to a matplotlib Figure or PNG bytes."""
        run_id = run_id or self.new_id(manifest.get("analysis", "run"), manifest.get("model", {}).get("name", "model"))
        manifest = {"manifest_version": MANIFEST_VERSION, "id": run_id, **manifest}
        manifest.setdefault("created", datetime.now(UTC).isoformat(timespec="seconds"))
        if "environment" not in manifest:
            manifest["environment"] = environment_info()
        if problem := _manifest_problem(manifest):
            raise ValueError(f"cannot save run {run_id}: {problem}")
        target = self.root / _check_id(run_id)
        if target.exists() or target.is_symlink():
            raise OutputExistsError(f"run {run_id} already exists in {self.root}; choose another run id")
        with atomic_dir(target) as tmp:
            arrays = _unshared({k: v.detach().cpu().contiguous() for k, v in result.arrays.items()})
            save_file(arrays, str(tmp / "arrays.safetensors"))
            (tmp / "result.json").write_text(json.dumps(result.to_dict(), indent=2, default=_json_default))
            if figures:
                (tmp / "figures").mkdir()
                for name, fig in figures.items():
                    dest = tmp / "figures" / f"{_safe(name)}.png"
                    if isinstance(fig, bytes):
                        dest.write_bytes(fig)
                    else:
                        fig.savefig(dest, dpi=110, bbox_inches="tight")
            # The manifest is written last: a folder with a manifest is a complete run.
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=_json_default))
        return self.load(run_id)

    def list(self, *, clean: bool = True) -> list[Run]:
        """Every run, newest first, broken ones last; the result is not loaded (None). A run is a
        folder probe wrote holding a ``manifest.json`` (or a link named like a generated run id, or
        leading to a folder probe wrote); other folders and links are not runs and are neither
        listed nor ever deleted.

        Never raises for one bad run: it is listed with ``status="broken"`` and its `problem`.
        Staging folders left by crashed saves and deletes more than a day ago are removed, unless
        `clean` is False (readers of a shared store, such as the app, write nothing).
        """
        if not self.root.is_dir():
            return []
        n = self.clean_incomplete(older_than=STALE_AFTER_S) if clean else 0
        if n:
            logger.info("removed %d stale staging folder%s from %s", n, "" if n == 1 else "s", self.root)
        runs = []
        for p in self.root.iterdir():
            if p.name.startswith(".") or not _is_run(p):
                continue
            manifest, problem = self._inspect(p)
            runs.append(Run(p.name, p, manifest, None, _figures(p), "broken" if problem else "ok", problem))
        return sorted(runs, key=lambda r: (r.status == "ok", r.manifest.get("created", ""), r.id), reverse=True)

    def load(self, run_id: str) -> Run:
        """One run with its result and arrays.

        Raises:
            RunIdError: `run_id` is not a plain name inside the store.
            UnknownRunError: no such run (a KeyError).
            BrokenRunError: the run cannot be read; the message says why.
        """
        p = self._path(run_id)
        manifest, problem = self._inspect(p)
        if not problem:
            try:
                arrays = load_file(str(p / "arrays.safetensors"))
            except Exception as e:  # safetensors raises its own error type for corrupt files
                problem = f"arrays.safetensors cannot be read ({_one_line(e)})"
        if not problem:
            try:
                result = result_from_dict(json.loads((p / "result.json").read_text()), arrays)
            except Exception as e:  # whatever the file holds, a result that cannot be rebuilt is broken
                problem = f"result.json cannot be read ({_one_line(e)})"
        if problem:
            raise BrokenRunError(f"run {run_id} in {self.root} is broken: {problem}; "
                                 f"delete it with `probe runs --delete {run_id}`")
        return Run(run_id, p, manifest, result, _figures(p))

    def is_probe_run(self, run_id: str) -> bool:
        """Whether `run_id` is positively a run probe wrote: a real folder (not a link) in the store
        holding probe's output marker, or a probe manifest naming this id. Never raises; viewers
        offer to delete only such runs (`delete` also removes broken entries and links)."""
        try:
            p = self.root / _check_id(run_id)
        except RunIdError:
            return False
        return not p.is_symlink() and p.is_dir() and _written_by_probe(p)

    def delete(self, run_id: str) -> None:
        """Remove a run folder, broken or not. A symlinked run loses the link only, never its target."""
        p = self._path(run_id)
        trash = self.root / f".deleting-{run_id}-{secrets.token_hex(3)}"
        os.replace(p, trash)  # atomic disappearance from the listing; moves a link, not its target
        if trash.is_symlink():
            trash.unlink()
        else:
            shutil.rmtree(trash)  # does not follow links inside the folder

    # ---------------------------------------------------------------- read-only access, file by file
    # For viewers (the app) that read a run lazily instead of `load`ing every array: each path goes
    # through the same id check as `load`, and nothing outside the store root is ever opened.

    def run_path(self, run_id: str) -> Path:
        """The folder of an existing run, checked: a plain id, a real folder (not a symbolic link)
        inside the store root.

        Raises:
            RunIdError: `run_id` is not a plain name inside the store.
            UnknownRunError: no such run.
            BrokenRunError: the run is a symbolic link, or resolves outside the store root.
        """
        p = self._path(run_id)
        if p.is_symlink():  # where it points is not said: it may be outside the store
            raise BrokenRunError(f"run {run_id} in {self.root} is a symbolic link; "
                                 "runs are real folders in the store, so it is not read")
        if not p.resolve().is_relative_to(self.root.resolve()):
            raise BrokenRunError(f"run {run_id} resolves outside the store {self.root}; it is not read")
        return p

    def run_file(self, run_id: str, name: str) -> Path:
        """One file of a run, checked as `run_path` is: ``manifest.json``, ``result.json``,
        ``arrays.safetensors`` or ``figures/NAME.png``; never a link, never outside the run.

        Raises:
            RunIdError, UnknownRunError: as `run_path`.
            BrokenRunError: the file is missing, a link, or not one of those names.
        """
        p = self.run_path(run_id)
        parts = name.split("/")
        allowed = name in RUN_FILES or (len(parts) == 2 and parts[0] == "figures" and figure_name_ok(parts[1]))
        if not allowed:
            raise BrokenRunError(f"{name!r} is not a file of a run ({', '.join(RUN_FILES)} or figures/NAME.png)")
        f = p.joinpath(*parts)
        if f.is_symlink() or (len(parts) == 2 and p.joinpath(parts[0]).is_symlink()):
            raise BrokenRunError(f"run {run_id}: {name} is a symbolic link; it is not read")
        if not f.is_file():
            raise BrokenRunError(f"run {run_id} in {self.root} is broken: {name} is missing")
        if not f.resolve().is_relative_to(p.resolve()):
            raise BrokenRunError(f"run {run_id}: {name} resolves outside the run; it is not read")
        return f

    def read_json(self, run_id: str, name: str = "result.json") -> dict[str, Any]:
        """``result.json`` (or ``manifest.json``) of a run as a dict, without rebuilding the result.

        Raises:
            BrokenRunError: the file cannot be read or does not hold a JSON object (and as `run_file`).
        """
        if name not in ("result.json", "manifest.json"):
            raise BrokenRunError(f"{name!r}: read_json reads result.json or manifest.json")
        f = self.run_file(run_id, name)
        try:
            d = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BrokenRunError(f"run {run_id}: {name} is not valid JSON ({_one_line(e)})") from e
        problem = _manifest_problem(d) if name == "manifest.json" else (
            "" if isinstance(d, dict) else f"result.json holds a {type(d).__name__}, not an object")
        if problem:
            raise BrokenRunError(f"run {run_id} is broken: {problem}")
        return d

    def array_info(self, run_id: str) -> dict[str, tuple[tuple[int, ...], str]]:
        """Name -> (shape, safetensors dtype such as ``F32``) of every array of a run, read from the
        file's header only.

        Raises:
            BrokenRunError: ``arrays.safetensors`` cannot be read (and as `run_file`).
        """
        f = self.run_file(run_id, "arrays.safetensors")
        try:
            with safe_open(str(f), framework="pt") as fh:
                out = {}
                for k in fh.keys():
                    sl = fh.get_slice(k)
                    out[k] = (tuple(int(n) for n in sl.get_shape()), str(sl.get_dtype()))
                return out
        except Exception as e:  # safetensors raises its own error type for corrupt files
            raise BrokenRunError(f"run {run_id}: arrays.safetensors cannot be read ({_one_line(e)})") from e

    def read_array(self, run_id: str, name: str, index: tuple[int | slice, ...] = ()) -> np.ndarray:
        """One array of a run, or a part of it (`index`: ints and slices over its leading axes),
        read lazily from ``arrays.safetensors`` (only the part asked for is read). Floating-point
        arrays come back as float32 (bfloat16 has no numpy type), others as they are.

        Raises:
            KeyError: the run has no array `name`.
            IndexError: `index` is out of range.
            BrokenRunError: ``arrays.safetensors`` cannot be read (and as `run_file`).
        """
        f = self.run_file(run_id, "arrays.safetensors")
        try:
            with safe_open(str(f), framework="pt") as fh:
                if name not in fh.keys():
                    raise KeyError(f"run {run_id} has no array {name!r}")
                t = fh.get_slice(name)[index] if index else fh.get_tensor(name)
        except (KeyError, IndexError):
            raise
        except Exception as e:
            raise BrokenRunError(f"run {run_id}: {name} in arrays.safetensors cannot be read ({_one_line(e)})") from e
        return (t.float() if t.is_floating_point() else t).numpy()

    def clean_incomplete(self, older_than: float = 0.0) -> int:
        """Remove staging folders (``.incomplete-*``, ``.deleting-*``, ``.old-*``) left by crashed saves
        and deletes, last modified more than `older_than` seconds ago; returns how many. Only what
        probe wrote goes: a folder named so that holds probe's output marker (or is empty), or a
        link left by a delete; anything of the user's with a similar name stays."""
        n = 0
        now = time.time()
        for p in self.root.glob(".*"):
            if not STAGING_RE.fullmatch(p.name) or not _ours(p):
                continue
            try:
                if now - p.lstat().st_mtime < older_than:
                    continue  # may be a save in progress
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
            except OSError as e:
                logger.debug("cannot remove %s: %s", p, e)
                continue
            n += 1
        return n

    def _path(self, run_id: str) -> Path:
        """The folder of an existing run; refuses ids that are not plain names in the store."""
        p = self.root / _check_id(run_id)
        if p.is_dir() and not _is_run(p):
            raise UnknownRunError(f"{p} is not a probe run (no manifest.json, or not written by probe); probe reads "
                                  "and deletes only its runs")
        if not _is_run(p):
            known = ", ".join(r.id for r in self.list(clean=False)[:5]) or "none"  # a hint never writes
            raise UnknownRunError(f"no run {run_id!r} in {self.root} (recent runs: {known})")
        return p

    def _inspect(self, p: Path) -> tuple[dict[str, Any], str]:
        """(manifest, problem) of a run folder: problem is "" for a run that looks complete; the
        manifest is {} unless it was read and fits the schema."""
        if p.is_symlink():
            return {}, "is a symbolic link (runs are real folders in the store)"
        if not RUN_ID_RE.fullmatch(p.name):  # a folder someone named by hand
            return {}, "folder name is not a run id (letters, digits, '.', '_' and '-'); rename or remove it"
        manifest: Any = {}
        for name in ("manifest.json", "result.json", "arrays.safetensors"):
            f = p / name
            if f.is_symlink() or not f.is_file():
                return manifest, f"{name} is {'a symbolic link' if f.is_symlink() else 'missing'}"
            if name == "manifest.json":
                try:
                    manifest = json.loads(f.read_text())
                except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                    return {}, f"manifest.json is not valid JSON ({_one_line(e)})"
                if problem := _manifest_problem(manifest):
                    return {}, problem
        return manifest, ""


def _ours(p: Path) -> bool:
    """Written by probe: a link left by a delete, or a folder with probe's output marker (or empty)."""
    if p.is_symlink():
        return p.name.startswith(".deleting-")
    return p.is_dir() and ((p / MARKER).is_file() or not any(p.iterdir()))


def _is_run(p: Path) -> bool:
    """A run: a folder holding a ``manifest.json`` (possibly broken) that probe wrote (its output
    marker, a generated run id, or a probe manifest naming this id). A link is listed (as a broken
    run; deleting it removes the link only) only when its name is a generated run id or it leads to
    a folder with probe's marker: the user's links (``bin -> usr/bin``) are not runs. Any other
    folder is the user's."""
    if p.is_symlink():
        return GENERATED_ID_RE.fullmatch(p.name) is not None or (p / MARKER).is_file()
    m = p / "manifest.json"
    if not p.is_dir() or not (m.is_file() or m.is_symlink()):
        return False
    return GENERATED_ID_RE.fullmatch(p.name) is not None or _written_by_probe(p)


def _written_by_probe(p: Path) -> bool:
    """A folder holding probe's output marker, or a probe manifest (``manifest_version``) naming its id."""
    if (p / MARKER).is_file():
        return True
    m = p / "manifest.json"
    if m.is_symlink() or not m.is_file():
        return False
    try:
        d = json.loads(m.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(d, dict) and "manifest_version" in d and d.get("id") == p.name


def _check_id(run_id: str) -> str:
    """`run_id` if it is a plain folder name (so it stays inside the store), else `RunIdError`."""
    if not isinstance(run_id, str) or not RUN_ID_RE.fullmatch(run_id) or run_id.startswith("."):
        raise RunIdError(f"{run_id!r} is not a run id: use letters, digits, '.', '_' and '-' only, "
                         "not starting with '.' (`probe runs` lists the ids)")
    return run_id


def _manifest_problem(m: Any) -> str:
    """What is wrong with a manifest's shape, or "" when it fits the schema."""
    if not isinstance(m, dict):
        return f"manifest.json holds a {type(m).__name__}, not an object"
    for key in ("id", "analysis", "created"):
        if not isinstance(m.get(key), str):
            return f"manifest.json has no string {key!r}"
    if not isinstance(m.get("model"), dict) or not isinstance(m["model"].get("name"), str):
        return "manifest.json has no 'model' object with a string 'name'"
    return ""


def figure_name_ok(name: str) -> bool:
    """A figure file name `RunStore.run_file` accepts: ``NAME.png``, a plain run-id-like name."""
    return name.endswith(".png") and RUN_ID_RE.fullmatch(name) is not None and not name.startswith(".")


def _figures(p: Path) -> list[Path]:
    """PNG files of a run's figures/ folder that `RunStore.run_file` would read; links, folders,
    odd names and files that resolve outside the run are left out."""
    if p.is_symlink() or (p / "figures").is_symlink():
        return []
    root = p.resolve()
    return sorted(f for f in (p / "figures").glob("*.png")
                  if figure_name_ok(f.name) and not f.is_symlink() and f.is_file() and f.resolve().is_relative_to(root))


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "figure"


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.dtype | torch.device):
        return str(o)
    if isinstance(o, tuple | set):
        return list(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"cannot write {type(o).__name__} to JSON")


def _unshared(arrays: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of the arrays that share storage with an earlier one (a view such as a reshaped slice
    of a batch of one): safetensors refuses to write shared memory."""
    seen: set[int] = set()
    out = {}
    for k, v in arrays.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen and v.numel() else v
        seen.add(ptr)
    return out
