"""The architecture holds: layers import one way (import-linter), the first-party import graph has
no cycle (imports inside functions included), family names stay in probe.models, importing probe
touches no plotting backend, every hook name is canonical, and the README's hook table is current."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import probe
from probe import registry
from probe.docs import HOOKS_END, HOOKS_START, hooks_markdown, readme_block
from probe.types import vocabulary_entry

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> Path:
    """The package as a wheel lays it out (models/ and analyses/ inside probe/)."""
    stage = tmp_path_factory.mktemp("stage")
    shutil.copytree(ROOT / "probe", stage / "probe", ignore=shutil.ignore_patterns("__pycache__", "assets"))
    (stage / "probe" / "assets").mkdir()
    (stage / "probe" / "assets" / "__init__.py").write_text("")
    shutil.copytree(ROOT / "models", stage / "probe" / "models", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "analyses", stage / "probe" / "analyses", ignore=shutil.ignore_patterns("__pycache__"))
    return stage


def test_import_linter_contracts_are_kept():
    out = subprocess.run([str(ROOT / ".ci" / "lint-imports")], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "BROKEN" not in out.stdout


def _edges(stage: Path) -> dict[str, set[str]]:
    """First-party module -> modules it imports (anywhere in the file, functions included)."""
    files = {".".join(p.relative_to(stage).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (stage / "probe").rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                subs = [f"{base}.{a.name}" for a in node.names]
                # `from pkg import sub` imports the module pkg.sub; any other name is an attribute of pkg
                targets = subs + ([base] if any(t not in files for t in subs) else [])
            for t in targets:
                if t in files and t != mod:
                    edges[mod].add(t)
    return edges


def test_first_party_import_graph_has_no_cycle(staged):
    edges = _edges(staged)
    facade = [m for m, e in edges.items() if "probe" in e]
    assert not facade, f"only scripts and apps import the probe facade; these modules do: {facade}"
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert len(edges) > 30


def _string_constants(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    helps = {id(k.value) for n in ast.walk(tree) if isinstance(n, ast.Call) for k in n.keywords if k.arg == "help"}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings | helps]


def test_no_model_name_outside_the_models_package():
    names = list(registry.models())
    pattern = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, names)) + r")(?![\w-])")
    files = sorted((ROOT / "analyses").glob("*.py")) + sorted((ROOT / "probe").rglob("*.py"))
    hits = [f"{p.relative_to(ROOT)}:{line}: {s!r}" for p in files for line, s in _string_constants(p)
            if pattern.search(s)]
    assert not hits, "family names belong in probe.models (registry capabilities):\n" + "\n".join(hits)


def test_import_probe_leaves_the_plotting_backend_alone():
    code = "import sys, probe; probe.models(); probe.analyses(); assert 'matplotlib.pyplot' not in sys.modules"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_listings_are_callable_packages():
    assert "blip" in probe.models() and "ablation" in probe.analyses()
    assert "blip" in probe.models(task="caption") and "vit-standard" not in probe.models(task="caption")


@pytest.mark.parametrize("name", sorted(registry.models()))
def test_every_hook_name_is_canonical(name):
    a = registry.load_model(name, weights="meta")
    bad = [s.name for s in a.hook_specs() if vocabulary_entry(s.name) is None]
    assert not bad, f"{name} declares hooks outside the vocabulary: {bad}"
    for s in a.hook_specs():
        a.module(s.module)  # every declared module exists


def test_readme_hook_table_is_current():
    block = readme_block((ROOT / "README.md").read_text(), HOOKS_START, HOOKS_END)
    assert block == hooks_markdown(), "README hook table is stale: paste the output of probe.docs.hooks_markdown()"
