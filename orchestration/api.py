"""Which Prefect API a flow started from the command line reports to.

``PREFECT_API_URL`` when set; else the local server ``make schedule`` runs on 127.0.0.1:4200 when it answers
(its UI then shows the run, and no temporary server, ~15 s to start, is needed); else Prefect's own temporary
server for this process.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

from orchestration.prefect_server import LOCAL_PORT, api_url, healthy

__all__ = ["on_local_server"]

T = TypeVar("T")


def on_local_server(call: Callable[[], T]) -> T:
    """``call()`` against ``make schedule``'s server if ``PREFECT_API_URL`` is unset and that server answers."""
    local = api_url(LOCAL_PORT)
    if not os.environ.get("PREFECT_API_URL") and healthy(local, timeout=0.5):
        from prefect.settings import PREFECT_API_URL, temporary_settings

        print(f"using the Prefect server at {local}", flush=True)
        with temporary_settings(updates={PREFECT_API_URL: local}):
            return call()
    return call()
