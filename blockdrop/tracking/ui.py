"""Addresses in the MLflow UI: where ``make ui`` sends a user, and the links a flow prints for its runs."""

from __future__ import annotations

import json
import urllib.parse

from blockdrop.tracking.store import client, tracking_uri

__all__ = ["UI", "UI_VIEW", "ui_address", "ui_links"]

UI = "http://127.0.0.1:5000"  # `make ui`
# mlflow 3.17's UI opens every experiment as a GenAI one (traces, token usage) unless the address asks otherwise.
UI_VIEW = "workflowType=machine_learning"


def _base(ui: str | None) -> str:
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
    ui = _base(ui)
    exp = client().get_experiment_by_name(experiment)
    return f"{ui}/#/experiments/{exp.experiment_id}/runs?{UI_VIEW}" if exp else f"{ui}/#/experiments?{UI_VIEW}"


def ui_links(parent_run_id: str, run_ids: list[str], ui: str | None = None) -> dict[str, str]:
    """Addresses in the MLflow UI (``make ui``, or the tracking server's own): the parent run, and the compare
    view of ``run_ids``."""
    ui = _base(ui)
    experiment_id = client().get_run(parent_run_id).info.experiment_id

    def quoted(ids: list[str]) -> str:
        return urllib.parse.quote(json.dumps(ids, separators=(",", ":")))

    return {"parent": f"{ui}/#/experiments/{experiment_id}/runs/{parent_run_id}?{UI_VIEW}",
            "compare": f"{ui}/#/compare-runs?runs={quoted(run_ids)}&experiments={quoted([experiment_id])}&{UI_VIEW}"}
