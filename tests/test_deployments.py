"""prefect.yaml's deployments on a real ``prefect server start`` and a ``process`` worker (``make deploy``,
``make worker``, i.e. ``python -m ops.pool deploy|worker``).

One server on a free 127.0.0.1 port with its own PREFECT_HOME serves the module. The project is a copy of the
reproduced tiny project (every stage up to date) whose ``flow.cron`` is changed first, so the deployed schedule
can only have come from params.yaml. It is deployed twice (the pool is created once, the deployments updated in
place), then a worker with ``--run-once --limit 1`` runs one flow run of the pipeline deployment: every stage but
``report`` is skipped (the report prints the whole params.yaml, so the new cron is news to it), so the run takes
seconds, and its parent MLflow run lands in the copy's own store, which is where the pull step must have put it.
The API is read over plain HTTP: this module never imports Prefect.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow import MlflowClient
from tinyrepo import REPO, copy_reproduced, tiny_params

from blockdrop import tracking
from orchestration.prefect_server import api_url, local_server

pytestmark = pytest.mark.e2e  # runs stages, servers or other processes: `make test`, not `make test-fast`

POOL = "blockdrop"
DEPLOYMENT = "pool"
ENTRYPOINTS = {"blockdrop-pipeline": "orchestration/flows.py:pipeline_flow",
               "blockdrop-retrain": "orchestration/flows.py:retrain_flow",
               "blockdrop-sweep": "orchestration/sweep.py:sweep_flow"}
CRON = "30 4 * * 2"  # not the default: it must travel from the copy's params.yaml to the server
# The project's settings that must not leak into the copy's runs (they would point MLflow, DVC or Prefect at
# the developer's own stores), and prefect.yaml's two inputs, which only `ops.pool deploy` may set.
LEAKS = ("MLFLOW_TRACKING_URI", tracking.PARENT_ENV, "DVC_EXP_NAME", "DVC_ROOT", "BLOCKDROP_ROOT",
         "PREFECT_API_URL", "PREFECT_HOME", "PREFECT_PROFILE", "BLOCKDROP_CRON", "BLOCKDROP_PROJECT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(base: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """GET ``path`` from the Prefect REST API (POST ``body`` as JSON when given); the decoded answer."""
    request = urllib.request.Request(f"{base}{path}", method="GET" if body is None else "POST",
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def pool_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ops.pool", *args]


def run(cmd: list[str], root: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f"{' '.join(cmd)} exited {proc.returncode}:\n"
                                  f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@dataclass
class Deployed:
    root: Path
    api: str
    env: dict[str, str]
    first: str  # output of the first deploy, then of the second
    second: str

    def deployment(self, flow: str) -> dict[str, Any]:
        return api(self.api, f"/deployments/name/{flow}/{DEPLOYMENT}")


@pytest.fixture(scope="module")
def deployed(tiny_reproduced: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    tmp = tmp_path_factory.mktemp("deployments")
    root = copy_reproduced(tiny_reproduced, tmp / "repo")
    params = tiny_params(root)
    assert params["flow"]["cron"] != CRON
    params["flow"]["cron"] = CRON  # only `report` depends on flow.*: it prints the whole params.yaml
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    env = {k: v for k, v in os.environ.items() if k not in LEAKS}
    env.update({"PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
                "PREFECT_HOME": str(tmp / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1"})
    port = free_port()
    with (tmp / "server.log").open("w") as log, local_server(port, env, stdout=log, startup_timeout_s=180):
        env["PREFECT_API_URL"] = api_url(port)  # so ops.pool uses this server and starts none
        first = run(pool_cmd("deploy"), root, env, timeout=300).stdout
        second = run(pool_cmd("deploy"), root, env, timeout=300).stdout
        yield Deployed(root, env["PREFECT_API_URL"], env, first, second)


def test_deploy_creates_the_process_pool_once_and_the_three_deployments(deployed: Deployed) -> None:
    assert api(deployed.api, f"/work_pools/{POOL}")["type"] == "process"
    assert "work-pool create blockdrop --type process" in deployed.first
    assert f"work pool {POOL!r} exists" in deployed.second and "work-pool create" not in deployed.second
    on_pool = api(deployed.api, "/deployments/filter", {"work_pools": {"name": {"any_": [POOL]}}})
    assert len(on_pool) == 3, [d["name"] for d in on_pool]  # deploying again updated them in place
    for flow, entrypoint in ENTRYPOINTS.items():
        d = deployed.deployment(flow)
        assert (d["entrypoint"], d["work_pool_name"]) == (entrypoint, POOL), flow
        # Flow runs start in the checkout that was deployed, resolved when it was deployed.
        assert d["pull_steps"] == [{"prefect.deployments.steps.set_working_directory":
                                    {"directory": str(deployed.root)}}], flow


def test_retrain_is_scheduled_on_params_flow_cron_in_utc_one_run_at_a_time(deployed: Deployed) -> None:
    cron = tiny_params(deployed.root)["flow"]["cron"]
    retrain = deployed.deployment("blockdrop-retrain")
    assert [(s["schedule"]["cron"], s["schedule"]["timezone"], s["active"]) for s in retrain["schedules"]] == [
        (cron, "UTC", True)]
    assert retrain["global_concurrency_limit"]["limit"] == 1
    assert retrain["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    for flow in ("blockdrop-pipeline", "blockdrop-sweep"):  # on demand, no limit of their own
        d = deployed.deployment(flow)
        assert d["schedules"] == [] and d["global_concurrency_limit"] is None, flow
    # Written once: the project's prefect.yaml holds no cron of its own, neither the default's nor this one.
    spec = (REPO / "prefect.yaml").read_text()
    assert yaml.safe_load((REPO / "params.yaml").read_text())["flow"]["cron"] not in spec and CRON not in spec


def test_a_worker_runs_a_pipeline_flow_run_in_the_project_and_exits(deployed: Deployed) -> None:
    pipeline = deployed.deployment("blockdrop-pipeline")
    flow_run = api(deployed.api, f"/deployments/{pipeline['id']}/create_flow_run", {})
    proc = run(pool_cmd("worker", "--run-once", "--limit", "1"), deployed.root, deployed.env, timeout=300)
    state = api(deployed.api, f"/flow_runs/{flow_run['id']}")["state"]
    assert state["type"] == "COMPLETED", f"{state}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"

    stages = list(yaml.safe_load((deployed.root / "dvc.yaml").read_text())["stages"])
    raw = [str(p.relative_to(deployed.root)) for p in (deployed.root / "data" / "raw").glob("*.dvc")]
    tasks = api(deployed.api, "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run["id"]]}}})
    assert raw and sorted(t["name"] for t in tasks) == sorted(stages + raw)  # a task per DVC stage and data source
    assert {t["state"]["type"] for t in tasks} == {"COMPLETED"}

    # The flow ran in the copy (the pull step): its parent MLflow run is in the copy's store, and DVC there found
    # every stage up to date but the report, which prints the cron changed above.
    client = MlflowClient(f"sqlite:///{deployed.root / 'mlflow.db'}")
    (parent,) = client.search_runs([client.get_experiment_by_name("blockdrop").experiment_id],
                                   "attributes.run_name = 'blockdrop-pipeline'")
    assert parent.info.status == "FINISHED"
    expected = {**dict.fromkeys(stages, "skipped"), "report": "ran"}
    assert {s: parent.data.tags.get(f"stage.{s}") for s in stages} == expected
