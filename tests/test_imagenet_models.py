"""The ImageNet family: torchvision's ResNet-101 with real block skipping, the ResNet-10 policy, their
weights files, FLOPs, checkpoints and BatchNorm folding."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
import torchvision
from fakeweights import write_torchvision_weights
from torch import nn

from blockdrop.config import Model
from blockdrop.files import CheckpointError
from blockdrop.flops import count_flops
from blockdrop.inference import FullPredictor, SkippingPredictor, fold_batchnorm
from blockdrop.models import (
    BlockDropNet,
    ImageNetResNet,
    PolicyResNet10,
    build_backbone,
    build_policy,
    cifar_resnet,
    imagenet_resnet101,
    load_backbone,
    load_blockdrop,
    load_policy,
    load_torchvision_weights,
    policy_resnet8,
    policy_resnet10,
    save_backbone,
    save_blockdrop,
    save_policy,
)

# fp32 through 101 layers: batch 1 and batch 4 convolutions round differently, by about 2e-4 on logits
# whose spread is about 7 here; a wrong skip or a missing shortcut moves them by whole units.
TOL = {"atol": 1e-3, "rtol": 1e-4}
STAGE_FIRST = (0, 3, 7, 30)  # ResNet-101's 3-4-23-3 blocks: where each stage starts (and downsamples)


def calibrated(model: nn.Module, x: torch.Tensor, seed: int = 0) -> nn.Module:
    """Random BN affine parameters and running stats from ``x``, then eval mode (as in test_models)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = 0.5 + torch.rand(m.num_features, generator=g)
            m.bias.data = 0.2 * torch.randn(m.num_features, generator=g)
            m.momentum = 1.0
    with torch.no_grad():
        model.train()(x)
    return model.eval()


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pretrained")
    return {arch: write_torchvision_weights(folder, arch, seed=i) for i, arch in enumerate(("resnet101", "resnet18"))}


@pytest.fixture(scope="module")
def resnet101(weights: dict[str, Path]) -> tuple[ImageNetResNet, torch.Tensor]:
    torch.manual_seed(0)
    return imagenet_resnet101(weights["resnet101"]).eval(), torch.randn(4, 3, 64, 64)


def drop_policy(n: int, k: int = 33) -> torch.Tensor:
    """Per-image policies that drop every stage-first block, all of the last stage, and some others."""
    g = torch.Generator().manual_seed(3)
    policy = (torch.rand(n, k, generator=g) < 0.7).float()
    policy[:, list(STAGE_FIRST)] = 0.0
    policy[:, 30:] = 0.0  # the whole last stage: the head sees layer 3's output through one downsample
    policy[0] = 1.0  # one image keeps everything
    policy[1, 8] = 1.0  # and one keeps block 8, which every other image may drop
    return policy


# ----------------------------------------------------------------------------------------------------------
# architecture and the ways of running a policy


def test_resnet101_layout() -> None:
    model = ImageNetResNet()
    assert (model.num_blocks, model.blocks_per_stage, model.depth) == (33, (3, 4, 23, 3), 101)
    assert (cifar_resnet(32, 10).depth, cifar_resnet(110, 10).depth, policy_resnet8(15).depth) == (32, 110, 8)
    # torchvision puts the stride on the 3x3 conv; the downsample at each stage's first block only
    assert [t for t, s in enumerate(model.shortcuts) if not isinstance(s, nn.Identity)] == list(STAGE_FIRST)
    assert [t for t, b in enumerate(model.blocks) if b.conv2.stride == (2, 2)] == [3, 7, 30]
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in torchvision.models.resnet101()
                                                             .parameters()) == 44_549_160


def test_skipping_masked_and_sparse_agree_with_dropped_stage_first_blocks(
    resnet101: tuple[ImageNetResNet, torch.Tensor],
) -> None:
    model, x = resnet101
    policy = drop_policy(len(x))
    with torch.no_grad():
        sparse = model(x, policy)
        masked = model.forward_masked(x, policy)
        skipping = torch.cat([model.forward_skipping(x[i : i + 1], policy[i]) for i in range(len(x))])
        full = model(x)
    torch.testing.assert_close(skipping, masked, **TOL)
    torch.testing.assert_close(sparse, masked, **TOL)
    torch.testing.assert_close(sparse[0], full[0], **TOL)  # the all-ones row is the full network
    assert (sparse[1:] - full[1:]).abs().max() > 0.1  # dropping blocks does change the logits


