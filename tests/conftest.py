"""Fixtures shared by several test modules."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from blockdrop import tracking


@pytest.fixture
def mlflow_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """cwd = a temp project holding the repo's dvc.yaml (so stage runs log their own params), with its own
    SQLite MLflow store and no parent run or DVC experiment leaking in from the environment; the store URI."""
    for var in (tracking.PARENT_ENV, "DVC_EXP_NAME", "DVC_ROOT"):
        monkeypatch.delenv(var, raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("BLOCKDROP_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    shutil.copy(Path(__file__).resolve().parents[1] / "dvc.yaml", tmp_path / "dvc.yaml")
    return uri
