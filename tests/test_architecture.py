"""The layering the project is built on, checked on the source: which package may import which, no import
cycles inside a package, and the one sanctioned exception (storage's lazy aliases of the exports)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"steptune": ROOT / "app", "steptune.space": ROOT / "space", "steptune.evaluators": ROOT / "evaluators",
           "steptune.search": ROOT / "search", "steptune.storage": ROOT / "storage"}
LAYERS = ("steptune.space", "steptune.evaluators", "steptune.search", "steptune.storage")
ALLOWED = {  # what each layer may import of ours besides itself
    "steptune.space": set(),
    "steptune.evaluators": {"steptune.space"},
    "steptune.search": {"steptune.space", "steptune.evaluators"},
    "steptune.storage": {"steptune.space"},
}
ALIAS_FUNCTION = "_deprecated_export_alias"  # storage/__init__.py: old export names, lazily from steptune.exports


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            if pkg == "steptune" and rel.parts[0] in ("space", "evaluators", "search", "storage"):
                continue
            if "migrations" in rel.parts:
                continue
            parts = [p for p in rel.parts if p != "__init__"]
            mods[".".join([pkg, *parts])] = path
    return mods


MODULES = _modules()


def _layer(module: str) -> str:
    return next((layer for layer in LAYERS if module == layer or module.startswith(layer + ".")), "steptune")


def _resolve(name: str) -> str | None:
    """The module of ours an import names (a name imported from a package resolves to its submodule)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> list[tuple[str, int, str | None]]:
    """(imported module of ours, line, enclosing function) for every import, module-level or inside functions."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(node, func):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else func
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - (child.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                names = [f"{base}.{a.name}" for a in child.names] + [base]
            for n in names:
                target = _resolve(n) if n.startswith("steptune") else None
                if target is not None and target not in (module, "steptune"):  # the root package loads anyway
                    found.append((target, child.lineno, inner))
            visit(child, inner)

    visit(tree, None)
    return found


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def test_the_source_tree_is_found():
    assert {"steptune.space.schedule", "steptune.evaluators", "steptune.search", "steptune.storage.db",
            "steptune.runner", "steptune.cli.main"} <= set(MODULES)


def test_each_layer_imports_only_the_layers_below_it():
    wrong = []
    for module, imports in GRAPH.items():
        layer = _layer(module)
        if layer not in ALLOWED:
            continue
        for target, line, func in imports:
            tl = _layer(target)
            if tl == layer or tl in ALLOWED[layer]:
                continue
            if module == "steptune.storage" and func == ALIAS_FUNCTION and target.startswith("steptune.exports"):
                continue
            wrong.append(f"{MODULES[module].relative_to(ROOT)}:{line} imports {target}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_no_import_cycle_inside_a_package():
    def package(m: str) -> str:
        return m if MODULES[m].name == "__init__.py" else m.rpartition(".")[0]

    edges = {m: {t for t, _, _ in imps if package(t) == package(m) and t != package(m)} for m, imps in GRAPH.items()}
    cycles, state = [], {}

    def walk(m, stack):
        state[m] = "open"
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                walk(t, stack)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            walk(m, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_a_breach_would_be_seen(tmp_path):
    """The checks see imports inside functions and relative ones (so they can fail)."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from ..storage import db\n    from steptune.search import s3\n")
    MODULES["steptune.space.probe"] = probe
    try:
        got = {t for t, _, _ in _imports("steptune.space.probe", probe)}
    finally:
        del MODULES["steptune.space.probe"]
    assert {"steptune.storage.db", "steptune.search.s3"} <= got
