"""The package layout keeps its layers: imports run one way, with no cycle, and the torch-free
packages stay torch-free (DESIGN.md: runtime, files <- data, models <- detect, train, inference <-
api <- cli)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "kdfine"

# Lowest first: a module may import modules of its own layer and of the layers before it. Within a
# layer an order is fixed too (data before models, detect before train), so that every import
# between two packages has one allowed direction.
LAYERS = [
    ("kdfine", "kdfine.errors", "kdfine.metrics", "kdfine.registry", "kdfine.boundary"),
    ("kdfine.runtime",),
    ("kdfine.files",),
    ("kdfine.data",),
    ("kdfine.models", "kdfine.features"),
    ("kdfine.detect",),
    ("kdfine.train",),
    ("kdfine.inference",),
    ("kdfine.options", "kdfine.plots"),
    ("kdfine.api",),
    ("kdfine.cli", "kdfine.__main__"),
]
TORCH_FREE = ("kdfine.detect", "kdfine.files", "kdfine.options", "kdfine.cli", "kdfine.registry", "kdfine.errors",
              "kdfine.boundary", "kdfine.runtime.memory",
              "kdfine.train",  # kdfine.train: its package module only (the options read names from its sources)
              # predict --model FILE.onnx runs without torch: the decoder, the metadata checks, predict, onnxruntime
              "kdfine.data.decode", "kdfine.models.meta", "kdfine.inference.predict", "kdfine.inference.onnx_run")


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = ["kdfine", *p.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _rank(module: str) -> tuple[int, str]:
    """(layer, group) of ``module``: the longest group name that is the module or its package."""
    best = None
    for i, groups in enumerate(LAYERS):
        for g in groups:
            if (module == g or module.startswith(g + ".")) and (best is None or len(g) > len(best[1])):
                best = (i, g)
    assert best is not None, module
    return best


def _imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every kdfine module that ``module`` imports anywhere in its source (function bodies and
    TYPE_CHECKING blocks included), resolved to the module that defines the name."""
    pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1]) if node.level else ""
            mod = ".".join(x for x in (base, node.module) if x) if node.level else (node.module or "")
            names = [f"{mod}.{a.name}" for a in node.names] + [mod]
        for n in names:
            while n and n not in known:
                n = n.rpartition(".")[0]
            if n and n.startswith("kdfine") and n != module and not module.startswith(n + "."):
                found.add(n)
    return found


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {m: _imports(m, p, known) for m, p in known.items()}


def test_imports_run_down_the_layers():
    """No module imports one of a later layer (or a later group of its layer)."""
    order = {g: (i, j) for i, groups in enumerate(LAYERS) for j, g in enumerate(groups)}
    wrong = []
    for m, targets in _graph().items():
        layer, group = _rank(m)
        for t in targets:
            t_layer, t_group = _rank(t)
            if t_group != group and order[t_group] > order[group]:
                wrong.append(f"{m} -> {t}")
    assert not wrong, "imports against the layering: " + "; ".join(sorted(wrong))


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_graph_sees_function_level_imports():
    """The walk must see lazy imports, or both tests above would pass vacuously."""
    graph = _graph()
    assert "kdfine.train.run" in graph["kdfine.api"]  # imported inside api._train
    assert "kdfine.detect.dump" in graph["kdfine.detect.command"]


_PROBE = """
import importlib, json, sys
bad = {}
for m in json.loads(sys.argv[1]):
    importlib.import_module(m)
    if "torch" in sys.modules:
        bad[m] = True
        break
print(json.dumps(bad))
"""


def test_torch_free_packages_import_no_torch():
    """Every module of detect/, files/, cli/ and options.py imports without torch (each in the order
    listed, in one fresh process: the first that loads torch is named)."""
    mods = sorted(m for m in _modules() if any(m == p or m.startswith(p + ".") for p in TORCH_FREE)
                  and not (m.startswith("kdfine.train.") and m != "kdfine.train.schedule"))
    assert "kdfine.detect.fine" in mods and "kdfine.cli.commands" in mods and "kdfine.options" in mods
    r = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(mods)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {}, f"imports torch: {r.stdout}"
