"""Atomic file and folder writes: write beside the target, then rename over it."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from probe.types import ProbeError


class OutputExistsError(ProbeError, FileExistsError):
    """An output path that would be overwritten or is not a folder; the message says what to do."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_dir(target: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a hidden staging folder beside `target`; on success it is renamed to `target`.

    On an exception the staging folder is deleted and `target` is untouched. An existing folder is
    never wiped unless asked: a non-empty `target` is refused (before anything is written) unless
    `force`, and then replaced only after the new one is complete; an empty folder is fine. A file or
    a symbolic link at `target` is refused even with `force`.

    Every folder written here holds a `MARKER` file: `force` replaces only a folder that holds one
    (a previous output of probe), never a folder of the user's.

    Raises:
        OutputExistsError: `target` is a file or a link, or a non-empty folder and `force` is False
            or the folder was not written by probe.
    """
    target = Path(target)
    check_output(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".incomplete-{target.name}-", dir=target.parent))
    os.chmod(stage, 0o755)  # mkdtemp makes it private; the output is an ordinary folder
    try:
        (stage / MARKER).write_text("written by probe; `--force` may replace this folder\n")
        yield stage
        check_output(target, force)  # again: something may have appeared meanwhile
        if force and target.exists():
            old = target.with_name(f".old-{target.name}-{secrets.token_hex(4)}")
            os.replace(target, old)
            try:
                os.replace(stage, target)
            except BaseException:
                os.replace(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, target)  # over an empty folder at most: rename refuses a non-empty one
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


#: the file that marks a folder as written by probe (so `--force` may replace it)
MARKER = ".probe-output"


def check_output(target: str | Path, force: bool = False) -> None:
    """Refuse an output folder that `atomic_dir` would refuse (call it before long work)."""
    target = Path(target)
    if target.is_symlink():
        raise OutputExistsError(f"{target} is a symbolic link; give the real folder or choose another one")
    if target.exists() and not target.is_dir():
        raise OutputExistsError(f"{target} is a file, not a folder; choose another output folder")
    if target.is_dir() and any(target.iterdir()):
        if not force:
            raise OutputExistsError(f"{target} already exists and is not empty; pass --force to replace it")
        if not (target / MARKER).is_file():
            raise OutputExistsError(f"{target} was not written by probe, so --force will not replace it; "
                                    "remove it yourself or choose another folder")
