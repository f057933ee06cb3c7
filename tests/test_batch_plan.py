"""blockdrop.batch_plan and the engine's stretches: a batch sorted by policy, each block run in place on the
stretches of images that keep it, and the logits the model's own forward gives, in the input's order."""

from __future__ import annotations

import pytest
import torch
from test_models import calibrated

from blockdrop.batch_plan import plan_batch
from blockdrop.inference import FastResNet, fold_batchnorm
from blockdrop.models import CifarResNet, cifar_resnet

# Folding BatchNorm into the convolutions changes float rounding (w * s and b - m * s are rounded once, the
# model rounds conv, then BN), and oneDNN picks other kernels for one image than for several; the logits of
# these calibrated networks agree to about 1e-6 of their scale, so this bound is 10x the worst difference seen.
TOL = {"atol": 1e-5, "rtol": 1e-5}


def test_plan_sorts_by_policy_and_finds_each_blocks_stretches() -> None:
    keep = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 1], [0, 0, 0]], dtype=torch.bool)
    plan = plan_batch(keep)
    assert plan.order.tolist() == [2, 0, 3, 1, 4]  # codes 6, 5, 5, 3, 0: descending, ties in input order
    assert torch.equal(plan.keep, keep[plan.order]) and torch.equal(plan.order[plan.restore], torch.arange(5))
    assert plan.runs == [[(0, 3)], [(0, 1), (3, 4)], [(1, 4)]]
    assert plan.counts == [3, 2, 3]


def test_plan_of_a_sorted_batch_does_not_reorder() -> None:
    keep = torch.tensor([[1, 1], [1, 0], [0, 0]], dtype=torch.bool)
    plan = plan_batch(keep)
    assert plan.order is None and plan.restore is None
    assert plan.runs == [[(0, 2)], [(0, 1)]] and plan.counts == [2, 1]


@pytest.mark.parametrize("n", [2, 7, 40])
def test_plan_stretches_cover_exactly_the_keepers(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    keep = torch.rand(n, 9, generator=g) < 0.5
    plan = plan_batch(keep)
    for t in range(9):
        rows = [r for a, b in plan.runs[t] for r in range(a, b)]
        assert rows == plan.keep[:, t].nonzero().squeeze(1).tolist()
        assert all(b < c for (_, b), (c, _) in zip(plan.runs[t], plan.runs[t][1:], strict=False))  # disjoint
    # sorted with block 0 most significant: its keepers are one stretch at the top
    assert len(plan.runs[0]) <= 1 and (not plan.runs[0] or plan.runs[0][0][0] == 0)


@pytest.fixture(scope="module")
def resnet20() -> tuple[CifarResNet, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(256, 1, 8, 8)
    return calibrated(cifar_resnet(20, 10, 1), x[:64]), x


def batch_policies(n: int, k: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    table = (torch.rand(12, k, generator=g) < 0.5).float()  # tens of images share each of a few policies
    codes = torch.randperm(2**k, generator=g)[:n]  # n different policies, as k-bit numbers
    distinct = ((codes[:, None] >> torch.arange(k)) & 1).float()
    return {
        "shared table": table[torch.randint(12, (n,), generator=g)],
        "every image its own": distinct,
        "one for all": table[:1].expand(n, k).clone(),
        "all run": torch.ones(n, k),
        "all skip": torch.zeros(n, k),
    }


@pytest.mark.parametrize(("n", "min_stretch"), [
    *((n, m) for n in (1, 2, 5, 33, 64) for m in (0.0, 16.0, float("inf"))),  # always stretches, default, gather
    (256, 16.0),
])
def test_engine_logits_are_the_models_at_every_batch_size(resnet20: tuple[CifarResNet, torch.Tensor], n: int,
                                                          min_stretch: float) -> None:
    net, x = resnet20
    fast = FastResNet(net, min_stretch=min_stretch)
    folded = fold_batchnorm(net)
    images = x[:n].contiguous(memory_format=torch.channels_last)
    for name, policy in batch_policies(n, net.num_blocks).items():
        if name == "every image its own":
            assert len(torch.unique(policy, dim=0)) == n
        with torch.inference_mode():
            out = fast(images, policy > 0.5)
            reference = net(x[:n], policy)  # the model: BatchNorm unfolded, per-block sub-batches
            masked = net.forward_masked(x[:n], policy)  # the paper's dense formula
            same_weights = folded(x[:n], policy)  # the engine's folded weights through the model's forward
            alone = torch.cat([fast(images[i : i + 1], policy[i : i + 1] > 0.5) for i in range(0, n, max(1, n // 8))])
        torch.testing.assert_close(out, reference, **TOL, msg=name)
        torch.testing.assert_close(out, masked, **TOL, msg=name)
        torch.testing.assert_close(out, same_weights, **TOL, msg=name)
        torch.testing.assert_close(out[:: max(1, n // 8)], alone, **TOL, msg=name)  # input order kept


def test_stretches_run_each_block_on_its_keepers_only(resnet20: tuple[CifarResNet, torch.Tensor]) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from blockdrop.flops import count_flops

    net, x = resnet20
    policy = batch_policies(64, net.num_blocks)["shared table"]
    table = count_flops(net, tuple(x.shape[1:]))
    for min_stretch in (0.0, float("inf")):
        counter = FlopCounterMode(display=False)
        with counter, torch.inference_mode():
            FastResNet(net, min_stretch=min_stretch)(x[:64].contiguous(memory_format=torch.channels_last),
                                                      policy > 0.5)
        assert counter.get_total_flops() == int(table.per_image(policy, with_policy=False).sum().item())
