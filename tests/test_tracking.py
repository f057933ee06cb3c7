"""blockdrop.tracking against a throw-away SQLite store (no server, no training)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from blockdrop import lineage, tracking
from blockdrop.config import Params, params_sha256
from blockdrop.tracking import runs
from blockdrop.tracking import store as store_module

DVC_YAML = {
    "stages": {
        "pretrain": {
            "cmd": "python -m pipelines.pretrain",
            "deps": ["data/prepared"],
            "params": ["seed", "model", "pretrain.epochs", {"params.yaml": ["pretrain.lr"]}],
            "outs": ["models/backbone.pt"],
        },
        "finetune": {"cmd": "true", "deps": ["models/backbone.pt"], "params": ["finetune.penalty"],
                     "outs": ["models/blockdrop.pt"]},
        "evaluate": {"cmd": "true", "deps": ["models/blockdrop.pt", "data/prepared"],
                     "params": ["evaluate.batch_size"]},
        "bare": {"cmd": "true"},
    }
}


@pytest.fixture(scope="session")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Creating an MLflow database runs its migrations (seconds); do it once and copy it per test.
    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def store(tmp_path: Path, template_db: Path, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    """A fresh store in tmp_path, cwd = a project folder with a small dvc.yaml, clean environment."""
    for var in (tracking.PARENT_ENV, "DVC_EXP_NAME", "DVC_ROOT"):
        monkeypatch.delenv(var, raising=False)
    shutil.copy(template_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("BLOCKDROP_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML))
    return MlflowClient(uri)


def _write(path: str, text: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


def test_stage_run_logs_params_tags_metrics_artifacts(store: MlflowClient, monkeypatch) -> None:
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-lamb")
    params = Params()
    _write("reports/pretrain/metrics.json", '{"test": {"accuracy": 0.9}}')
    _write("reports/pretrain/history.csv", "epoch,loss\n0,1.0\n")
    _write("models/backbone.pt", "weights")
    with tracking.stage_run("pretrain", params, data_sha256="abc") as run:
        for epoch in range(3):
            run.log_epoch({"train/loss": 1.0 / (epoch + 1), "val/accuracy": 0.5}, step=epoch)
        run.log_metrics({"test": {"accuracy": 0.9, "classes": ["a", "b"]}, "train": {"epochs": 3}})
        run.log_artifacts(["reports/pretrain/history.csv", "reports/pretrain/metrics.json"])
        tags = run.tag_outputs(["models/backbone.pt"])

    got = store.get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "pretrain"
    assert store.get_experiment(got.info.experiment_id).name == "blockdrop"
    # Exactly the stage's dvc.yaml keys, sections expanded to their leaves, values as strings.
    assert got.data.params == {"seed": "0", "model.depth": "32", "model.weights": "", "model.policy_weights": "",
                               "model.policy_pool": "0", "pretrain.epochs": "5", "pretrain.lr": "0.2"}
    keys = ["seed", "model", "pretrain.epochs", "pretrain.lr"]
    assert got.data.tags["params_sha256"] == params_sha256(params, keys)
    assert got.data.tags["stage"] == "pretrain"
    assert got.data.tags["data_sha256"] == "abc"
    assert got.data.tags["dvc_exp"] == "brisk-lamb"
    assert got.data.tags["git_commit"]  # a hash, or "unknown" outside git
    assert "mlflow.parentRunId" not in got.data.tags
    md5 = hashlib.md5(b"weights").hexdigest()
    assert tags == {"dvc_md5:models/backbone.pt": md5} and got.data.tags["dvc_md5:models/backbone.pt"] == md5

    history = store.get_metric_history(run.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    assert got.data.metrics["test/accuracy"] == 0.9 and got.data.metrics["train/epochs"] == 3
    assert "test/classes" not in got.data.metrics
    # What tracking cost the stage, importing mlflow included: a share of the process's life so far.
    m = got.data.metrics
    assert 0 < m["tracking/import_seconds"] <= m["tracking/seconds"] < m["tracking/process_seconds"]
    assert m["tracking/share"] == pytest.approx(m["tracking/seconds"] / m["tracking/process_seconds"])
    listed = {a.path for a in store.list_artifacts(run.run_id, "reports/pretrain")}
    assert listed == {"reports/pretrain/history.csv", "reports/pretrain/metrics.json"}


def test_a_stage_run_carries_the_params_of_every_stage_upstream(store: MlflowClient) -> None:
    # The run holding a setting's results (evaluate) must carry what decided them, upstream keys included:
    # one MLflow row per setting, penalty beside accuracy.
    params = Params(finetune={"penalty": 7.5})
    with tracking.stage_run("evaluate", params) as run:
        pass
    got = store.get_run(run.run_id).data
    assert got.params["finetune.penalty"] == "7.5" and got.params["pretrain.epochs"] == "5"
    assert got.params["evaluate.batch_size"] == "500" and got.params["seed"] == "0"
    assert "data.source" not in got.params  # no stage upstream reads it here
    assert set(got.tags["params_from"].split(",")) == {"pretrain", "finetune", "evaluate"}
    keys = ["seed", "model", "pretrain.epochs", "pretrain.lr", "finetune.penalty", "evaluate.batch_size"]
    assert got.tags["params_sha256"] == params_sha256(params, keys)


def test_a_stage_run_logs_the_prepared_splits_it_reads_as_its_dataset(store: MlflowClient, tmp_path: Path) -> None:
    _write("data/prepared/meta.json", '{"source": "fashion-mnist"}')
    _write("data/prepared/train.pt", "tensors")
    runs = {}
    for stage in ("pretrain", "evaluate", "bare"):  # bare lists no deps: it reads no data
        with tracking.stage_run(stage, Params()) as run:
            pass
        runs[stage] = store.get_run(run.run_id).inputs.dataset_inputs
    listing = [{"md5": hashlib.md5(b'{"source": "fashion-mnist"}').hexdigest(), "relpath": "meta.json"},
               {"md5": hashlib.md5(b"tensors").hexdigest(), "relpath": "train.pt"}]
    md5 = hashlib.md5(json.dumps(listing, sort_keys=True).encode()).hexdigest() + ".dir"  # DVC 3's folder md5
    for stage, context in (("pretrain", "training"), ("evaluate", "eval")):
        (logged,) = runs[stage]
        assert (logged.dataset.name, logged.dataset.digest) == ("fashion-mnist prepared", md5)
        assert {t.key: t.value for t in logged.tags} == {"mlflow.data.context": context}
        assert logged.dataset.source_type == "local"
        assert json.loads(logged.dataset.source) == {"uri": str(tmp_path / "data" / "prepared")}
    assert runs["bare"] == []

    _write("data/prepared/train.pt", "other tensors")  # new data, same name: the digest tells them apart
    with tracking.stage_run("pretrain", Params()) as run:
        pass
    (logged,) = store.get_run(run.run_id).inputs.dataset_inputs
    assert logged.dataset.digest not in (md5, None) and logged.dataset.digest == tracking.dvc_md5("data/prepared")


def test_the_experiment_is_marked_as_model_training(store: MlflowClient) -> None:
    # mlflow.experimentKind is what the UI's experiment-type selector writes; "custom_model_development" is its
    # "Machine learning" (model training) kind, "genai_development" the GenAI one.
    made_before = store.create_experiment("older")  # an experiment from before the tag: marked by the next run
    chosen = store.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    ids = {}
    for name in ("blockdrop", "older", "chosen"):
        with tracking.stage_run("bare", Params(tracking={"experiment": name})) as run:
            pass
        ids[name] = store.get_run(run.run_id).info.experiment_id
    kinds = {name: store.get_experiment(i).tags.get("mlflow.experimentKind") for name, i in ids.items()}
    assert kinds == {"blockdrop": "custom_model_development", "older": "custom_model_development",
                     "chosen": "genai_development"}  # a kind someone chose in the UI is kept
    assert (ids["older"], ids["chosen"]) == (made_before, chosen)


def test_all_params_without_a_stage_entry(store: MlflowClient) -> None:
    params = Params(tracking={"experiment": "other"})
    with tracking.stage_run("missing", params) as run:
        pass
    got = store.get_run(run.run_id)
    assert store.get_experiment(got.info.experiment_id).name == "other"
    assert {"seed", "finetune.penalty", "tracking.experiment", "data.source"} <= set(got.data.params)
    assert got.data.tags["params_sha256"] == params_sha256(params)
    with tracking.stage_run("bare", params) as run:  # in dvc.yaml, without params: logs none
        pass
    assert store.get_run(run.run_id).data.params == {}


def test_nests_under_parent_from_env(store: MlflowClient, monkeypatch) -> None:
    # The flow's parent run lives in another process: here it is created and closed by the client.
    exp = store.create_experiment("blockdrop")
    parent = store.create_run(exp, run_name="flow").info.run_id
    store.set_terminated(parent)
    monkeypatch.setenv(tracking.PARENT_ENV, parent)
    with tracking.stage_run("pretrain", Params()) as run:
        pass
    assert store.get_run(run.run_id).data.tags["mlflow.parentRunId"] == parent


def test_parent_run_sets_env_for_stages(store: MlflowClient) -> None:
    with tracking.parent_run("flow", Params()) as parent:
        assert os.environ[tracking.PARENT_ENV] == parent
        with tracking.stage_run("pretrain", Params()) as run:
            pass
    assert tracking.PARENT_ENV not in os.environ
    assert store.get_run(run.run_id).data.tags["mlflow.parentRunId"] == parent


def test_exception_marks_run_failed(store: MlflowClient) -> None:
    with pytest.raises(RuntimeError, match="boom"), tracking.stage_run("pretrain", Params()) as run:
        raise RuntimeError("boom")
    assert store.get_run(run.run_id).info.status == "FAILED"


def test_unreachable_server_fails_fast(store: MlflowClient, monkeypatch) -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.monotonic()
    with pytest.raises(tracking.TrackingUnavailable, match=uri) as err, tracking.stage_run("x", Params()):
        pytest.fail("the block must not run")
    assert time.monotonic() - start < 10
    assert "\n" not in str(err.value)


def test_a_server_that_goes_away_mid_run_stops_the_stage_with_one_line(store: MlflowClient, monkeypatch) -> None:
    """An epoch's write fails and ``/health`` no longer answers: not a blink, so the stage stops at once with
    TrackingUnavailable naming the URI (not MLflow's traceback), and the run's lease stays behind for the next
    start to mark it KILLED. (tests/test_tracking_server.py does this against a real server.)"""
    from mlflow.exceptions import MlflowException

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        gone = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(runs, "EPOCH_LOG_BACKOFF_S", 0.0)
    start = time.monotonic()
    with pytest.raises(tracking.TrackingUnavailable, match=gone) as err, \
            tracking.stage_run("pretrain", Params()) as run:
        run.uri = gone  # as if the server the run was opened on had just stopped

        def dead(*args, **kwargs):
            raise MlflowException(f"API request to {gone}/api/2.0/mlflow/runs/log-batch failed: refused")

        monkeypatch.setattr(run.client, "log_batch", dead)
        run.log_epoch({"train/loss": 0.5}, step=1)
        pytest.fail("the stage must stop at the epoch whose point cannot be logged")
    assert time.monotonic() - start < 10
    assert "\n" not in str(err.value) and "unreachable" in str(err.value)
    assert Path("checkpoints/pretrain.run.json").exists()

    # A final write (not an epoch's point) that fails the same way stops the stage the same way.
    with pytest.raises(tracking.TrackingUnavailable, match=gone), tracking.stage_run("finetune", Params()) as run:
        run.uri = gone
        monkeypatch.setattr(run.client, "log_batch", dead)
        run.log_metrics({"test": {"accuracy": 0.5}})


def test_stage_param_keys(tmp_path: Path) -> None:
    spec = {
        "stages": {
            "a": {"params": ["data", {"params.yaml": ["x.y"]}, {"other.yaml": ["z"]}]},
            "b": {"params": [{"params.yaml": None}]},
        }
    }
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(spec))
    assert lineage.stage_param_keys("a", tmp_path / "dvc.yaml") == ["data", "x.y"]
    assert lineage.stage_param_keys("b", tmp_path / "dvc.yaml") is None  # whole file
    assert lineage.stage_param_keys("c", tmp_path / "dvc.yaml") is None
    assert lineage.stage_param_keys("a", tmp_path / "absent.yaml") is None


def test_repo_root_and_default_uri(tmp_path: Path, monkeypatch) -> None:
    for var in ("BLOCKDROP_ROOT", "DVC_ROOT", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    root = (tmp_path / "ws").resolve()
    (root / "sub").mkdir(parents=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(root / "sub")
    assert tracking.repo_root() == root  # walks up to dvc.yaml (tmp_path is outside any git repo)
    assert tracking.tracking_uri() == f"sqlite:///{root}/mlflow.db"
    assert store_module.artifact_location(tracking.tracking_uri()) == (root / "mlartifacts").as_uri()

    temp_copy = root / ".dvc" / "tmp" / "exps" / "tmpab12" / "sub"  # `dvc exp run --temp` copy
    temp_copy.mkdir(parents=True)
    (temp_copy.parent / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(temp_copy)
    assert tracking.repo_root() == root

    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert tracking.repo_root() == tmp_path.resolve()
    monkeypatch.setenv("BLOCKDROP_ROOT", str(root))
    assert tracking.repo_root() == root
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example.org")
    assert tracking.tracking_uri() == "http://example.org"


def test_repo_root_from_git_worktree(tmp_path: Path, monkeypatch) -> None:
    for var in ("BLOCKDROP_ROOT", "DVC_ROOT"):
        monkeypatch.delenv(var, raising=False)
    main, worktree = tmp_path / "main", tmp_path / "wt"
    main.mkdir()
    (main / "dvc.yaml").write_text("stages: {}\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q"], cwd=main, check=True)
    subprocess.run([*git, "add", "dvc.yaml"], cwd=main, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=main, check=True)
    subprocess.run([*git, "worktree", "add", "-q", str(worktree)], cwd=main, check=True)
    monkeypatch.chdir(worktree)
    assert tracking.repo_root() == main.resolve()


def test_dvc_md5_matches_dvc(tmp_path: Path) -> None:
    build = pytest.importorskip("dvc_data.hashfile.build").build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("hi\n")
    (tmp_path / "d" / "sub" / "b.bin").write_bytes(b"x\r\ny")  # CRLF: DVC 3 no longer normalises it
    fs = LocalFileSystem()
    odb = HashFileDB(fs, str(tmp_path / "odb"))
    for path in (tmp_path / "d", tmp_path / "d" / "sub" / "b.bin"):
        _, _, obj = build(odb, str(path), fs, "md5")
        assert tracking.dvc_md5(path) == obj.hash_info.value


def test_registry_name() -> None:
    assert tracking.registry_name("fashion-mnist", 32) == "blockdrop-fashion-mnist-resnet32"


def test_log_blockdrop_model(store: MlflowClient, tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    import mlflow.pyfunc
    import pandas as pd

    from blockdrop import serving
    from blockdrop.models import cifar_resnet, policy_resnet8, save_blockdrop

    backbone, policy = cifar_resnet(8, 3, 1).eval(), policy_resnet8(3, 1).eval()
    ckpt = tmp_path / "blockdrop.pt"
    save_blockdrop(backbone, policy, ckpt)
    spec = serving.model_spec("fashion-mnist", ["a", "b", "c"], [1, 28, 28], [0.5], [0.25], backbone, policy)
    example = pd.DataFrame({"image": [np.zeros((28, 28), np.uint8)] * 2})
    with tracking.stage_run("finetune", Params()):
        v1 = tracking.log_blockdrop_model(ckpt, spec, example, "blockdrop-test", description="first")
        v2 = tracking.log_blockdrop_model(ckpt, spec, example, "blockdrop-test", version_tags={"dvc_md5": "x"})
    assert (v1, v2) == (1, 2)
    assert int(store.get_model_version_by_alias("blockdrop-test", "challenger").version) == 2
    assert store.get_model_version("blockdrop-test", "1").description == "first"
    assert store.get_model_version("blockdrop-test", "2").tags["dvc_md5"] == "x"
    tracking.describe_version("blockdrop-test", 1, "second")
    assert store.get_model_version("blockdrop-test", "1").description == "second"
    loaded = mlflow.pyfunc.load_model("models:/blockdrop-test@challenger")
    answer = loaded.predict(pd.DataFrame({"image": [np.full((28, 28), 7, np.uint8)] * 3}))
    assert len(answer) == 3 and set(answer["class_name"]) <= {"a", "b", "c"}
    reqs = Path(mlflow.pyfunc.get_model_dependencies("models:/blockdrop-test/2")).read_text()
    assert f"torch=={version('torch')}" in reqs.split()

