"""MLflow as a shared server over PostgreSQL (``make tracking-server``, ``ops/tracking_server.py``).

A private PostgreSQL cluster and ``mlflow server`` (one worker, artifacts proxied to a folder) are started for
real on free loopback ports, once for the module. The tiny pipeline logs every stage through the server, and
the runs are read back through the server's REST API with urllib, as any client of a team's server would, not
through MLflow's Python client. Then the server is stopped while a stage trains: the stage stops within
seconds with one line naming the URI, and a rerun once the server is back resumes and completes.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from tinyrepo import copy_reproduced, tiny_params

from blockdrop import tracking
from ops.tracking_server import MlflowServer, ServerError, pg_bin, tracking_server


def _postgres_missing() -> str | None:
    try:
        pg_bin()
        import psycopg2  # noqa: F401  (MLflow's PostgreSQL driver)
    except (ServerError, ImportError) as error:
        return f"{error} (`make postgres` installs PostgreSQL, `make install` the driver)"
    return None


pytestmark = [pytest.mark.e2e, pytest.mark.skipif(_postgres_missing() is not None, reason=str(_postgres_missing()))]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (held open together, so the kernel cannot hand out one twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def server() -> Iterator[MlflowServer]:
    """PostgreSQL and ``mlflow server`` for the module; their logs are printed if a test fails."""
    # Not under pytest's tmp_path: /tmp/pytest-of-root is 0700, and as root the cluster runs as the postgres
    # user, who must reach its folder.
    state = Path(tempfile.mkdtemp(prefix="blockdrop-tracking-"))
    mlflow_port, pg_port = free_ports(2)
    t0 = time.perf_counter()
    try:
        with (state / "mlflow.log").open("w") as log, tracking_server(state, mlflow_port, pg_port, log) as srv:
            print(f"PostgreSQL and the MLflow server started in {time.perf_counter() - t0:.1f} s")
            yield srv
    finally:
        for name in ("mlflow.log", "pg.log"):
            if (state / name).exists():
                print(f"--- {name} (last lines)\n{(state / name).read_text()[-3000:]}")
        shutil.rmtree(state, ignore_errors=True)


def _env(uri: str) -> dict[str, str]:
    """A user's shell in the project with ``MLFLOW_TRACKING_URI`` pointing at the server."""
    env = {k: v for k, v in os.environ.items()
           if k not in (tracking.PARENT_ENV, "DVC_EXP_NAME", "DVC_ROOT", "BLOCKDROP_ROOT")}
    env |= {"MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
            "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    return env


def rest(uri: str, endpoint: str, body: dict | None = None, **query: str) -> Any:
    """One call to the server's REST API (``/api/2.0/mlflow/<endpoint>``): POST ``body`` as JSON, else GET."""
    url = f"{uri}/api/2.0/mlflow/{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def runs_of(uri: str, experiment: str, query: str = "") -> list[dict]:
    """Every run of ``experiment`` matching ``query``, as the REST API returns them (info, data, inputs);
    none while the experiment does not exist yet (a stage creates it on its first run: 404 until then)."""
    try:
        exp = rest(uri, "experiments/get-by-name", experiment_name=experiment)["experiment"]["experiment_id"]
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return []
        raise
    runs, token = [], None
    while True:
        page = rest(uri, "runs/search", {"experiment_ids": [exp], "filter": query, "max_results": 1000,
                                         **({"page_token": token} if token else {})})
        runs += page.get("runs", [])
        if not (token := page.get("next_page_token")):
            return runs


def pairs(run: dict, kind: str) -> dict[str, Any]:
    """A run's ``params``, ``tags`` or ``metrics`` (lists of key/value objects in REST) as a dict."""
    return {item["key"]: item["value"] for item in run["data"].get(kind, [])}


def stage_names(root: Path) -> list[str]:
    return list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])


