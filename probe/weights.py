"""Resolving ``--weights`` for Hugging Face models: auto, pretrained, random, a hub id or a folder.

Nothing hangs without a network: ``auto`` looks in the local cache first, and
``HF_HUB_OFFLINE=1`` is honoured (no request is made at all).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from probe.types import WeightsInfo

log = logging.getLogger(__name__)


def state_dict_sha256(model: nn.Module) -> str:
    """SHA-256 over parameter and buffer names, shapes, dtypes and bytes, in a fixed order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def files_sha256(paths: Sequence[Path]) -> str:
    """SHA-256 over the bytes of weight files, in sorted name order."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


class WeightsNotFound(FileNotFoundError):
    """No weights could be had; the message says what was tried and how to get them."""


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host accepts a TCP connection within `timeout` seconds.

    huggingface_hub retries an unreachable host for about 25 s; this check fails in seconds.
    """
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))


def load_hf(
    load: Callable[[str, bool], Any],
    build_random: Callable[[], Any],
    weights: str,
    *,
    hub_id: str,
    model_name: str,
    demo: Path | None = None,
) -> tuple[Any, WeightsInfo, str]:
    """Resolve `weights` and load a model.

    Args:
        load: ``load(ref, local_files_only) -> model`` (a ``from_pretrained`` call).
        build_random: builds the architecture with random weights.
        weights: ``auto`` | ``pretrained`` | ``demo`` | ``random`` | a hub id | a local folder.
        hub_id: the published checkpoint of this family.
        demo: the bundled demo checkpoint folder of this family, if one is bundled.

    ``auto`` tries the local Hugging Face cache, then the hub (unless ``HF_HUB_OFFLINE=1`` or the
    host is unreachable), then the bundled demo weights, and only then random weights, with a
    warning; the returned `WeightsInfo` always says which.

    Returns:
        (model, weights info, the reference its processor should be loaded from or "").
    """
    if weights == "demo":
        if demo is None or not demo.is_dir():
            raise WeightsNotFound(
                f"{model_name}: no demo weights are bundled for this family yet; use --weights random, "
                f"a folder written by save_pretrained, or {hub_id} where a network is available")
        model = load(str(demo), True)
        return model, WeightsInfo("demo", str(demo), files_sha256(_weight_files(demo))), str(demo)
    if weights == "random":
        model = build_random()
        return model, WeightsInfo("random", "random init", state_dict_sha256(model)), ""
    path = Path(weights).expanduser()
    if path.is_dir() or weights.startswith((".", "/", "~")):
        if not path.is_dir():
            raise WeightsNotFound(f"{model_name}: local weights folder {path} does not exist")
        model = load(str(path), True)
        return model, WeightsInfo("local", str(path.resolve()), files_sha256(_weight_files(path))), str(path)
    ref = hub_id if weights in ("auto", "pretrained") else weights
    tried = []
    for local_only in (True, False):
        if not local_only and offline():
            tried.append("the hub (skipped: HF_HUB_OFFLINE=1)")
            break
        if not local_only and not hub_reachable():
            tried.append("the hub (unreachable: no network)")
            break
        try:
            model = load(ref, local_only)
        except (OSError, ValueError) as e:
            tried.append(f"{'local cache' if local_only else 'the hub'} ({type(e).__name__})")
            continue
        return model, WeightsInfo("hub", ref, state_dict_sha256(model)), ref
    if weights == "auto" and demo is not None and demo.is_dir():
        log.warning("%s: %s not found (%s); using the bundled demo weights", model_name, ref, "; ".join(tried))
        model = load(str(demo), True)
        note = f"{ref} unavailable: tried {'; '.join(tried)}"
        return model, WeightsInfo("demo", str(demo), files_sha256(_weight_files(demo)), note), str(demo)
    if weights == "auto":
        log.warning("%s: %s not found (%s) and no demo weights are bundled; using RANDOM weights",
                    model_name, ref, "; ".join(tried))
        model = build_random()
        note = f"{ref} unavailable: tried {'; '.join(tried)}"
        return model, WeightsInfo("random", "random init (auto fallback)", state_dict_sha256(model), note), ""
    raise WeightsNotFound(
        f"{model_name}: weights {ref!r} not found; tried {'; '.join(tried)}. Download them where a "
        f"network is available (huggingface-cli download {ref}), pass a local folder written by "
        "save_pretrained, or use --weights random"
    )
