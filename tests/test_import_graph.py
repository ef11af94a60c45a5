"""The import graph of the project's packages, read from the source with `ast` (no imports).

Every `import` and `from ... import` counts, at module level or inside a function: a cycle
hidden in a function is still a cycle. The layers, bottom up: pn_base (errors, atomic output,
output names, tokenizer identity) imports neither data_tools nor megatron_pn (nor torch or
megatron); data_tools imports pn_base only; megatron_pn may import both.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pn_base", "data_tools", "megatron_pn")
HEAVY = ("torch", "megatron", "deepspeed", "transformer_engine")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            modules[module_name(path)] = path
    return modules


def imported_names(path: Path, name: str) -> set[str]:
    """Every module name `path` imports (for `from X import Y`: X.Y as well as X, so that
    importing a submodule by `from package import module` counts)."""
    is_package = path.name == "__init__.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)
    return names


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(edges between project modules, every imported name of each module)."""
    modules = project_modules()
    raw = {name: imported_names(path, name) for name, path in modules.items()}
    edges = {}
    for name, imported in raw.items():
        targets = set()
        for target in imported:
            # the module itself, else its closest enclosing project module (a name imported
            # from a module is not a module)
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
                # importing a.b.c runs a/__init__ and a/b/__init__ first (those of the
                # importer's own packages are already running: no edge)
                parent = target.rpartition(".")[0]
                while parent:
                    if not (name + ".").startswith(parent + "."):
                        targets.add(parent)
                    parent = parent.rpartition(".")[0]
        edges[name] = targets
    return edges, raw


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(edges.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def _package_importers(raw, importer: str, imported: tuple[str, ...]) -> list[str]:
    """"M imports T" for each module M of package `importer` that imports from `imported`
    (`from X import Y` is reported once, as X)."""
    return sorted(f"{name} imports {target}" for name, targets in raw.items()
                  if name.split(".")[0] == importer for target in targets
                  if target.split(".")[0] in imported
                  and target.rpartition(".")[0] not in targets)


def test_no_import_cycle():
    found = cycles(graph()[0])
    assert not found, "import cycles between project modules: " + "; ".join(
        "{" + ", ".join(component) + "}" for component in found)


def test_base_imports_no_other_layer():
    bad = _package_importers(graph()[1], "pn_base", ("megatron_pn", "data_tools") + HEAVY)
    assert (ROOT / "pn_base").is_dir()
    assert not bad, "pn_base must stay the light bottom layer: " + "; ".join(bad)


def test_data_tools_imports_no_megatron_pn():
    bad = _package_importers(graph()[1], "data_tools", ("megatron_pn",))
    assert not bad, "data_tools must not import megatron_pn: " + "; ".join(bad)