def test_all_dropped_is_stem_downsamples_and_head(resnet101: tuple[ImageNetResNet, torch.Tensor]) -> None:
    """The authors' FlatResNet: a dropped block hands on ``ds(x)`` at a stage's start, ``x`` elsewhere, no ReLU."""
    model, x = resnet101
    with torch.no_grad():
        h = model.stem(x)
        for t in STAGE_FIRST:
            h = model.shortcuts[t](h)
        expected = model.fc(h.mean((2, 3)))
        assert bool((h < 0).any())  # a ReLU here would change the answer: the check means something
        torch.testing.assert_close(model.forward_skipping(x, [False] * 33), expected, **TOL)
        torch.testing.assert_close(model(x, torch.zeros(len(x), 33)), expected, **TOL)
        torch.testing.assert_close(model.forward_masked(x, torch.zeros(len(x), 33)), expected, **TOL)


def test_dropped_blocks_are_not_called(resnet101: tuple[ImageNetResNet, torch.Tensor]) -> None:
    model, x = resnet101
    blocks: list[int] = []
    shortcuts: list[int] = []
    hooks = [b.register_forward_hook(lambda m, i, o, t=t: blocks.append(t)) for t, b in enumerate(model.blocks)]
    hooks += [s.register_forward_hook(lambda m, i, o, t=t: shortcuts.append(t)) for t, s in enumerate(model.shortcuts)
              if not isinstance(s, nn.Identity)]
    try:
        actions = drop_policy(2)[1].bool().tolist()
        with torch.no_grad():
            model.forward_skipping(x[:1], actions)
        assert blocks == [t for t in range(33) if actions[t]] and not set(blocks) & {0, 3, 7, 30, 31, 32}
        assert shortcuts == list(STAGE_FIRST)  # every downsample still runs: the next block needs its shape
        blocks.clear()
        policy = torch.zeros(3, 33)
        policy[1, 8] = 1.0
        with torch.no_grad():
            model(x[:3], policy)  # sparse: block 8 on one image, nothing else at all
        assert blocks == [8]
    finally:
        for h in hooks:
            h.remove()


# ----------------------------------------------------------------------------------------------------------
# FLOPs against a closed form of the paper's convention


def conv(cin: int, cout: int, k: int, side: int) -> int:
    return 2 * cin * cout * k * k * side * side


def resnet101_flops(size: int, classes: int = 1000) -> tuple[int, list[int]]:
    """(always-run FLOPs: stem conv, the 4 downsamples, fc; [per-block FLOPs]) of ResNet-101 at size x size."""
    side = (size + 1) // 2  # 7x7 stride-2 conv, padding 3
    base = conv(3, 64, 7, side)
    side = (side + 1) // 2  # 3x3 stride-2 max pool, padding 1
    blocks, cin = [], 64
    for stage, n in enumerate((3, 4, 23, 3)):
        width = 64 * 2**stage
        for b in range(n):
            out = (side + 1) // 2 if (b == 0 and stage > 0) else side
            blocks.append(conv(cin, width, 1, side) + conv(width, width, 3, out) + conv(width, 4 * width, 1, out))
            if b == 0:
                base += conv(cin, 4 * width, 1, out)
            cin, side = 4 * width, out
    return base + 2 * 2048 * classes, blocks


def resnet10_flops(size: int, k: int) -> int:
    """The ResNet-10 policy on size x size images, pooled by 2 first."""
    side = (size // 2 + 1) // 2
    total = conv(3, 64, 7, side)
    side, cin = (side + 1) // 2, 64
    for stage in range(4):
        width = 64 * 2**stage
        out = (side + 1) // 2 if stage > 0 else side
        total += conv(cin, width, 3, out) + conv(width, width, 3, out)
        total += conv(cin, width, 1, out) if stage > 0 else 0
        cin, side = width, out
    return total + 2 * 512 * k


def test_flops_at_224_match_the_closed_form_and_the_paper() -> None:
    table = count_flops(ImageNetResNet(), (3, 224, 224), policy_resnet10(33))
    base, blocks = resnet101_flops(224)
    assert list(table.blocks) == blocks and table.base == base
    assert abs(table.full / 1.560e10 - 1) < 0.01  # docs/paper.md, FLOPs convention: R101 1.560e10
    # by hand: block 0 at 56x56 is 64->64 1x1, 64->64 3x3, 64->256 1x1; its downsample 64->256 is in the base
    assert table.blocks[0] == 2 * 56 * 56 * (64 * 64 + 64 * 64 * 9 + 64 * 256)
    assert table.policy == resnet10_flops(224, 33)
    assert f"{table.policy:.2e}" == "4.72e+08"  # docs/paper.md, FLOPs convention: ResNet-10 at 112px


def test_flops_at_64px_match_the_closed_form() -> None:
    table = count_flops(ImageNetResNet(10), (3, 64, 64), policy_resnet10(33))
    base, blocks = resnet101_flops(64, classes=10)
    assert (table.base, list(table.blocks), table.policy) == (base, blocks, resnet10_flops(64, 33))


# ----------------------------------------------------------------------------------------------------------
# weights files


def test_torchvision_weights_give_torchvision_logits(weights: dict[str, Path],
                                                     resnet101: tuple[ImageNetResNet, torch.Tensor]) -> None:
    model, x = resnet101
    reference = torchvision.models.resnet101()
    reference.load_state_dict(torch.load(weights["resnet101"], weights_only=True))
    with torch.no_grad():
        ours, theirs = model(x), reference.eval()(x)
    assert ours.std() > 0.1  # sane, varied logits: a wrong key map would show
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_other_num_classes_gets_a_fresh_classifier(weights: dict[str, Path],
                                                   resnet101: tuple[ImageNetResNet, torch.Tensor]) -> None:
    model = imagenet_resnet101(weights["resnet101"], num_classes=10)
    assert (model.fc.in_features, model.fc.out_features) == (2048, 10)
    assert torch.equal(model.blocks[32].conv3.weight, resnet101[0].blocks[32].conv3.weight)


def copy_as(src: Path, name: str) -> Path:
    return Path(shutil.copy(src, src.parent.parent / name))


def test_a_name_whose_hash_is_not_the_content_is_refused(weights: dict[str, Path]) -> None:
    src = weights["resnet18"]
    assert re.fullmatch(r"resnet18-[0-9a-f]{8}\.pth", src.name)
    wrong = copy_as(src, "resnet18-00000000.pth")
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(wrong))} does not match the hash in its name"):
        load_torchvision_weights(wrong)
    with pytest.raises(CheckpointError, match=re.escape(str(wrong))):
        policy_resnet10(33, wrong)


