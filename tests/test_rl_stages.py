"""The RL stages on tiny data: deterministic for a seed, and a resumed run equals an unbroken one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blockdrop import rl
from blockdrop.config import Curriculum, Finetune
from blockdrop.data import Normalize, Split
from blockdrop.models import cifar_resnet, policy_resnet8
from blockdrop.train.block_costs import CostTable, cost_table
from blockdrop.train.context import TrainContext
from blockdrop.train.curriculum import train_curriculum
from blockdrop.train.finetune import finetune_jointly

K = 6  # ResNet-20 has 9 blocks; ResNet-14 has 6


class Interrupt(Exception):
    pass


def tiny_split(n: int, seed: int) -> Split:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = torch.randint(0, 60, (n, 1, 16, 16), generator=g, dtype=torch.uint8)
    for i, c in enumerate(labels.tolist()):  # a class-dependent bar, so accuracy is not all chance
        images[i, 0, c : c + 3, 2:14] = 220
    return Split(images, labels)


def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    return cifar_resnet(14, 10, 1), policy_resnet8(K, 1)


def train_tiny(train, cfg: Curriculum | Finetune, state: Path, interrupt_after: int | None = None,
               costs: CostTable | None = None):
    """Run an RL stage (``train_curriculum`` or ``finetune_jointly``) on tiny data with fresh models;
    return its history and the two trained models. ``costs``: the blocks' costs in the reward."""
    backbone, policy = models()

    def on_epoch(row: dict) -> None:
        if interrupt_after is not None and row["epoch"] == interrupt_after:
            raise Interrupt

    history = train(backbone, policy, tiny_split(96, 1), tiny_split(40, 2), Normalize([0.2], [0.3], "cpu"),
                    cfg, TrainContext(torch.Generator().manual_seed(0), "fp32", state, "key", on_epoch), costs=costs)
    return history, backbone, policy


def run_curriculum(state: Path, interrupt_after: int | None = None) -> list[dict]:
    cfg = Curriculum(epochs=3, images_per_epoch=64, batch_size=32, crop_padding=2)
    return train_tiny(train_curriculum, cfg, state, interrupt_after)[0]


def run_finetune(state: Path, interrupt_after: int | None = None) -> list[dict]:
    cfg = Finetune(epochs=2, images_per_epoch=64, batch_size=32, crop_padding=2)
    return train_tiny(finetune_jointly, cfg, state, interrupt_after)[0]


@pytest.mark.parametrize("run", [run_curriculum, run_finetune], ids=["curriculum", "finetune"])
def test_same_seed_same_history(run, tmp_path: Path) -> None:
    first, second = run(tmp_path / "a.pt"), run(tmp_path / "b.pt")
    assert first == second  # bit-for-bit: every reward, accuracy and block count


@pytest.mark.parametrize("run", [run_curriculum, run_finetune], ids=["curriculum", "finetune"])
def test_resume_after_interruption_matches_unbroken_run(run, tmp_path: Path) -> None:
    unbroken = run(tmp_path / "unbroken.pt")
    state = tmp_path / "state.pt"
    with pytest.raises(Interrupt):
        run(state, interrupt_after=1)
    assert torch.load(state, weights_only=True)["epoch"] == 1  # the epoch that finished was saved
    assert run(state) == unbroken


def test_state_of_other_params_is_not_resumed(tmp_path: Path) -> None:
    state = tmp_path / "state.pt"
    run_curriculum(state)
    torch.save({**torch.load(state, weights_only=True), "run_key": "other params"}, state)
    assert [r["epoch"] for r in run_curriculum(state)] == [1, 2, 3]  # started over


def test_curriculum_unlocks_one_block_per_epoch(tmp_path: Path) -> None:
    history = run_curriculum(tmp_path / "s.pt")
    assert [r["unlocked_blocks"] for r in history] == [1, 2, 3]
    # forced-on blocks count as used: at least K - unlocked blocks run on every image
    for row in history:
        assert row["train/blocks"] >= K - row["unlocked_blocks"]
        assert row["val/blocks_mean"] >= K - row["unlocked_blocks"]


def test_curriculum_validation_subset_changes_only_the_curve(tmp_path: Path) -> None:
    # curriculum.val_images scores fewer validation images per epoch; it draws no random numbers, so the
    # trained policy and every training number are the same as when all of them are scored.
    runs = {}
    for n in (0, 10):
        cfg = Curriculum(epochs=2, images_per_epoch=64, batch_size=32, crop_padding=2, val_images=n)
        history, _, policy = train_tiny(train_curriculum, cfg, tmp_path / f"{n}.pt")
        runs[n] = history, policy.state_dict()
    (all_rows, all_weights), (sub_rows, sub_weights) = runs[0], runs[10]
    for a, b in zip(all_rows, sub_rows, strict=True):
        assert {k: v for k, v in a.items() if not k.startswith("val/")} == \
               {k: v for k, v in b.items() if not k.startswith("val/")}
        assert round(b["val/accuracy"] * 10, 6) == round(b["val/accuracy"] * 10)  # scored on 10 images
    assert all(torch.equal(all_weights[k], sub_weights[k]) for k in all_weights)


