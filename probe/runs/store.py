"""The run store: one folder per run, written atomically.

Layout of a run folder::

    manifest.json        model, weights and their hash, versions, attention implementation,
                         dtype, device, seed, parameters, timings
    result.json          Result.to_dict()
    arrays.safetensors   Result.arrays, keyed by canonical hook names
    figures/*.png

A run is staged in a hidden ``.incomplete-*`` folder and renamed into place only when every
file is written, so a crash never leaves a half-written run in the listing.
"""

from __future__ import annotations

import json
import os
import platform
import re
import secrets
import shutil
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from probe.io import atomic_dir
from probe.runs.results import Result, result_from_dict

DEFAULT_STORE_ENV = "PROBE_STORE"
MANIFEST_VERSION = 1


def default_store_root() -> Path:
    """``$PROBE_STORE`` if set, else ``./probe-runs``."""
    return Path(os.environ.get(DEFAULT_STORE_ENV, "probe-runs"))


@dataclass(frozen=True)
class Run:
    """A saved run: its id, folder, manifest, result and figure files."""

    id: str
    path: Path
    manifest: dict[str, Any]
    result: Result | None
    figures: list[Path]


def environment_info() -> dict[str, Any]:
    import transformers

    import probe

    return {
        "probe": probe.__version__,
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
        manifest.setdefault("environment", environment_info())
        target = self.root / run_id
        if target.exists():
            raise FileExistsError(f"run {run_id} already exists in {self.root}")
        with atomic_dir(target, overwrite=False) as tmp:
            arrays = {k: v.detach().cpu().contiguous() for k, v in result.arrays.items()}
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

    def list(self) -> list[Run]:
        """Complete runs, newest first (result not loaded: `result` is None)."""
        if not self.root.is_dir():
            return []
        runs = []
        for p in self.root.iterdir():
            if p.name.startswith(".") or not (p / "manifest.json").is_file():
                continue
            try:
                manifest = json.loads((p / "manifest.json").read_text())
            except (OSError, json.JSONDecodeError):
                continue
            runs.append(Run(p.name, p, manifest, None, sorted((p / "figures").glob("*.png"))))
        return sorted(runs, key=lambda r: (r.manifest.get("created", ""), r.id), reverse=True)

    def load(self, run_id: str) -> Run:
        p = self.root / run_id
        if run_id.startswith(".") or not (p / "manifest.json").is_file():
            known = ", ".join(r.id for r in self.list()[:5]) or "none"
            raise KeyError(f"no run {run_id!r} in {self.root} (recent runs: {known})")
        manifest = json.loads((p / "manifest.json").read_text())
        arrays = load_file(str(p / "arrays.safetensors"))
        result = result_from_dict(json.loads((p / "result.json").read_text()), arrays)
        return Run(run_id, p, manifest, result, sorted((p / "figures").glob("*.png")))

    def delete(self, run_id: str) -> None:
        self.load(run_id)  # raises a clear error for an unknown id
        p = self.root / run_id
        trash = self.root / f".deleting-{run_id}"
        os.replace(p, trash)  # atomic disappearance from the listing
        shutil.rmtree(trash)

    def clean_incomplete(self) -> int:
        """Remove staging folders left by crashed saves; returns how many."""
        n = 0
        for p in self.root.glob(".*"):
            if p.is_dir() and p.name.startswith((".incomplete-", ".deleting-", ".old-")):
                shutil.rmtree(p, ignore_errors=True)
                n += 1
        return n


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
