"""A shared MLflow tracking server over PostgreSQL, run on this machine: ``make tracking-server``.

What a team's tracking server is, in miniature: PostgreSQL holds the runs, params, metrics, tags and the
model registry (SQLite takes one writer at a time and lives on one disk), and ``mlflow server`` serves the
REST API and the UI and proxies artifact uploads and downloads to ``--artifacts-destination`` (a folder
here, ``s3://...`` on a real deployment), so the stages need a URL and nothing else: no database driver,
no credentials, no access to the artifact store. Both bind 127.0.0.1 only.

    python -m ops.tracking_server                    # PostgreSQL on 127.0.0.1:5433, MLflow on 127.0.0.1:5050
    export MLFLOW_TRACKING_URI=http://127.0.0.1:5050  # then `dvc repro`, `make flow`... log there

Everything lives in a git-ignored folder (``.tracking/``): the cluster (``pg/``), its password, its log and
the artifacts. Ctrl-C stops the MLflow server, then PostgreSQL. Used by ``tests/test_tracking_server.py`` and
``bench/overhead.py --tracking-server`` too. Like ``orchestration/prefect_server.py``, it runs commands and
never imports mlflow.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from orchestration.prefect_server import healthy  # the same GET <url>/health check; MLflow's server has one too

__all__ = ["MlflowServer", "Postgres", "ServerError", "healthy", "tracking_server"]

STATE = Path(".tracking")  # relative to the project root; git-ignored
MLFLOW_PORT, PG_PORT = 5050, 5433  # beside `make ui` (5000), `make serve` (5001) and a system PostgreSQL (5432)
DB_USER, DB_NAME = "blockdrop", "mlflow"
OS_USER = "postgres"  # PostgreSQL refuses to run as root: as root, the cluster belongs to Debian's postgres user
STARTUP_TIMEOUT_S = 180.0  # a busy 2-core machine needs a minute or more to import mlflow and start uvicorn


class ServerError(RuntimeError):
    """PostgreSQL or the MLflow server cannot be set up or started; the message says what to do."""


def pg_bin() -> Path:
    """The newest installed PostgreSQL's programs (Debian keeps them in /usr/lib/postgresql/<major>/bin, off PATH)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    if found:
        return found[-1].parent
    if on_path := shutil.which("pg_ctl"):
        return Path(on_path).resolve().parent
    raise ServerError("PostgreSQL is not installed: `make tracking-server` installs it when run as root "
                      "(apt-get install postgresql), or run `sudo apt-get install postgresql`")


def _as_owner(cmd: list[str]) -> list[str]:
    """``cmd`` run as the cluster's owner: ourselves, or the postgres user when we are root."""
    return ["runuser", "-u", OS_USER, "--", *cmd] if os.geteuid() == 0 else cmd


def _give(*paths: Path) -> None:
    """Make ``paths`` the cluster owner's, when we are root (otherwise they are ours already)."""
    if os.geteuid() == 0:
        owner = pwd.getpwnam(OS_USER)
        for path in paths:
            os.chown(path, owner.pw_uid, owner.pw_gid)


