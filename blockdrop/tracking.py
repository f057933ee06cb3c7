"""MLflow, in one place: one run per DVC stage, named and tagged the same way everywhere.

A stage does::

    with tracking.stage_run("pretrain", params, data_sha256=meta.data_sha256) as run:
        run.log_epoch({"train/loss": loss}, step=epoch)
        run.log_metrics({"test": {"accuracy": 0.9}})      # -> "test/accuracy"
        run.log_artifacts(["reports/pretrain/metrics.json"])
        run.tag_outputs(["models/backbone.pt"])           # tag "dvc_md5:models/backbone.pt"

The run logs exactly the params the stage lists in ``dvc.yaml`` (dotted names, as in params.yaml), so
``dvc exp show`` and the MLflow comparison view have the same columns. This is the only module that
imports mlflow: the library stays usable without a tracking server.
"""

from __future__ import annotations

import functools
import json
import logging
import numbers
import os
import re
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from contextlib import closing, contextmanager, suppress
from importlib.metadata import version
from pathlib import Path
from typing import Any

# Set before mlflow is imported: it reads some of these at import time. setdefault, so the user's
# environment still wins. MLflow's HTTP defaults (7 retries, 120 s timeout each, exponential back-off)
# turn a server that dies mid-run into a ~20 minute hang; these bound it to about a minute and a half.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

_t_import = time.perf_counter()
import mlflow  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

_IMPORT_S = time.perf_counter() - _t_import

from blockdrop.config import Params, params_sha256, select_params  # noqa: E402
from blockdrop.files import atomic_write_text  # noqa: E402
from blockdrop.lineage import dvc_md5, stage_deps, upstream_param_keys, upstream_stages  # noqa: E402  (dvc_md5 public)

__all__ = [
    "PARENT_ENV",
    "SWEEP_ENV",
    "TIMES_ENV",
    "StageRun",
    "TrackingUnavailable",
    "describe_version",
    "download_run_file",
    "dvc_md5",
    "find_version",
    "get_alias_version",
    "latest_stage_runs",
    "latest_version",
    "load_registered_model",
    "log_blockdrop_model",
    "open_run",
    "parent_run",
    "registry_name",
    "repo_root",
    "set_alias",
    "set_version_tags",
    "stage_run",
    "tracking_uri",
    "ui_address",
    "ui_links",
    "version_info",
]

PARENT_ENV = "BLOCKDROP_PARENT_RUN_ID"  # set by the Prefect flow; every stage run nests under it
SWEEP_ENV = "BLOCKDROP_SWEEP"  # set by the sweep flow: the stage runs of its experiments are tagged `sweep`
UI = "http://127.0.0.1:5000"  # `make ui`
TIMES_ENV = "BLOCKDROP_TRACKING_TIMES"  # a JSON-lines file: each stage appends the time its tracking took
REACH_TIMEOUT_S = 3.0
EPOCH_LOG_ATTEMPTS, EPOCH_LOG_BACKOFF_S = 4, 0.5  # 0.5 + 1 + 2 s of waiting before an epoch's point is dropped
# The experiment's type, as the UI's type selector writes it ("Machine learning"; the other is "genai_development").
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# mlflow 3.17's UI opens every experiment as a GenAI one (traces, token usage) unless the address asks otherwise.
UI_VIEW = "workflowType=machine_learning"
PREPARED = "data/prepared"  # the prepared splits, a DVC out: logged as the dataset input of each stage reading it
TRAINING_STAGES = frozenset({"pretrain", "curriculum", "finetune"})  # their dataset context is "training"
_log = logging.getLogger("blockdrop.tracking")


class _Clock:
    """Seconds this process spent in tracking calls (bench/overhead.py reads them via $BLOCKDROP_TRACKING_TIMES)."""

    def __init__(self) -> None:
        self.total, self.log_model = _IMPORT_S, 0.0

    @contextmanager
    def __call__(self, model: bool = False) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.total += dt
            if model:
                self.log_model += dt


_clock = _Clock()


