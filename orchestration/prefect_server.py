"""A local ``prefect server start`` as a child process: find one answering, or start one and stop it after.

Used by ``python -m orchestration serve`` (``make schedule``), ``python -m ops.pool`` (``make deploy``,
``make worker``), ``orchestration.api`` (a flow uses ``make schedule``'s server when it answers) and
``bench/overhead.py``. It lives here, beside the flows that need a server, because ``orchestration`` may not
import ``ops``; ``ops`` imports it from here. It runs the ``prefect`` command and never imports Prefect, so
``ops`` uses it without loading Prefect.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["LOCAL_PORT", "api_url", "healthy", "local_server"]

LOCAL_PORT = 4200  # make schedule's server, which make deploy, make worker and the flows use too


def api_url(port: int) -> str:
    """The Prefect API of a server on 127.0.0.1:``port``."""
    return f"http://127.0.0.1:{port}/api"


def healthy(api: str, timeout: float = 2.0) -> bool:
    """Whether a server answers ``GET <api>/health`` with 200: a Prefect API here, an MLflow server in
    ``ops/tracking_server.py`` (both have that endpoint)."""
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def _stop(server: subprocess.Popen) -> None:
    print("stopping the Prefect server we started", flush=True)
    try:
        os.killpg(server.pid, signal.SIGINT)
        server.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()


@contextlib.contextmanager
def local_server(port: int, env: dict[str, str], stdout: IO | None = None,
                 startup_timeout_s: float = 120.0) -> Iterator[bool]:
    """A Prefect server on 127.0.0.1:``port`` for the block; yields whether this call started it.

    One already answering there is used as it is. Otherwise ``prefect server start`` runs in its own session
    (Ctrl-C reaches us, not it), is waited for until healthy, and is stopped when the block ends, however.
    """
    api = api_url(port)
    if healthy(api):
        yield False
        return
    prefect = Path(sys.executable).parent / "prefect"
    cmd = [str(prefect) if prefect.exists() else "prefect", "server", "start", "--host", "127.0.0.1",
           "--port", str(port)]
    print(f"starting the Prefect server: {' '.join(cmd)}", flush=True)
    server = subprocess.Popen(cmd, env=env, stdout=stdout, stderr=subprocess.STDOUT if stdout else None,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not healthy(api):
            if server.poll() is not None:
                raise SystemExit(f"error: the Prefect server exited with {server.returncode} (port {port} busy?)")
            if time.monotonic() > deadline:
                raise SystemExit(f"error: the Prefect server did not answer on {api} in {startup_timeout_s:.0f} s")
            time.sleep(0.5)
        yield True
    finally:
        _stop(server)
