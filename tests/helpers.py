"""Test helpers: bare modules as adapter-like objects for capture(); hostile checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from torch import nn

from probe.types import HookSpec

#: load_model kwargs of tiny prefix-vlm and mmca models (2 decoder layers, 1 vision layer, width 32)
SMALL_OWN_CAPTIONERS = {
    "prefix-vlm": {"config": {"decoder": {"d_model": 32, "depth": 2, "heads": 2},
                              "vision": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                         "intermediate_size": 64, "image_size": 32, "patch_size": 8}}},
    "mmca": {"config": {"dim": 32, "depth": 2, "heads": 2,
                        "vision": {"image_size": 32, "patch_size": 8, "dim": 32, "depth": 1, "heads": 2}}},
}


class ModuleHooks:
    """Exposes one attention module as ``vision.blocks.0.attn.pattern`` (and its z hook)."""

    def __init__(self, module: nn.Module, heads: int, approximate: bool = False) -> None:
        self.model = module
        self.name = "test-module"
        self._specs = [
            HookSpec("vision.blocks.0.attn.pattern", "", "pattern", "(b, h, n, n)", n_heads=heads,
                     approximate=approximate),
            HookSpec("vision.blocks.0.attn.z", "out_proj", "input", "(b, n, h*d)", n_heads=heads),
        ]

    def hook_specs(self) -> list[HookSpec]:
        return self._specs

    def module(self, path: str) -> nn.Module:
        return self.model.get_submodule(path)


class SiteHooks:
    """Exposes named submodules of `model` as pattern hooks: {canonical name: module path}."""

    def __init__(self, model: nn.Module, names: dict[str, str]) -> None:
        self.model = model
        self._specs = [HookSpec(n, path, "pattern", "(b, h, q, k)") for n, path in names.items()]

    def hook_specs(self) -> list[HookSpec]:
        return self._specs

    def module(self, path: str) -> nn.Module:
        return self.model.get_submodule(path)


def hostile_copy(src, dst, marker):
    """`src` with a config.json naming remote code (`auto_map`) whose module would create `marker`."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    return dst


class Touch:
    """Unpickling this creates a file: proof that a pickle was (not) loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (Path(self.path),)
