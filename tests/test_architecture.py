"""The shape of the code: modules import one way.

The import graph of pipelines/, recipes/ and scripts/ is read with `ast` (module-level imports and the ones
placed inside functions alike): it must have no cycle, and the shared machinery (pipelines/) must never import
a task (recipes/). Only reads files; imports nothing.
"""

import ast
from pathlib import Path

from conftest import REPO

PACKAGES = ("pipelines", "recipes", "scripts")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if "metrics" in path.relative_to(REPO).parts[1:-1] and path.name != "__init__.py":
                continue  # evaluate's metric scripts are loaded by path, not imported
            found[module_name(path)] = path
    return found


def imports_of(path: Path, name: str, known: set) -> set:
    """The project modules `path` imports, anywhere in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for candidate in candidates:
            # `import a.b.c` depends on the longest project module it names
            parts = candidate.split(".")
            for i in range(len(parts), 0, -1):
                prefix = ".".join(parts[:i])
                if prefix in known:
                    if prefix != name:
                        targets.add(prefix)
                    break
    return targets


def import_graph() -> dict:
    modules = project_modules()
    known = set(modules)
    return {name: imports_of(path, name, known) for name, path in modules.items()}


def find_cycle(graph: dict) -> list | None:
    """One cycle as a list of module names, or None (depth-first search with colours)."""
    colour, stack = {}, []

    def visit(node):
        colour[node] = "grey"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if colour.get(target) == "grey":
                return stack[stack.index(target):] + [target]
            if target not in colour:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        colour[node] = "black"
        return None

    for node in sorted(graph):
        if node not in colour:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "pipelines.errors" in graph["pipelines.config"]
    assert graph["scripts.run"], "scripts/run.py imports the project"


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_shared_machinery_never_imports_a_task():
    graph = import_graph()
    bad = sorted(f"{source} -> {target}" for source, targets in graph.items() if source.startswith("pipelines")
                 for target in targets if target.split(".")[0] in ("recipes", "scripts"))
    assert not bad, bad


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_ranks_are_read_in_one_place():
    """Only pipelines/context.py reads the launcher's RANK / LOCAL_RANK; everything else asks it (or Accelerate)."""
    import re

    reads = re.compile(r"environ(\.get\(|\[)\s*[\"'](LOCAL_)?RANK[\"']")
    found = [f"{name}" for name, path in project_modules().items()
             if reads.search(path.read_text(encoding="utf-8")) and name != "pipelines.context"]
    assert not found, found
    assert reads.search((REPO / "pipelines" / "context.py").read_text(encoding="utf-8"))


# Sizes the architecture issue set: a module a reader can hold in mind, a class that does one thing.
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 200


def _sources():
    for folder in ("pipelines", "recipes"):
        yield from sorted((REPO / folder).rglob("*.py"))


def test_no_module_or_class_is_too_long():
    too_long = []
    for path in _sources():
        text = path.read_text(encoding="utf-8")
        name = path.relative_to(REPO)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                too_long.append(f"{name}: class {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, f"over {MAX_MODULE_LINES} lines a module or {MAX_CLASS_LINES} a class: {too_long}"
