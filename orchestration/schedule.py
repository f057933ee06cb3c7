"""``blockdrop-retrain`` served on ``flow.cron`` (``make schedule``, ``python -m orchestration serve``).

A Prefect runner in this process serves the flow as the deployment ``blockdrop-retrain-scheduled`` against a
Prefect server on 127.0.0.1 (``orchestration.prefect_server``: one already answering there, or one started
for as long as this serves). ``flow.cron`` is checked with Prefect's own schedule model before anything
starts. The deployment runs one flow run at a time across every runner serving it (``global_limit=1``).
"""

from __future__ import annotations

import os
import signal

from blockdrop.config import load_params
from blockdrop.project import project_root
from orchestration.cron import checked_cron
from orchestration.flows import RETRAIN, retrain_flow
from orchestration.prefect_server import LOCAL_PORT, api_url, local_server
from orchestration.stages import stage_env

__all__ = ["DEPLOYMENT", "serve"]

DEPLOYMENT = "blockdrop-retrain-scheduled"


def serve(port: int = LOCAL_PORT, startup_timeout_s: float = 120.0) -> None:
    """Serve ``blockdrop-retrain`` on ``flow.cron`` against a Prefect server on 127.0.0.1:``port``, starting
    the server if none answers there (and stopping it again on Ctrl-C). Invalid params or a cron Prefect
    refuses: one line naming the key, exit 2, before any server starts."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = project_root()
    cron = checked_cron(load_params(root / "params.yaml"))
    api = api_url(port)
    # `kill` is Ctrl-C: it stops the server too (Prefect's runner installs its own handler later).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with local_server(port, stage_env(), startup_timeout_s=startup_timeout_s) as started:
            os.environ["PREFECT_API_URL"] = api  # for the flow runs the server's runner starts
            print(f"serving {RETRAIN} as deployment {DEPLOYMENT!r} on cron {cron!r} (flow.cron)\n"
                  f"  runs, schedule and logs: Prefect UI at http://127.0.0.1:{port} (Deployments -> {DEPLOYMENT})\n"
                  f"  run now: PREFECT_API_URL={api} prefect deployment run '{RETRAIN}/{DEPLOYMENT}'\n"
                  f"  MLflow runs: make ui.  Ctrl-C stops serving" + (" and the server." if started else "."),
                  flush=True)
            with temporary_settings(updates={PREFECT_API_URL: api}):
                # global_limit: the deployment's concurrency limit, 1 across every runner serving it, which is
                # what keeps two promotions on different machines from interleaving (a file lock cannot).
                retrain_flow.serve(name=DEPLOYMENT, cron=cron, global_limit=1)
    except KeyboardInterrupt:
        print("\ninterrupted", flush=True)
