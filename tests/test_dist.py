"""Data-parallel training: the ranks' shards, their random draws in step, and ``pretrain`` under ``torchrun``.

The unit tests check what makes the ranks agree without talking: every rank draws the whole global batch's
random numbers and keeps its rows, so its shard is disjoint from the others', their union is the epoch, and
rank r's rows are exactly rows ``r*n/W ..`` of the one-process batch. The end-to-end test runs the tiny
profile's ``pretrain`` with two gloo processes (through ``dist.nproc`` and through ``torchrun`` itself),
SIGKILLs one run in the middle and checks that the rerun resumes and ends bit for bit where an unbroken run does.
"""

from __future__ import annotations

import csv
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.multiprocessing as mp
import yaml
from distworker import in_group
from mlflow import MlflowClient
from tinyrepo import make_tiny_repo

from blockdrop import rl, tracking
from blockdrop.data import Normalize, batches
from blockdrop.data.prepared import Split
from blockdrop.dist import Dist, data_parallel
from blockdrop.train.pretrain import stochastic_depth_forward

# ------------------------------------------------------------------------------------------ the shards


def _numbered_split(n: int) -> Split:
    """Image i is filled with i % 256 and labelled i: a batch's labels say which images it holds."""
    images = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, 6, 6).contiguous()
    return Split(images, torch.arange(n))


def _epoch(split: Split, batch: int, dist: Dist, seed: int = 0, **augment) -> tuple[list, torch.Generator]:
    generator = torch.Generator().manual_seed(seed)
    norm = Normalize([0.0], [1 / 255], torch.device("cpu"))  # (x/255 - 0) / (1/255): the pixel value itself
    out = list(batches(split, batch, norm, generator=generator, shuffle=True, dist=dist, **augment))
    return out, generator


@pytest.mark.parametrize("world", [2, 3])
def test_rank_shards_are_disjoint_and_their_union_is_the_epoch(world: int) -> None:
    n, batch = 101, 12  # 8 whole global batches; the last 5 images are dropped with several ranks
    split = _numbered_split(n)
    per_rank = [_epoch(split, batch, Dist(rank, world))[0] for rank in range(world)]
    one, _ = _epoch(split, batch, Dist(), drop_last=True)
    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(0))

    assert all(len(steps) == n // batch for steps in per_rank)  # every rank takes the same number of steps
    seen = [torch.cat([y for _, y in steps]) for steps in per_rank]
    for a in range(world):
        for b in range(a + 1, world):
            assert not set(seen[a].tolist()) & set(seen[b].tolist()), f"ranks {a} and {b} share images"
    assert sorted(torch.cat(seen).tolist()) == sorted(permutation[: n // batch * batch].tolist())
    for step, (x_one, y_one) in enumerate(one):  # rank r holds rows r*b/W .. (r+1)*b/W of each global batch
        assert torch.equal(torch.cat([steps[step][1] for steps in per_rank]), y_one)
        assert torch.equal(torch.cat([steps[step][0] for steps in per_rank]), x_one)


def test_ranks_augment_their_rows_as_one_process_would_and_their_generators_stay_in_step() -> None:
    split = Split(torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8), torch.arange(64))
    augment = {"crop_padding": 2, "flip": True}
    one, g_one = _epoch(split, 16, Dist(), seed=3, drop_last=True, **augment)
    ranks = [_epoch(split, 16, Dist(rank, 4), seed=3, **augment) for rank in range(4)]
    for step, (x_one, _) in enumerate(one):  # the crops and flips are those of the one-process batch's rows
        assert torch.equal(torch.cat([steps[step][0] for steps, _ in ranks]), x_one)
    states = [g.get_state() for _, g in ranks]
    assert all(torch.equal(s, g_one.get_state()) for s in states)  # same draws: the next epoch agrees too


def test_sampled_policies_and_drop_paths_are_rows_of_the_one_process_draw() -> None:
    probs = torch.rand(12, 5, generator=torch.Generator().manual_seed(1))
    one = rl.sample_actions(probs, torch.Generator().manual_seed(7))
    parts = [rl.sample_actions(probs[Dist(r, 3).rows(12)], torch.Generator().manual_seed(7), Dist(r, 3))
             for r in range(3)]
    assert torch.equal(torch.cat(parts), one)
    assert 0 < one.sum() < one.numel()  # a real draw, not all ones or zeros

    class Recorder(torch.nn.Module):  # records the per-image policy stochastic depth hands the network
        num_blocks = 6

        def forward_masked(self, x, policy):
            self.policy = policy
            return x

    nets = [Recorder() for _ in range(3)]
    x = torch.zeros(12, 1)
    whole = Recorder()
    stochastic_depth_forward(whole, x, 0.5, "image", torch.Generator().manual_seed(5))
    for r, net in enumerate(nets):
        stochastic_depth_forward(net, x[Dist(r, 3).rows(12)], 0.5, "image", torch.Generator().manual_seed(5),
                                 Dist(r, 3))
    assert torch.equal(torch.cat([net.policy for net in nets]), whole.policy)


def test_one_process_trains_without_a_wrapper_and_uneven_batches_are_refused() -> None:
    step = lambda x: x  # noqa: E731
    assert data_parallel(Dist(), step, [torch.nn.Linear(1, 1)], skips_blocks=False) is step
    assert Dist(1, 2).rows(8) == slice(4, 8)
    with pytest.raises(ValueError, match="does not split"):
        Dist(0, 2).rows(7)


@pytest.mark.e2e
def test_epoch_sums_and_the_resume_check_over_a_real_gloo_group(tmp_path: Path) -> None:
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(in_group, args=(2, f"file://{tmp_path / 'rendezvous'}", queue), nprocs=2)
    results = sorted(queue.get() for _ in range(2))
    assert [r[1:4] for r in results] == [(3, "int", 0.5)] * 2  # 1 + 2 images, 0 + 0.5 loss
    assert all("different epochs [0, 1]" in r[4] and "checkpoints/x.pt" in r[4] for r in results)


# --------------------------------------------------------------------------------------- under torchrun

# Short epochs (8 steps of 2 x 16 images, a quarter of a second): the workers outlive a SIGKILL of their launcher
# by up to a second (how often they check it), which leaves most of the 12 epochs still to run.
EPOCHS = 12
OVERRIDES = {
    "data": {"train_limit": 256, "val_size": 64, "test_limit": 64, "verify_checksums": False},
    "model": {"depth": 8},
    "pretrain": {"epochs": EPOCHS, "batch_size": 32},
    "dist": {"nproc": 2},
    "tracking": {"log_model": False},
}
TIMING = ("images_per_s", "epoch_seconds")


def _env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in {tracking.PARENT_ENV, "DVC_EXP_NAME", "DVC_ROOT", "BLOCKDROP_ROOT", "OMP_NUM_THREADS"}}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    return env


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
            "pipelines.pretrain"]


