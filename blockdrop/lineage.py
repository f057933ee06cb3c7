"""What a stage's result depends on, read from dvc.yaml: upstream stages, their params, the md5 of the deps.

The library's one reader of dvc.yaml: the params keys a stage lists (its MLflow params), its deps, the
stages upstream of it and the resume key derived from them are all read through one parse function.

A resume state is only valid for the exact inputs that produced it. DVC already knows those inputs (the
stage's ``deps:`` and the ``params:`` of it and of every stage upstream), so the resume key is derived from
the same dvc.yaml, with the md5 DVC itself would record: when DVC would rerun a stage for a changed input, the
stage's old resume state no longer matches. A plain YAML walk, not ``dvc.repo.Repo``: the library never
imports DVC (seconds per stage process), and the graph it needs is a few set intersections.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from blockdrop.config import Params, select_params

__all__ = ["dvc_md5", "resume_key", "stage_deps", "stage_param_keys", "upstream_param_keys", "upstream_stages"]

# Folders .dvcignore hides from DVC (byte-code appears after a first import; it must not change a hash).
IGNORED_NAMES = frozenset({"__pycache__", ".pytest_cache", ".ruff_cache"})


def dvc_md5(path: str | Path) -> str:
    """The md5 DVC 3 records for ``path``: plain md5 of a file; for a folder, md5 of its listing + ".dir"."""
    path = Path(path)
    if path.is_file():
        h = hashlib.md5()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    listing = sorted(
        (
            {"md5": dvc_md5(p), "relpath": p.relative_to(path).as_posix()}
            for p in path.rglob("*")
            if p.is_file() and IGNORED_NAMES.isdisjoint(p.relative_to(path).parts)
        ),
        key=lambda d: d["relpath"],
    )
    return hashlib.md5(json.dumps(listing, sort_keys=True).encode()).hexdigest() + ".dir"


def _stages(dvc_yaml: str | Path) -> dict[str, dict[str, Any]]:
    """The ``stages:`` of ``dvc_yaml`` by name ({} if the file is missing or not YAML)."""
    try:
        spec = yaml.safe_load(Path(dvc_yaml).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return {name: entry for name, entry in (spec.get("stages") or {}).items() if isinstance(entry, dict)}


def _paths(items: Iterable[Any] | None) -> list[str]:
    """Paths of a ``deps:``/``outs:`` list, whose items are ``path`` or ``{path: {options}}``."""
    out: list[str] = []
    for item in items or []:
        out.extend([item] if isinstance(item, str) else list(item) if isinstance(item, dict) else [])
    return [p.rstrip("/") for p in out]


def _overlap(a: str, b: str) -> bool:
    """One path is the other or lies inside it (a stage may depend on a folder another writes into)."""
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def stage_deps(stage: str, dvc_yaml: str | Path = "dvc.yaml") -> list[str]:
    """The ``deps:`` of ``stage`` as listed in dvc.yaml (empty if the stage is unknown)."""
    return _paths(_stages(dvc_yaml).get(stage, {}).get("deps"))


def stage_param_keys(stage: str, dvc_yaml: str | Path = "dvc.yaml") -> list[str] | None:
    """The params keys a DVC stage depends on, as written in its ``params:`` list (None: all, or unknown).

    dvc.yaml is the one place that says which knobs a stage reads; the stage's MLflow params and its
    resume key are derived from the same list, so the three can never disagree.
    """
    entry = _stages(dvc_yaml).get(stage)
    if entry is None:
        return None
    keys: list[str] = []
    for item in entry.get("params") or []:
        if isinstance(item, str):
            keys.append(item)
        elif isinstance(item, dict):  # {file: [keys]}; other files are not ours
            for file, sub in item.items():
                if Path(file).name == "params.yaml":
                    if sub is None:  # `- params.yaml:` alone means the whole file
                        return None
                    keys.extend(sub)
    return keys


def upstream_stages(stage: str, dvc_yaml: str | Path = "dvc.yaml") -> list[str]:
    """Every stage whose outs (metrics and plots included) feed ``stage``, transitively, in dvc.yaml order."""
    stages = _stages(dvc_yaml)
    outs = {name: _paths([*(e.get("outs") or []), *(e.get("metrics") or []), *(e.get("plots") or [])])
            for name, e in stages.items()}
    found: set[str] = set()
    todo = [stage]
    while todo:
        deps = _paths(stages.get(todo.pop(), {}).get("deps"))
        for name, produced in outs.items():
            if name not in found and name != stage and any(_overlap(d, o) for d in deps for o in produced):
                found.add(name)
                todo.append(name)
    return [name for name in stages if name in found]


def upstream_param_keys(stage: str, dvc_yaml: str | Path = "dvc.yaml") -> list[str] | None:
    """The params keys of ``stage`` and of every stage upstream of it (None: all of params.yaml)."""
    keys: list[str] = []
    for name in [*upstream_stages(stage, dvc_yaml), stage]:
        own = stage_param_keys(name, dvc_yaml)
        if own is None:
            return None
        keys.extend(k for k in own if k not in keys)
    return keys


def resume_key(stage: str, params: Params, dvc_yaml: str | Path = "dvc.yaml") -> str:
    """A hash of everything that decides ``stage``'s result: its params and its upstream stages' params,
    and the DVC md5 of each of its deps (data, upstream models, code), paths relative to dvc.yaml's folder.

    A dep that does not exist hashes as missing (DVC would refuse to run the stage anyway).
    """
    root = Path(dvc_yaml).parent
    deps = {d: dvc_md5(root / d) if (root / d).exists() else None for d in stage_deps(stage, dvc_yaml)}
    payload = {"stage": stage, "params": select_params(params, upstream_param_keys(stage, dvc_yaml)), "deps": deps}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
