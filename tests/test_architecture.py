"""The layout holds: who may import mlflow and prefect, no import circle, no private names across modules,
``pipelines/`` only the DVC stages' entry points, and short modules.

Read from the source with ``ast`` (nothing is imported), so a lazy import inside a function counts too.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterator
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("blockdrop", "pipelines", "orchestration", "ops")
MLFLOW_ALLOWED = ("blockdrop.tracking", "blockdrop.serving", "orchestration")
PREFECT_ALLOWED = ("orchestration",)
MAX_LINES = 450
LONG_REASON = "Why this module is long:"  # a module over MAX_LINES says why in its first lines


def modules() -> dict[str, Path]:
    """Every project module by dotted name (``blockdrop.tracking`` for ``blockdrop/tracking/__init__.py``)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path) -> Iterator[tuple[str, str | None]]:
    """(module, imported name or None) for every import in the file, relative ones resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                yield base, alias.name


def within(name: str, owners: tuple[str, ...]) -> bool:
    return any(name == owner or name.startswith(owner + ".") for owner in owners)


def project_target(module: str, imported: str | None, known: dict[str, Path]) -> str | None:
    """The project module an import refers to (``from blockdrop import tracking`` is ``blockdrop.tracking``)."""
    if imported and f"{module}.{imported}" in known:
        return f"{module}.{imported}"
    return module if module in known else None


def test_only_tracking_serving_and_orchestration_import_mlflow() -> None:
    offenders = sorted({name for name, path in modules().items() for module, _ in imports(name, path)
                        if module.split(".")[0] == "mlflow" and not within(name, MLFLOW_ALLOWED)})
    assert offenders == []


def test_only_orchestration_imports_prefect() -> None:
    offenders = sorted({name for name, path in modules().items() for module, _ in imports(name, path)
                        if module.split(".")[0] == "prefect" and not within(name, PREFECT_ALLOWED)})
    assert offenders == []


def test_the_library_knows_nothing_of_dvc_or_the_packages_above_it() -> None:
    above = ("dvc", "pipelines", "orchestration", "ops")
    offenders = sorted({f"{name} -> {module}" for name, path in modules().items() if within(name, ("blockdrop",))
                        for module, _ in imports(name, path) if module.split(".")[0] in above})
    assert offenders == []


def test_no_import_circle_between_project_modules() -> None:
    known = modules()
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        for module, imported in imports(name, path):
            target = project_target(module, imported, known)
            # A package's __init__ re-exporting its own modules is how a package is built, not a circle.
            if target and target != name and not target.startswith(name + "."):
                graph[name].add(target)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    # A package importing from its own __init__ (``from blockdrop.tracking import x`` inside the package) shows
    # as module -> package -> module; only a circle through two real modules counts.
    real = [c for c in cycles if not any(within(a, (b,)) or within(b, (a,)) for a, b in itertools.pairwise(c))]
    assert real == []


def test_no_private_name_is_imported_across_modules() -> None:
    known = modules()
    offenders = sorted(f"{name}: from {module} import {imported}" for name, path in known.items()
                       for module, imported in imports(name, path)
                       if imported and imported.startswith("_") and not imported.startswith("__")
                       and project_target(module, None, known))
    assert offenders == []


def test_no_private_attribute_of_another_module_is_used() -> None:
    known = modules()
    offenders = []
    for name, path in known.items():
        tree = ast.parse(path.read_text())
        aliases = {}  # local name -> project module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    if f"{node.module}.{alias.name}" in known:
                        aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in known and alias.asname:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                offenders.append(f"{name}: {node.value.id}.{node.attr}")
    assert sorted(offenders) == []


def test_pipelines_holds_only_the_dvc_stage_entry_points() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    entry_points = {cmd.split("-m ", 1)[1].split()[0] for cmd in (s["cmd"] for s in stages.values())}
    held = {name for name in modules() if within(name, ("pipelines",)) and name != "pipelines"}
    assert held == entry_points


def test_no_module_is_long_without_saying_why() -> None:
    long = []
    for name, path in modules().items():
        lines = path.read_text().splitlines()
        if len(lines) > MAX_LINES and not any(LONG_REASON in line for line in lines[:40]):
            long.append(f"{name}: {len(lines)} lines")
    assert long == []
