"""steptune.space has no import cycles between its modules, counting imports inside functions, and imports
nothing else of ours."""

import ast
import graphlib
from pathlib import Path

import pytest

SPACE = Path(__file__).resolve().parent.parent / "space"


def imports_of_ours(path: Path) -> set[str]:
    """The steptune modules ``path`` imports anywhere in its code, relative imports resolved (space has no
    subpackages, so one dot is steptune.space)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("steptune"))
        elif isinstance(node, ast.ImportFrom):
            base = f"steptune.space{'.' + node.module if node.module else ''}" if node.level else node.module or ""
            if base.startswith("steptune"):
                out.add(base)
                out.update(f"{base}.{a.name}" for a in node.names)
    return out


def module_graph() -> dict[str, set[str]]:
    modules = {f"steptune.space.{p.stem}" for p in SPACE.glob("*.py") if p.stem != "__init__"}
    return {f"steptune.space.{p.stem}": imports_of_ours(p) & modules for p in SPACE.glob("*.py")
            if p.stem != "__init__"}


def test_the_graph_sees_relative_and_function_level_imports():
    graph = module_graph()
    assert "steptune.space.kernel" in graph["steptune.space.sampler"]
    assert "steptune.space.errors" in graph["steptune.space.noise"]


def test_a_cycle_is_found():
    with pytest.raises(graphlib.CycleError):
        graphlib.TopologicalSorter({"a": {"b"}, "b": {"a"}}).prepare()


def test_space_has_no_import_cycles():
    graphlib.TopologicalSorter(module_graph()).prepare()  # raises CycleError naming the cycle


def test_space_imports_nothing_else_of_ours():
    for path in SPACE.glob("*.py"):
        other = {m for m in imports_of_ours(path) if not m.startswith("steptune.space")}
        assert not other, f"space/{path.name} imports {sorted(other)}"
