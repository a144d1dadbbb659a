"""One weights resolver for every family: ``auto | pretrained | demo | random | meta | hub id | folder``.

Nothing hangs without a network: hub look-ups try the local cache first and honour
``HF_HUB_OFFLINE=1``. Nothing runs code from a checkpoint: a config.json with an ``auto_map`` is
refused before anything is loaded, folders load only safetensors, every ``from_pretrained`` gets
``trust_remote_code=False``, and a checkpoint that leaves parameters missing or unexpected is an error.

Our own checkpoint format (`write_checkpoint`/`read_checkpoint`): ``config.json``
(``{"probe_model": KIND, "config": ..., ...}``) and ``model.safetensors``, plus family files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import probe.assets
from probe.types import ProbeError, WeightsInfo

log = logging.getLogger(__name__)

#: the bundled demo checkpoints (the probe-shapes zoo), one folder per registered name
ZOO_DIR = Path(probe.assets.__file__).resolve().parent / "zoo"


class WeightsNotFound(ProbeError, FileNotFoundError):
    """No weights could be had; the message says what was tried and how to get them."""


class CheckpointError(ProbeError, ValueError):
    """A checkpoint that cannot be used as it is: remote code, pickles only, the wrong kind, or
    parameters that do not match the model. The message is one line and names the folder."""


class HasModel(Protocol):
    model: nn.Module


T = TypeVar("T", bound=HasModel)


def demo_path(name: str) -> Path:
    """The folder of `name`'s bundled demo checkpoint (it may not exist)."""
    return ZOO_DIR / name


def source_of(folder: Path) -> str:
    """``demo`` for a bundled zoo checkpoint, ``local`` for any other folder."""
    return "demo" if Path(folder).resolve().is_relative_to(ZOO_DIR) else "local"


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


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host accepts a TCP connection within `timeout` seconds (huggingface_hub
    retries an unreachable host for about 25 s; this check fails in seconds)."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------ the resolver
def resolve(weights: str, *, name: str, load: Callable[[str, bool], T], build: Callable[[bool], T],
            hub_id: str | None = None, auto: Sequence[str] = ("demo", "random"),
            seed: int = 0) -> tuple[T, WeightsInfo]:
    """Resolve `weights` and load or build a model.

    Args:
        weights: ``auto`` | ``pretrained`` (`hub_id`) | ``demo`` (`demo_path(name)`) | ``random``
            | ``meta`` (the architecture on the meta device: no weights, no download) | a hub id |
            a local folder.
        load: ``load(ref, local_only)`` from a folder or a hub id; anything with a ``model``.
        build: ``build(meta)``: the architecture with fresh weights (under ``torch.device("meta")``
            when `meta`); seeded with `seed` first.
        auto: what ``auto`` tries, in order, among ``hub``, ``demo`` and ``random`` (random with a
            warning); the returned `WeightsInfo` says which was used and why.

    Raises:
        WeightsNotFound: nothing could be had; the message says what was tried.
        CheckpointError: a checkpoint names remote code, holds only pickles, or does not match the model.
    """
    if weights == "meta":
        with torch.device("meta"):
            return build(True), WeightsInfo("meta", "architecture only, no weights")
    if weights == "random":
        return _random(build, seed, "")
    demo = demo_path(name)
    if weights == "demo":
        if not (demo / "config.json").is_file():
            raise WeightsNotFound(f"{name}: no demo weights are bundled for this family; use --weights random, a "
                                  f"checkpoint folder, or build them with `probe zoo train {name}`")
        return _folder(load, demo, "demo", seed)
    path = Path(weights).expanduser()
    if path.exists() or weights.startswith((".", "/", "~")):
        if path.is_file():
            raise WeightsNotFound(f"{name}: weights {path} is a file; give the checkpoint folder that holds it")
        if not path.is_dir():
            raise WeightsNotFound(f"{name}: local weights folder {path} does not exist")
        return _folder(load, path, source_of(path), seed)
    if weights == "pretrained" and hub_id is None:
        raise WeightsNotFound(f"{name} has no published weights; use auto, demo, random or a checkpoint folder")
    if weights not in ("auto", "pretrained") and hub_id is None:
        raise WeightsNotFound(f"{name}: weights {weights!r}: no such folder, and this family has no hub weights; "
                              "use auto, demo, random, meta or a checkpoint folder")
    ref = hub_id if weights in ("auto", "pretrained") else weights
    tried: list[str] = []
    for step in auto if weights == "auto" else ("hub",):
        note = f"{ref} unavailable: tried {'; '.join(tried)}" if tried else ""
        if step == "hub" and ref is not None:
            got = _hub(load, ref, seed, tried)
            if got is not None:
                return got
        elif step == "demo" and (demo / "config.json").is_file():
            if tried:
                log.warning("%s: %s not found (%s); using the bundled demo weights", name, ref, "; ".join(tried))
            else:
                log.info("%s: bundled demo weights (probe-shapes zoo) from %s", name, demo)
            obj, info = _folder(load, demo, "demo", seed)
            return obj, WeightsInfo(info.source, info.ref, info.sha256, note)
        elif step == "random":
            log.warning("%s: %s; using RANDOM weights (seed %d)", name,
                        f"{ref} not found ({'; '.join(tried)}) and no demo weights are bundled" if tried
                        else "no bundled weights", seed)
            return _random(build, seed, note or "no bundled weights")
    raise WeightsNotFound(
        f"{name}: weights {ref!r} not found; tried {'; '.join(tried)}. Download them where a network is "
        f"available (huggingface-cli download {ref}), pass a local folder written by adapter.save, or use "
        "--weights random")


