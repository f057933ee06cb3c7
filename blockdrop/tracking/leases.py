"""Process leases: which process holds a stage's open run, so that a run whose process died is marked KILLED.

While a stage's run is open, ``checkpoints/<stage>.run.json`` names the run and the process (pid, host, start
time). A process killed outright (SIGKILL, power loss) cannot end its run; the next start of the stage in the
same folder finds the lease, sees its process gone, and marks the run KILLED.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from blockdrop.files import atomic_write_text

__all__ = ["lease_path", "take_over_lease", "write_lease"]

log = logging.getLogger(__name__)


def lease_path(stage: str) -> Path:
    """``checkpoints/<stage>.run.json`` in the stage's own folder (beside its resume state): two DVC
    experiments running the same stage in two temp folders never see each other's lease."""
    return Path("checkpoints") / f"{stage}.run.json"


def _holder_alive(lease: Mapping[str, Any]) -> bool:
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


def take_over_lease(stage: str, client: MlflowClient) -> str | None:
    """Mark the stage's previous run KILLED if its process died while the run was RUNNING (SIGKILL, power
    loss: nothing in that process could end the run); return that run's id when it did not finish."""
    path = lease_path(stage)
    try:
        lease = json.loads(path.read_text())
        run_id = str(lease["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if _holder_alive(lease):
        return None
    try:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "KILLED")
            log.warning("stage %s: its previous run %s died while running (pid %s); marked it KILLED",
                        stage, run_id, lease.get("pid"))
    except MlflowException:
        pass  # deleted, or in another store: nothing to mark
    return run_id


def write_lease(stage: str, run_id: str) -> None:
    """Name ``run_id`` and this process as the holder of ``stage``'s lease."""
    import psutil

    lease = {"run_id": run_id, "pid": os.getpid(), "host": socket.gethostname(),
             "started": psutil.Process().create_time()}
    atomic_write_text(lease_path(stage), json.dumps(lease) + "\n")
