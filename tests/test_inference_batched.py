"""blockdrop.inference at any batch size: each block runs once, on exactly the images that keep it, and the
logits are the model's own forward under the same actions (BatchNorm folded: to float tolerance)."""

from __future__ import annotations

import pytest
import torch
from test_models import calibrated, random_policies
from torch.utils.flop_counter import FlopCounterMode

from blockdrop.flops import count_flops
from blockdrop.inference import BatchedSkippingPredictor, FastResNet, FullPredictor, fold_batchnorm
from blockdrop.models import BlockResNet, CifarResNet, ImageNetResNet, cifar_resnet, policy_resnet8, policy_resnet10

TOL = {"atol": 1e-4, "rtol": 1e-4}  # folded BatchNorm against the unfolded model
STAGE_FIRST_R20 = (3, 6)  # resnet20: 3 blocks per stage; blocks 3 and 6 downsample (pool + zero channels)


@pytest.fixture(scope="module")
def resnet20() -> tuple[CifarResNet, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(16, 3, 16, 16)
    return calibrated(cifar_resnet(20, 10, 3), x), x


def policies(n: int, k: int) -> dict[str, torch.Tensor]:
    mixed = random_policies(max(n, 5), k, seed=2)[:n]  # rows 1 and 2: keep all, drop all (from n >= 3)
    return {"all-ones": torch.ones(n, k), "all-zeros": torch.zeros(n, k), "mixed": mixed}


def conv_flops(fn, *args) -> int:
    """FLOPs of the convolutions and matrix products ``fn(*args)`` runs (torch's counter, paper convention)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn(*args)
    return counter.get_total_flops()


def check_against_reference(net: BlockResNet, x: torch.Tensor, policy: torch.Tensor, flop_table) -> None:
    fast = FastResNet(net)
    with torch.inference_mode():
        out = fast(x.contiguous(memory_format=torch.channels_last), policy > 0.5)
        reference = net(x, policy)
        masked = net.forward_masked(x, policy)  # the paper's dense formula
        folded = fold_batchnorm(net)(x, policy)  # the same weights as ``fast``, run by BlockResNet.forward
    torch.testing.assert_close(out, reference, **TOL)
    torch.testing.assert_close(out, masked, **TOL)
    torch.testing.assert_close(out, folded, **TOL)
    # each block ran once on exactly the images that keep it: the convolutions' FLOPs are the FLOPs table's
    # for these actions (stem, always-run shortcuts and classifier on every image, block t on its keepers)
    ran = conv_flops(fast, x.contiguous(memory_format=torch.channels_last), policy > 0.5)
    assert ran == int(flop_table.per_image(policy, with_policy=False).sum().item())


@pytest.mark.parametrize("n", [1, 5, 16])
@pytest.mark.parametrize("kind", ["all-ones", "all-zeros", "mixed"])
def test_backbone_under_actions_matches_the_model(resnet20: tuple[CifarResNet, torch.Tensor], n: int,
                                                   kind: str) -> None:
    net, x = resnet20
    policy = policies(n, net.num_blocks)[kind]
    check_against_reference(net, x[:n], policy, count_flops(net, tuple(x.shape[1:])))


@pytest.mark.parametrize("n", [1, 5, 16])
def test_a_dropped_downsampling_block_still_downsamples(resnet20: tuple[CifarResNet, torch.Tensor], n: int) -> None:
    net, x = resnet20
    flops = count_flops(net, tuple(x.shape[1:]))
    g = torch.Generator().manual_seed(5)
    policy = (torch.rand(n, net.num_blocks, generator=g) < 0.5).float()
    policy[:, STAGE_FIRST_R20[0]] = 0.0  # dropped by every image: its branch is never called
    policy[:, STAGE_FIRST_R20[1]] = (torch.arange(n) % 2).float()  # dropped by every other image
    check_against_reference(net, x[:n], policy, flops)
    # dropping a stage-first block is not dropping its shortcut: the output is a pooled, zero-padded input
    fast = FastResNet(net)
    with torch.inference_mode():
        h = x[:n]
        for m in fast.stem:
            h = m(h)
        for t in range(STAGE_FIRST_R20[0]):
            h = torch.relu(fast.branches[t](h) + h)
        pooled = torch.nn.functional.avg_pool2d(h, 2)
    assert pooled.shape[1:] == (16, 8, 8) and fast.shortcuts[STAGE_FIRST_R20[0]](h).shape[1:] == (32, 8, 8)
    torch.testing.assert_close(fast.shortcuts[STAGE_FIRST_R20[0]](h)[:, :16], pooled, atol=0, rtol=0)
    assert fast.shortcuts[STAGE_FIRST_R20[0]](h)[:, 16:].abs().max() == 0


def greedy_policy_net(backbone: BlockResNet, x: torch.Tensor, make) -> torch.nn.Module:
    torch.manual_seed(1)
    policy_net = calibrated(make(backbone.num_blocks), x, seed=1)
    with torch.no_grad():
        policy_net.fc.weight *= 30  # spread the probabilities away from 0.5
    return policy_net


@pytest.mark.parametrize("n", [1, 5, 16])
def test_batched_predictor_takes_the_greedy_actions(resnet20: tuple[CifarResNet, torch.Tensor], n: int) -> None:
    backbone, x = resnet20
    policy_net = greedy_policy_net(backbone, x, lambda k: policy_resnet8(k, 3))
    predictor = BatchedSkippingPredictor(backbone, policy_net)
    with torch.no_grad():
        probs = torch.sigmoid(policy_net(x[:n]))
        greedy = (probs >= 0.5).float()  # the evaluation's rule (blockdrop.predict.run_policy)
        expected = backbone(x[:n], greedy)
    assert (probs - 0.5).abs().min() > 1e-3  # none so close to 0.5 that folding BN could flip it
    logits, keep = predictor(x[:n])
    assert keep.dtype == torch.bool and torch.equal(keep.float(), greedy)
    torch.testing.assert_close(logits, expected, **TOL)
    if n == 16:
        assert 0 < greedy.sum() < greedy.numel() and len(torch.unique(greedy, dim=0)) > 2  # mixed, per image
    # a batch gives each image what it gets alone
    alone = torch.cat([predictor(x[i : i + 1])[0] for i in range(n)])
    torch.testing.assert_close(logits, alone, atol=1e-5, rtol=1e-5)


def test_full_predictor_is_the_model(resnet20: tuple[CifarResNet, torch.Tensor]) -> None:
    net, x = resnet20
    with torch.no_grad():
        torch.testing.assert_close(FullPredictor(net)(x), net(x), **TOL)
    flops = count_flops(net, tuple(x.shape[1:]))
    assert conv_flops(FullPredictor(net), x) == flops.full * len(x)


def test_policy_pool_is_applied() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 1, 28, 28)
    backbone = calibrated(cifar_resnet(20, 10, 1), x)
    for pool in (1, 2):
        policy_net = calibrated(policy_resnet8(9, 1, pool=pool), x, seed=1)
        _, keep = BatchedSkippingPredictor(backbone, policy_net)(x)
        with torch.no_grad():
            assert torch.equal(keep, policy_net(x) >= 0)


# ----------------------------------------------------------------------------------------------------------
# the ImageNet family: bottleneck branches, downsampling shortcuts with weights (1x1 conv + BN)


@pytest.fixture(scope="module")
def bottleneck_net() -> tuple[ImageNetResNet, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(5, 3, 32, 32)
    return calibrated(ImageNetResNet(10, layers=(2, 1, 2, 1)), x), x  # K = 6; blocks 0, 2, 3, 5 stage-first


@pytest.mark.parametrize("n", [1, 5])
def test_bottleneck_net_under_actions(bottleneck_net: tuple[ImageNetResNet, torch.Tensor], n: int) -> None:
    net, x = bottleneck_net
    flops = count_flops(net, tuple(x.shape[1:]))
    for policy in policies(n, net.num_blocks).values():
        check_against_reference(net, x[:n], policy, flops)
    dropped = torch.ones(n, net.num_blocks)
    dropped[:, [2, 5]] = 0.0  # stage-first blocks: their 1x1-conv downsample still runs
    dropped[::2, 3] = 0.0
    check_against_reference(net, x[:n], dropped, flops)


def test_bottleneck_predictor_with_the_resnet10_policy(bottleneck_net: tuple[ImageNetResNet, torch.Tensor]) -> None:
    backbone, x = bottleneck_net
    policy_net = greedy_policy_net(backbone, x, policy_resnet10)
    predictor = BatchedSkippingPredictor(backbone, policy_net)
    with torch.no_grad():
        greedy = (torch.sigmoid(policy_net(x)) >= 0.5).float()
        expected = backbone(x, greedy)
    logits, keep = predictor(x)
    assert torch.equal(keep.float(), greedy) and 0 < greedy.sum() < greedy.numel()
    torch.testing.assert_close(logits, expected, **TOL)
