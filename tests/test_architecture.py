"""The package's layering, read from the source: no import cycle and no upward import.

Every module of ``metanmt/`` is parsed with ``ast``; every import counts, at module level and
inside functions (a function-level import is still a dependency, it only runs later). Layers,
lowest first (docs/design.md, "Layers"): a module may import its own layer and the ones below.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "metanmt"

# lowest first; a module's layer is the first prefix that matches (longest prefixes listed first)
LAYERS: list[tuple[str, list[str]]] = [
    ("base", ["metanmt.errors", "metanmt.config", "metanmt.registry", "metanmt.data", "metanmt"]),
    ("tasks", ["metanmt.tasks"]),
    ("engine", ["metanmt.engine"]),
    ("adaptation", ["metanmt.adaptation"]),
    ("evaluation", ["metanmt.evaluation"]),
    ("study", ["metanmt.study"]),
    ("cli", ["metanmt.cli", "metanmt.__main__", "metanmt.hf"]),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str], unresolved: list[str] | None = None) -> set[str]:
    """metanmt modules imported anywhere in ``path`` (relative imports resolved); a metanmt module
    that does not exist is appended to ``unresolved``."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in known else stem for a in node.names]
            if (node.level or stem.split(".")[0] == "metanmt") and stem not in known and unresolved is not None:
                unresolved.append(f"{name}:{node.lineno}: {'.' * node.level}{node.module or ''} -> {stem}")
        else:
            continue
        for target in targets:
            # the deepest known module the dotted name points into
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def layer_of(name: str) -> int:
    best = (-1, -1)  # (prefix length, layer)
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best[0]:
                best = (len(prefix), index)
    assert best[1] >= 0, f"{name}: in no layer; add it to LAYERS"
    return best[1]


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_parser_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "metanmt" / "sub"
    pkg.mkdir(parents=True)
    (tmp_path / "metanmt" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n    from .. import other\n")
    known = {"metanmt", "metanmt.sub", "metanmt.sub.a", "metanmt.sub.b", "metanmt.other"}
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "metanmt"
    try:
        assert imports_of("metanmt.sub.a", pkg / "a.py", known) == {"metanmt.sub.b", "metanmt.other"}
    finally:
        PACKAGE = saved
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_metanmt():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_metanmt_import_resolves():
    mods = modules()
    unresolved: list[str] = []
    for name, path in mods.items():
        imports_of(name, path, set(mods), unresolved)
    assert not unresolved, "imports of missing modules:\n" + "\n".join(unresolved)


def test_lower_layers_never_import_higher_ones():
    wrong = []
    for name, targets in sorted(graph().items()):
        for target in sorted(targets):
            if layer_of(target) > layer_of(name):
                wrong.append(f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})")
    assert not wrong, "upward imports:\n" + "\n".join(wrong)
