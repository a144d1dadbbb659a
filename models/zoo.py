"""The bundled demo weights (the zoo): where each family's checkpoint folder lives.

The checkpoints themselves are built by the probe-shapes zoo issue; until a family's folder exists,
``--weights demo`` names what is missing and ``--weights auto`` says it fell back.
"""

from __future__ import annotations

from pathlib import Path

import probe.assets

ZOO_DIR = Path(probe.assets.__file__).resolve().parent / "zoo"


def demo_path(name: str) -> Path:
    """The folder of `name`'s bundled demo checkpoint (it may not exist yet)."""
    return ZOO_DIR / name


def bundled() -> list[str]:
    """Names of the families whose demo checkpoint is bundled."""
    if not ZOO_DIR.is_dir():
        return []
    return sorted(p.name for p in ZOO_DIR.iterdir() if p.is_dir() and (p / "config.json").is_file())
