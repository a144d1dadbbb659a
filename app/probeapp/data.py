"""Reading the run store for the app: listings, one run's JSON and its arrays, lazily and cached.

Every path goes through `RunStore`'s checked functions (`run_path`, `run_file`, `read_array`): a
run id from the URL or a widget that is not a plain name in the store, or a run that is a symbolic
link, is refused there. Caches are keyed by the store root, the run id and the modification time
of the file read, so a run re-saved under the same id is read again. Only the slice of an array
a view asks for is read (safetensors slices); no page ever loads all runs or all arrays.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st

from probe.runs.store import DEFAULT_STORE_ENV, RunStore, default_store_root, figure_name_ok
from probe.types import ProbeError

STORE_KEY = "probe.store"  # the chosen store root (a non-widget key: it survives page switches)
READONLY_ENV = "PROBE_APP_READONLY"  # "1": no delete button and no store chooser (a shared store)

#: analysis name -> the app page that shows it (file relative to app/); others go to the generic page
PAGE_OF = {
    "attention": "app_pages/attention.py",
    "flow": "app_pages/flow.py",
    "ablation": "app_pages/ablation.py",
    "attribution": "app_pages/attribution.py",
    "relevancy": "app_pages/attribution.py",
    "rollout": "app_pages/attribution.py",
    "attention-flow": "app_pages/attribution.py",
    "faithfulness": "app_pages/faithfulness.py",
    "patching": "app_pages/patching.py",
    "ca-params": "app_pages/cross_attention.py",
    "probes": "app_pages/probes.py",
    "representations": "app_pages/umap.py",
    "logit-lens": "app_pages/logit_lens.py",
    "efficiency": "app_pages/efficiency.py",
}
GENERIC_PAGE = "app_pages/generic.py"
PAGE_TITLE = {"app_pages/attention.py": "Attention", "app_pages/flow.py": "Flow and tokens",
              "app_pages/ablation.py": "Ablation", "app_pages/attribution.py": "Attribution",
              "app_pages/faithfulness.py": "Faithfulness", "app_pages/patching.py": "Patching",
              "app_pages/cross_attention.py": "Cross-attention and fusion", "app_pages/probes.py": "Probes",
              "app_pages/umap.py": "UMAP and modality gap", "app_pages/logit_lens.py": "Logit lens",
              "app_pages/efficiency.py": "Efficiency", GENERIC_PAGE: "Any run"}


class RunUnreadable(ProbeError):
    """A run the app cannot show; the message says why (a bad id, no such run, a broken run)."""


def readonly() -> bool:
    return os.environ.get(READONLY_ENV, "").strip() not in ("", "0", "false", "no")


def store_root() -> Path:
    """The store the app reads: the sidebar's choice, else ``$PROBE_STORE``, else ``./probe-runs``."""
    chosen = st.session_state.get(STORE_KEY)
    if chosen and not readonly():
        return Path(os.path.expanduser(str(chosen)))
    return default_store_root()


def default_root_text() -> str:
    return os.environ.get(DEFAULT_STORE_ENV, "").strip() or str(default_store_root())


def store() -> RunStore:
    return RunStore(store_root())


def _mtime(p: Path) -> int:
    try:
        return p.stat().st_mtime_ns
    except OSError:
        return 0


# ------------------------------------------------------------------------------------ listing
def _weights(m: dict[str, Any]) -> tuple[str, str]:
    """(sources, sha256 prefixes) of a manifest's weights: one model, or several keyed by name."""
    w = m.get("weights")
    if not isinstance(w, dict):
        return "?", ""
    if "source" in w:
        return str(w.get("source", "?")), str(w.get("sha256") or "")[:12]
    parts = [v for v in w.values() if isinstance(v, dict)]
    sources = sorted({str(v.get("source", "?")) for v in parts})
    return ",".join(sources) or "?", ",".join(str(v.get("sha256") or "")[:12] for v in parts)


def _capabilities(m: dict[str, Any]) -> list[dict[str, Any]]:
    model = m.get("model") if isinstance(m.get("model"), dict) else {}
    models = model.get("models") if isinstance(model.get("models"), list) else [model]
    return [x.get("capabilities") for x in models if isinstance(x, dict) and isinstance(x.get("capabilities"), dict)]