@pytest.mark.parametrize("name", ["resnet18.pth", "resnet-18.pth", "resnet18-.pth"])
def test_a_name_without_a_hash_is_refused(weights: dict[str, Path], name: str) -> None:
    path = copy_as(weights["resnet18"], name)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))} has no hash in its name"):
        load_torchvision_weights(path)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "resnet101-63fe2227.pth"
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))} is missing"):
        imagenet_resnet101(path)


def test_the_wrong_architecture_is_refused_by_name(weights: dict[str, Path]) -> None:
    path = weights["resnet18"]
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))} is not torchvision's resnet101"):
        imagenet_resnet101(path)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(weights['resnet101']))} is not .* resnet18"):
        policy_resnet10(33, weights["resnet101"])


def test_policy_starts_from_resnet18_first_blocks(weights: dict[str, Path]) -> None:
    resnet18 = torch.load(weights["resnet18"], weights_only=True)
    torch.manual_seed(5)
    policy = policy_resnet10(33, weights["resnet18"])
    torch.manual_seed(5)
    fresh = PolicyResNet10(33)
    state = policy.state_dict()
    copied = [k for k in state if not k.startswith("fc.")]
    assert {k.split(".")[0] for k in copied} == {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"}
    assert all(re.match(r"(conv1|bn1|layer\d\.0)\.", k) for k in copied)  # layerN.0 only: one block per stage
    assert "layer2.0.downsample.0.weight" in copied
    assert all(torch.equal(state[k], resnet18[k]) for k in copied)
    assert torch.equal(policy.fc.weight, fresh.fc.weight) and policy.fc.weight.shape == (33, 512)  # untouched
    assert not torch.equal(policy.conv1.weight, fresh.conv1.weight)


def test_factories_follow_the_model_section(weights: dict[str, Path]) -> None:
    cfg = Model(depth=101, weights=str(weights["resnet101"]), policy_weights=str(weights["resnet18"]))
    backbone = build_backbone(cfg, num_classes=1000, in_channels=3)
    policy = build_policy(backbone, 3, cfg)
    assert isinstance(backbone, ImageNetResNet) and isinstance(policy, PolicyResNet10)
    assert policy.fc.out_features == 33
    assert torch.equal(policy.layer3[0].conv2.weight, torch.load(weights["resnet18"], weights_only=True)
                       ["layer3.0.conv2.weight"])
    assert isinstance(build_policy(backbone, 3, Model(depth=101, weights="x")), PolicyResNet10)  # random init
    with pytest.raises(ValueError, match="3 channels"):
        build_backbone(cfg, 10, 1)
    cifar = build_backbone(Model(depth=20), 10, 1)
    assert cifar.depth == 20 and cifar.in_channels == 1
    assert build_policy(cifar, 1, Model(depth=20)).fc.out_features == 9
    BlockDropNet(backbone, policy)  # accepts the family


# ----------------------------------------------------------------------------------------------------------
# checkpoints


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_imagenet_round_trips(tmp_path: Path, resnet101: tuple[ImageNetResNet, torch.Tensor]) -> None:
    model, x = resnet101
    save_backbone(model, tmp_path / "backbone.pt")
    loaded = load_backbone(tmp_path / "backbone.pt")
    assert isinstance(loaded, ImageNetResNet) and same_state(loaded, model) and not loaded.training
    assert torch.load(tmp_path / "backbone.pt", weights_only=True)["family"] == "imagenet"
    torch.manual_seed(0)
    small, policy = ImageNetResNet(7, layers=(1, 2, 1, 1)), policy_resnet10(5)
    save_policy(policy, tmp_path / "policy.pt")
    save_blockdrop(small, policy, tmp_path / "bd.pt")
    p = load_policy(tmp_path / "policy.pt")
    b2, p2 = load_blockdrop(tmp_path / "bd.pt")
    assert isinstance(p, PolicyResNet10) and same_state(p, policy)
    assert b2.blocks_per_stage == (1, 2, 1, 1) and same_state(b2, small) and same_state(p2, policy)
    small.eval(), policy.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
        torch.testing.assert_close(BlockDropNet(b2, p2)(x), BlockDropNet(small, policy)(x), atol=0, rtol=0)


def test_cifar_round_trip_and_old_files_without_a_family(tmp_path: Path) -> None:
    backbone, policy = cifar_resnet(20, 10, 1).eval(), policy_resnet8(9, 1).eval()
    save_blockdrop(backbone, policy, tmp_path / "bd.pt")
    blob = torch.load(tmp_path / "bd.pt", weights_only=True)
    assert (blob["family"], blob["policy_family"]) == ("cifar", "cifar")
    # the layouts written before the ImageNet family existed: no family field
    old = {"arch": {"depth": 20, "num_classes": 10, "in_channels": 1}, "model": backbone.state_dict()}
    torch.save(old, tmp_path / "old_backbone.pt")
    torch.save({"num_blocks": 9, "in_channels": 1, "model": policy.state_dict()}, tmp_path / "old_policy.pt")
    torch.save({**old, "num_blocks": 9, "in_channels": 1, "policy": policy.state_dict()}, tmp_path / "old_bd.pt")
    b2, p2 = load_blockdrop(tmp_path / "bd.pt")
    b3, p3 = load_blockdrop(tmp_path / "old_bd.pt")
    assert same_state(load_backbone(tmp_path / "old_backbone.pt"), backbone)
    assert same_state(load_policy(tmp_path / "old_policy.pt"), policy)
    assert all(same_state(a, b) for a, b in ((b2, backbone), (p2, policy), (b3, backbone), (p3, policy)))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(BlockDropNet(b3, p3)(x), BlockDropNet(backbone, policy)(x), atol=0, rtol=0)


def test_unknown_family_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "future.pt"
    torch.save({"family": "vit", "arch": {}, "model": {}}, path)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))} .*unknown family 'vit'"):
        load_backbone(path)


