"""blockdrop.train.pretrain: the learning-rate schedule and stochastic depth."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blockdrop.models import cifar_resnet
from blockdrop.train.pretrain import drop_path_policy, stochastic_depth_forward, warmup_cosine


def test_warmup_cosine_by_hand() -> None:
    # 10 steps, 2 of warm-up: 0.1 at the start, 0.55 half-way up, 1 at the top, cos(pi/2) half-way down.
    assert warmup_cosine(0, 10, 2) == pytest.approx(0.1)
    assert warmup_cosine(1, 10, 2) == pytest.approx(0.55)
    assert warmup_cosine(2, 10, 2) == pytest.approx(1.0)
    assert warmup_cosine(6, 10, 2) == pytest.approx(0.5)
    assert warmup_cosine(10, 10, 2) == pytest.approx(0.0)


def test_drop_path_policy_drops_block_l_with_probability_linear_in_depth() -> None:
    policy = drop_path_policy(40_000, 5, 0.5, torch.Generator().manual_seed(0))
    assert set(policy.unique().tolist()) == {0.0, 1.0}
    # block l of 5 is dropped with probability 0.5 * l / 5: 0.1, 0.2, ..., 0.5 (binomial s.e. <= 0.0025).
    torch.testing.assert_close(1 - policy.mean(0), torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5]), atol=0.01, rtol=0)


def _step(unit: str, seed: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """One forward/backward of a ResNet-20 under stochastic depth; returns the model, logits and the
    actions the same generator state draws for a whole batch."""
    torch.manual_seed(0)
    model = cifar_resnet(20, 10, 1).train()
    x = torch.randn(6, 1, 16, 16)
    actions = drop_path_policy(1, model.num_blocks, 0.9, torch.Generator().manual_seed(seed))[0]
    logits = stochastic_depth_forward(model, x, 0.9, unit, torch.Generator().manual_seed(seed))
    F.cross_entropy(logits, torch.arange(6)).backward()
    return model, logits, actions


def test_batch_unit_never_computes_a_dropped_block() -> None:
    model, _, actions = _step("batch", seed=3)
    assert 0 < actions.sum() < model.num_blocks  # this seed drops some blocks and keeps others
    for block, keep in zip(model.blocks, actions.tolist(), strict=True):
        # A dropped block was not called: no gradient, and its BatchNorm saw no batch.
        assert (block.conv1.weight.grad is not None) == bool(keep)
        assert int(block.bn1.num_batches_tracked) == int(keep)
    assert int(model.stem[1].num_batches_tracked) == 1


def test_image_unit_runs_every_block_on_every_image() -> None:
    model, logits, _ = _step("image", seed=3)
    assert logits.shape == (6, 10)
    assert all(int(b.bn1.num_batches_tracked) == 1 for b in model.blocks)  # dense: every block ran


def test_zero_drop_path_is_the_full_network() -> None:
    torch.manual_seed(0)
    model = cifar_resnet(20, 10, 1).eval()
    x = torch.randn(4, 1, 16, 16)
    generator = torch.Generator().manual_seed(0)
    torch.testing.assert_close(stochastic_depth_forward(model, x, 0.0, "batch", generator), model(x))
    # No random numbers drawn: a run without stochastic depth keeps the generator stream of the data order.
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(0).get_state())