@dataclass
class Postgres:
    """A private PostgreSQL cluster in ``state/pg``, listening on 127.0.0.1:``port`` only (no Unix socket)."""

    state: Path
    port: int = PG_PORT
    started: bool = False  # by us (stop() leaves a cluster someone else started alone)

    @property
    def data(self) -> Path:
        return self.state / "pg"

    @property
    def password_file(self) -> Path:
        return self.state / "pg-password"

    def url(self, db: str = DB_NAME) -> str:
        """The SQLAlchemy URL of database ``db``, password included: keep it off argv.

        The driver is named: SQLAlchemy 2.1 reads a plain ``postgresql://`` as psycopg 3, and the pinned driver
        is psycopg2 (``psycopg2-binary``). libpq, and so ``psycopg2.connect``, reads the URL without the suffix.
        """
        password = self.password_file.read_text().strip()
        return f"postgresql+psycopg2://{DB_USER}:{password}@127.0.0.1:{self.port}/{db}"

    def dsn(self, db: str = DB_NAME) -> str:
        """The same URL for libpq (``psycopg2.connect``, ``psql``), which knows no driver suffix."""
        return self.url(db).replace("postgresql+psycopg2://", "postgresql://", 1)

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        # cwd = the data folder's parent: the postgres user may not be allowed into the caller's folder.
        # start_new_session: Ctrl-C in the terminal must reach us, not the server, so that we stop
        # MLflow first and PostgreSQL after it (pg_ctl start leaves the server in this session).
        return subprocess.run(_as_owner([str(pg_bin() / args[0]), *args[1:]]), cwd=self.state, capture_output=True,
                              text=True, timeout=timeout, start_new_session=True)

    def init(self) -> None:
        """Create the cluster once (superuser ``blockdrop``, a random password, scram-sha-256 over TCP)."""
        self.state.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:  # the postgres user must get through it to the cluster (mkdtemp makes it 0700)
            self.state.chmod(self.state.stat().st_mode | 0o011)
        if (self.data / "PG_VERSION").exists():
            return
        self.data.mkdir(mode=0o700, exist_ok=True)
        self.password_file.write_text(secrets.token_urlsafe(24) + "\n")
        self.password_file.chmod(0o600)
        if os.geteuid() == 0:
            _give(self.data, self.password_file)
            # Every folder above must let the postgres user through (a repository under /root does not).
            if subprocess.run(_as_owner(["test", "-w", str(self.data)]), check=False).returncode:
                raise ServerError(f"user {OS_USER} cannot reach {self.data.resolve()} (a private folder above it?); "
                                  "pass --state with a folder it can reach, e.g. /var/tmp/blockdrop-tracking")
        proc = self._run("initdb", "-D", str(self.data.resolve()), "-U", DB_USER, "--auth=scram-sha-256",
                         f"--pwfile={self.password_file.resolve()}", "--encoding=UTF8", "--no-locale")
        if proc.returncode:
            shutil.rmtree(self.data, ignore_errors=True)  # a half-made cluster would be taken as made next time
            raise ServerError(f"initdb failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        # TCP on loopback only, and no Unix socket (Debian's default socket folder belongs to the system's
        # PostgreSQL); written into the cluster's config, so no later start can listen anywhere else.
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# blockdrop: ops/tracking_server.py\nlisten_addresses = '127.0.0.1'\n"
                       "unix_socket_directories = ''\n")

    def running(self) -> bool:
        return self.data.exists() and self._run("pg_ctl", "status", "-D", str(self.data.resolve())).returncode == 0

    def start(self) -> None:
        """Start the cluster on ``port`` (waiting until it accepts connections), unless it already runs."""
        if self.running():
            pid_file = (self.data / "postmaster.pid").read_text().splitlines()
            self.port = int(pid_file[3])  # line 4 of postmaster.pid: the port it listens on
            print(f"PostgreSQL already runs from {self.data} (port {self.port}): using it", flush=True)
            return
        log = self.state / "pg.log"
        log.touch()
        _give(log)  # pg_ctl, run as the cluster's owner, appends the server's log to it
        proc = self._run("pg_ctl", "start", "-D", str(self.data.resolve()), "-l", str(log.resolve()),
                         "-w", "-t", "120", "-o", f"-p {self.port}")
        if proc.returncode:
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise ServerError(f"PostgreSQL did not start on 127.0.0.1:{self.port} (port busy?):\n{proc.stderr}{tail}")
        self.started = True

    def create_database(self, db: str = DB_NAME) -> None:
        """``CREATE DATABASE db`` if missing (psycopg2: the driver MLflow itself will use, checked here)."""
        try:
            import psycopg2
        except ImportError:
            raise ServerError("the PostgreSQL driver psycopg2 is missing: `make install` (pip install -e .)") from None
        conn = psycopg2.connect(self.dsn("postgres"), connect_timeout=10)
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{db}"')
        finally:
            conn.close()

    def stop(self) -> None:
        """Stop the cluster if we started it (fast: open sessions are ended, everything committed is kept)."""
        if self.started:
            print("stopping PostgreSQL", flush=True)
            self._run("pg_ctl", "stop", "-D", str(self.data.resolve()), "-m", "fast", "-w", "-t", "60")
            self.started = False


