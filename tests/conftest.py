"""Fixtures shared by several test modules."""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.error
import urllib.request
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


@pytest.fixture(scope="session")
def flows():
    """orchestration.flows, imported under one temporary Prefect API for the whole session."""
    home = None
    if not os.environ.get("PREFECT_HOME"):
        home = tempfile.mkdtemp(prefix="prefect-home-")
        os.environ["PREFECT_HOME"] = home  # read when prefect is first imported
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from prefect.testing.utilities import prefect_test_harness

    from orchestration import flows

    with prefect_test_harness(server_startup_timeout=None):
        yield flows
    if home:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def flow_stages(flows):
    """orchestration.stages (the stage errors, ``dag_order``), imported under the ``flows`` fixture's Prefect API."""
    from orchestration import stages

    return stages


@pytest.fixture(scope="module")
def isolated_env():
    """Module-scoped monkeypatch (fixtures that run flows once per module need one)."""
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="session")
def tiny_reproduced(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """A copy of the project on the tiny profile, reproduced once per test run (``dvc repro``, about two
    minutes here) and not committed. Tests copy it with ``tinyrepo.copy_reproduced``; none changes it. Under
    pytest-xdist the workers share one build: the first to take the lock builds it in the run's base folder, the
    others wait for it and reuse it."""
    import subprocess
    import sys

    from filelock import FileLock
    from tinyrepo import make_tiny_repo

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if worker_id != "master" else base  # xdist gives each worker a folder inside the run's
    root, done = shared / "tiny-reproduced" / "repo", shared / "tiny-reproduced" / "reproduced"
    with FileLock(str(shared / "tiny-reproduced.lock")):
        if done.exists():
            return root
        make_tiny_repo(root)
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", tracking.PARENT_ENV,
                                                               "DVC_EXP_NAME", "DVC_ROOT", "BLOCKDROP_ROOT")}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
        proc = subprocess.run(["dvc", "repro"], cwd=root, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"dvc repro failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        done.touch()
    return root


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every URL torchvision tries to open fails at once (and is recorded)."""
    tried: list[str] = []

    def refuse(request, *args, **kwargs):
        tried.append(getattr(request, "full_url", str(request)))
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return tried