def _run(root: Path, argv: list[str]) -> str:
    done = subprocess.run(argv, cwd=root, env=_env(root), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def _history(root: Path) -> list[dict]:
    with (root / "reports" / "pretrain" / "history.csv").open() as f:
        return [{k: float(v) for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _runs(root: Path) -> list:
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("blockdrop")
    return client.search_runs([exp.experiment_id], "tags.mlflow.runName = 'pretrain'",
                              order_by=["attributes.start_time ASC"])


@pytest.mark.e2e
def test_pretrain_on_two_gloo_processes_writes_one_set_of_outputs_and_resumes_after_a_kill(tmp_path: Path) -> None:
    root = make_tiny_repo(tmp_path / "repo", OVERRIDES)
    _run(root, [sys.executable, "-m", "pipelines.prepare"])

    # 1. Unbroken, through the param: `python -m pipelines.pretrain` (the dvc.yaml command) relaunches itself.
    out = _run(root, [sys.executable, "-m", "pipelines.pretrain"])
    assert "relaunching as -m torch.distributed.run --standalone --nproc_per_node=2" in out
    assert "rank 0 of 2 processes" in out
    history = _history(root)
    assert [row["epoch"] for row in history] == list(range(1, EPOCHS + 1))
    assert history[-1]["train/loss"] < history[0]["train/loss"] - 0.2, history  # the loss goes down
    # One set of outputs (rank 0's) and one MLflow run; the resume state is gone once the outputs are written.
    assert sorted(p.name for p in (root / "models").iterdir()) == ["backbone.pt"]
    assert sorted(p.name for p in (root / "reports" / "pretrain").iterdir()) == ["history.csv", "metrics.json"]
    assert not list((root / "checkpoints").glob("*.pt"))
    (unbroken,) = _runs(root)
    assert unbroken.info.status == "FINISHED"
    assert unbroken.data.params["dist.nproc"] == "2" and unbroken.data.tags["dist.world_size"] == "2"
    assert unbroken.data.metrics["train/epochs"] == EPOCHS
    reference, reference_history = _md5(root / "models" / "backbone.pt"), history

    # 2. `torchrun` itself, SIGKILLed (launcher and both workers) right after the first epoch's state is saved.
    for path in (root / "models" / "backbone.pt", *(root / "reports" / "pretrain").iterdir()):
        path.unlink()
    state = root / "checkpoints" / "pretrain.pt"
    with (tmp_path / "killed.log").open("w") as log:
        proc = subprocess.Popen(TORCHRUN, cwd=root, env=_env(root), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + 300
    while not state.exists():
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no epoch saved in 300 s"
        time.sleep(0.02)
    workers = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # torchrun puts each worker in a session of its own, out of the killed group's reach: they see their
    # launcher gone (blockdrop.supervision.watch_launcher) and stop within a second or two.
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"workers outlived their launcher: {alive}"
    epoch = torch.load(state, weights_only=True)["epoch"]
    assert 1 <= epoch < EPOCHS and not (root / "models" / "backbone.pt").exists()
    assert "the torchrun launcher that started it" in (tmp_path / "killed.log").read_text()

    # 3. The rerun resumes after that epoch and ends bit for bit where the unbroken run did.
    out = _run(root, TORCHRUN)
    assert f"resuming from checkpoints/pretrain.pt after epoch {epoch}" in out
    assert _md5(root / "models" / "backbone.pt") == reference
    assert _history(root) == reference_history
    _, dead, rerun = _runs(root)
    # KILLED when rank 0 stopped on seeing its launcher gone (the rerun marks its run); FAILED when rank 1 saw it
    # first and rank 0's next gradient exchange failed (gloo: connection closed), marking its own run.
    assert dead.info.status in ("KILLED", "FAILED")
    assert (rerun.info.status, rerun.data.tags["resumed_from_epoch"]) == ("FINISHED", str(epoch))
    assert rerun.data.tags["resumed_from_run"] == dead.info.run_id

    # 4. torchrun with another count than params.yaml's: refused, as dvc.lock and the run would say otherwise. (A
    # worker's environment as torchrun sets it, without torchrun: its report of a failed worker would hide the
    # exit code the stage gives.)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["dist"]["nproc"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    worker = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    done = subprocess.run([sys.executable, "-m", "pipelines.pretrain"], cwd=root, env=_env(root) | worker,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip() == ("error: invalid params in params.yaml: dist.nproc: 1, but torchrun started 2 "
                                   "processes per machine: set dist.nproc: 2")
    assert len(_runs(root)) == 3  # refused before any run was opened


@pytest.mark.e2e
def test_the_fair_baseline_trains_on_two_gloo_processes_as_finetune_would(tmp_path: Path) -> None:
    # finetune-full on finetune's budget under dist.nproc 2: relaunched through torchrun like finetune, every
    # global batch whole (3 x 32 of the 100 images: the last incomplete one dropped, as finetune drops it), one
    # set of outputs and one MLflow run.
    overrides = {**OVERRIDES, "pretrain": {"epochs": 1, "batch_size": 32},
                 "finetune": {"epochs": 2, "images_per_epoch": 100, "batch_size": 32}}
    root = make_tiny_repo(tmp_path / "repo", overrides)
    _run(root, [sys.executable, "-m", "pipelines.prepare"])
    _run(root, [sys.executable, "-m", "pipelines.pretrain"])
    out = _run(root, [sys.executable, "-m", "pipelines.finetune_full"])
    assert "-m pipelines.finetune_full" in out and "rank 0 of 2 processes" in out
    metrics = yaml.safe_load((root / "reports" / "finetune-full" / "metrics.json").read_text())
    assert metrics["train"]["epochs"] == 2 and metrics["train"]["images"] == 2 * 96
    assert sorted(p.name for p in (root / "reports" / "finetune-full").iterdir()) == ["history.csv", "metrics.json"]
    assert (root / "models" / "backbone_finetuned.pt").stat().st_size > 0
    assert not list((root / "checkpoints").glob("*.pt"))
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("blockdrop").experiment_id],
                                "tags.mlflow.runName = 'finetune-full'")
    assert run.info.status == "FINISHED" and run.data.tags["dist.world_size"] == "2"