def tags_of(m: dict[str, Any], status: str) -> list[str]:
    """The manifest's own ``tags`` plus derived ones: random-weights, approximate, cuda, broken."""
    tags = [str(t) for t in m.get("tags", []) if isinstance(t, str | int | float)] if isinstance(m.get("tags"), list) else []
    if "random" in _weights(m)[0].split(","):
        tags.append("random-weights")
    if any(c.get("attention_weights") == "effective" for c in _capabilities(m)):
        tags.append("approximate")
    if str(m.get("device", "")).startswith("cuda"):
        tags.append("cuda")
    if status != "ok":
        tags.append("broken")
    return list(dict.fromkeys(tags))


def safe_text(x: Any) -> str:
    """`x` as text that can always be shown: a folder name that is not valid UTF-8 (Python keeps
    its bytes as lone surrogates) or a lone surrogate from a JSON escape is written as ``\\udcff``."""
    return str(x).encode("utf-8", "backslashreplace").decode("utf-8")


def day_of(created: str) -> str:
    """The ISO day (``YYYY-MM-DD``) of a manifest's ``created`` time, or "" when it is not an ISO date."""
    try:
        return datetime.fromisoformat(created).date().isoformat()
    except (TypeError, ValueError):
        try:
            return date.fromisoformat(created[:10]).isoformat()
        except (TypeError, ValueError):
            return ""


@st.cache_data(show_spinner=False, max_entries=8)
def _listing(root: str, stamp: int) -> list[dict[str, Any]]:
    rows = []
    s = RunStore(root)
    for r in s.list(clean=False):  # the app writes nothing, not even cleaning
        m = r.manifest
        model = m.get("model") if isinstance(m.get("model"), dict) else {}
        source, sha = _weights(m)
        created = safe_text(m.get("created", ""))
        link = r.path.is_symlink()
        rows.append({
            "id": safe_text(r.id), "analysis": safe_text(m.get("analysis", "?")),
            "model": safe_text(model.get("name", "?")), "weights": safe_text(source), "sha256": safe_text(sha),
            "created": created, "date": day_of(created), "tags": [safe_text(t) for t in tags_of(m, r.status)],
            "status": r.status, "problem": safe_text(r.problem), "link": link,
            # offered for deletion only when positively a run probe wrote (never a link, a user's folder)
            "deletable": not link and safe_text(r.id) == r.id and s.is_probe_run(r.id),
        })
    return rows


def listing(s: RunStore | None = None) -> list[dict[str, Any]]:
    """Every run of the store as a table row (newest first, broken last); cached until the store's
    folder changes (a run saved or deleted renames an entry in it)."""
    s = s or store()
    return _listing(str(s.root), _mtime(s.root))


def has_entries(root: Path) -> bool:
    """Whether `root` is a folder with anything in it (read one entry, not the whole folder)."""
    try:
        return root.is_dir() and any(True for _ in root.iterdir())
    except OSError:
        return False


def no_runs_text(root: Path) -> str:
    """What to say about a store with no runs: empty or missing, or a folder of other things."""
    if has_entries(root):
        return (f"`{safe_text(root)}` holds no probe runs (folders written by `probe run`); nothing in it is "
                "listed. Choose another store in the sidebar.")
    return (f"No runs in `{safe_text(root)}` yet. Make one with `probe run attention`, or choose another store "
            "in the sidebar.")


def clear_caches() -> None:
    _listing.clear()
    _opened.clear()


# ------------------------------------------------------------------------------------ one run
@st.cache_data(show_spinner=False, max_entries=256)
def _opened(root: str, run_id: str, stamp: tuple[int, int, int]) -> dict[str, Any]:
    s = RunStore(root)
    manifest = s.read_json(run_id, "manifest.json")
    result = s.read_json(run_id, "result.json")
    arrays = s.array_info(run_id)
    fig_dir = s.run_path(run_id) / "figures"
    # only what `run_file` will read: a plain NAME.png that is a regular file (not a link or a folder)
    figures = [] if fig_dir.is_symlink() or not fig_dir.is_dir() else [
        f.name for f in sorted(fig_dir.glob("*.png")) if figure_name_ok(f.name) and not f.is_symlink() and f.is_file()]
    return {"manifest": manifest, "result": result, "arrays": arrays, "figures": figures}


