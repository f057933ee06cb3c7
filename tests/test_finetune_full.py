"""The fair full-network baseline (``finetune-full``) trains on exactly the budget finetune gives BlockDrop's
backbone: the same images (order, crops, flips), the same optimizer and rate at every step, the same BatchNorm
mode; it reads finetune's budget keys and no policy key, and dvc.yaml lists exactly those keys.

Both loops run for real on tiny data; the test only listens: it records the batches each loop draws (a wrapper
around the real ``batches``) and the optimizer at each step (torch's global optimizer step hook)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from test_rl_stages import tiny_split  # the same tiny data as the RL stage tests
from torch.optim.optimizer import register_optimizer_step_pre_hook

from blockdrop import lineage
from blockdrop.config import Finetune
from blockdrop.data import Normalize
from blockdrop.models import cifar_resnet, policy_resnet8
from blockdrop.predict import accuracy, predict
from blockdrop.train import finetune as finetune_module
from blockdrop.train import finetune_full as finetune_full_module
from blockdrop.train.context import TrainContext
from blockdrop.train.finetune import finetune_jointly
from blockdrop.train.finetune_full import finetune_full

REPO = Path(__file__).resolve().parents[1]
NORMALIZE = Normalize([0.2], [0.3], torch.device("cpu"))
# 3 epochs of 48 of the 64 images at batch 32 (a full batch and a last one of 16), the decay from epoch 2, and a
# backbone rate that differs from the policy's: every part of the schedule shows.
BUDGET = Finetune(epochs=3, images_per_epoch=48, batch_size=32, lr=1e-3, backbone_lr=4e-3, lr_decay_epoch=2,
                  lr_decay=0.1, crop_padding=2, flip=True)
BUDGET_KEYS = {"epochs", "images_per_epoch", "batch_size", "lr", "backbone_lr", "lr_decay_epoch", "lr_decay",
               "crop_padding", "flip"}


def pretrained(depth: int = 14) -> torch.nn.Module:
    torch.manual_seed(0)
    return cifar_resnet(depth, 10, 1)


def listen(monkeypatch: pytest.MonkeyPatch, module, backbone: torch.nn.Module) -> dict[str, list]:
    """Record what ``module``'s loop trains ``backbone`` on: each batch it draws, and at each optimizer step the
    hyperparameters of the param group holding the backbone, the group's coverage and the backbone's mode."""
    seen: dict[str, list] = {"batches": [], "steps": [], "optimizers": []}
    real = module.batches

    def recorded(*args, **kwargs):
        for x, y in real(*args, **kwargs):
            seen["batches"].append((x.clone(), y.clone()))
            yield x, y

    monkeypatch.setattr(module, "batches", recorded)
    ours = {id(p) for p in backbone.parameters()}

    def on_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        group = next(g for g in optimizer.param_groups if {id(p) for p in g["params"]} & ours)
        assert {id(p) for p in group["params"]} == ours  # the whole backbone, nothing else, in one group
        seen["steps"].append({**{k: v for k, v in group.items() if k != "params"}, "train_mode": backbone.training,
                              "optimizer": type(optimizer)})
        if optimizer not in seen["optimizers"]:
            seen["optimizers"].append(optimizer)

    handle = register_optimizer_step_pre_hook(on_step)
    seen["handle"] = [handle]
    return seen


def run_both(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cfg: Finetune = BUDGET):
    """finetune (backbone + policy) and finetune-full (the backbone alone) from the same pretrained weights and
    seed; what each loop was seen to train on, and the two trained backbones."""
    train, val = tiny_split(64, 1), tiny_split(32, 2)
    blockdrop_backbone, full = pretrained(), pretrained()
    policy = policy_resnet8(blockdrop_backbone.num_blocks, 1)
    runs = {}
    for name, module, backbone, call in (
        ("finetune", finetune_module, blockdrop_backbone,
         lambda loop: finetune_jointly(blockdrop_backbone, policy, train, val, NORMALIZE, cfg, loop)),
        ("finetune-full", finetune_full_module, full,
         lambda loop: finetune_full(full, train, val, NORMALIZE, cfg, loop)),
    ):
        seen = listen(monkeypatch, module, backbone)
        try:
            seen["history"] = call(TrainContext(torch.Generator().manual_seed(0), "fp32", tmp_path / f"{name}.pt",
                                                "key"))
        finally:
            seen["handle"][0].remove()
        seen["state_steps"] = sorted({int(s["step"]) for o in seen["optimizers"] for p in backbone.parameters()
                                      if (s := o.state.get(p))})
        runs[name] = seen
    return runs["finetune"], runs["finetune-full"], blockdrop_backbone, full


@pytest.mark.parametrize("distill", [0.0, 1.0])
def test_the_fair_baseline_gets_exactly_blockdrops_backbone_budget(distill: float, monkeypatch, tmp_path: Path) -> None:
    # distill adds a forward of every block to finetune's steps, not an image or a draw of the generator
    blockdrop, full, _, _ = run_both(monkeypatch, tmp_path, BUDGET.model_copy(update={"distill": distill}))
    # the same images: count, order, crops and flips, batch by batch, in every epoch
    sizes = [len(y) for _, y in full["batches"]]
    assert sizes == [len(y) for _, y in blockdrop["batches"]] == [32, 16] * BUDGET.epochs
    for (xa, ya), (xb, yb) in zip(blockdrop["batches"], full["batches"], strict=True):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    assert [r["train/images"] for r in full["history"]] == [BUDGET.images_per_epoch] * BUDGET.epochs
    # the same optimizer, one step per batch, every hyperparameter and the rate at each step as the backbone's group
    assert len(full["steps"]) == len(blockdrop["steps"]) == len(sizes)
    assert full["steps"] == blockdrop["steps"]
    assert {s["optimizer"] for s in full["steps"]} == {torch.optim.Adam}
    assert [s["lr"] for s in full["steps"]] == pytest.approx([4e-3] * 4 + [4e-4] * 2)  # decayed from epoch 2 (0-based)
    assert {s["weight_decay"] for s in full["steps"]} == {0} and all(s["train_mode"] for s in full["steps"])
    assert full["state_steps"] == blockdrop["state_steps"] == [len(sizes)]  # Adam's own count, every parameter


def test_backbone_lr_zero_means_finetunes_single_rate(monkeypatch, tmp_path: Path) -> None:
    cfg = Finetune(**{**BUDGET.model_dump(), "backbone_lr": 0.0, "epochs": 1, "lr_decay_epoch": 0})
    blockdrop, full, _, _ = run_both(monkeypatch, tmp_path, cfg)
    assert full["steps"] == blockdrop["steps"] and {s["lr"] for s in full["steps"]} == {cfg.lr}


def train_full(cfg: Finetune, tmp_path: Path, name: str) -> tuple[list[dict], dict[str, torch.Tensor]]:
    backbone = pretrained(8)  # ResNet-8: a dozen runs of this test must stay quick
    history = finetune_full(backbone, tiny_split(64, 1), tiny_split(32, 2), NORMALIZE, cfg,
                            TrainContext(torch.Generator().manual_seed(0), "fp32", tmp_path / f"{name}.pt", "key"))
    return history, copy.deepcopy(backbone.state_dict())


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


CHANGED_BUDGET = {"epochs": 3, "images_per_epoch": 40, "batch_size": 16, "backbone_lr": 1e-3, "lr_decay": 0.5,
                  "crop_padding": 0, "flip": False}
POLICY_ONLY = {"alpha": 0.95, "penalty": 9.0, "pg_reduction": "sum", "execution": "masked", "greedy_ce": 2.0,
               "distill": 1.0, "cost": "flops"}


def test_each_budget_key_changes_the_result_and_no_policy_key_does(tmp_path: Path) -> None:
    base_cfg = Finetune(**{**BUDGET.model_dump(), "epochs": 2, "lr_decay_epoch": 1})
    base_history, base = train_full(base_cfg, tmp_path, "base")
    for key, value in CHANGED_BUDGET.items():
        _, weights = train_full(Finetune(**{**base_cfg.model_dump(), key: value}), tmp_path, f"budget-{key}")
        assert not same(weights, base), key
    # lr matters where backbone_lr is 0 (then it is the backbone's rate); lr_decay_epoch moves the decay
    single = Finetune(**{**base_cfg.model_dump(), "backbone_lr": 0.0})
    _, a = train_full(single, tmp_path, "lr-a")
    _, b = train_full(Finetune(**{**single.model_dump(), "lr": 2e-3}), tmp_path, "lr-b")
    _, c = train_full(Finetune(**{**base_cfg.model_dump(), "lr_decay_epoch": 0}), tmp_path, "decay")
    assert not same(a, b) and not same(c, base)
    changed = Finetune(**{**base_cfg.model_dump(), **POLICY_ONLY})
    history, weights = train_full(changed, tmp_path, "policy")
    assert history == base_history and same(weights, base)
    assert set(Finetune.model_fields) == BUDGET_KEYS | set(POLICY_ONLY)  # every key of the section is tried


def test_dvc_yaml_lists_the_budget_keys_and_no_policy_key() -> None:
    keys = lineage.stage_param_keys("finetune-full", REPO / "dvc.yaml")
    finetune_keys = {k.removeprefix("finetune.") for k in keys if k.startswith("finetune.")}
    assert finetune_keys == BUDGET_KEYS and "finetune" not in keys
    assert set(keys) - {f"finetune.{k}" for k in BUDGET_KEYS} == {"dist", "seed", "device", "precision", "compile"}
    assert "models/backbone.pt" in lineage.stage_deps("finetune-full", REPO / "dvc.yaml")
    assert "models/policy_cl.pt" not in lineage.stage_deps("finetune-full", REPO / "dvc.yaml")
    assert "finetune-full" in lineage.upstream_stages("evaluate", REPO / "dvc.yaml")


class Interrupt(Exception):
    pass


def test_a_resumed_run_matches_an_unbroken_one(tmp_path: Path) -> None:
    cfg = Finetune(**{**BUDGET.model_dump(), "epochs": 2, "lr_decay_epoch": 1})

    def run(state: Path, stop_after: int | None = None) -> tuple[list[dict], torch.nn.Module]:
        def on_epoch(row: dict) -> None:
            if row["epoch"] == stop_after:
                raise Interrupt

        backbone = pretrained(8)
        history = finetune_full(backbone, tiny_split(64, 1), tiny_split(32, 2), NORMALIZE, cfg,
                                TrainContext(torch.Generator().manual_seed(0), "fp32", state, "key", on_epoch))
        return history, backbone

    unbroken, a = run(tmp_path / "a.pt")
    with pytest.raises(Interrupt):
        run(tmp_path / "b.pt", stop_after=1)
    resumed, b = run(tmp_path / "b.pt")
    assert resumed == unbroken and [r["lr"] for r in resumed] == pytest.approx([4e-3, 4e-4])
    assert same(a.state_dict(), b.state_dict())


def test_a_static_subnetwork_trains_only_its_blocks_on_the_same_budget(tmp_path: Path) -> None:
    cfg = Finetune(**{**BUDGET.model_dump(), "epochs": 2, "lr_decay_epoch": 1})
    start = pretrained(8).state_dict()  # ResNet-8: 3 blocks, one per stage
    keep = torch.tensor([1.0, 0.0, 1.0])

    def train(mask: torch.Tensor | None, name: str) -> tuple[list[dict], torch.nn.Module]:
        backbone = pretrained(8)
        history = finetune_full(backbone, tiny_split(64, 1), tiny_split(32, 2), NORMALIZE, cfg,
                                TrainContext(torch.Generator().manual_seed(0), "fp32", tmp_path / f"{name}.pt", "key"),
                                keep=mask)
        return history, backbone

    history, static = train(keep, "static")
    trained = {k for k, v in static.state_dict().items() if not torch.equal(v, start[k])}
    assert trained and not any(k.startswith("blocks.1.") for k in trained)  # the dropped block is never touched
    assert any(k.startswith("blocks.0.") for k in trained) and any(k.startswith("blocks.2.") for k in trained)
    # the history's validation accuracy is the subnetwork's, not the full network's
    val = tiny_split(32, 2)
    assert history[-1]["val/accuracy"] == accuracy(
        predict(static, val, NORMALIZE, policy_fn=lambda x: keep.expand(len(x), -1)), val.labels)
    # every block kept is the fair baseline itself, bit for bit
    all_history, all_kept = train(torch.ones(3), "all")
    full_history, full = train(None, "full")
    assert all_history == full_history and same(all_kept.state_dict(), full.state_dict())