def _random(build: Callable[[bool], T], seed: int, note: str) -> tuple[T, WeightsInfo]:
    torch.manual_seed(seed)
    obj = build(False)
    return obj, WeightsInfo("random", f"random init, seed {seed}", state_dict_sha256(obj.model), note)


def _folder(load: Callable[[str, bool], T], folder: Path, source: str, seed: int) -> tuple[T, WeightsInfo]:
    cfg = folder / "config.json"
    if cfg.is_file():
        refuse_remote_code(read_json(cfg), str(folder))
    files = sorted(folder.glob("*.safetensors"))
    pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    if not files and pickles:
        raise CheckpointError(
            f"{folder} holds only pickled weights ({', '.join(sorted(pickles))}), which probe does not load; convert "
            "them where you trust them, e.g. `python -c \"import torch; from safetensors.torch import save_file; "
            f"save_file(torch.load('{pickles[0]}', weights_only=True), 'model.safetensors')\"` in that folder")
    torch.manual_seed(seed)
    try:
        obj = load(str(folder), True)
    except SafetensorError as e:
        raise CheckpointError(f"{folder}: a .safetensors file is corrupt or truncated ({e}); re-save it") from None
    except (ProbeError, OSError):
        raise
    except Exception as e:  # transformers and our configs raise many kinds for a config of another family
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{folder} cannot be loaded as this family's checkpoint ({type(e).__name__}: "
                              f"{first[:200]}); is it a checkpoint of another model?") from None
    return obj, WeightsInfo(source, str(folder.resolve()), files_sha256(files))


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; invalid JSON or another type is a one-line error naming the file."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def _hub(load: Callable[[str, bool], T], ref: str, seed: int, tried: list[str]) -> tuple[T, WeightsInfo] | None:
    """The local cache first, then the hub when it is allowed and reachable; None (and `tried`
    extended) when neither has `ref`."""
    for local_only in (True, False):
        if not local_only and offline():
            tried.append("the hub (skipped: HF_HUB_OFFLINE=1)")
            return None
        if not local_only and not hub_reachable():
            tried.append("the hub (unreachable: no network)")
            return None
        try:
            from huggingface_hub import hf_hub_download

            refuse_remote_code(json.loads(Path(hf_hub_download(ref, "config.json", local_files_only=local_only))
                                          .read_text()), ref)
            torch.manual_seed(seed)
            obj = load(ref, local_only)
        except ProbeError:
            raise
        except (OSError, ValueError) as e:
            tried.append(f"{'local cache' if local_only else 'the hub'} ({type(e).__name__})")
            continue
        return obj, WeightsInfo("hub", ref, state_dict_sha256(obj.model))
    return None


