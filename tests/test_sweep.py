"""``make sweep`` (orchestration/sweep.py) on the tiny profile: two penalties as DVC experiments on two queue workers.

What the sweep must show, on a real copy of the project: both experiments in ``dvc exp show`` and
their stage runs in MLflow under one parent run, each ``evaluate`` run carrying its penalty; shared stages
(prepare, pretrain, heuristics, curriculum, and finetune-full, which reads no policy key) not run again; the
table and the figure written from the experiments' own numbers, and shown by the report; ``dvc plots diff``
across the experiments; a second run of the same sweep a no-op. And a setting that fails at run time is retried,
reported, and stops nothing else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from tinyrepo import copy_reproduced

pytestmark = pytest.mark.e2e  # runs stages, servers or other processes: `make test`, not `make test-fast`

SWEEP = {"workers": 2, "retries": 1, "grid": {"finetune.penalty": [1.0, 2.0]}}
NAMES = ("sweep-penalty-1", "sweep-penalty-2")


def sh(root: Path, *cmd: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc.stdout


def stage_runs(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name("blockdrop")
    return client.search_runs([experiment.experiment_id], max_results=1000)


@pytest.fixture(scope="module")
def swept(flows, tiny_reproduced, tmp_path_factory, isolated_env):
    """A committed tiny project, reproduced, with ``SWEEP`` as its sweep; the sweep run twice. (root, client,
    first, second, runs before the second run)."""
    from orchestration import sweep

    root = copy_reproduced(tiny_reproduced, tmp_path_factory.mktemp("sweep") / "repo")
    params = yaml.safe_load((root / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump({**params, "sweep": SWEEP}, sort_keys=False))
    for var in ("BLOCKDROP_PARENT_RUN_ID", "DVC_EXP_NAME", "DVC_ROOT", "BLOCKDROP_ROOT", "BLOCKDROP_SWEEP"):
        isolated_env.delenv(var, raising=False)
    isolated_env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    for who in ("AUTHOR", "COMMITTER"):
        isolated_env.setenv(f"GIT_{who}_NAME", "test")
        isolated_env.setenv(f"GIT_{who}_EMAIL", "test@example.com")
    isolated_env.chdir(root)
    sh(root, "dvc", "repro")  # the report only: it reads params.yaml, whose sweep section just changed
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-q", "-m", "baseline")
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    first = sweep.sweep_flow()
    before_second = {r.info.run_id for r in stage_runs(client)}
    t0 = time.perf_counter()
    second = sweep.sweep_flow()
    second["seconds"] = time.perf_counter() - t0
    return root, client, first, second, before_second


def test_both_settings_are_dvc_experiments_with_their_penalty(swept) -> None:
    root, _, first, _, _ = swept
    assert {n: r["status"] for n, r in first["results"].items()} == dict.fromkeys(NAMES, "Success")
    shown = json.loads(sh(root, "dvc", "exp", "show", "--json"))
    experiments = {e["name"]: e for baseline in shown for e in (baseline.get("experiments") or [])}
    assert set(NAMES) <= set(experiments), list(experiments)
    for name, penalty in zip(NAMES, (1.0, 2.0), strict=True):
        rev = experiments[name]["revs"][0]["data"]
        assert rev["params"]["params.yaml"]["data"]["finetune"]["penalty"] == penalty
        assert "reports/evaluate/metrics.json" in rev["metrics"]


def test_stage_runs_nest_under_one_sweep_run_and_carry_the_setting(swept) -> None:
    _, client, first, _, _ = swept
    parent = first["parent_run_id"]
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent}'", max_results=100)
    by_exp: dict[str, set[str]] = {}
    for run in children:
        assert run.data.tags["sweep"] == "sweep" and run.info.status == "FINISHED"
        # "": the workspace's own report stage, rerun by the flow to show the sweep
        by_exp.setdefault(run.data.tags.get("dvc_exp", ""), set()).add(run.data.tags["stage"])
        if run.data.tags["stage"] == "evaluate":  # the run that holds the numbers carries the penalty
            penalty = run.data.tags["dvc_exp"].rsplit("-", 1)[1]
            assert float(run.data.params["finetune.penalty"]) == float(penalty)
            assert "blockdrop/accuracy" in run.data.metrics and "speedup/measured_batch1" in run.data.metrics
    # prepare, pretrain, heuristics, curriculum and finetune-full (the fair full-network baseline reads finetune's
    # budget keys, not the penalty) are the baseline's: DVC's cache, not run again
    assert by_exp == {"": {"report"}} | {name: {"finetune", "evaluate", "analyze", "report"} for name in NAMES}
    assert set(first["links"]) == {"parent", "compare"} and parent in first["links"]["parent"]


def test_table_and_figure_come_from_each_experiments_own_metrics(swept) -> None:
    root = swept[0]
    out = root / "reports" / "sweep"
    table = pd.read_csv(out / "settings.csv")
    assert sorted(table["finetune.penalty"]) == [1.0, 2.0] and table["flops_mean"].is_monotonic_increasing
    info = json.loads((out / "sweep.json").read_text())
    for name in NAMES:
        commit = info["experiments"][name]["commit"]
        metrics = json.loads(sh(root, "git", "show", f"{commit}:reports/evaluate/metrics.json"))
        row = table[table["experiments"] == name].iloc[0]
        assert row["accuracy_mean"] == pytest.approx(metrics["blockdrop"]["accuracy"])
        assert row["flops_mean"] == pytest.approx(metrics["blockdrop"]["flops_mean"])
        assert row["full_accuracy_mean"] == pytest.approx(metrics["full"]["accuracy"])
    assert table["firstk_at_flops"].notna().all()  # the heuristics' per-k curves reached the table
    for figure in ("tradeoff.png", "speedup.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the report stage reads reports/sweep: the flow reran it (only it was stale) and it shows the sweep
    report = (root / "reports" / "report.md").read_text()
    assert "## Sweep" in report and "sweep/tradeoff.png" in report and "sweep/speedup.png" in report


def test_dvc_plots_diff_shows_the_experiments_side_by_side(swept) -> None:
    root = swept[0]
    plots = json.loads(sh(root, "dvc", "plots", "diff", *NAMES, "--json", "--split"))["data"]
    assert set(plots["Accuracy against FLOPs"][0]["revisions"]) == set(NAMES)


def test_second_run_of_the_same_sweep_is_a_no_op(swept) -> None:
    _, client, first, second, before = swept
    assert {n: r["status"] for n, r in second["results"].items()} == dict.fromkeys(NAMES, "Cached")
    new = [r for r in stage_runs(client) if r.info.run_id not in before]
    # its own parent run, no stage (the report already shows these results)
    assert [r.data.tags["mlflow.runName"] for r in new] == ["blockdrop-sweep"]
    assert second["links"]["compare"] == first["links"]["compare"]  # the same evaluate runs
    assert second["seconds"] < 60


def test_a_failing_setting_is_retried_reported_and_stops_nothing_else(swept) -> None:
    """A 32x32 crop passes params validation and fails ``pretrain`` against the 28x28 images (exit 2). The
    failing stage reads only what DVC restores in the queue's workspace (the prepared splits), not raw data."""
    from orchestration import sweep

    root = swept[0]
    result = sweep.sweep_flow(grid={"pretrain.crop_size": [20, 32]})
    ok, bad = "sweep-crop_size-20", "sweep-crop_size-32"
    assert result["results"][ok]["status"] == "Success"
    assert result["results"][bad]["status"] == "Failed" and result["results"][bad]["attempts"] == 2
    assert result["failed"] == [bad] and "pretrain.crop_size" in result["results"][bad]["log"]
    table = pd.read_csv(root / "reports" / "sweep" / "settings.csv")
    assert table["experiments"].tolist() == [ok]


def test_invalid_grid_exits_2_naming_the_key_before_anything_runs(tmp_path) -> None:
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "orchestration", "sweep", "--set", "finetune.penalty=1,-1"],
                          cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "sweep.grid.finetune.penalty" in proc.stderr, proc.stderr
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["sweep"]["grid"], "the default profile sweeps something"