@dataclass
class MlflowServer:
    """``mlflow server`` over ``backend`` with proxied artifacts in ``artifacts``, one worker, on 127.0.0.1."""

    backend: str
    artifacts: Path
    port: int = MLFLOW_PORT
    stdout: IO | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Start it and wait until ``/health`` answers; fail with its log's reason if it exits."""
        if healthy(self.uri):
            raise ServerError(f"something already answers on {self.uri}: stop it or choose another --port")
        self.artifacts.mkdir(parents=True, exist_ok=True)
        mlflow = Path(sys.executable).parent / "mlflow"
        # --workers 1: uvicorn (MLflow 3's default server) forks 4 otherwise, ~250 MB each. The artifact
        # proxy (--serve-artifacts, on by default) gives new experiments `mlflow-artifacts:/` locations that
        # the server resolves against --artifacts-destination.
        cmd = [str(mlflow) if mlflow.exists() else "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--serve-artifacts", "--artifacts-destination", str(self.artifacts.resolve())]
        env = {**os.environ,
               # The store URL holds the database password: through the environment (readable by its owner
               # only), not on the command line (that `ps` shows every user).
               "MLFLOW_BACKEND_STORE_URI": self.backend,
               "MLFLOW_DISABLE_TELEMETRY": "true",
               # Job execution (a huey consumer beside the server, for GenAI evaluation jobs) is on by default
               # with a SQL store; this project submits no jobs, and on two cores it is processes for nothing.
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        print(f"starting the MLflow server: {' '.join(cmd)}", flush=True)
        # Its own session, as PostgreSQL's: Ctrl-C reaches us, and we stop both in order.
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.stdout,
                                     stderr=subprocess.STDOUT if self.stdout else None, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not healthy(self.uri):
            if self.proc.poll() is not None:
                raise ServerError(f"the MLflow server exited with {self.proc.returncode} (port {self.port} busy?)"
                                  + self._log_tail())
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"the MLflow server did not answer on {self.uri} in {timeout_s:.0f} s")
            time.sleep(0.5)

    def _log_tail(self) -> str:
        """The end of its log, when it goes to a file (on a terminal it is on screen already)."""
        name = getattr(self.stdout, "name", None)
        if not isinstance(name, str) or not Path(name).is_file():
            return ""
        self.stdout.flush()
        return ":\n" + Path(name).read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        """SIGTERM to its process group (mlflow and its uvicorn worker shut down gracefully), SIGKILL after 30 s.

        Not SIGINT: uvicorn re-raises a caught SIGINT once it has shut down, and prints a KeyboardInterrupt
        traceback for a clean stop; a re-raised SIGTERM just ends it."""
        if self.proc is None:
            return
        print("stopping the MLflow server", flush=True)
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


@contextlib.contextmanager
def tracking_server(state: Path = STATE, port: int = MLFLOW_PORT, pg_port: int = PG_PORT,
                    stdout: IO | None = None) -> Iterator[MlflowServer]:
    """PostgreSQL and ``mlflow server`` over it for the block (artifacts in ``state/artifacts``); yields the
    MLflow server (``.uri``; ``.stop()`` and ``.start()`` restart it over the same database). Both stopped
    after, however the block ends: MLflow first, so no request is cut off from its database."""
    pg = Postgres(state, pg_port)
    pg.init()
    try:
        pg.start()
        pg.create_database()
        server = MlflowServer(pg.url(), state / "artifacts", port, stdout)
        try:
            server.start()
            yield server
        finally:
            server.stop()
    finally:
        pg.stop()


def main() -> None:
    # Both servers run in sessions of their own, so nothing but us stops them: `kill <pid>` and a closed
    # terminal must unwind like Ctrl-C does (Python's default for SIGTERM and SIGHUP is to die on the spot).
    # SIGTERM and SIGHUP as Ctrl-C: KeyboardInterrupt unwinds through tracking_server(), which stops both servers.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGHUP, signal.default_int_handler)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state", type=Path, default=STATE, help="folder for the cluster, its log and the artifacts")
    parser.add_argument("--port", type=int, default=MLFLOW_PORT, help="the MLflow server's port on 127.0.0.1")
    parser.add_argument("--pg-port", type=int, default=PG_PORT, help="PostgreSQL's port on 127.0.0.1")
    args = parser.parse_args()
    try:
        with tracking_server(args.state, args.port, args.pg_port) as server:
            print(f"\nMLflow tracking server on {server.uri} (PostgreSQL on 127.0.0.1:{args.pg_port}, artifacts in "
                  f"{args.state / 'artifacts'}); Ctrl-C stops both. In another shell:\n"
                  f"  export MLFLOW_TRACKING_URI={server.uri}\n", flush=True)
            assert server.proc is not None
            code = server.proc.wait()
            raise SystemExit(f"error: the MLflow server exited with {code}")
    except KeyboardInterrupt:
        pass  # the context managers have stopped both servers
    except ServerError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