@st.cache_data(show_spinner=False, max_entries=512)
def _array(root: str, run_id: str, name: str, index: tuple[int, ...], stamp: int) -> np.ndarray:
    return RunStore(root).read_array(run_id, name, index)


@st.cache_data(show_spinner=False, max_entries=128)
def _figure(root: str, run_id: str, name: str, stamp: int) -> bytes:
    return RunStore(root).run_file(run_id, f"figures/{name}").read_bytes()


@dataclass(frozen=True)
class RunView:
    """One run as the app reads it: manifest and result JSON, the arrays' shapes (header only);
    arrays and figures are read when asked for."""

    root: str
    id: str
    manifest: dict[str, Any]
    result: dict[str, Any]
    arrays: dict[str, tuple[tuple[int, ...], str]]
    figures: list[str]
    stamp: int = 0

    @property
    def kind(self) -> str:
        return str(self.result.get("kind", self.manifest.get("analysis", "?")))

    @property
    def model(self) -> str:
        m = self.manifest.get("model")
        return str(m.get("name", "?")) if isinstance(m, dict) else "?"

    @property
    def label(self) -> str:
        return f"{self.kind} · {self.model} · {self.id}"

    def shape(self, name: str) -> tuple[int, ...] | None:
        info = self.arrays.get(name)
        return info[0] if info else None

    def array(self, name: str, *index: int) -> np.ndarray:
        """Array `name`, or its part at the leading `index`; read lazily and cached."""
        if name not in self.arrays:
            raise KeyError(f"run {self.id} has no array {name!r} (it has {', '.join(sorted(self.arrays)) or 'none'})")
        shape = self.arrays[name][0]
        if len(index) > len(shape) or any(not 0 <= int(i) < n for i, n in zip(index, shape, strict=False)):
            raise IndexError(f"{name}: index {index} is outside its shape {shape}")
        return _array(self.root, self.id, name, tuple(int(i) for i in index), self.stamp)

    def image(self, i: int) -> np.ndarray | None:
        """Image `i` as the model saw it (H, W, 3) uint8, or None when the run stored none."""
        shape = self.shape("input.image")
        if shape is None or len(shape) != 4 or not 0 <= i < shape[0]:
            return None
        return self.array("input.image", i).astype(np.uint8)

    def figure(self, name: str) -> bytes:
        return _figure(self.root, self.id, name, self.stamp)

    def field(self, name: str, default: Any = None) -> Any:
        return self.result.get(name, default)

    def weights(self) -> tuple[str, str]:
        return _weights(self.manifest)

    def approximate(self) -> bool:
        return bool(self.result.get("approximate")) or any(
            c.get("attention_weights") == "effective" for c in _capabilities(self.manifest))

    def attention_kind(self) -> str:
        kinds = {str(c.get("attention_kind", "?")) for c in _capabilities(self.manifest)}
        return ",".join(sorted(kinds)) or "?"


def open_run(run_id: str, s: RunStore | None = None) -> RunView:
    """A run by id, checked by the store (id, existence, links, root) and read to the point where
    a page can show it: its JSON and the shapes of its arrays.

    Raises:
        RunUnreadable: the id is not a run id, no such run, or the run is broken; the message says which.
    """
    s = s or store()
    try:
        files = [s.run_file(run_id, n) for n in ("manifest.json", "result.json", "arrays.safetensors")]
        stamp = tuple(_mtime(f) for f in files)
        d = _opened(str(s.root), run_id, stamp)
    except ProbeError as e:  # RunIdError, UnknownRunError, BrokenRunError
        raise RunUnreadable(str(e)) from e
    except Exception as e:  # whatever a hostile or half-written file does, the page stays up
        raise RunUnreadable(f"run {run_id} cannot be read: {type(e).__name__}: {e}") from e
    return RunView(str(s.root), run_id, d["manifest"], d["result"], d["arrays"], d["figures"], stamp[2])