# ----------------------------------------------------------------------------------------------------------
# BatchNorm folding, both families, under real skipping


def test_fold_batchnorm_imagenet(resnet101: tuple[ImageNetResNet, torch.Tensor]) -> None:
    backbone, x = resnet101
    policy_net = calibrated(policy_resnet10(33), x, seed=1)
    with torch.no_grad():
        policy_net.fc.weight *= 30  # spread the probabilities away from 0.5
    folded_policy = fold_batchnorm(policy_net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded_policy.modules())
    assert isinstance(folded_policy.layer2[0].downsample[1], nn.Identity)
    predictor = SkippingPredictor(backbone, policy_net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in predictor.backbone.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded_policy(x), policy_net(x), **TOL)
        greedy = (policy_net(x) >= 0).float()
        expected = backbone(x, greedy)
        torch.testing.assert_close(FullPredictor(backbone)(x), backbone(x), **TOL)
    assert 0 < greedy.sum() < greedy.numel()  # a mixed policy, so the comparison means something
    for i in range(len(x)):
        logits, actions = predictor(x[i : i + 1])
        assert actions == greedy[i].bool().tolist()
        torch.testing.assert_close(logits[0], expected[i], **TOL)


def test_fold_batchnorm_cifar_with_skipping() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    backbone = calibrated(cifar_resnet(20, 10, 3), x)
    policy_net = calibrated(policy_resnet8(9, 3), x, seed=1)
    folded_b, folded_p = fold_batchnorm(backbone), fold_batchnorm(policy_net)
    policy = (torch.rand(len(x), 9, generator=torch.Generator().manual_seed(3)) < 0.5).float()
    policy[:, [3, 6]] = 0.0  # the stage-first blocks, whose shortcut downsamples
    with torch.no_grad():
        torch.testing.assert_close(folded_p(x), policy_net(x), **TOL)
        for i in range(len(x)):
            torch.testing.assert_close(folded_b.forward_skipping(x[i : i + 1], policy[i]),
                                       backbone.forward_skipping(x[i : i + 1], policy[i]), **TOL)


def test_fold_batchnorm_refuses_what_it_cannot_fold() -> None:
    odd = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))  # BN not right after its conv
    with pytest.raises(TypeError, match="2"):
        fold_batchnorm(odd)
