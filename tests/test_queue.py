"""Concurrent experiments: ``dvc exp run --queue`` of three settings, run by two DVC queue workers at once.

Both workers run stages in parallel processes that write to the one SQLite MLflow store of the workspace
(``tracking.repo_root()`` sends runs from the queue's copies there), and the store does not exist yet when
they start: both race to create its schema. Every experiment must finish, with every stage's run FINISHED and
its metrics recorded, and every registered version tagged with its DVC md5 and, by ``evaluate``, its numbers.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from tinyrepo import copy_reproduced

pytestmark = pytest.mark.e2e  # runs stages, servers or other processes: `make test`, not `make test-fast`

PENALTIES = (1.0, 2.0, 3.0)
STATES = {"Queued", "Running", "Success", "Failed"}  # the Status column of `dvc queue status`


def run(root: Path, *cmd: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "GIT_AUTHOR_NAME": "test",
           "GIT_AUTHOR_EMAIL": "test@example.com", "GIT_COMMITTER_NAME": "test",
           "GIT_COMMITTER_EMAIL": "test@example.com"}
    for var in ("MLFLOW_TRACKING_URI", "BLOCKDROP_PARENT_RUN_ID", "BLOCKDROP_ROOT", "DVC_ROOT", "DVC_EXP_NAME"):
        env.pop(var, None)  # the default store: <workspace>/mlflow.db, also for the queue's copies
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def queued(tiny_reproduced: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], float]:
    """A committed tiny project whose baseline is reproduced (so the experiments rerun finetune onwards),
    three experiments queued and run by two workers; the queue's final status per experiment name."""
    # no MLflow store in the copy: the workers start on no store at all, and race to create its schema
    root = copy_reproduced(tiny_reproduced, tmp_path_factory.mktemp("queue") / "repo")
    run(root, "git", "add", "-A")
    run(root, "git", "commit", "-q", "-m", "baseline")
    names = [f"penalty-{int(p)}" for p in PENALTIES]
    for name, penalty in zip(names, PENALTIES, strict=True):
        run(root, "dvc", "exp", "run", "--queue", "--name", name, "-S", f"finetune.penalty={penalty}")
    t0 = time.perf_counter()
    run(root, "dvc", "queue", "start", "-j", "2")
    status: dict[str, str] = {}
    try:
        while time.perf_counter() - t0 < 900:
            time.sleep(5)
            lines = run(root, "dvc", "queue", "status").stdout.splitlines()
            status = {name: next((t for t in line.split() if t in STATES), "?") for line in lines
                      for name in names if name in line.split()}
            if len(status) == len(names) and not {"Queued", "Running"} & set(status.values()):
                break
    finally:
        subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=root, capture_output=True, timeout=60,
                       env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    return root, status, time.perf_counter() - t0


# About 3 min on 2 quiet cores (7.4 with other work on them): a baseline dvc repro, then 3 x finetune..report on
# 2 workers. It fits make test's budget, so it runs there.
def test_three_queued_experiments_on_two_workers_lose_nothing(queued) -> None:
    root, status, seconds = queued
    assert status == {f"penalty-{int(p)}": "Success" for p in PENALTIES}, status
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("blockdrop")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    by_exp: dict[str, list] = {}
    for r in runs:
        by_exp.setdefault(r.data.tags.get("dvc_exp", ""), []).append(r)
    assert set(by_exp) == set(status), {k: len(v) for k, v in by_exp.items()}  # every run is an experiment's
    for name, exp_runs in by_exp.items():
        stages = sorted(r.info.run_name for r in exp_runs)
        # The baseline made prepare..curriculum current: each experiment reran finetune and what follows it.
        assert {"finetune", "evaluate"} <= set(stages), (name, stages)
        assert len(stages) == len(set(stages)), (name, stages)  # one run per stage, no duplicates
        assert all(r.info.status == "FINISHED" for r in exp_runs), [(r.info.run_name, r.info.status) for r in exp_runs]
        finetune = next(r for r in exp_runs if r.info.run_name == "finetune")
        evaluate = next(r for r in exp_runs if r.info.run_name == "evaluate")
        assert float(finetune.data.params["finetune.penalty"]) == float(name.split("-")[1])
        assert math.isfinite(finetune.data.metrics["val/accuracy"])
        assert client.get_metric_history(finetune.info.run_id, "train/loss"), "epoch curve lost"
        assert 0.0 <= evaluate.data.metrics["blockdrop/accuracy"] <= 1.0
        assert evaluate.data.metrics["blockdrop/flops_mean"] > 0

    # One registered version per experiment, tied to its checkpoint and tagged by its evaluate stage.
    (model,) = client.search_registered_models()
    versions = client.search_model_versions(f"name = '{model.name}'")
    assert len(versions) == len(PENALTIES)
    assert len({v.tags["dvc_md5"] for v in versions}) == len(PENALTIES)
    evaluated = {r.data.tags["dvc_exp"]: r for r in runs if r.info.run_name == "evaluate"}
    for v in versions:
        exp = client.get_run(v.run_id).data.tags["dvc_exp"]
        assert float(v.tags["test_accuracy"]) == pytest.approx(evaluated[exp].data.metrics["blockdrop/accuracy"])
        assert float(v.tags["flops_mean"]) == pytest.approx(evaluated[exp].data.metrics["blockdrop/flops_mean"])
    print(f"3 experiments on 2 workers: {seconds:.0f} s")


