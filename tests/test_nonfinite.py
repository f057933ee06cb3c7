"""A NaN or infinite loss, gradient norm or weight stops a stage at once: exit 1, one line naming the stage,
epoch and step, no outputs, no registered model, the MLflow run FAILED.

The unit tests drive :mod:`blockdrop.train.guard` directly; the stage tests run ``python -m pipelines.<stage>``
in a tiny repo copy with a valid but absurd learning rate that really diverges (1e30 / 1e20: the loss is
NaN at the second step, after the first update has blown the weights up).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tinyrepo import make_tiny_repo, merge

from blockdrop import stage, tracking
from blockdrop.train.guard import NonFiniteError, check_step, check_weights

pytestmark = pytest.mark.e2e  # runs stages, servers or other processes: `make test`, not `make test-fast`


def tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))


def backward(net: torch.nn.Module, scale: float = 1.0) -> torch.Tensor:
    loss = net(torch.ones(5, 4) * scale).square().mean()
    loss.backward()
    return loss


def test_finite_step_passes_and_leaves_gradients_bit_identical() -> None:
    net = tiny_net()
    loss = backward(net)
    before = [p.grad.clone() for p in net.parameters()]
    check_step(loss, net.parameters(), epoch=1, step=1)
    # get_total_norm reads the gradients only: training with the guard stays bit-identical.
    assert all(torch.equal(b, p.grad) for b, p in zip(before, net.parameters(), strict=True))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_loss_names_epoch_and_step(bad: float) -> None:
    net = tiny_net()
    backward(net)
    with pytest.raises(NonFiniteError) as info:
        check_step(torch.tensor(bad), net.parameters(), epoch=2, step=7)
    assert str(info.value) == f"non-finite loss ({bad}) at epoch 2 step 7"


def test_non_finite_gradient_with_a_finite_loss() -> None:
    net = tiny_net()
    loss = backward(net)
    next(net.parameters()).grad[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"^non-finite gradient norm \(inf\) at epoch 1 step 3$"):
        check_step(loss, net.parameters(), epoch=1, step=3)


def test_no_gradients_checks_the_loss_only() -> None:
    net = tiny_net()
    check_step(torch.tensor(0.5), net.parameters(), epoch=1, step=1)  # no backward yet: grads are None
    with pytest.raises(NonFiniteError, match="loss"):
        check_step(torch.tensor(float("nan")), net.parameters(), epoch=1, step=1)


def test_non_finite_weights_and_batchnorm_statistics_are_named() -> None:
    net = tiny_net()
    check_weights({"policy": net}, epoch=1)
    net[1].running_var[1] = float("nan")  # a buffer, not a parameter: state_dict covers both
    with pytest.raises(NonFiniteError, match=r"^non-finite weights in policy \(1\.running_var\) after epoch 4$"):
        check_weights({"backbone": tiny_net(), "policy": net}, epoch=4)


def test_failures_reported_turns_it_into_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info, stage.failures_reported("finetune"):
        raise NonFiniteError("non-finite loss (nan) at epoch 1 step 3")
    assert info.value.code == 1
    assert capsys.readouterr().err == "error: stage finetune: non-finite loss (nan) at epoch 1 step 3\n"


# --- whole stages, as DVC runs them -------------------------------------------------------------------------

DIVERGING = {"pretrain": {"pretrain": {"lr": 1e30}}, "curriculum": {"curriculum": {"lr": 1e20}},
             "finetune": {"finetune": {"lr": 1e20}}}
OUTPUTS = {"pretrain": ["models/backbone.pt", "reports/pretrain/metrics.json", "reports/pretrain/history.csv"],
           "curriculum": ["models/policy_cl.pt", "reports/curriculum/metrics.json"],
           "finetune": ["models/blockdrop.pt", "reports/finetune/metrics.json"]}
UPSTREAM = {"pretrain": [], "curriculum": ["pretrain"], "finetune": ["pretrain", "curriculum"]}


def run_stage(root: Path, name: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", tracking.PARENT_ENV, "DVC_EXP_NAME", "DVC_ROOT")}
    env |= {"BLOCKDROP_ROOT": str(root), "MLFLOW_DISABLE_TELEMETRY": "true"}
    return subprocess.run([sys.executable, "-m", f"pipelines.{name}"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared tiny repo on one-epoch schedules; stages upstream of the one under test run on demand."""
    one_epoch = {"pretrain": {"epochs": 1}, "curriculum": {"epochs": 1}}
    root = make_tiny_repo(tmp_path_factory.mktemp("nonfinite"), one_epoch)
    shutil.rmtree(root / "reports")  # the copy brings the git-tracked metrics of the real run: start without
    assert run_stage(root, "prepare").returncode == 0
    return root


def with_params(root: Path, overrides: dict) -> str:
    """Write ``overrides`` deep-merged over params.yaml; return the original text (to restore)."""
    text = (root / "params.yaml").read_text()
    (root / "params.yaml").write_text(yaml.safe_dump(merge(yaml.safe_load(text), overrides), sort_keys=False))
    return text


def mlflow_runs(root: Path, name: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("blockdrop")
    runs = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{name}'") if experiment else []
    return sorted(runs, key=lambda r: r.info.start_time)


@pytest.mark.parametrize("name", ["pretrain", "curriculum", "finetune"])
def test_diverging_stage_fails_with_one_line_and_writes_nothing(repo: Path, name: str) -> None:
    for upstream in UPSTREAM[name]:
        if not (repo / OUTPUTS[upstream][0]).exists():
            assert run_stage(repo, upstream).returncode == 0
    original = with_params(repo, DIVERGING[name])
    try:
        proc = run_stage(repo, name)
    finally:
        (repo / "params.yaml").write_text(original)
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: stage {name}: non-finite loss (nan) at epoch 1 step 2"], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not [out for out in OUTPUTS[name] if (repo / out).exists()]
    assert not (repo / "checkpoints" / f"{name}.pt").exists()  # no resume state from a diverged epoch
    runs = mlflow_runs(repo, name)
    assert runs and runs[-1].info.status == "FAILED"
    assert "train/loss" not in runs[-1].data.metrics
    if name == "finetune":
        import mlflow

        client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
        assert client.search_model_versions() == []
