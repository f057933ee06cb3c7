"""Which MLflow store, and a client on it ready for use.

The store is ``$MLFLOW_TRACKING_URI`` when set (a server), else ``<workspace>/mlflow.db`` (SQLite) with its
artifacts in ``<workspace>/mlartifacts``: one store for ``dvc repro``, ``dvc exp run`` copies and git worktrees
alike. A server that does not answer fails in seconds with one line (:class:`TrackingUnavailable`), not after
MLflow's retries; a SQLite file is made safe for several writing processes before first use.
"""

from __future__ import annotations

import os
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from blockdrop.config import Params
from blockdrop.project import ROOT_ENV, find_up, git

__all__ = ["TrackingUnavailable", "artifact_location", "check_reachable", "client", "connect", "experiment_id",
           "no_http_retries", "prepare_store", "repo_root", "server_errors", "tracking_uri", "unreachable"]

REACH_TIMEOUT_S = 3.0
# The experiment's type, as the UI's type selector writes it ("Machine learning"; the other is "genai_development").
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


class TrackingUnavailable(RuntimeError):
    """The tracking server does not answer; the message is one line naming its URI."""


def repo_root() -> Path:
    """The workspace that owns ``mlflow.db``, the same for ``dvc repro`` and for ``dvc exp run``.

    ``dvc exp run --temp`` and queued experiments run in a copy under ``<root>/.dvc/tmp/exps/``, and git
    worktrees are copies too; runs from any copy must land in the one database of the real workspace.
    """
    for var in (ROOT_ENV, "DVC_ROOT"):  # DVC sets DVC_ROOT to the workspace, even for temp copies
        if os.environ.get(var):
            return Path(os.environ[var]).resolve()
    cwd = Path.cwd().resolve()
    parts = cwd.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    project = find_up(cwd, "dvc.yaml") or cwd
    found = git("rev-parse", "--path-format=absolute", "--git-common-dir", "--show-toplevel", cwd=project)
    if found and len(found.splitlines()) == 2:
        common, top = map(Path, found.splitlines())
        # In a worktree the common dir is the main checkout's .git; in a submodule it is not named .git.
        main = common.parent if common.name == ".git" else top
        if project.is_relative_to(top):
            return main / project.relative_to(top)
    return project


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite file in the repo root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store go next to the database (not in ``./mlruns`` of a temp copy); None for a
    server, which chooses its own artifact store."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///")).resolve()
    return (db.parent / "mlartifacts").as_uri()


def unreachable(uri: str, timeout: float = REACH_TIMEOUT_S) -> TrackingUnavailable | None:
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


def check_reachable(uri: str, timeout: float = REACH_TIMEOUT_S) -> None:
    """Fail in seconds, with one clear line, instead of after MLflow's retries."""
    if error := unreachable(uri, timeout):
        raise error from None


def server_errors() -> tuple[type[BaseException], ...]:
    """What a call to a tracking server raises when the server is gone: MLflow wraps connection errors in
    MlflowException; an artifact upload through the server's proxy can raise requests' own errors."""
    from requests.exceptions import RequestException  # an mlflow dependency, imported with it

    return MlflowException, RequestException


@contextmanager
def no_http_retries() -> Iterator[None]:
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


def experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    """The experiment ``name``, created if missing, marked as a model-training one (not GenAI)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location(uri),
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


def prepare_store(uri: str) -> None:
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
        store = MlflowClient(uri)
        store.search_experiments(max_results=1)  # builds the tracking store: creates or migrates the schema
        store.search_registered_models(max_results=1)  # and the registry's, on the same file
    _PREPARED.add(uri)


def client() -> MlflowClient:
    """A client on the store, checked reachable and prepared."""
    uri = tracking_uri()
    check_reachable(uri)
    prepare_store(uri)
    return MlflowClient(uri)


def connect(params: Params) -> tuple[MlflowClient, str]:
    """:func:`client`, made the fluent API's store too, and the id of the experiment ``params`` name."""
    uri = tracking_uri()
    check_reachable(uri)
    prepare_store(uri)
    mlflow.set_tracking_uri(uri)
    store = MlflowClient(uri)
    return store, experiment_id(store, params.tracking.experiment, uri)
