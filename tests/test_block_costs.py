"""blockdrop.train.block_costs: the per-block weights of the reward, against closed forms and blockdrop.flops."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from tinyrepo import make_tiny_repo

from blockdrop import tracking
from blockdrop.flops import count_flops
from blockdrop.models import cifar_resnet, save_backbone
from blockdrop.train.block_costs import COSTS, CostTable, block_costs, block_latency, cost_table, shares

# (depth, image shape) of the backbones checked: ResNet-20 on Fashion-MNIST's 28x28, ResNet-32 on CIFAR's 32x32
BACKBONES = [(20, (1, 28, 28)), (32, (3, 32, 32))]


def test_the_choices_are_the_params() -> None:
    assert COSTS == ("blocks", "flops", "latency")


@pytest.mark.parametrize(("depth", "shape"), BACKBONES)
def test_blocks_table_is_uniform_and_leaves_the_reward_as_it_was(depth: int, shape: tuple[int, ...]) -> None:
    backbone = cifar_resnet(depth, 10, shape[0])
    k = backbone.num_blocks
    table = cost_table("blocks", backbone, shape)
    assert torch.equal(table.weights, torch.full((k,), 1 / k, dtype=torch.float64))
    assert table.weights.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert table.reward_weights is None  # rl.reward then computes blocks / K, the paper's arithmetic
    assert not table.measured
    assert table.flops == count_flops(backbone, shape).blocks  # written beside the weights for reference


@pytest.mark.parametrize(("depth", "shape"), BACKBONES)
def test_flops_table_is_each_blocks_share_of_the_blocks_flops(depth: int, shape: tuple[int, ...]) -> None:
    backbone = cifar_resnet(depth, 10, shape[0])
    weights = block_costs("flops", backbone, shape)
    flops = torch.tensor(count_flops(backbone, shape).blocks, dtype=torch.float64)
    assert torch.equal(weights, flops / flops.sum())
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-12)
    # Closed form: a block does 2 convolutions of equal cost u, except a stage-first block of stages 2 and 3,
    # whose first convolution (stride 2, half the input channels) costs u / 2. With n blocks a stage:
    # (3n - 2) * 2u + 2 * 1.5u in all, so a block weighs 2 / (6n - 1) and a stage-first one 1.5 / (6n - 1).
    n = (depth - 2) // 6
    expected = [2.0] * (3 * n)
    expected[n] = expected[2 * n] = 1.5
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float64) / (6 * n - 1), rtol=1e-12, atol=0)
    table = cost_table("flops", backbone, shape)
    assert table.reward_weights is table.weights and not table.measured


def test_latency_table_is_measured_positive_and_sums_to_one() -> None:
    backbone = cifar_resnet(20, 10, 1).train()
    rng = torch.get_rng_state()
    table = cost_table("latency", backbone, (1, 28, 28), batch_size=16)
    assert torch.equal(torch.get_rng_state(), rng)  # its input comes from a private generator
    assert backbone.training  # timed in eval mode, handed back as it came
    assert table.measured and table.reward_weights is table.weights
    seconds = torch.tensor(table.latency_s, dtype=torch.float64)
    assert len(seconds) == backbone.num_blocks and (seconds > 0).all()
    assert torch.equal(table.weights, seconds / seconds.sum())
    assert (table.weights > 0).all() and table.weights.sum().item() == pytest.approx(1.0, abs=1e-12)
    written = table.to_json()
    assert written["cost"] == "latency" and written["batch_size"] == 16 and written["device"] == "cpu"
    assert [row["latency_s"] for row in written["blocks"]] == list(table.latency_s)
    assert sum(row["weight"] for row in written["blocks"]) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(("device", "precision"), [("cpu", "fp32"), pytest.param(
    "cuda", "bf16", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))])
def test_block_latency_times_every_block_on_its_device(device: str, precision: str) -> None:
    backbone = cifar_resnet(20, 10, 3).to(device, memory_format=torch.channels_last)
    seconds = block_latency(backbone, (3, 32, 32), batch_size=4, precision=precision, warmup=1, repeats=3)
    assert seconds.shape == (9,) and seconds.dtype == torch.float64 and (seconds > 0).all()
    table = cost_table("latency", backbone, (3, 32, 32), batch_size=4, precision=precision)
    assert table.device.startswith(device) and table.weights.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert table.flops == count_flops(cifar_resnet(20, 10, 3), (3, 32, 32)).blocks  # counted on a CPU copy


def test_a_resumed_run_takes_the_saved_table() -> None:
    # The resume state carries a measured table: loading it replaces weights and times measured anew.
    first = CostTable("latency", torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), (1, 1, 1), (5.0, 3.0, 2.0))
    again = CostTable("latency", torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64), (1, 1, 1), (4.0, 4.0, 2.0))
    again.load_state_dict(first.state_dict())
    assert torch.equal(again.weights, first.weights) and again.latency_s == first.latency_s
    with pytest.raises(ValueError, match="3 blocks, not 2"):
        CostTable("latency", torch.tensor([0.5, 0.5], dtype=torch.float64)).load_state_dict(first.state_dict())


def test_unknown_cost_and_bad_costs_are_refused() -> None:
    backbone = cifar_resnet(20, 10, 1)
    with pytest.raises(ValueError, match="unknown block cost 'time'"):
        cost_table("time", backbone, (1, 28, 28))
    assert shares(torch.tensor([1, 3])).tolist() == [0.25, 0.75]
    for bad in ([0.0, 0.0], [2.0, -1.0]):
        with pytest.raises(ValueError, match="non-negative with a positive sum"):
            shares(torch.tensor(bad))


@pytest.mark.e2e
def test_the_curriculum_stage_measures_writes_and_logs_its_latency_table(tmp_path: Path) -> None:
    # A tiny project with curriculum.cost: latency, a random ResNet-20 as its backbone and one short epoch: the
    # stage times the blocks, trains with their shares, writes the table as its DVC out and logs it to its run.
    root = make_tiny_repo(tmp_path / "repo", {"curriculum": {"cost": "latency", "epochs": 1, "images_per_epoch": 64,
                                                             "val_images": 32}})
    env = {k: v for k, v in os.environ.items()
           if k not in {tracking.PARENT_ENV, "DVC_EXP_NAME", "DVC_ROOT", "BLOCKDROP_ROOT"}}
    env["MLFLOW_TRACKING_URI"] = uri = f"sqlite:///{root / 'mlflow.db'}"
    for stage in ("prepare", "curriculum"):
        if stage == "curriculum":
            torch.manual_seed(0)
            save_backbone(cifar_resnet(20, 10, 1), root / "models" / "backbone.pt")
        done = subprocess.run([sys.executable, "-m", f"pipelines.{stage}"], cwd=root, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = json.loads((root / "reports/curriculum/block_costs.json").read_text())
    assert table["cost"] == "latency" and table["num_blocks"] == 9 and table["batch_size"] == 64
    assert table["device"] == "cpu" and table["timed_rounds"] > 0
    weights = [row["weight"] for row in table["blocks"]]
    seconds = [row["latency_s"] for row in table["blocks"]]
    assert all(w > 0 for w in weights) and sum(weights) == pytest.approx(1.0, abs=1e-12)
    assert all(s > 0 for s in seconds)
    assert weights == pytest.approx([s / sum(seconds) for s in seconds], rel=1e-12)
    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.stage = 'curriculum'")
    assert run.data.params["curriculum.cost"] == "latency"
    assert "reports/curriculum/block_costs.json" in {a.path for a in client.list_artifacts(run.info.run_id,
                                                                                           "reports/curriculum")}
    logged = client.download_artifacts(run.info.run_id, "reports/curriculum/block_costs.json", str(tmp_path))
    assert json.loads(Path(logged).read_text()) == table