def test_finetune_greedy_cross_entropy_trains_the_greedy_paths(tmp_path: Path) -> None:
    # greedy_ce adds the cross-entropy under the greedy actions: the loss grows by that term and the
    # backbone ends elsewhere; 0 is the paper's loss.
    results = {}
    for weight in (0.0, 1.0):
        cfg = Finetune(epochs=1, images_per_epoch=64, batch_size=32, crop_padding=2, greedy_ce=weight)
        history, backbone, _ = train_tiny(finetune_jointly, cfg, tmp_path / f"{weight}.pt")
        results[weight] = history[0], backbone.state_dict()
    (paper, paper_w), (greedy, greedy_w) = results[0.0], results[1.0]
    assert greedy["train/ce"] > 1.5 * paper["train/ce"]  # two cross-entropies of similar size, not one
    assert not all(torch.equal(paper_w[k], greedy_w[k]) for k in paper_w)


def test_finetune_backbone_lr_sets_the_backbone_step(tmp_path: Path) -> None:
    # Adam's first step moves each weight by its group's lr times m / sqrt(v) = g / |g| = +-1: after one
    # step the largest change is `backbone_lr` in the backbone and `lr` in the policy network.
    cfg = Finetune(epochs=1, images_per_epoch=32, batch_size=32, crop_padding=2, lr=1e-3, backbone_lr=4e-3)
    _, backbone, policy = train_tiny(finetune_jointly, cfg, tmp_path / "s.pt")
    backbone0, policy0 = models()

    def largest_step(after: torch.nn.Module, before: torch.nn.Module) -> float:
        return max((a - b).abs().max().item() for a, b in zip(after.parameters(), before.parameters(), strict=True))

    assert largest_step(backbone, backbone0) == pytest.approx(4e-3, rel=1e-3)
    assert largest_step(policy, policy0) == pytest.approx(1e-3, rel=1e-3)


# --- the blocks' costs in the reward (curriculum.cost, finetune.cost) ------------------------------------------

STAGES = {"curriculum": (train_curriculum, Curriculum(epochs=2, images_per_epoch=64, batch_size=32, crop_padding=2)),
          "finetune": (finetune_jointly, Finetune(epochs=2, images_per_epoch=64, batch_size=32, crop_padding=2))}


def paper_reward(actions: torch.Tensor, correct: torch.Tensor, penalty: float, weights=None) -> torch.Tensor:
    """The reward as blockdrop.rl computed it before per-block costs: ``1 - (blocks/K)^2`` or ``-penalty``."""
    assert weights is None, "cost blocks must hand the reward no weights"
    used = actions.sum(1) / actions.shape[1]
    return torch.where(correct, 1 - used**2, torch.full_like(used, -penalty))


def weights_of(_history, backbone, policy) -> dict[str, torch.Tensor]:
    return {**{f"backbone.{k}": v for k, v in backbone.state_dict().items()},
            **{f"policy.{k}": v for k, v in policy.state_dict().items()}}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_cost_blocks_trains_bit_for_bit_as_the_papers_reward(name: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # Three runs of the same steps: with the stage's `blocks` table (what the entry point builds), with no table
    # (the loops' default), and with rl.reward replaced by the paper's formula as the code computed it before
    # costs existed. Every weight, buffer and history number must be identical.
    train, cfg = STAGES[name]
    backbone, _ = models()
    table = cost_table("blocks", backbone, (1, 16, 16))
    runs = {"table": train_tiny(train, cfg, tmp_path / "table.pt", costs=table),
            "none": train_tiny(train, cfg, tmp_path / "none.pt")}
    monkeypatch.setattr(rl, "reward", paper_reward)
    runs["paper"] = train_tiny(train, cfg, tmp_path / "paper.pt")
    reference = weights_of(*runs["paper"])
    for run in ("table", "none"):
        assert runs[run][0] == runs["paper"][0], run
        got = weights_of(*runs[run])
        assert got.keys() == reference.keys()
        assert [k for k in reference if not torch.equal(got[k], reference[k])] == [], run


@pytest.mark.parametrize("name", sorted(STAGES))
def test_cost_flops_changes_what_is_learnt(name: str, tmp_path: Path) -> None:
    # A table that makes the first block 90% of the network's cost: another reward, another policy.
    train, cfg = STAGES[name]
    heavy = torch.tensor([0.9] + [0.02] * (K - 1), dtype=torch.float64)
    paper, _, paper_policy = train_tiny(train, cfg, tmp_path / "paper.pt")
    flops, _, flops_policy = train_tiny(train, cfg, tmp_path / "flops.pt", costs=CostTable("flops", heavy))
    assert [r["train/reward"] for r in flops] != [r["train/reward"] for r in paper]
    assert not torch.equal(flops_policy.fc.bias, paper_policy.fc.bias)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_a_resumed_run_keeps_the_latency_table_it_began_with(name: str, tmp_path: Path) -> None:
    # The entry point times the blocks again when a killed stage is rerun; the run must go on with the table its
    # first epochs trained with (saved in the resume state), and end where an unbroken run ends.
    train, cfg = STAGES[name]
    measured = torch.tensor([0.3, 0.2, 0.2, 0.1, 0.1, 0.1], dtype=torch.float64)

    def table(weights: torch.Tensor) -> CostTable:
        return CostTable("latency", weights.clone(), latency_s=tuple((weights * 1e-3).tolist()))

    unbroken = train_tiny(train, cfg, tmp_path / "unbroken.pt", costs=table(measured))
    state = tmp_path / "state.pt"
    with pytest.raises(Interrupt):
        train_tiny(train, cfg, state, interrupt_after=1, costs=table(measured))
    remeasured = table(torch.full((K,), 1 / K, dtype=torch.float64))
    resumed = train_tiny(train, cfg, state, costs=remeasured)
    assert torch.equal(remeasured.weights, measured)
    assert resumed[0] == unbroken[0]
    assert all(torch.equal(a, b) for a, b in zip(weights_of(*resumed).values(), weights_of(*unbroken).values(),
                                                 strict=True))