def refuse_remote_code(config: dict[str, Any], where: str) -> None:
    """Refuse a config that names code to import (``auto_map``), before anything is loaded."""
    if "auto_map" in config:
        names = ", ".join(sorted(config["auto_map"]))
        raise CheckpointError(f"{where}: config.json names remote code (auto_map: {names}); probe never runs code "
                              "from a checkpoint: use a checkpoint of a built-in transformers class")


# ------------------------------------------------------------------------------ loading helpers
def from_pretrained(klass: Any, ref: str, local_only: bool, *, ignore_unexpected: tuple[str, ...] = (),
                    **kwargs: Any) -> Any:
    """``klass.from_pretrained`` without remote code, safetensors only from folders, and an error
    when the checkpoint leaves parameters missing or unexpected (keys starting with
    `ignore_unexpected` excepted). Configs, processors and tokenizers: use `hf_part`."""
    model, info = klass.from_pretrained(
        ref, local_files_only=local_only, trust_remote_code=False, output_loading_info=True,
        use_safetensors=True if Path(ref).is_dir() else None, **kwargs)
    unexpected = sorted(k for k in info["unexpected_keys"] if not k.startswith(ignore_unexpected))
    check_keys(ref, sorted(info["missing_keys"]), unexpected, sorted(str(k) for k in info["mismatched_keys"]))
    return model


def hf_part(klass: Any, ref: str, local_only: bool, **kwargs: Any) -> Any:
    """A config, image processor or tokenizer from `ref`, without remote code."""
    return klass.from_pretrained(ref, local_files_only=local_only, trust_remote_code=False, **kwargs)


def check_keys(where: str, missing: Sequence[str], unexpected: Sequence[str],
               mismatched: Sequence[str] = ()) -> None:
    """A one-line `CheckpointError` when a checkpoint does not fill the model exactly."""
    found = (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched))
    parts = [f"{what} {len(keys)} ({', '.join(list(keys)[:4])}{', ...' if len(keys) > 4 else ''})"
             for what, keys in found if keys]
    if parts:
        raise CheckpointError(f"{where}: the checkpoint does not match the model: parameters {'; '.join(parts)}")


def write_checkpoint(folder: Path, kind: str, model: nn.Module, **meta: Any) -> None:
    """Write ``config.json`` (``{"probe_model": kind, **meta}``) and ``model.safetensors`` into `folder`
    (the caller makes it atomic, see `probe.io.atomic_dir`)."""
    (folder / "config.json").write_text(json.dumps({"probe_model": kind, **meta}, indent=2))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))


def read_checkpoint(folder: str | Path, kind: str, *files: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config.json, state dict)`` of a folder written by `write_checkpoint` for `kind`; `files`
    are further files the family needs (checked to exist)."""
    folder = Path(folder)
    need = ["config.json", "model.safetensors", *files]
    if not all((folder / n).is_file() for n in need):
        raise WeightsNotFound(f"{folder} is not a {kind} checkpoint: expected {', '.join(need)} "
                              "(written by adapter.save)")
    meta = read_json(folder / "config.json")
    if meta.get("probe_model") != kind:
        holds = (f"a {meta['probe_model']!r} checkpoint" if "probe_model" in meta
                 else f"a transformers checkpoint ({meta.get('model_type', 'unknown type')})" if "model_type" in meta
                 else "no probe checkpoint (config.json has no probe_model)")
        raise CheckpointError(f"{folder} holds {holds}, not {kind!r}: load it with the model it was saved from")
    return meta, load_file(str(folder / "model.safetensors"))


def load_state(model: nn.Module, state: dict[str, torch.Tensor], folder: str | Path) -> nn.Module:
    """`model` with `state` loaded strictly; a mismatch is a one-line error naming `folder`."""
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    check_keys(str(folder), sorted(set(own) - set(state)), sorted(set(state) - set(own)), mismatched)
    model.load_state_dict(state, strict=True)
    return model
