"""The package's layers: no import cycle among lfm2vl's modules, and the low layers import nothing above them.

Every module's imports are read with `ast`, those inside functions (lazy imports) included, relative ones resolved.
A cycle would make import order matter and tie layers together; the rules keep the reference model plain PyTorch
(model/ imports only lfm2vl.config) and the native kernels a leaf (cpu/kernels/ imports nothing from lfm2vl).
"""
from __future__ import annotations

import ast
from pathlib import Path

import lfm2vl

ROOT = Path(lfm2vl.__file__).parent


def _module_name(path: Path) -> str:
    parts = ("lfm2vl",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    """lfm2vl module -> the lfm2vl modules it imports (at module level or inside functions)."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import mod` imports the submodule pkg.mod when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in files:  # `import lfm2vl.cpu.kernels.decode` -> that module; a name -> its module
                    t = t.rpartition(".")[0]
                if t and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_graph_sees_lazy_and_relative_imports():
    """The walk itself: a lazy relative import inside a function (engine.load's) is an edge."""
    graph = _graph()
    assert "lfm2vl.cpu.speed" in graph["lfm2vl.engine"]
    assert "lfm2vl.config" in graph["lfm2vl.model.text"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_model_imports_only_config():
    bad = {m: sorted(d) for m, d in _graph().items() if m.startswith("lfm2vl.model")
           and any(not (x == "lfm2vl.config" or x.startswith("lfm2vl.model")) for x in d)}
    assert not bad, f"lfm2vl/model/ may import only lfm2vl.config (and torch): {bad}"


def test_kernels_import_nothing_from_lfm2vl():
    bad = {m: sorted(d) for m, d in _graph().items() if m.startswith("lfm2vl.cpu.kernels")
           and any(not x.startswith("lfm2vl.cpu.kernels") for x in d)}
    assert not bad, f"lfm2vl/cpu/kernels/ must import nothing from lfm2vl outside itself: {bad}"


def test_package_root_holds_only_entry_points():
    """Every other module lives in a folder named for its layer."""
    root = sorted(p.name for p in ROOT.glob("*.py"))
    assert root == ["__init__.py", "__main__.py", "config.py", "engine.py", "loading.py", "resolve.py"]