@pytest.mark.slow  # 85 s of dvc repro --force: make test would pass its 30 minutes; make test-slow runs it
def test_every_stage_logs_through_the_server_into_postgresql(server: MlflowServer, tiny_reproduced: Path,
                                                              tmp_path: Path) -> None:
    root = copy_reproduced(tiny_reproduced, tmp_path / "project")
    params = tiny_params(root)
    t0 = time.perf_counter()
    proc = subprocess.run(["dvc", "repro", "--force"], cwd=root, env=_env(server.uri), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    print(f"dvc repro --force against the server: {time.perf_counter() - t0:.1f} s")

    stages = stage_names(root)
    runs = {r["info"]["run_name"]: r for r in runs_of(server.uri, params["tracking"]["experiment"])}
    assert sorted(runs) == sorted(stages)
    for stage, run in runs.items():
        assert run["info"]["status"] == "FINISHED", stage
        assert pairs(run, "tags")["stage"] == stage
        assert pairs(run, "params"), f"{stage} logged no params"
        assert 0 < float(pairs(run, "metrics")["tracking/share"]) < 1
        # New experiments on a server with --serve-artifacts store artifacts through it, not in a local path.
        assert run["info"]["artifact_uri"].startswith("mlflow-artifacts:/"), run["info"]["artifact_uri"]
    assert pairs(runs["pretrain"], "params")["pretrain.epochs"] == str(params["pretrain"]["epochs"])

    # Artifacts: listed and downloaded through the server, the same bytes as the project's file.
    pretrain = runs["pretrain"]["info"]["run_id"]
    listed = rest(server.uri, "artifacts/list", run_id=pretrain, path="reports/pretrain")
    assert "reports/pretrain/metrics.json" in {f["path"] for f in listed["files"]}
    url = f"{server.uri}/get-artifact?" + urllib.parse.urlencode({"run_id": pretrain,
                                                                  "path": "reports/pretrain/metrics.json"})
    with urllib.request.urlopen(url, timeout=30) as response:
        assert json.load(response) == json.loads((root / "reports/pretrain/metrics.json").read_text())

    # The model registry: finetune registered a version with the alias challenger, from its own run.
    name = tracking.registry_name(params["data"]["source"], params["model"]["depth"])
    model = rest(server.uri, "registered-models/get", name=name)["registered_model"]
    (challenger,) = [a["version"] for a in model.get("aliases", []) if a["alias"] == "challenger"]
    version = rest(server.uri, "model-versions/get", name=name, version=challenger)["model_version"]
    assert version["run_id"] == runs["finetune"]["info"]["run_id"]

    # Nothing went to a local store: no SQLite file, no artifact folder in the project.
    assert not (root / "mlflow.db").exists() and not (root / "mlartifacts").exists()
    # And PostgreSQL holds them: the server's store, read with the driver MLflow uses.
    import psycopg2

    conn = psycopg2.connect(server.backend.replace("+psycopg2", "", 1), connect_timeout=10)  # libpq: no driver
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT name, status FROM runs WHERE run_uuid = %s", (pretrain,))
            assert cur.fetchone() == ("pretrain", "FINISHED")
    finally:
        conn.close()


def _wait_for_first_epoch(uri: str, experiment: str, stage: subprocess.Popen, log: Path) -> str:
    """The id of the running pretrain run once it has logged an epoch's loss (the stage is mid-training)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if stage.poll() is not None:
            pytest.fail(f"the stage ended ({stage.returncode}) before the server could be stopped:\n"
                        f"{log.read_text()[-3000:]}")
        with_loss = [r for r in runs_of(uri, experiment, "attributes.status = 'RUNNING'")
                     if r["info"]["run_name"] == "pretrain" and "train/loss" in pairs(r, "metrics")]
        if with_loss:
            return with_loss[0]["info"]["run_id"]
        time.sleep(0.3)
    pytest.fail("pretrain logged no epoch in 300 s")


def test_a_stage_whose_server_goes_away_fails_fast_and_a_rerun_resumes(server: MlflowServer, tiny_reproduced: Path,
                                                                       tmp_path: Path) -> None:
    root = copy_reproduced(tiny_reproduced, tmp_path / "project")
    params = tiny_params(root)
    experiment = params["tracking"]["experiment"]
    # Three epochs: time to stop the server after the first epoch's point and before the stage ends.
    params["pretrain"]["epochs"] = 3
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    log = tmp_path / "pretrain.log"
    with log.open("w") as out:
        stage = subprocess.Popen([sys.executable, "-m", "pipelines.pretrain"], cwd=root, env=_env(server.uri),
                                 stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            first = _wait_for_first_epoch(server.uri, experiment, stage, log)
            t_stop = time.monotonic()
            server.stop()
            code = stage.wait(timeout=300)
        finally:
            if stage.poll() is None:
                stage.kill()
                stage.wait()
    elapsed = time.monotonic() - t_stop
    output = log.read_text()
    print(f"the stage stopped {elapsed:.1f} s after the server was told to stop")
    assert code == 1, output[-3000:]
    errors = [ln for ln in output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and server.uri in errors[0] and "unreachable" in errors[0], output[-3000:]
    assert "Traceback" not in output
    # Fast: the rest of an epoch, one write through MLflow's bounded retries (~5 s), then 3.5 s of back-off.
    assert elapsed < 60

    server.start()
    t0 = time.perf_counter()
    proc = subprocess.run(["dvc", "repro", "pretrain"], cwd=root, env=_env(server.uri), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    print(f"rerun (dvc repro pretrain) after the server came back: {time.perf_counter() - t0:.1f} s")

    runs = {r["info"]["run_id"]: r for r in runs_of(server.uri, experiment, "tags.stage = 'pretrain'")}
    assert runs[first]["info"]["status"] == "KILLED"  # the server could not be told; the rerun marked it
    (rerun,) = [r for r in runs.values() if pairs(r, "tags").get("resumed_from_run") == first]
    assert rerun["info"]["status"] == "FINISHED"
    assert int(pairs(rerun, "tags")["resumed_from_epoch"]) >= 1