def _timed(method):
    def wrapper(*args, **kwargs):
        with _clock():
            return method(*args, **kwargs)

    wrapper.__name__, wrapper.__doc__, wrapper.__wrapped__ = method.__name__, method.__doc__, method
    return wrapper


def _process_seconds() -> float | None:
    """How long this process has lived (the stage's whole cost, imports included)."""
    try:
        import psutil  # an mlflow dependency

        return time.time() - psutil.Process().create_time()
    except Exception:
        return None


def _record_times(stage: str, block_s: float) -> None:
    path = os.environ.get(TIMES_ENV)
    if not path:
        return
    row = {"stage": stage, "tracking_s": _clock.total, "import_s": _IMPORT_S, "log_model_s": _clock.log_model,
           "run_block_s": block_s, "process_s": _process_seconds()}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


class TrackingUnavailable(RuntimeError):
    """The tracking server does not answer; the message is one line naming its URI."""


# ---------------------------------------------------------------------------------------------- where


def _git(*args: str, cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _find_up(start: Path, name: str) -> Path | None:
    """The nearest folder at or above ``start`` that holds ``name``."""
    for folder in (start, *start.parents):
        if (folder / name).exists():
            return folder
    return None


def repo_root() -> Path:
    """The workspace that owns ``mlflow.db``, the same for ``dvc repro`` and for ``dvc exp run``.

    ``dvc exp run --temp`` and queued experiments run in a copy under ``<root>/.dvc/tmp/exps/``, and git
    worktrees are copies too; runs from any copy must land in the one database of the real workspace.
    """
    for var in ("BLOCKDROP_ROOT", "DVC_ROOT"):  # DVC sets DVC_ROOT to the workspace, even for temp copies
        if os.environ.get(var):
            return Path(os.environ[var]).resolve()
    cwd = Path.cwd().resolve()
    parts = cwd.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    project = _find_up(cwd, "dvc.yaml") or cwd
    git = _git("rev-parse", "--path-format=absolute", "--git-common-dir", "--show-toplevel", cwd=project)
    if git and len(git.splitlines()) == 2:
        common, top = map(Path, git.splitlines())
        # In a worktree the common dir is the main checkout's .git; in a submodule it is not named .git.
        main = common.parent if common.name == ".git" else top
        if project.is_relative_to(top):
            return main / project.relative_to(top)
    return project


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite file in the repo root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store go next to the database (not in ``./mlruns`` of a temp copy)."""
    if not uri.startswith("sqlite:///"):
        return None  # a server chooses its own artifact store
    db = Path(uri.removeprefix("sqlite:///")).resolve()
    return (db.parent / "mlartifacts").as_uri()


def _unreachable(uri: str, timeout: float = REACH_TIMEOUT_S) -> TrackingUnavailable | None:
    """The error to raise if the tracking server at ``uri`` does not answer (None: it does, or it is no server)."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # it answered (401, 404 behind a proxy...): reachable
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, ssl.SSLError):
            return None  # it answered; MLFLOW_TRACKING_INSECURE_TLS may let mlflow accept the certificate
        return TrackingUnavailable(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it or set MLFLOW_TRACKING_URI")
    return None


def _check_reachable(uri: str, timeout: float = REACH_TIMEOUT_S) -> None:
    """Fail in seconds, with one clear line, instead of after MLflow's retries."""
    if error := _unreachable(uri, timeout):
        raise error from None


def _server_errors() -> tuple[type[BaseException], ...]:
    """What a call to a tracking server raises when the server is gone: MLflow wraps connection errors in
    MlflowException; an artifact upload through the server's proxy can raise requests' own errors."""
    from requests.exceptions import RequestException  # an mlflow dependency, imported with it

    return MlflowException, RequestException


@contextmanager
def _no_http_retries() -> Iterator[None]:
    """MLflow's HTTP calls without their retries (read from the environment at each call): for the last call
    to a server already known to be gone, which would otherwise wait through its back-off for nothing."""
    previous = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
        else:
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = previous


def _experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    """The experiment ``name``, created if missing, marked as a model-training one (not GenAI)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_location(uri),
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:
            # Two stages racing to create it: the loser reads the winner's.
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if EXPERIMENT_KIND_TAG not in exp.tags:  # made before the tag existed; a kind chosen in the UI is kept
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


_PREPARED: set[str] = set()  # SQLite stores this process has already made safe for parallel writers


def _prepare_store(uri: str) -> None:
    """Make a SQLite store safe for several processes (``dvc queue start -j 2``, a flow beside ``dvc exp``).

    Two processes opening a new database both run MLflow's schema migration and one fails; so the schema is
    created (or checked) under an exclusive ``flock`` on ``<db>.lock``. Then the database is switched to WAL
    journal mode, a property stored in the file itself: readers no longer block the writer, and MLflow's own
    per-session ``busy_timeout`` (20 s) covers the short waits left between writers. Once per process.
    """
    if not uri.startswith("sqlite:///") or uri in _PREPARED:
        return
    import fcntl
    import sqlite3

    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when this process dies
        with closing(sqlite3.connect(db, timeout=60)) as conn:
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)  # builds the tracking store: creates or migrates the schema
        client.search_registered_models(max_results=1)  # and the registry's, on the same file
    _PREPARED.add(uri)


def _connect(params: Params) -> tuple[MlflowClient, str]:
    uri = tracking_uri()
    _check_reachable(uri)
    _prepare_store(uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    return client, _experiment_id(client, params.tracking.experiment, uri)


# --------------------------------------------------------------------------------------------- params


def _dvc_yaml() -> Path:
    """The dvc.yaml of the code being run (a temp copy may differ from the workspace), else the root's."""
    return (_find_up(Path.cwd(), "dvc.yaml") or repo_root()) / "dvc.yaml"


def _stage_params(stage: str, params: Params) -> tuple[dict[str, Any], list[str] | None, list[str]]:
    """The params that decided the stage's result: its own dvc.yaml keys and those of every stage upstream of
    it (evaluate's run carries finetune.penalty, pretrain.epochs, seed...), so one MLflow row holds a setting
    and its numbers; also those keys, and the upstream stages' names."""
    dvc_yaml = _dvc_yaml()
    keys = upstream_param_keys(stage, dvc_yaml)
    return select_params(params, keys), keys, upstream_stages(stage, dvc_yaml)


# ------------------------------------------------------------------------------------------------ run


def _metric_items(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """``{"test": {"accuracy": .9}}`` -> ``("test/accuracy", .9)``; non-numbers (lists, strings) skipped."""
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _metric_items(value, f"{prefix}{key}/")
        elif isinstance(value, numbers.Real):
            yield f"{prefix}{key}", float(value)


class StageRun:
    """The handle a stage logs through; every call names the run explicitly (no global state)."""

    def __init__(self, client: MlflowClient, run_id: str, previous_run_id: str | None = None):
        self.client, self.run_id, self.uri = client, run_id, tracking_uri()
        self.previous_run_id = previous_run_id  # the stage's last run in this folder, if it did not finish

    @_timed
    def mark_resumed(self, epoch: int) -> None:
        """Record that this run continues from the resume state saved after ``epoch`` epochs (and by which run:
        the stage's previous run in this folder, killed or failed, whose lease was left behind)."""
        tags = {"resumed": "true", "resumed_from_epoch": str(epoch)}
        if self.previous_run_id:
            tags["resumed_from_run"] = self.previous_run_id
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    @_timed
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log (nested) metrics; nested keys are joined with "/"."""
        ts = int(time.time() * 1000)
        batch = [Metric(k, v, ts, step or 0) for k, v in _metric_items(metrics)]
        self.client.log_batch(self.run_id, metrics=batch)

    @_timed
    def log_epoch(self, metrics: Mapping[str, Any], step: int) -> None:
        """One epoch's metrics, with the epoch as the step (so MLflow plots them as curves).

        A curve point is not worth a stage: a write that fails (a locked SQLite store, a server that
        blinks) is retried with back-off, then given up with a warning. A server still unreachable after the
        back-off is gone, not blinking: that raises :class:`TrackingUnavailable` and the stage stops (a rerun
        resumes from the last epoch's saved state) rather than train on with nothing recorded. The final
        metrics are not retried this way: losing those must fail the stage.
        """
        error: Exception | None = None
        for attempt in range(EPOCH_LOG_ATTEMPTS):
            if attempt:
                time.sleep(EPOCH_LOG_BACKOFF_S * 2 ** (attempt - 1))
                if _unreachable(self.uri):
                    continue  # a health check costs nothing; a write to a dead server costs MLflow's retries
            try:
                self.log_metrics(metrics, step=step)
                return
            except MlflowException as e:
                error = e
        if gone := _unreachable(self.uri):
            raise gone from None
        _log.warning("epoch %d metrics not logged to run %s after %d attempts: %s", step, self.run_id,
                     EPOCH_LOG_ATTEMPTS, str(error).splitlines()[0][:200])

    @_timed
    def log_artifacts(self, paths: Iterable[str | Path]) -> None:
        """Upload files or folders, keeping their relative folder (``reports/pretrain/metrics.json``)."""
        for path in map(Path, paths):
            inside = not path.is_absolute() and ".." not in path.parts
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), path.as_posix() if inside else path.name)
            else:
                folder = path.parent.as_posix() if inside and path.parent != Path(".") else None
                self.client.log_artifact(self.run_id, str(path), folder)

    @_timed
    def tag_outputs(self, paths: Iterable[str | Path]) -> dict[str, str]:
        """Tag ``dvc_md5:<path>`` with the md5 DVC will record, linking this run to a ``dvc.lock``."""
        tags = {f"dvc_md5:{Path(p).as_posix()}": dvc_md5(p) for p in paths}
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)
        return tags

    @_timed
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    @_timed
    def log_params(self, params: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    @_timed
    def log_json(self, obj: Any, artifact_file: str) -> None:
        """``obj`` as a JSON artifact at ``artifact_file`` (e.g. ``"flow/stages.json"``)."""
        self.client.log_dict(self.run_id, obj, artifact_file)

    def lineage_tags(self, checkpoint: str | Path) -> dict[str, str]:
        """Tags that tie a registered version to DVC: the md5 DVC records for ``checkpoint``, and this run's
        git commit and params hash."""
        tags = self.client.get_run(self.run_id).data.tags
        return {"dvc_md5": dvc_md5(checkpoint), "git_commit": tags.get("git_commit", "unknown"),
                "params_sha256": tags.get("params_sha256", "unknown"), "run_id": self.run_id}


def open_run(run_id: str) -> StageRun:
    """A handle on an existing run (the flow's parent run, to record what its stages did)."""
    return StageRun(_client(), run_id)


def _base_tags(stage: str) -> dict[str, str]:
    tags = {"stage": stage, "git_commit": _git("rev-parse", "HEAD") or "unknown"}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get(SWEEP_ENV):
        tags["sweep"] = os.environ[SWEEP_ENV]
    return tags


@functools.cache
def _host_tags() -> dict[str, str]:
    """What the numbers were measured on: the CPU model and the torch build (BLAS, oneDNN, OpenMP, CUDA)."""
    import platform

    import torch

    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    except OSError:
        cpu = ""
    onednn = re.search(r"MKL-DNN v([\d.]+)", torch.__config__.show())
    build = {
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "mkl": torch.backends.mkl.is_available(),
        "onednn": (onednn.group(1) if onednn else True) if torch.backends.mkldnn.is_available() else False,
        "openmp": torch.backends.openmp.is_available(),
        "cuda": torch.version.cuda or False,
    }
    return {
        "host.cpu": cpu or platform.processor() or platform.machine() or "unknown",
        "host.cores": str(os.cpu_count()),
        "host.gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "torch.version": torch.__version__,
        "torch.cpu_capability": build["cpu"],
        "torch.build": " ".join(f"{k}={'yes' if v is True else 'no' if v is False else v}" for k, v in build.items()),
    }


def _precision(params: Params) -> str:
    """The precision ``precision: auto`` resolves to where this stage runs (bf16 only where it is native):
    the same params give other numbers in bf16 than in fp32, so the run says which it trained in."""
    from blockdrop.runtime import resolve_precision, select_device

    return resolve_precision(params.precision, select_device(params.device))  # the device the stage picked


def _lease_path(stage: str) -> Path:
    """``checkpoints/<stage>.run.json`` in the stage's own folder (beside its resume state): two DVC
    experiments running the same stage in two temp folders never see each other's lease."""
    return Path("checkpoints") / f"{stage}.run.json"


def _lease_holder_alive(lease: Mapping[str, Any]) -> bool:
    """Whether the process that wrote ``lease`` still runs (same pid and start time: pids are reused).
    A lease from another host cannot be checked and counts as alive: its run is left alone."""
    import psutil  # an mlflow dependency

    if lease.get("host") != socket.gethostname():
        return True
    try:
        proc = psutil.Process(int(lease["pid"]))
        return abs(proc.create_time() - float(lease["started"])) < 1 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.AccessDenied:
        return True  # it exists (another user's): not ours to judge
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False  # no such process (a zombie included), or a lease we cannot read


def _take_over_lease(stage: str, client: MlflowClient) -> str | None:
    """Mark the stage's previous run KILLED if its process died while the run was RUNNING (SIGKILL, power
    loss: nothing in that process could end the run); return that run's id when it did not finish."""
    path = _lease_path(stage)
    try:
        lease = json.loads(path.read_text())
        run_id = str(lease["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if _lease_holder_alive(lease):
        return None
    try:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "KILLED")
            _log.warning("stage %s: its previous run %s died while running (pid %s); marked it KILLED",
                         stage, run_id, lease.get("pid"))
    except MlflowException:
        pass  # deleted, or in another store: nothing to mark
    return run_id


def _write_lease(stage: str, run_id: str) -> None:
    import psutil

    lease = {"run_id": run_id, "pid": os.getpid(), "host": socket.gethostname(),
             "started": psutil.Process().create_time()}
    atomic_write_text(_lease_path(stage), json.dumps(lease) + "\n")


@contextmanager
def stage_run(stage: str, params: Params, data_sha256: str | None = None) -> Iterator[StageRun]:
    """One MLflow run named ``stage``, nested under ``$BLOCKDROP_PARENT_RUN_ID`` when the flow set it.

    While the run is open, a lease ``checkpoints/<stage>.run.json`` names it; one left behind by a killed
    process gets its run marked KILLED by the next start, whose run then knows it as ``previous_run_id`` (see
    :meth:`StageRun.mark_resumed`). An exception inside the block marks the run FAILED and propagates.

    Raises :class:`TrackingUnavailable` before any work if the server is down, and if it goes away during the
    block (a tracking call fails and ``/health`` no longer answers): the run is then left RUNNING on a server
    that cannot be told otherwise, and its lease stays for the next start to mark it KILLED.
    """
    t0 = time.perf_counter()
    with _clock():
        client, experiment_id = _connect(params)
        previous = _take_over_lease(stage, client)
        flat, keys, upstream = _stage_params(stage, params)
        tags = (_base_tags(stage) | _host_tags() | {"precision": _precision(params)}
                | {"params_sha256": params_sha256(params, keys), "params_from": ",".join([*upstream, stage])})
        if data_sha256:
            tags["data_sha256"] = data_sha256
        # mlflow 3 accepts a parent that is not active in this process: it checks the run exists and sets
        # the mlflow.parentRunId tag. nested=True covers the in-process case (a caller's run is active).
        active = mlflow.start_run(
            experiment_id=experiment_id,
            run_name=stage,
            parent_run_id=os.environ.get(PARENT_ENV) or None,
            nested=mlflow.active_run() is not None,
            tags=tags,
            log_system_metrics=True,  # CPU/GPU/memory every 10 s; mlflow logs and swallows monitor errors
        )
        run = StageRun(client, active.info.run_id, previous)
        _write_lease(stage, run.run_id)
        _log_prepared_input(stage, params)
        if flat:
            client.log_batch(run.run_id, params=[Param(k, str(v)) for k, v in flat.items()])
    status, gone = "FAILED", None
    try:
        try:
            yield run
            status = "FINISHED"
        except TrackingUnavailable as error:
            gone = error
            raise
        except _server_errors() as error:
            # One line naming the URI, not MLflow's traceback through urllib3, when the server went away.
            if (gone := _unreachable(run.uri)) is None:
                raise
            raise gone from error
        finally:
            current = mlflow.active_run()
            if current is not None and current.info.run_id == run.run_id:  # the block may have ended it
                if gone is None:
                    with _clock():
                        _log_own_cost(run)
                        mlflow.end_run(status)
                else:  # end it in this process; its one call to the server fails at once
                    with _no_http_retries(), suppress(*_server_errors()):
                        mlflow.end_run(status)
    except _server_errors() as error:  # ending the run: the server went away after the block's last call
        if (gone := _unreachable(run.uri)) is None:
            raise
        raise gone from error
    finally:
        if status == "FINISHED" and gone is None:  # a failed run's lease stays: the rerun that resumes names it
            _lease_path(stage).unlink(missing_ok=True)
        _record_times(stage, time.perf_counter() - t0)


def _log_prepared_input(stage: str, params: Params) -> None:
    """Log the prepared splits as the active run's dataset input, if the stage reads them (a dvc.yaml dep),
    with the md5 DVC records for them as the digest: the runs table's Datasets column names the data a run
    saw. The md5 is of the files as they are now (~0.2 s for 55 MB), not dvc.lock's, which may be stale."""
    folder = Path(PREPARED)  # where the stage reads them: relative to its working folder, as in blockdrop.stage
    if PREPARED not in stage_deps(stage, _dvc_yaml()) or not folder.is_dir():
        return
    from mlflow.data.meta_dataset import MetaDataset  # mlflow.data is imported with mlflow: nothing more to load
    from mlflow.data.sources import LocalArtifactDatasetSource

    source = LocalArtifactDatasetSource(str(repo_root() / PREPARED))  # the workspace's, not a temp copy's
    dataset = MetaDataset(source, name=f"{params.data.source} prepared", digest=dvc_md5(folder))
    mlflow.log_input(dataset, context="training" if stage in TRAINING_STAGES else "eval")


def _log_own_cost(run: StageRun) -> None:
    """What tracking cost this stage: ``tracking/seconds`` (importing mlflow included) of
    ``tracking/process_seconds`` (the stage process's life so far), and their ratio ``tracking/share``."""
    process_s = _process_seconds()
    metrics = {"seconds": _clock.total, "import_seconds": _IMPORT_S, "log_model_seconds": _clock.log_model}
    if process_s:
        metrics |= {"process_seconds": process_s, "share": _clock.total / process_s}
    run.client.log_batch(run.run_id, metrics=[Metric(k, v, int(time.time() * 1000), 0)
                                              for k, v in _metric_items({"tracking": metrics})])


@contextmanager
def parent_run(name: str, params: Params) -> Iterator[str]:
    """A run for a whole flow; stage runs started (even in subprocesses) inside it nest under it.

    Itself nested under the active run, or under ``$BLOCKDROP_PARENT_RUN_ID``: the retrain flow's run holds
    the pipeline flow's run, which holds the stage runs.
    """
    _, experiment_id = _connect(params)
    previous = os.environ.get(PARENT_ENV)
    outer = mlflow.active_run()
    with mlflow.start_run(
        experiment_id=experiment_id,
        run_name=name,
        tags=_base_tags(name),
        nested=outer is not None,
        parent_run_id=None if outer is not None else previous or None,
    ) as active:
        os.environ[PARENT_ENV] = active.info.run_id  # inherited by `dvc repro` and its stages
        try:
            yield active.info.run_id
        finally:
            if previous is None:
                os.environ.pop(PARENT_ENV, None)
            else:
                os.environ[PARENT_ENV] = previous


# ---------------------------------------------------------------------------------------------- model


def registry_name(dataset: str, depth: int) -> str:
    """``("fashion-mnist", 32)`` -> ``"blockdrop-fashion-mnist-resnet32"``."""
    return f"blockdrop-{dataset}-resnet{depth}"


SERVING_PINS = ("mlflow", "torch", "torchvision", "numpy", "pandas", "pydantic", "PyYAML", "psutil", "tqdm",
                "cloudpickle")  # what blockdrop.serving imports, at the versions it was logged with


def log_blockdrop_model(checkpoint: str | Path, spec: Mapping[str, Any], input_example: Any, registered_name: str,
                        version_tags: Mapping[str, Any] | None = None, description: str | None = None) -> int:
    """Log the self-contained pyfunc of :mod:`blockdrop.serving` to the active run: the weights-only
    ``checkpoint`` and ``spec`` (:func:`blockdrop.serving.model_spec`) as artifacts, this library as
    ``code_paths``, :func:`blockdrop.serving.signature` with the model's answer to ``input_example`` (raw
    images: a DataFrame with one column ``image``).
    Register it, describe and tag the new version with ``version_tags`` (e.g. ``dvc_md5``, the md5 DVC records
    for the checkpoint), and only then point the alias ``challenger`` at it, so a version an alias names
    always carries its tags.

    Pinned requirements skip MLflow's slow requirement inference and make serving match training.
    """
    with _clock(model=True):
        import tempfile

        import mlflow.pyfunc

        from blockdrop import serving
        from blockdrop.models import load_blockdrop

        local = serving.BlockDropClassifier().setup(dict(spec), *load_blockdrop(checkpoint))
        signature = serving.signature(dict(spec), local.predict(None, input_example))
        pins = [f"{pkg}=={version(pkg)}" for pkg in SERVING_PINS]
        with tempfile.TemporaryDirectory(prefix="blockdrop-model-") as tmp:
            spec_file = Path(tmp) / serving.SPEC_FILE
            spec_file.write_text(json.dumps(spec, indent=2))
            info = mlflow.pyfunc.log_model(
                name="model", python_model=serving.BlockDropClassifier(),
                artifacts={"weights": str(checkpoint), "spec": str(spec_file)},
                code_paths=[str(Path(serving.__file__).parent)], signature=signature, input_example=input_example,
                pip_requirements=pins, registered_model_name=registered_name,
            )
        client = MlflowClient()
        registered = info.registered_model_version
        if description:
            client.update_model_version(registered_name, registered, description=description)
        for key, value in (version_tags or {}).items():
            client.set_model_version_tag(registered_name, registered, key, str(value))
        client.set_registered_model_alias(registered_name, "challenger", registered)
        return int(registered)


def _client() -> MlflowClient:
    uri = tracking_uri()
    _check_reachable(uri)
    _prepare_store(uri)
    return MlflowClient(uri)


def latest_stage_runs(stage: str, dvc_exps: Iterable[str]) -> dict[str, str]:
    """``{experiment: run id}``: the latest FINISHED run of ``stage`` tagged with each DVC experiment name."""
    client = _client()
    ids = [e.experiment_id for e in client.search_experiments()]
    found: dict[str, str] = {}
    for name in dvc_exps:
        runs = client.search_runs(ids, filter_string=f"tags.dvc_exp = '{name}' and tags.stage = '{stage}' and "
                                  "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"],
                                  max_results=1)
        if runs:
            found[name] = runs[0].info.run_id
    return found


def _ui(ui: str | None) -> str:
    """``ui``, else the tracking server itself (it serves the UI too), else ``make ui``'s address."""
    if ui:
        return ui
    uri = tracking_uri()
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI


def ui_address(experiment: str = "blockdrop", ui: str | None = None) -> str:
    """Where ``make ui`` sends a user: the experiment's runs table in the UI's model-training view.

    mlflow 3.17's UI picks GenAI or model training per browser (GenAI unless switched) and does not read the
    experiment's ``mlflow.experimentKind``; only the address's ``workflowType`` opens it on the runs.
    """
    ui = _ui(ui)
    exp = _client().get_experiment_by_name(experiment)
    return f"{ui}/#/experiments/{exp.experiment_id}/runs?{UI_VIEW}" if exp else f"{ui}/#/experiments?{UI_VIEW}"


def ui_links(parent_run_id: str, run_ids: list[str], ui: str | None = None) -> dict[str, str]:
    """Addresses in the MLflow UI (``make ui``, or the tracking server's own): the parent run, and the compare
    view of ``run_ids``."""
    ui = _ui(ui)
    experiment_id = _client().get_run(parent_run_id).info.experiment_id

    def quoted(ids: list[str]) -> str:
        return urllib.parse.quote(json.dumps(ids, separators=(",", ":")))

    return {"parent": f"{ui}/#/experiments/{experiment_id}/runs/{parent_run_id}?{UI_VIEW}",
            "compare": f"{ui}/#/compare-runs?runs={quoted(run_ids)}&experiments={quoted([experiment_id])}&{UI_VIEW}"}


def latest_version(name: str) -> int | None:
    """The highest version of registered model ``name`` (None: no such model, or no version yet)."""
    try:
        versions = _client().search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    return max((int(v.version) for v in versions), default=None)


def get_alias_version(name: str, alias: str) -> int | None:
    """The version ``alias`` (``"champion"``, ``"challenger"``) points at, or None if it is not set."""
    try:
        return int(_client().get_model_version_by_alias(name, alias).version)
    except MlflowException:  # RESOURCE_DOES_NOT_EXIST for the model or the alias
        return None


def find_version(name: str, tag: str, value: str) -> int | None:
    """The highest version of ``name`` whose tag ``tag`` equals ``value`` (None: none does). Filtered here,
    not in the store's query language, so any store (SQLite, a server) answers the same."""
    try:
        versions = _client().search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    return max((int(v.version) for v in versions if v.tags.get(tag) == value), default=None)


def version_info(name: str, version: int | str) -> tuple[str | None, dict[str, str]]:
    """The run that logged ``version`` of ``name``, and the version's tags."""
    v = _client().get_model_version(name, str(version))
    return v.run_id, dict(v.tags)


def set_version_tags(name: str, version: int | str, tags: Mapping[str, Any]) -> None:
    """Add (or overwrite) tags on one registered version (``test_accuracy``, ``flops_mean``...)."""
    client = _client()
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, str(value))


def download_run_file(run_id: str, artifact_path: str, dst: str | Path) -> Path:
    """One artifact file of a run, copied under ``dst``; FileNotFoundError if the run has none there."""
    import mlflow.artifacts

    uri = tracking_uri()
    _check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                                        dst_path=str(dst), tracking_uri=uri))
    except (MlflowException, OSError) as error:
        raise FileNotFoundError(f"run {run_id} has no artifact {artifact_path}: {error}") from None


def set_alias(name: str, alias: str, version: int) -> None:
    """Point ``alias`` at ``version`` (moving it if it pointed elsewhere)."""
    _client().set_registered_model_alias(name, alias, str(version))


def load_registered_model(name: str, version: int | str) -> Any:
    """The pyfunc of ``name`` at ``version`` (a number, or an alias such as ``"champion"``)."""
    import mlflow.pyfunc

    ref = f"models:/{name}/{version}" if str(version).isdigit() else f"models:/{name}@{version}"
    uri = tracking_uri()
    _check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    return mlflow.pyfunc.load_model(ref)


def describe_version(name: str, version: int | str, description: str) -> None:
    """Replace the description of one registered version (evaluate writes the test split's numbers)."""
    _client().update_model_version(name, str(version), description=description)