# --------------------------------------------------------------------- the store under parallel writers

WRITER = """
import sys
from blockdrop import tracking
from blockdrop.config import Params

with tracking.stage_run("prepare", Params()) as run:
    for epoch in range(20):
        run.log_epoch({"train": {"loss": 1.0 / (epoch + 1)}}, step=epoch)
    run.log_metrics({"test": {"accuracy": float(sys.argv[1])}})
"""


def test_parallel_stages_on_a_new_store_all_land(mlflow_project: str, tmp_path: Path) -> None:
    """Four processes start at once on a store that does not exist yet: one creates the schema (under the
    store's lock), all log, nothing is lost, and the store is left in WAL mode."""
    import sqlite3

    db = tmp_path / "mlflow.db"
    assert not db.exists()
    (tmp_path / "writer.py").write_text(WRITER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, "writer.py", str(i / 10)], cwd=tmp_path, env=env,
                              stderr=subprocess.PIPE, text=True) for i in range(4)]
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
    client = MlflowClient(mlflow_project)
    runs = client.search_runs([client.get_experiment_by_name("blockdrop").experiment_id])
    assert sorted(r.data.metrics["test/accuracy"] for r in runs) == [0.0, 0.1, 0.2, 0.3]
    assert all(r.info.status == "FINISHED" for r in runs)
    for r in runs:
        assert [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")] == list(range(20))
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_failing_epoch_write_is_retried_then_given_up_without_failing(mlflow_project: str, monkeypatch,
                                                                         caplog) -> None:
    from mlflow.exceptions import MlflowException

    from blockdrop import tracking
    from blockdrop.config import Params
    from blockdrop.tracking import runs

    monkeypatch.setattr(runs, "EPOCH_LOG_BACKOFF_S", 0.0)
    with tracking.stage_run("prepare", Params()) as run:
        real, calls = run.client.log_batch, []

        def flaky(*args, **kwargs):
            calls.append(kwargs)
            if len(calls) in (1, 2) or len(calls) >= 4:  # locked twice, then fine once, then for good
                raise MlflowException("(sqlite3.OperationalError) database is locked")
            return real(*args, **kwargs)

        monkeypatch.setattr(run.client, "log_batch", flaky)
        run.log_epoch({"train": {"loss": 0.5}}, step=1)  # third attempt lands
        assert len(calls) == 3
        run.log_epoch({"train": {"loss": 0.25}}, step=2)  # never lands: warned, not raised
        assert len(calls) == 3 + runs.EPOCH_LOG_ATTEMPTS
        with pytest.raises(MlflowException):
            run.log_metrics({"test": {"accuracy": 0.5}})  # final metrics are not retried away
        monkeypatch.setattr(run.client, "log_batch", real)
    history = MlflowClient(mlflow_project).get_metric_history(run.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.5)]
    assert "epoch 2 metrics not logged" in caplog.text
