"""``flow.cron`` checked with Prefect's own schedule model, where the cron is read: before serving the
retrain flow on it (``make schedule``) and before deploying it (``make deploy``, ``ops/pool.py``).

The library keeps ``flow.cron`` a plain string: what a valid cron is, is Prefect's to say, and a schedule
Prefect would refuse must be refused before any work, with one line naming the key (exit 2), not halfway
through a deployment.
"""

from __future__ import annotations

from prefect.client.schemas.schedules import CronSchedule
from pydantic import ValidationError

from blockdrop.config import Params, ParamsError, refuse

__all__ = ["checked_cron", "cron_schedule"]

KEY = "flow.cron"


def cron_schedule(cron: str) -> CronSchedule:
    """``cron`` as Prefect's ``CronSchedule``; :class:`ParamsError` naming ``flow.cron`` if Prefect refuses it
    (``61 * * * *``, six fields, ``every monday``...)."""
    try:
        return CronSchedule(cron=cron)
    except ValidationError as error:
        why = "; ".join(e["msg"].removeprefix("Value error, ") for e in error.errors())
        raise ParamsError(f"{KEY}: {why} (Prefect's CronSchedule)") from None


def checked_cron(params: Params) -> str:
    """``params.flow.cron`` if Prefect accepts it; otherwise print one line naming ``flow.cron`` and exit 2."""
    try:
        cron_schedule(params.flow.cron)
    except ParamsError as error:
        raise refuse(error) from None
    return params.flow.cron
