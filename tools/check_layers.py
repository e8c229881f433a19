"""Check medexp's import layering: no module imports one of a higher layer, and no import cycles.

Layers, lowest first (a module may import its own layer and the ones below):

    0  medexp.errors (and the bare package medexp), medexp.nn.memory (the training-step memory model:
       torch only, so any layer may use it and it may use no other medexp module)
    1  components: medexp.nn, medexp.losses, medexp.schedules, medexp.data, medexp.evaluation
    2  medexp.config      (composes and builds components)
    3  medexp.tracking    (the only mlflow importer)
    4  medexp.report
    5  medexp.run         (the training job)
    6  medexp.commands
    7  medexp.cli, medexp.__main__

Every `import` and `from ... import` counts, also those inside functions (a lazy import is still a
dependency). Cycles are found between modules of any layer with Tarjan's algorithm over that graph.

Usage:  python -m tools.check_layers      (from the repository root; exit 1 and one line per problem when
                                          the layering is broken)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "medexp"
LAYERS = (
    ("medexp.errors", "medexp", "medexp.nn.memory"),
    ("medexp.nn", "medexp.losses", "medexp.schedules", "medexp.data", "medexp.evaluation"),
    ("medexp.config",),
    ("medexp.tracking",),
    ("medexp.report",),
    ("medexp.run",),
    ("medexp.commands",),
    ("medexp.cli", "medexp.__main__"),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int | None:
    """The layer of `module`: that of the longest prefix naming it (the package `medexp` alone is 0)."""
    best = None
    for index, prefixes in enumerate(LAYERS):
        for p in prefixes:
            inside = module == p or (p != "medexp" and module.startswith(p + "."))
            if inside and (best is None or len(p) > best[0]):
                best = (len(p), index)
    return best[1] if best else None


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The medexp modules `path` imports (`from pkg import name` counts as pkg.name when that is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base])
                base = base.rstrip(".")
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else base)
    return {m for m in found if m in modules}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, result = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return result


def problems() -> list[str]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: imports_of(p, set(paths)) - {m} for m, p in paths.items()}
    found = []
    for module, imported in sorted(graph.items()):
        own = layer_of(module)
        if own is None:
            found.append(f"{module}: in no layer of tools/check_layers.py (LAYERS)")
            continue
        for other in sorted(imported):
            theirs = layer_of(other)
            if theirs is not None and theirs > own:
                found.append(f"{module} (layer {own}) imports {other} (layer {theirs}), a higher layer")
    # A package's __init__ importing its own modules is not a cycle of code; count module edges only.
    code_graph = {
        m: {o for o in imported if not paths[o].name == "__init__.py"} for m, imported in graph.items()
    }
    found += [f"import cycle: {' -> '.join(c)}" for c in cycles(code_graph)]
    return found


def main() -> int:
    found = problems()
    for line in found:
        print(line)
    if not found:
        print(f"layering ok: {len(list(PACKAGE.rglob('*.py')))} modules, {len(LAYERS)} layers, no cycles")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
