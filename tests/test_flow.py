"""The Prefect flows (orchestration/flows.py, orchestration/stages.py) over real DVC and a throw-away MLflow store.

Fast tests (default suite) run the pipeline flow on a toy DVC project whose stages are small scripts that
log through ``blockdrop.tracking``: DAG order read from DVC, nesting under the parent run, params per
stage, stage output in the Prefect task logs, skipped and restored stages, retries, and no retry for bad
params. The others run the real pipeline on the tiny profile in a copy of the repository: the retrain flow
twice, with a deliberately degraded model registered as the challenger in between.

One Prefect test harness (a temporary API server, 10-20 s to start) serves the whole session.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow import MlflowClient

from blockdrop.config import flatten
from blockdrop.lineage import upstream_param_keys

pytestmark = pytest.mark.e2e  # runs stages, servers or other processes: `make test`, not `make test-fast`

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- set-up


class Project:
    """A DVC project in a temp folder with its own MLflow store; ``enter`` makes it the cwd."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        self.client = MlflowClient(self.uri)

    def enter(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for var in ("BLOCKDROP_PARENT_RUN_ID", "DVC_EXP_NAME", "DVC_ROOT", "BLOCKDROP_ROOT"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", self.uri)
        monkeypatch.chdir(self.root)

    def params(self) -> dict:
        return yaml.safe_load((self.root / "params.yaml").read_text())

    def children(self, parent_run_id: str) -> list:
        runs = self.client.search_runs(self.client.get_experiment_by_name("blockdrop").experiment_id,
                                       f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=100)
        return sorted(runs, key=lambda r: r.info.start_time)

    def expected_params(self, stage: str, params: dict | None = None) -> dict[str, str]:
        """params.yaml (now, or as ``params`` held), flattened, restricted to the keys dvc.yaml lists for
        ``stage`` and every stage upstream of it, as MLflow strings."""
        flat = flatten(params or self.params())
        keys = upstream_param_keys(stage, self.root / "dvc.yaml")  # a stage's run carries its upstream params
        chosen = flat if keys is None else {k: v for k, v in flat.items()
                                            if any(k == p or k.startswith(p + ".") for p in keys)}
        return {k: str(v) for k, v in chosen.items()}


# ------------------------------------------------------------------------------------ toy DVC project

STEP = textwrap.dedent('''
    """A toy stage: count the attempt, maybe misbehave, log one MLflow run, write its out."""
    import os
    import sys
    import time
    from pathlib import Path

    from blockdrop.supervision import watch_supervisor

    stage = sys.argv[1]
    watch_supervisor(stage)  # as blockdrop.stage.start does
    Path("attempts").mkdir(exist_ok=True)
    with open(f"attempts/{stage}", "a") as f:
        f.write("attempt\\n")
    Path(f"attempts/{stage}.pid").write_text(str(os.getpid()))
    behaviour = Path("behaviour") / stage
    mode = behaviour.read_text().strip() if behaviour.exists() else ""
    if mode.startswith("sleep"):
        time.sleep(float(mode.split()[1]))

    from blockdrop import tracking  # after the attempt is counted: importing mlflow takes seconds
    from blockdrop.config import load_params
    if mode == "fail-once":
        behaviour.unlink()
        print(f"error: stage {stage}: a transient failure", file=sys.stderr)
        raise SystemExit(1)
    params = load_params("bad-params.yaml" if mode == "bad-params" else "params.yaml")  # exits 2 if invalid
    print(f"toy stage {stage} runs in {Path.cwd()}")
    with tracking.stage_run(stage, params) as run:
        run.log_metrics({"toy": {"attempts": len(Path(f"attempts/{stage}").read_text().split())}})
    Path("out").mkdir(exist_ok=True)
    Path(f"out/{stage}.txt").write_text(stage + "\\n")
''')

# Listed out of order on purpose: the flow must take the order from DVC's graph, not from the file.
TOY_DVC = {
    "stages": {
        "c": {"cmd": "python step.py c", "deps": ["step.py", "out/b.txt"], "params": ["seed", "evaluate"],
              "outs": ["out/c.txt"]},
        "a": {"cmd": "python step.py a", "deps": ["step.py"], "params": ["seed", "data"], "outs": ["out/a.txt"]},
        "b": {"cmd": "python step.py b", "deps": ["step.py", "out/a.txt"],
              "params": ["pretrain.epochs", {"params.yaml": ["model"]}], "outs": ["out/b.txt"]},
    }
}


def make_toy(root: Path, behaviour: dict[str, str] | None = None, flow: dict | None = None) -> Project:
    root.mkdir(parents=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["flow"] = {**params["flow"], "retries": 1, "retry_delay_s": 0, **(flow or {})}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    bad = {**params, "pretrain": {**params["pretrain"], "epochs": 0}}
    (root / "bad-params.yaml").write_text(yaml.safe_dump(bad, sort_keys=False))
    (root / "dvc.yaml").write_text(yaml.safe_dump(TOY_DVC, sort_keys=False))
    (root / "step.py").write_text(STEP)
    (root / ".gitignore").write_text("attempts/\nbehaviour/\nmlflow.db\nmlartifacts/\n")
    for stage, mode in (behaviour or {}).items():
        (root / "behaviour").mkdir(exist_ok=True)
        (root / "behaviour" / stage).write_text(mode)
    subprocess.run(["git", "-c", "init.defaultBranch=main", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    return Project(root)


def stage_pid(project: Project, stage: str, wait_s: float = 120) -> int:
    """The pid of the toy stage's process (it writes it first thing), waiting for it to start."""
    path = project.root / "attempts" / f"{stage}.pid"
    deadline = time.monotonic() + wait_s
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < deadline, f"stage {stage} never started"
        time.sleep(0.2)
    return int(path.read_text())


def gone_within(pid: int, seconds: float) -> float | None:
    """Seconds until process ``pid`` ended (exited or a zombie), or None if it still runs after ``seconds``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return time.monotonic() - t0
        except psutil.NoSuchProcess:
            return time.monotonic() - t0
        time.sleep(0.1)
    return None


def attempts(project: Project, stage: str) -> int:
    path = project.root / "attempts" / stage
    return len(path.read_text().split()) if path.exists() else 0


@pytest.fixture(scope="module")
def toy_runs(flows, tmp_path_factory, isolated_env):
    """Three runs of the pipeline flow on one toy project: a first run (stage b fails once, then passes on
    its retry), a second with nothing changed, a third after a param only stage c reads changed, and a
    fourth with that param changed back (DVC's run cache holds c's outputs for it)."""
    project = make_toy(tmp_path_factory.mktemp("toy") / "project", behaviour={"b": "fail-once"})
    project.enter(isolated_env)
    first = flows.pipeline_flow()
    first["params"] = project.params()
    second = flows.pipeline_flow()
    params = project.params()
    params["evaluate"]["batch_size"] += 1
    (project.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = flows.pipeline_flow()
    params["evaluate"]["batch_size"] -= 1
    (project.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    fourth = flows.pipeline_flow()
    return project, first, second, third, fourth


def test_dag_order_comes_from_dvc(flow_stages, toy_runs) -> None:
    project, first, *_ = toy_runs
    assert flow_stages.dag_order(project.root) == ["a", "b", "c"]
    assert [s["stage"] for s in first["stages"]] == ["a", "b", "c"]
    assert [s["status"] for s in first["stages"]] == ["ran", "ran", "ran"]


def test_one_nested_run_per_stage_with_its_params(toy_runs) -> None:
    project, first, *_ = toy_runs
    parent = project.client.get_run(first["parent_run_id"])
    assert parent.info.run_name == "blockdrop-pipeline" and parent.info.status == "FINISHED"
    assert {k: v for k, v in parent.data.tags.items() if k.startswith("stage.")} == {
        "stage.a": "ran", "stage.b": "ran", "stage.c": "ran"}
    children = project.children(first["parent_run_id"])
    assert [r.info.run_name for r in children] == ["a", "b", "c"]  # one each, in DAG order
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.params == project.expected_params(run.info.run_name, first["params"]), run.info.run_name
    # both forms of dvc.yaml params (a key, a section expanded to its leaves), then upstream a's, not downstream c's
    b = set(children[1].data.params)
    assert b >= {"pretrain.epochs", "model.depth", "model.weights", "model.policy_weights", "seed", "data.source"}
    assert not any(k.startswith(("evaluate.", "finetune.")) for k in b)


def test_stage_output_reaches_the_task_log_in_prefect(flows, toy_runs) -> None:
    from prefect import get_client
    from prefect.logging.handlers import APILogHandler

    project, *_ = toy_runs
    APILogHandler().flush()  # logs reach the API in batches
    with get_client(sync_client=True) as client:
        logs: list = []
        while batch := client.read_logs(limit=200, offset=len(logs)):
            logs += batch
        printed = {client.read_task_run(log.task_run_id).name: log.message for log in logs
                   if log.task_run_id and str(project.root) in log.message}
    assert printed == {s: f"{s} | toy stage {s} runs in {project.root}" for s in "abc"}


def test_transient_failure_is_retried(toy_runs) -> None:
    project, first, *_ = toy_runs
    assert attempts(project, "a") == 1
    assert attempts(project, "b") == 2  # failed once (exit 1), passed on the retry
    children = project.children(first["parent_run_id"])
    assert [r.info.run_name for r in children].count("b") == 1  # the failed attempt never reached MLflow


def test_up_to_date_stages_are_recorded_as_skipped(toy_runs) -> None:
    project, _, second, third, _ = toy_runs
    assert [s["status"] for s in second["stages"]] == ["skipped", "skipped", "skipped"]
    assert [s["status"] for s in third["stages"]] == ["skipped", "skipped", "ran"]
    for result, ran in ((second, []), (third, ["c"])):
        parent = project.client.get_run(result["parent_run_id"])
        tags = {k: v for k, v in parent.data.tags.items() if k.startswith("stage.")}
        assert tags == {f"stage.{s}": "ran" if s in ran else "skipped" for s in "abc"}
        assert parent.data.metrics["flow/stages_skipped"] == 3 - len(ran)
        assert parent.data.metrics["flow/stages_ran"] == len(ran)
        assert [r.info.run_name for r in project.children(result["parent_run_id"])] == ran
        summary = json.loads(Path(project.client.download_artifacts(parent.info.run_id, "flow/stages.json"))
                             .read_text())
        assert [s["status"] for s in summary["stages"]] == [s["status"] for s in result["stages"]]
    assert attempts(project, "c") == 2 and attempts(project, "a") == 1


def test_stages_restored_from_the_run_cache_are_recorded_as_restored(toy_runs) -> None:
    project, *_, fourth = toy_runs
    assert [s["status"] for s in fourth["stages"]] == ["skipped", "skipped", "restored"]
    assert attempts(project, "c") == 2  # not run again: DVC checked out the outputs of its first run
    assert (project.root / "out/c.txt").read_text() == "c\n"
    assert project.client.get_run(fourth["parent_run_id"]).data.tags["stage.c"] == "restored"


def test_bad_params_fail_without_retry(flows, flow_stages, tmp_path, monkeypatch) -> None:
    project = make_toy(tmp_path / "project", behaviour={"a": "bad-params"}, flow={"retries": 2})
    project.enter(monkeypatch)
    with pytest.raises(flow_stages.BadParamsError, match=r"stage a failed \(exit 2\).*pretrain\.epochs"):
        flows.pipeline_flow()
    assert attempts(project, "a") == 1  # exit 2 is not retried, though flow.retries is 2
    assert attempts(project, "b") == 0
    (parent,) = project.client.search_runs([project.client.get_experiment_by_name("blockdrop").experiment_id],
                                           "attributes.run_name = 'blockdrop-pipeline'")
    assert parent.info.status == "FAILED"
    assert parent.data.tags["stage.a"] == "failed"


# ------------------------------------------------------------------------------- supervision, one flow only


def test_stage_past_its_timeout_is_killed_and_not_retried(flows, flow_stages, tmp_path, monkeypatch) -> None:
    project = make_toy(tmp_path / "project", behaviour={"a": "sleep 300"}, flow={"retries": 2, "task_timeout_s": 8})
    project.enter(monkeypatch)
    t0 = time.monotonic()
    with pytest.raises(flow_stages.StageTimeoutError,
                       match=r"stage a timed out after 8 s \(flow\.task_timeout_s\): its processes were killed"):
        flows.pipeline_flow()
    assert time.monotonic() - t0 < 60  # the 300 s stage was stopped at its 8 s timeout, not waited for
    assert attempts(project, "a") == 1 and attempts(project, "b") == 0  # not retried, though flow.retries is 2
    assert gone_within(stage_pid(project, "a"), 5) is not None


def test_dvc_lock_held_elsewhere_fails_the_flow_as_busy_without_retry(flows, flow_stages, tmp_path,
                                                                      monkeypatch) -> None:
    project = make_toy(tmp_path / "project", flow={"retries": 2})
    project.enter(monkeypatch)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from dvc.repo import Repo; "
                               "r = Repo('.'); r.lock.lock(); print('held', flush=True); time.sleep(120)"],
                              cwd=project.root, stdout=subprocess.PIPE, text=True)  # as a `dvc repro` would
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(flow_stages.PipelineBusyError, match="pipeline busy: stage a: DVC's lock is held"):
            flows.pipeline_flow()
    finally:
        holder.kill()
        holder.wait()
    assert attempts(project, "a") == 0  # refused before the stage ran, and not retried


def test_second_flow_fails_busy_and_a_killed_flow_stops_its_stage(flows, tmp_path) -> None:
    from prefect.settings import PREFECT_API_URL

    project = make_toy(tmp_path / "project", behaviour={"a": "sleep 300"})
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "MLFLOW_TRACKING_URI": project.uri}
    for var in ("BLOCKDROP_PARENT_RUN_ID", "DVC_EXP_NAME", "DVC_ROOT", "BLOCKDROP_ROOT"):
        env.pop(var, None)
    command = [sys.executable, "-m", "orchestration", "run"]
    first = subprocess.Popen(command, cwd=project.root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid = None
    try:
        pid = stage_pid(project, "a")  # the first flow is running stage a
        t0 = time.monotonic()
        second = subprocess.run(command, cwd=project.root, env=env, capture_output=True, text=True, timeout=120)
        assert time.monotonic() - t0 < 30  # at once: no waiting, no retries
        assert second.returncode == 1, second.stderr
        errors = [ln for ln in second.stderr.splitlines() if ln.startswith("error:")]
        assert errors == [f"error: pipeline busy: another flow (pid {first.pid}) is running in {project.root} "
                          "(it holds .dvc/tmp/blockdrop-flow.lock); try again when it has finished"], second.stderr
        assert "Traceback" not in second.stderr
        assert attempts(project, "a") == 1
        first.kill()  # SIGKILL: the flow cannot clean anything up
        first.wait()
        seconds = gone_within(pid, 10)
        assert seconds is not None, "the stage ran on after its flow was killed"
    finally:
        if first.poll() is None:
            first.kill()
        if pid is not None:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()


# ------------------------------------------------------------------------------------------ bad input


@pytest.fixture(scope="module")
def tiny_prepared(tmp_path_factory) -> Path:
    """A tiny copy of the repository with data/prepared written in-process (no stage run needed)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from tinyrepo import make_tiny_repo

    from blockdrop.data import load_source, split_train_val, write_prepared

    root = make_tiny_repo(tmp_path_factory.mktemp("bad-input") / "repo")
    p = yaml.safe_load((root / "params.yaml").read_text())
    raw = load_source("fashion-mnist", root / p["data"]["raw"], verify_checksums=False)  # fake idx files
    splits = split_train_val(raw, p["data"]["val_size"], p["seed"], p["data"]["train_limit"], p["data"]["test_limit"])
    write_prepared(splits, raw, "fashion-mnist", root / "data" / "prepared")
    return root


def _stage(root: Path, stage: str, uri: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    env.pop("BLOCKDROP_PARENT_RUN_ID", None)
    return subprocess.run([sys.executable, "-m", f"pipelines.{stage}"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)


def test_unreachable_tracking_server_fails_the_stage_naming_the_uri(tiny_prepared: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free a moment ago: nothing listens there
    uri = f"http://127.0.0.1:{port}"
    proc = _stage(tiny_prepared, "prepare", uri)
    assert proc.returncode == 1, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and uri in errors[0] and "unreachable" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_corrupted_or_missing_checkpoint_names_the_file(tiny_prepared: Path) -> None:
    models = tiny_prepared / "models"
    models.mkdir(exist_ok=True)
    (models / "backbone.pt").write_bytes(b"not a checkpoint")
    uri = f"sqlite:///{tiny_prepared / 'mlflow.db'}"
    proc = _stage(tiny_prepared, "curriculum", uri)
    assert proc.returncode == 1, proc.stderr
    (error,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert "models/backbone.pt" in error and "corrupted" in error and "Traceback" not in proc.stderr
    (models / "backbone.pt").unlink()
    proc = _stage(tiny_prepared, "curriculum", uri)
    assert proc.returncode == 1 and "models/backbone.pt is missing" in proc.stderr, proc.stderr


# ------------------------------------------------------------------- the real pipeline, tiny profile


@pytest.fixture(scope="module")
def retrain_runs(flows, tmp_path_factory, isolated_env):
    """The retrain flow three times on the tiny profile. Between the first two, a deliberately degraded copy
    of the champion (its classifier always answers class 0) is registered the way a ``dvc exp run`` elsewhere
    would (checkpoint artifact, ``dvc_md5`` tag, alias ``challenger``) and made the champion, and one evaluate
    param changes: the second run skips prepare..finetune, re-evaluates, must pick the version dvc.lock names
    (not the alias ``challenger``) and promote it over the worse champion. The third, with nothing changed,
    finds that version already the champion."""
    sys.path.insert(0, str(Path(__file__).parent))
    import numpy as np
    import pandas as pd
    import torch
    from tinyrepo import SHRUNK_TINY, make_tiny_repo, merge

    from blockdrop import serving, tracking
    from blockdrop.config import load_params
    from blockdrop.data import load_meta
    from blockdrop.models import save_blockdrop
    from blockdrop.promotion import load_version

    # One epoch per training stage (SHRUNK_TINY): the model only has to beat a constant answer.
    root = make_tiny_repo(tmp_path_factory.mktemp("tiny") / "repo",
                          overrides=merge(SHRUNK_TINY, {"flow": {"retries": 0}}))
    project = Project(root)
    project.enter(isolated_env)
    first = flows.retrain_flow()
    first["params"] = project.params()

    params = load_params(root / "params.yaml", exit_on_error=False)
    name = tracking.registry_name(params.data.source, params.model.depth)
    degraded = load_version(name, 1, root)  # weights only, md5-checked: what promotion itself loads
    with torch.no_grad():
        degraded.backbone.fc.weight.zero_()
        degraded.backbone.fc.bias.copy_(torch.eye(degraded.backbone.fc.out_features)[0])
    meta = load_meta(root / "data/prepared")
    spec = serving.model_spec(meta.source, meta.classes, meta.shape, meta.mean, meta.std, degraded.backbone,
                              degraded.policy_net)
    example = pd.DataFrame({"image": [np.zeros((28, 28), np.uint8)]})
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "blockdrop.pt"  # not the workspace's DVC out
    save_blockdrop(degraded.backbone, degraded.policy_net, elsewhere)
    with tracking.stage_run("inject-degraded-challenger", params) as run:
        run.client.log_artifact(run.run_id, str(elsewhere), "models")
        injected = tracking.log_blockdrop_model(elsewhere, spec, example, name,
                                                version_tags={"dvc_md5": tracking.dvc_md5(elsewhere)})
    tracking.set_alias(name, "champion", injected)

    raw = project.params()
    raw["evaluate"]["latency_images"] += 1
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    second = flows.retrain_flow()
    third = flows.retrain_flow()
    return project, name, first, injected, second, third


def test_retrain_promotes_the_dvc_lock_version_over_a_worse_champion(retrain_runs) -> None:
    from blockdrop.promotion import locked_md5

    project, name, first, injected, second, third = retrain_runs
    client = project.client
    assert first["decision"]["promote"] and first["champion_version_before"] is None
    assert first["challenger_version"] == 1 and injected == 2
    v1 = client.get_model_version(name, "1")
    assert v1.tags["dvc_md5"] == locked_md5(project.root)  # what dvc.lock records for models/blockdrop.pt
    assert set(v1.tags) >= {"dvc_md5", "git_commit", "params_sha256", "test_accuracy", "flops_mean"}
    # The alias `challenger` points at the injected version: the flow ignored it and took dvc.lock's.
    assert second["challenger_version"] == 1 and second["champion_version_before"] == 2
    assert second["decision"]["promote"], second["decision"]
    assert int(client.get_model_version_by_alias(name, "champion").version) == 1
    assert int(client.get_model_version_by_alias(name, "challenger").version) == 2

    chal, champ = second["scores"]["challenger"], second["scores"]["champion"]
    assert chal["accuracy"] > champ["accuracy"] + 0.01, "the tiny model should beat a constant answer"
    assert chal["flops_mean"] == pytest.approx(champ["flops_mean"])  # same policy network: same FLOPs
    assert not third["decision"]["promote"] and "already the champion" in third["decision"]["reason"]

    for result, verdict in ((first, "promoted"), (second, "promoted"), (third, "kept")):
        run = client.get_run(result["parent_run_id"])
        assert run.info.run_name == "blockdrop-retrain" and run.info.status == "FINISHED"
        assert run.data.tags["promotion"] == verdict
        logged = json.loads(Path(client.download_artifacts(run.info.run_id, "promotion/decision.json")).read_text())
        assert logged["decision"]["promote"] == (verdict == "promoted")
        assert run.data.metrics["challenger/accuracy"] == pytest.approx(result["scores"]["challenger"]["accuracy"])
    run = client.get_run(second["parent_run_id"])
    assert run.data.metrics["champion/accuracy"] == pytest.approx(champ["accuracy"])
    assert run.data.params["challenger/version"] == "1" and run.data.params["champion/version"] == "2"
    # The evaluate stage's own number for the model it evaluated is the challenger score, and its version tag.
    metrics = json.loads((project.root / "reports/evaluate/metrics.json").read_text())
    assert first["scores"]["challenger"]["accuracy"] == pytest.approx(metrics["blockdrop"]["accuracy"])
    assert float(client.get_model_version(name, "1").tags["test_accuracy"]) == pytest.approx(
        metrics["blockdrop"]["accuracy"])


def test_real_pipeline_stage_runs_nested_with_params_yaml_values(flow_stages, retrain_runs) -> None:
    project, _, first, *_ = retrain_runs
    stages = [s for s in flow_stages.dag_order(project.root) if not s.endswith(".dvc")]  # the raw data: no run
    assert flow_stages.dag_order(project.root)[0] == "data/raw/fashion-mnist.dvc"
    pipeline_run = first["pipeline"]["parent_run_id"]
    assert project.client.get_run(pipeline_run).data.tags["mlflow.parentRunId"] == first["parent_run_id"]
    children = project.children(pipeline_run)
    assert [r.info.run_name for r in children] == stages
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.params == project.expected_params(run.info.run_name, first["params"]), run.info.run_name



def test_real_pipeline_up_to_date_stages_recorded_as_skipped(flow_stages, retrain_runs) -> None:
    project, _, _, _, second, _ = retrain_runs
    stages = flow_stages.dag_order(project.root)  # the raw data's .dvc first: verified, so "skipped" as well
    status = {s["stage"]: s["status"] for s in second["pipeline"]["stages"]}
    upstream = stages[: stages.index("evaluate")]
    assert all(status[s] == "skipped" for s in upstream), status
    assert status["evaluate"] == "ran"
    tags = project.client.get_run(second["pipeline"]["parent_run_id"]).data.tags
    assert all(tags[f"stage.{s}"] == status[s] for s in stages)
    ran = [r.info.run_name for r in project.children(second["pipeline"]["parent_run_id"])]
    assert ran == [s for s in stages if status[s] == "ran"]
