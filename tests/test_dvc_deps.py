"""dvc.yaml's deps are complete: every project module a stage runs is a dep, so editing it makes DVC rerun it.

A stage's code is what ``python -m pipelines.<stage>`` imports: the modules in ``sys.modules`` after importing
it in a fresh interpreter, plus what the source of those modules imports anywhere (inside a function body too:
``import torchvision`` in ``load_source`` or ``from blockdrop.tracking import ...`` in a helper run only later,
which ``sys.modules`` never sees at import time), followed until nothing new turns up.

Which files count: every ``.py`` under ``blockdrop/`` or ``pipelines/`` so reached, ``__init__.py`` included
when it holds code (re-exports decide which function a name means), but not one holding only a docstring
(nothing in it can change a result). The package ``blockdrop/tracking/`` and ``blockdrop/serving.py`` are exempt:
they only log to MLflow (runs, the registered model), no DVC output depends on them (their changes must not rerun
training), and what they alone import is not followed either.
"""

from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tinyrepo import REPO, make_tiny_repo

EXEMPT = ["blockdrop/tracking/", "blockdrop/serving.py"]  # log to MLflow only: no DVC output depends on them
PACKAGES = ("blockdrop", "pipelines")

PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted({getattr(m, "__file__", None) or "" for m in list(sys.modules.values())})))
"""


def stages(root: Path = REPO) -> dict[str, dict]:
    """The stages of dvc.yaml whose command runs a ``pipelines`` module, with that module's name."""
    listed = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, st in listed.items():
        cmd = st.get("cmd", "")
        if isinstance(cmd, str) and cmd.startswith("python -m pipelines."):
            out[name] = {**st, "module": cmd.split()[2]}
    return out


def module_file(module: str, root: Path) -> Path | None:
    """The project file that defines ``module`` (a .py or a package's __init__.py), if it is one of ours."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = root / module.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(path: Path, root: Path) -> set[str]:
    """Every module ``path``'s source imports, wherever the import statement is (function bodies too)."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..data import y
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


def with_parents(module: str) -> list[str]:
    """Importing ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py`` first."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


@functools.cache  # each probe is a fresh interpreter importing torch: seconds
def stage_code(module: str, root: Path = REPO) -> frozenset[str]:
    """Project files (relative paths) that running ``module`` can execute."""
    probe = subprocess.run([sys.executable, "-c", PROBE, module], cwd=root, capture_output=True, text=True,
                           timeout=120, check=True)
    files = {Path(f).resolve() for f in json.loads(probe.stdout) if f}
    todo = [p for p in files if p.is_file() and p.is_relative_to(root) and p.relative_to(root).parts[0] in PACKAGES]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        if covered(path.relative_to(root).as_posix(), EXEMPT):
            continue
        for name in imported_modules(path, root):
            todo.extend(p for m in with_parents(name) if (p := module_file(m, root)) is not None)
    return frozenset(p.relative_to(root).as_posix() for p in seen if holds_code(p))


def holds_code(path: Path) -> bool:
    """False for an ``__init__.py`` that is only a docstring."""
    if path.name != "__init__.py":
        return True
    body = ast.parse(path.read_text()).body
    return not all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def covered(path: str, deps: list[str]) -> bool:
    """A dep covers a file when it is the file or a folder above it."""
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def dep_paths(stage: dict) -> list[str]:
    return [next(iter(d)) if isinstance(d, dict) else d for d in stage.get("deps", [])]


@pytest.mark.e2e
@pytest.mark.parametrize("name", sorted(stages()))
def test_every_module_a_stage_runs_is_a_dep(name: str) -> None:
    stage = stages()[name]
    code = stage_code(stage["module"])
    script = stage["module"].replace(".", "/") + ".py"  # finetune-full runs pipelines/finetune_full.py
    assert script in code and "blockdrop/stage.py" in code  # the probe saw the stage at all
    missing = sorted(p for p in code if not covered(p, EXEMPT) and not covered(p, dep_paths(stage)))
    assert not missing, f"stage {name} runs these project modules, not among its deps in dvc.yaml: {missing}"


def test_the_finder_follows_imports_inside_functions(tmp_path: Path) -> None:
    pkg = tmp_path / "blockdrop"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""Docstring only."""\n')
    (pkg / "sub" / "__init__.py").write_text("from blockdrop.sub.inner import x\n")
    (pkg / "sub" / "inner.py").write_text("x = 1\n")
    (pkg / "lazy.py").write_text("def f():\n    from . import late\n    return late\n")
    (pkg / "late.py").write_text("y = 2\n")
    (pkg / "top.py").write_text("import json\n\ndef g():\n    import blockdrop.lazy\n    from blockdrop.sub import x\n")
    assert stage_code("blockdrop.top", tmp_path) == {
        "blockdrop/top.py", "blockdrop/lazy.py", "blockdrop/late.py", "blockdrop/sub/__init__.py",
        "blockdrop/sub/inner.py",
    }  # blockdrop/__init__.py holds only a docstring: not code


# ----------------------------------------------------------------------------------------------------------
# DVC itself sees an edit of a library file as a changed dep of exactly the stages that import it


def dvc(root: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def placeholder_outputs(root: Path) -> None:
    """Stand-ins for every data dep and out, so ``dvc commit`` can record a lock without running anything."""
    for st in stages(root).values():
        for entry in [*dep_paths(st), *(next(iter(o)) if isinstance(o, dict) else o
                                        for key in ("outs", "metrics", "plots") for o in st.get(key, []))]:
            path = root / entry
            if path.exists():
                continue
            if Path(entry).suffix:  # a file
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("placeholder\n")
            else:  # a folder out (data/prepared, reports/analyze/figures)
                path.mkdir(parents=True)
                (path / "placeholder.txt").write_text("placeholder\n")


@pytest.mark.e2e
def test_editing_a_library_file_marks_exactly_its_importers_changed(tmp_path: Path) -> None:
    root = make_tiny_repo(tmp_path / "repo")
    placeholder_outputs(root)
    dvc(root, "commit", "--force", "--quiet")  # a dvc.lock of this tree: every stage up to date
    assert json.loads(dvc(root, "status", "--json")) == {}

    with (root / "blockdrop" / "predict.py").open("a") as f:
        f.write("# an edit\n")
    status = json.loads(dvc(root, "status", "--json"))
    importers = {name for name, st in stages().items() if "blockdrop/predict.py" in stage_code(st["module"])}
    assert {"pretrain", "curriculum", "finetune", "evaluate"} <= importers and "prepare" not in importers
    assert set(status) == importers
    for name in importers:
        changed = {k: v for entry in status[name] for k, v in entry.get("changed deps", {}).items()}
        assert [k for k in changed if covered("blockdrop/predict.py", [k])] != [], (name, status[name])
