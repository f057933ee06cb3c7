"""The schedule params do what they say: pretrain.lr_schedule, curriculum.unlock_every, finetune.lr_decay_epoch,
and ``compile_model``. Each test fails if its param were ignored, and the resumable ones are checked across an
interruption (a schedule must derive from the epoch, never accumulate)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from test_rl_stages import Interrupt, tiny_split  # the same tiny data and interruption as the RL stage tests

from blockdrop import runtime
from blockdrop.config import Curriculum, Finetune, Pretrain
from blockdrop.data import Normalize
from blockdrop.models import cifar_resnet, policy_resnet8
from blockdrop.train import curriculum as curriculum_module
from blockdrop.train import finetune as finetune_module
from blockdrop.train import pretrain as pretrain_module
from blockdrop.train.context import TrainContext
from blockdrop.train.curriculum import learnable_blocks, train_curriculum
from blockdrop.train.finetune import finetune_jointly, lr_factor
from blockdrop.train.pretrain import pretrain_backbone, warmup_cosine, warmup_step

K = 6  # ResNet-14: 2 blocks per stage
NORMALIZE = Normalize([0.2], [0.3], torch.device("cpu"))



def stop_after(epoch: int | None):
    def on_epoch(row: dict) -> None:
        if epoch is not None and row["epoch"] == epoch:
            raise Interrupt

    return on_epoch


# --- pretrain.lr_schedule ---------------------------------------------------------------------------------


def test_step_schedule_by_hand() -> None:
    total, warmup = 100, 10
    assert [warmup_step(s, total, warmup) for s in (0, 5, 10, 49)] == pytest.approx([0.1, 0.55, 1.0, 1.0])
    assert [warmup_step(s, total, warmup) for s in (50, 74, 75, 99)] == pytest.approx([0.1, 0.1, 0.01, 0.01])
    assert warmup_step(0, 100, 0) == 1.0  # no warm-up: the full rate from the first step


def run_pretrain(state: Path, schedule: str, interrupt_after: int | None = None, compile_model: bool = False):
    torch.manual_seed(0)
    model = cifar_resnet(8, 10, 1)
    cfg = Pretrain(epochs=4, batch_size=32, lr=0.05, lr_schedule=schedule, warmup_epochs=0, crop_padding=2)
    loop = TrainContext(torch.Generator().manual_seed(0), "fp32", state, "key", on_epoch=stop_after(interrupt_after),
                        compile_model=compile_model)
    result = pretrain_backbone(model, tiny_split(64, 1), tiny_split(32, 2), NORMALIZE, cfg, loop)
    return result, model


def test_pretrain_step_schedule_drops_tenfold_at_half_and_three_quarters(tmp_path: Path) -> None:
    # 4 epochs of 2 steps: the rate logged at each epoch's end is the one of the next step (2, 4, 6, 8 of 8)
    step, _ = run_pretrain(tmp_path / "step.pt", "step")
    assert [r["lr"] for r in step.history] == pytest.approx([0.05, 0.005, 0.0005, 0.0005])
    cosine, _ = run_pretrain(tmp_path / "cos.pt", "cosine")
    assert [r["lr"] for r in cosine.history] == pytest.approx([0.05 * warmup_cosine(s, 8, 0) for s in (2, 4, 6, 8)])


def test_pretrain_step_schedule_resumes_on_the_same_curve(tmp_path: Path) -> None:
    unbroken, _ = run_pretrain(tmp_path / "a.pt", "step")
    with pytest.raises(Interrupt):
        run_pretrain(tmp_path / "b.pt", "step", interrupt_after=2)
    resumed, _ = run_pretrain(tmp_path / "b.pt", "step")
    for a, b in zip(unbroken.history, resumed.history, strict=True):
        assert (a["lr"], a["train/loss"]) == (b["lr"], b["train/loss"])


@pytest.mark.parametrize("full_size_epochs", [0, 1, 3])
def test_pretrain_last_full_size_epochs_train_on_whole_images(tmp_path: Path, full_size_epochs: int) -> None:
    """pretrain.full_size_epochs: the last epochs see the 16x16 images whole, the others 8x8 windows."""
    torch.manual_seed(0)
    model, sides = cifar_resnet(8, 10, 1), []
    model.register_forward_pre_hook(lambda m, args: sides.append(args[0].shape[-1]) if m.training else None)
    cfg = Pretrain(epochs=3, batch_size=32, lr=0.05, warmup_epochs=0, crop_padding=0, crop_size=8,
                   full_size_epochs=full_size_epochs)
    loop = TrainContext(torch.Generator().manual_seed(0), "fp32", tmp_path / "state.pt", "key")
    pretrain_backbone(model, tiny_split(64, 1), tiny_split(32, 2), NORMALIZE, cfg, loop)
    per_epoch = [sorted(set(sides[i:i + 2])) for i in range(0, len(sides), 2)]  # 64 images, batch 32: 2 steps
    assert per_epoch == [[8]] * (3 - full_size_epochs) + [[16]] * full_size_epochs


def test_pretrain_full_size_epochs_cannot_exceed_the_epochs() -> None:
    with pytest.raises(ValueError, match="full_size_epochs"):
        Pretrain(epochs=2, warmup_epochs=0, full_size_epochs=3)


# --- curriculum.unlock_every ------------------------------------------------------------------------------


def test_learnable_blocks_by_steps_and_by_epochs() -> None:
    def unlocked(epoch: int, step: int, every: int) -> int:
        return int(learnable_blocks(epoch, step, 4, K, every).sum())

    assert [unlocked(e, s, 0) for e in (0, 1) for s in range(4)] == [1] * 4 + [2] * 4  # one per epoch
    assert [unlocked(e, s, 3) for e in (0, 1) for s in range(4)] == [1, 1, 1, 2, 2, 2, 3, 3]
    assert unlocked(50, 0, 1) == K  # never more than K
    assert learnable_blocks(0, 3, 4, K, 3).tolist() == [False] * 4 + [True] * 2  # the last blocks first


def run_curriculum(state: Path, unlock_every: int, monkeypatch: pytest.MonkeyPatch, interrupt_after: int | None = None):
    """3 epochs of 4 steps; returns the history and the number of learnable blocks each step trained with."""
    seen: list[int] = []
    real = curriculum_module.rollout

    def spy(*args, **kwargs):
        seen.append(int(kwargs["learnable"].sum()))
        return real(*args, **kwargs)

    monkeypatch.setattr(curriculum_module, "rollout", spy)
    torch.manual_seed(0)
    backbone, policy = cifar_resnet(14, 10, 1), policy_resnet8(K, 1)
    cfg = Curriculum(epochs=3, images_per_epoch=64, batch_size=16, crop_padding=2, unlock_every=unlock_every)
    history = train_curriculum(backbone, policy, tiny_split(96, 1), tiny_split(40, 2), NORMALIZE, cfg,
                               TrainContext(torch.Generator().manual_seed(0), "fp32", state, "key",
                                            on_epoch=stop_after(interrupt_after)))
    return history, seen


def test_curriculum_unlocks_by_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    history, seen = run_curriculum(tmp_path / "s.pt", 3, monkeypatch)
    assert seen == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]  # one more block every 3 steps, across epochs
    assert [r["unlocked_blocks"] for r in history] == [2, 3, 4]  # the count at each epoch's end
    for row in history:  # validation forces on what was still locked at the epoch's end
        assert row["val/blocks_mean"] >= K - row["unlocked_blocks"]
    by_epoch, seen_by_epoch = run_curriculum(tmp_path / "e.pt", 0, monkeypatch)
    assert seen_by_epoch == [1] * 4 + [2] * 4 + [3] * 4 and [r["unlocked_blocks"] for r in by_epoch] == [1, 2, 3]


def test_curriculum_by_steps_resumes_where_it_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    unbroken, _ = run_curriculum(tmp_path / "a.pt", 3, monkeypatch)
    with pytest.raises(Interrupt):
        run_curriculum(tmp_path / "b.pt", 3, monkeypatch, interrupt_after=1)
    resumed, seen = run_curriculum(tmp_path / "b.pt", 3, monkeypatch)
    assert seen == [2, 2, 3, 3, 3, 4, 4, 4]  # the global step counts the epoch done before the interruption
    assert resumed == unbroken


# --- finetune.lr_decay_epoch / lr_decay -------------------------------------------------------------------


def test_lr_factor_by_hand() -> None:
    cfg = Finetune(epochs=10, lr_decay_epoch=8, lr_decay=0.1)
    assert [lr_factor(e, cfg) for e in (0, 7, 8, 9)] == [1.0, 1.0, 0.1, 0.1]
    assert {lr_factor(e, Finetune(epochs=10)) for e in range(10)} == {1.0}  # 0: never


def run_finetune(state: Path, decay_epoch: int, interrupt_after: int | None = None) -> list[dict]:
    torch.manual_seed(0)
    backbone, policy = cifar_resnet(14, 10, 1), policy_resnet8(K, 1)
    cfg = Finetune(epochs=3, images_per_epoch=32, batch_size=32, crop_padding=2, lr=1e-3, backbone_lr=4e-3,
                   lr_decay_epoch=decay_epoch, lr_decay=0.1)
    return finetune_jointly(backbone, policy, tiny_split(64, 1), tiny_split(32, 2), NORMALIZE, cfg,
                            TrainContext(torch.Generator().manual_seed(0), "fp32", state, "key",
                                         on_epoch=stop_after(interrupt_after)))


def test_finetune_decays_both_rates_from_the_epoch_and_resumes_without_compounding(tmp_path: Path) -> None:
    unbroken = run_finetune(tmp_path / "a.pt", 1)
    assert [r["lr"] for r in unbroken] == pytest.approx([1e-3, 1e-4, 1e-4])  # x0.1 once, not per epoch
    groups = torch.load(tmp_path / "a.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-4, 4e-4])  # policy and backbone alike
    assert [r["lr"] for r in run_finetune(tmp_path / "off.pt", 0)] == pytest.approx([1e-3] * 3)
    with pytest.raises(Interrupt):
        run_finetune(tmp_path / "b.pt", 1, interrupt_after=2)
    assert run_finetune(tmp_path / "b.pt", 1) == unbroken  # rates set from the epoch, not multiplied again


# --- compile ----------------------------------------------------------------------------------------------
# Inductor takes ~70 s to compile even a ResNet-8 on two CPU cores, so these tests compile with the aot_eager
# backend: the same graph capture (dynamo) and autograd tracing (AOTAutograd), without generated C++.


@pytest.fixture
def aot_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    fast = functools.partial(runtime.compiled, backend="aot_eager")
    for module in (pretrain_module, curriculum_module, finetune_module):
        monkeypatch.setattr(module, "compiled", fast)


def test_compiled_net_shares_the_weights_and_keeps_the_sparse_forward_eager() -> None:
    torch.manual_seed(0)
    model = cifar_resnet(8, 10, 1).eval()
    net = runtime.compiled(model, True, backend="aot_eager")
    assert runtime.compiled(model, False) is model
    x, policy = torch.randn(4, 1, 8, 8), torch.tensor([[1.0, 0.0, 1.0]] * 4)
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x))
        torch.testing.assert_close(net.forward_masked(x, policy), model.forward_masked(x, policy))
        torch.testing.assert_close(net(x, policy), model(x, policy))
        model.fc.bias.add_(1.0)  # a change to the module is seen by the compiled graph: the weights are shared
        torch.testing.assert_close(net(x), model(x))
    assert net.num_blocks == model.num_blocks and next(net.parameters()) is next(model.parameters())


def test_compiled_pretraining_trains_like_eager(tmp_path: Path, aot_eager: None) -> None:
    eager, eager_model = run_pretrain(tmp_path / "e.pt", "step")
    fast, fast_model = run_pretrain(tmp_path / "c.pt", "step", compile_model=True)
    assert [r["train/loss"] for r in fast.history] == pytest.approx([r["train/loss"] for r in eager.history],
                                                                    rel=1e-3)
    for a, b in zip(eager_model.state_dict().values(), fast_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-3, atol=1e-4)  # the original module trained


def test_compiled_masked_finetuning_trains_like_eager(tmp_path: Path, aot_eager: None) -> None:
    def run(state: Path, compile_model: bool) -> list[dict]:
        torch.manual_seed(0)
        backbone, policy = cifar_resnet(14, 10, 1), policy_resnet8(K, 1)
        cfg = Finetune(epochs=1, images_per_epoch=64, batch_size=32, crop_padding=2, execution="masked")
        return finetune_jointly(backbone, policy, tiny_split(64, 1), tiny_split(32, 2), NORMALIZE, cfg,
                                TrainContext(torch.Generator().manual_seed(0), "fp32", state, "key",
                                             compile_model=compile_model))

    eager, fast = run(tmp_path / "e.pt", False), run(tmp_path / "c.pt", True)
    assert fast[0]["train/loss"] == pytest.approx(eager[0]["train/loss"], rel=1e-3)
    assert fast[0]["val/accuracy"] == pytest.approx(eager[0]["val/accuracy"], abs=1 / 32)
