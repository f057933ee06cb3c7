"""Where the project is, and what git says about it: small helpers any module may import (no torch, no mlflow).

:func:`project_root` finds the folder holding ``dvc.yaml`` (``$BLOCKDROP_ROOT`` names it outright), :func:`git`
runs one git command and returns its output or None, :func:`git_commit` is the commit a result was made from.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

__all__ = ["ROOT_ENV", "find_up", "git", "git_commit", "project_root"]

ROOT_ENV = "BLOCKDROP_ROOT"  # names the project folder outright (tests, a copy run from elsewhere)
GIT_TIMEOUT_S = 20.0


def find_up(start: Path, name: str) -> Path | None:
    """The nearest folder at or above ``start`` that holds ``name`` (None: no folder up to ``/`` does)."""
    for folder in (start, *start.parents):
        if (folder / name).exists():
            return folder
    return None


def project_root(start: Path | None = None, marker: str = "dvc.yaml") -> Path:
    """The nearest folder at or above ``start`` that holds ``marker``.

    Without ``start``: ``$BLOCKDROP_ROOT`` when set, else the search starts at the working folder. An explicit
    ``start`` asks about that folder, so the variable does not apply. FileNotFoundError if no folder holds it.
    """
    if start is None and os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV]).resolve()
    start = (start or Path.cwd()).resolve()
    found = find_up(start, marker)
    if found is None:
        raise FileNotFoundError(f"no {marker} in {start} or above: run from the project")
    return found


def git(*args: str, cwd: str | Path | None = None) -> str | None:
    """``git <args>``'s stdout, stripped; None when git is missing, fails (not a repository...) or hangs."""
    try:
        out = subprocess.run(["git", *args], check=False, cwd=cwd, capture_output=True, text=True,
                             timeout=GIT_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit(cwd: str | Path | None = None) -> str:
    """``abc1234``, ``abc1234 (dirty)`` when tracked files differ from it, or ``unknown`` outside git."""
    commit = git("rev-parse", "--short", "HEAD", cwd=cwd)
    if not commit:
        return "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", cwd=cwd)
    return f"{commit} (dirty)" if dirty else commit
