"""What a sweep's experiments hold, read from their commits, and the tables and figure written from them.

``reports/sweep/``: ``experiments.csv`` (one row per experiment), ``settings.csv`` (one per setting, mean and
spread over seeds, Pareto front), ``tradeoff.png`` (accuracy against FLOPs), ``speedup.png`` (against the measured
speedup at batch 1) and ``sweep.json``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from blockdrop.analysis.tradeoff import Experiment, settings_table, speedup_figure, tradeoff_figure
from blockdrop.config import flatten, parse_params
from orchestration.dvc_queue import read_at
from orchestration.grid import Setting

__all__ = ["load_experiment", "matches", "same_results", "write_results"]

READ_FROM_EXPERIMENT = ("reports/evaluate/metrics.json", "reports/heuristics/by_k.csv", "params.yaml")
WRITTEN = ("experiments.csv", "settings.csv", "tradeoff.png", "speedup.png", "sweep.json")


def matches(root: Path, rev: str, setting: Setting) -> bool:
    """True if the experiment at ``rev`` ran with exactly ``setting``'s values."""
    text = read_at(root, rev, "params.yaml")
    flat = flatten(yaml.safe_load(text) or {}) if text else {}
    return all(key in flat and flat[key] == value for key, value in setting.values)


def load_experiment(root: Path, setting: Setting, rev: str) -> Experiment:
    """What the experiment at ``rev`` wrote: evaluate's metrics, the per-k heuristics, and its data/depth."""
    metrics, by_k, params_text = (read_at(root, rev, p) for p in READ_FROM_EXPERIMENT)
    if metrics is None:
        raise FileNotFoundError(f"experiment {setting.name} ({rev[:7]}) has no reports/evaluate/metrics.json")
    params = parse_params(yaml.safe_load(params_text or "") or {})
    heuristics = pd.read_csv(io.StringIO(by_k)) if by_k else None
    return Experiment(setting.name, dict(setting.values), json.loads(metrics), heuristics, params.data.dataset,
                      params.model.depth)


def write_results(out: Path, experiments: list[Experiment], summary: dict[str, Any], title: str,
                  dpi: int = 150) -> list[Path]:
    """``experiments.csv``, ``settings.csv``, ``tradeoff.png``, ``speedup.png`` and ``sweep.json`` in ``out`` (replaced
    whole)."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in WRITTEN:
        (out / stale).unlink(missing_ok=True)
    paths = [out / "sweep.json"]
    if experiments:
        rows = [{"experiment": e.name, **e.params, **{f"{section}.{k}": v for section, m in e.metrics.items()
                                                      if isinstance(m, dict) for k, v in m.items()}}
                for e in experiments]
        pd.DataFrame(rows).to_csv(out / "experiments.csv", index=False)
        settings_table(experiments).to_csv(out / "settings.csv", index=False)
        tradeoff_figure(experiments, out / "tradeoff.png", title=title, dpi=dpi)
        speedup_figure(experiments, out / "speedup.png", dpi=dpi)
        paths += [out / "experiments.csv", out / "settings.csv", out / "tradeoff.png", out / "speedup.png"]
    (out / "sweep.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return paths


def same_results(out: Path, summary: dict[str, Any]) -> bool:
    """True if ``out/sweep.json`` describes the same grid and baseline, and the same experiment commits."""
    try:
        before = json.loads((out / "sweep.json").read_text())
    except (OSError, ValueError):
        return False
    commits = {n: e.get("commit") for n, e in summary["experiments"].items()}
    return (before.get("grid") == summary["grid"] and before.get("baseline") == summary["baseline"]
            and {n: e.get("commit") for n, e in before.get("experiments", {}).items()} == commits)
