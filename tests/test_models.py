"""blockdrop.models: the CIFAR ResNets, the ways of running a policy, checkpoints, inference."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from fakeweights import calibrated
from torch import nn

from blockdrop.files import CheckpointError
from blockdrop.inference import FullPredictor, SkippingPredictor, fold_batchnorm, measure_latency
from blockdrop.models import (
    CifarResNet,
    cifar_resnet,
    load_backbone,
    load_blockdrop,
    load_policy,
    policy_resnet8,
    save_backbone,
    save_blockdrop,
    save_policy,
)

TOL = {"atol": 1e-5, "rtol": 1e-5}


def random_policies(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    policy = (torch.rand(n, k, generator=g) < 0.5).float()
    policy[:, 3] = 1.0  # a block kept by every image but the all-zeros one
    policy[:, 4] = 0.0  # one kept only by the all-ones image below
    policy[1] = 1.0  # an image that keeps everything
    policy[2] = 0.0  # and one that drops everything
    return policy


@pytest.fixture(scope="module")
def resnet20() -> tuple[CifarResNet, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(5, 3, 8, 8)
    return calibrated(cifar_resnet(20, 10, 3), x), x


# ----------------------------------------------------------------------------------------------------------
# architecture


@pytest.mark.parametrize(("depth", "k"), [(20, 9), (32, 15), (56, 27), (110, 54)])
def test_depth_gives_k_blocks(depth: int, k: int) -> None:
    model = cifar_resnet(depth, 10)
    assert model.num_blocks == k
    assert model.blocks_per_stage == (k // 3,) * 3
    strides = [b.conv1.stride[0] for b in model.blocks]
    assert strides == [1] * (k // 3) + ([2] + [1] * (k // 3 - 1)) * 2
    widths = [b.conv2.out_channels for b in model.blocks]
    assert widths == [16] * (k // 3) + [32] * (k // 3) + [64] * (k // 3)


@pytest.mark.parametrize("depth", [33, 7, 2, 0])
def test_bad_depth(depth: int) -> None:
    with pytest.raises(ValueError, match="6n\\+2"):
        cifar_resnet(depth, 10)


def resnet_params(n: int, classes: int, cin: int) -> int:
    """Parameters of a CIFAR ResNet with n basic blocks per stage, by hand.

    conv3x3 without bias: cin*cout*9; BatchNorm: 2*c (weight and bias; running stats are buffers);
    option-A shortcuts have none; classifier: 64*classes + classes.
    """
    conv = lambda i, o: i * o * 9  # noqa: E731
    bn = lambda c: 2 * c  # noqa: E731
    block = lambda i, o: conv(i, o) + bn(o) + conv(o, o) + bn(o)  # noqa: E731
    total = conv(cin, 16) + bn(16)
    for cin_stage, width in ((16, 16), (16, 32), (32, 64)):
        total += block(cin_stage, width) + (n - 1) * block(width, width)
    return total + 64 * classes + classes


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_resnet32_parameter_count() -> None:
    assert resnet_params(5, 10, 3) == 464_154  # the 0.46M of He et al.
    assert count(cifar_resnet(32, 10, 3)) == 464_154
    assert count(cifar_resnet(32, 10, 1)) == 464_154 - 2 * 16 * 9  # one input channel instead of three
    assert count(cifar_resnet(110, 100, 3)) == resnet_params(18, 100, 3)
    assert count(policy_resnet8(15, 3)) == resnet_params(1, 15, 3)


@pytest.mark.parametrize("channels", [1, 3])
def test_input_channels(channels: int) -> None:
    model = cifar_resnet(20, 7, channels).eval()
    with torch.no_grad():
        out = model(torch.randn(2, channels, 28, 28))
    assert out.shape == (2, 7)
    assert model.stem[0].in_channels == channels


def test_policy_resnet8_outputs_k() -> None:
    net = policy_resnet8(15, 1).eval()
    assert net.num_blocks == 3  # a ResNet-8: one block per stage
    with torch.no_grad():
        assert net(torch.randn(4, 1, 32, 32)).shape == (4, 15)


def test_shortcuts_are_parameter_free_and_downsample() -> None:
    model = cifar_resnet(20, 10)
    assert all(count(s) == 0 for s in model.shortcuts)
    x = torch.arange(2 * 16 * 4 * 4, dtype=torch.float32).view(2, 16, 4, 4)
    y = model.shortcuts[3](x)  # first block of stage 2: 16 -> 32 channels, stride 2
    assert y.shape == (2, 32, 2, 2)
    assert torch.equal(y[:, :16], nn.functional.avg_pool2d(x, 2)) and bool((y[:, 16:] == 0).all())


# ----------------------------------------------------------------------------------------------------------
# policies: sparse, dense and real skipping agree


@pytest.mark.parametrize("channels_last", [False, True])  # Normalize hands the model channels_last batches
def test_sparse_masked_and_skipping_agree(resnet20: tuple[CifarResNet, torch.Tensor], channels_last: bool) -> None:
    model, x = resnet20
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    policy = random_policies(len(x), model.num_blocks, seed=1)
    with torch.no_grad():
        sparse = model(x, policy)
        dense = model.forward_masked(x, policy)
        skipping = torch.cat([model.forward_skipping(x[i : i + 1], policy[i]) for i in range(len(x))])
        full = model(x)
    torch.testing.assert_close(sparse, dense, **TOL)
    torch.testing.assert_close(skipping, dense, **TOL)
    torch.testing.assert_close(sparse[1], full[1], **TOL)  # the all-ones row is the full network
    assert not torch.allclose(sparse[2:], full[2:], atol=1e-3)  # and dropping blocks does change the others


def test_all_ones_policy_is_the_full_network(resnet20: tuple[CifarResNet, torch.Tensor]) -> None:
    model, x = resnet20
    ones = torch.ones(len(x), model.num_blocks)
    with torch.no_grad():
        full = model(x)
        torch.testing.assert_close(model(x, ones), full, **TOL)
        torch.testing.assert_close(model.forward_masked(x, ones), full, **TOL)
        torch.testing.assert_close(model.forward_skipping(x, [True] * model.num_blocks), full, **TOL)


def test_all_zeros_policy_is_stem_shortcuts_and_head(resnet20: tuple[CifarResNet, torch.Tensor]) -> None:
    model, x = resnet20
    zeros = torch.zeros(len(x), model.num_blocks)
    with torch.no_grad():
        # by hand: no block runs, so the stem output only goes through the two downsampling shortcuts
        h = model.stem(x)
        h = nn.functional.pad(nn.functional.avg_pool2d(h, 2), (0, 0, 0, 0, 0, 16))
        h = nn.functional.pad(nn.functional.avg_pool2d(h, 2), (0, 0, 0, 0, 0, 32))
        expected = model.fc(h.mean((2, 3)))
        torch.testing.assert_close(model(x, zeros), expected, **TOL)
        torch.testing.assert_close(model.forward_masked(x, zeros), expected, **TOL)
        torch.testing.assert_close(model.forward_skipping(x, [False] * model.num_blocks), expected, **TOL)


def test_skipping_never_calls_dropped_blocks(resnet20: tuple[CifarResNet, torch.Tensor]) -> None:
    model, x = resnet20
    calls: list[int] = []
    hooks = [b.register_forward_hook(lambda m, i, o, t=t: calls.append(t)) for t, b in enumerate(model.blocks)]
    try:
        actions = [t % 3 == 0 for t in range(model.num_blocks)]
        with torch.no_grad():
            model.forward_skipping(x[:1], actions)
        assert calls == [t for t in range(model.num_blocks) if actions[t]]
        calls.clear()
        policy = torch.zeros(2, model.num_blocks)
        policy[0, 2] = 1.0
        with torch.no_grad():
            model(x[:2], policy)  # sparse path: block 2 on one image, no other block at all
        assert calls == [2]
    finally:
        for h in hooks:
            h.remove()


def test_latency_runs_on_the_requested_threads_and_restores_them(resnet20: tuple[CifarResNet, torch.Tensor]) -> None:
    model, x = resnet20
    before, seen = torch.get_num_threads(), []

    def predictor(image: torch.Tensor) -> torch.Tensor:
        seen.append((torch.get_num_threads(), len(image)))
        return model(image)

    result = measure_latency(predictor, predictor, x, warmup=2, threads=1)
    assert set(seen) == {(1, 1)} and len(seen) == 2 * len(x)  # every image, one at a time, on one thread
    assert torch.get_num_threads() == before
    assert result["threads"] == 1 and result["images"] == len(x) - 2
    assert result["speedup"] == pytest.approx(result["full_ms"] / result["blockdrop_ms"])


def test_latency_times_more_predictors_in_the_same_turns(resnet20: tuple[CifarResNet, torch.Tensor]) -> None:
    model, x = resnet20
    order: list[str] = []

    def named(name: str):
        return lambda image: order.append(name) or model(image)

    result = measure_latency(named("full"), named("blockdrop"), x, warmup=1, others={"full_finetuned": named("ft")})
    assert result["images"] == len(x) - 1 and result["full_finetuned_ms"] > 0
    assert result["speedup"] == pytest.approx(result["full_ms"] / result["blockdrop_ms"])  # still full / BlockDrop
    turns = [order[i : i + 3] for i in range(0, len(order), 3)]
    assert len(turns) == len(x) and all(sorted(t) == ["blockdrop", "ft", "full"] for t in turns)
    firsts = [t[0] for t in turns]
    assert {firsts.count(n) for n in ("full", "blockdrop", "ft")} <= {len(x) // 3, len(x) // 3 + 1}  # each goes first
    two: list[str] = []
    measure_latency(lambda i: two.append("full"), lambda i: two.append("blockdrop"), x[:4], warmup=0)
    assert two == ["blockdrop", "full", "full", "blockdrop"] * 2  # two predictors: the order they always had


def test_skipping_rejects_wrong_length(resnet20: tuple[CifarResNet, torch.Tensor]) -> None:
    model, x = resnet20
    with pytest.raises(ValueError, match="expected 9 actions, got 8"):
        model.forward_skipping(x[:1], [True] * 8)


def test_grad_path_matches_the_masked_formula_and_grads_reach_only_kept_blocks() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    model = calibrated(cifar_resnet(20, 5, 3), x)
    policy = random_policies(4, model.num_blocks, seed=3)
    policy[:, 6] = 0.0  # a block no image keeps
    with torch.no_grad():
        reference = model.forward_masked(x, policy)
    out = model(x, policy)  # autograd on: still the sparse path
    assert out.requires_grad
    torch.testing.assert_close(out, reference, **TOL)
    out.sum().backward()
    for t, block in enumerate(model.blocks):
        grads = [p.grad for p in block.parameters()]
        if t == 6:
            assert not policy[:, t].any()
        if policy[:, t].any():
            assert any(g is not None and g.abs().sum() > 0 for g in grads), f"kept block {t} got no gradient"
        else:
            assert all(g is None or bool((g == 0).all()) for g in grads), f"dropped block {t} got a gradient"
    assert model.fc.weight.grad.abs().sum() > 0


def test_in_train_mode_a_block_normalises_only_the_images_that_keep_it() -> None:
    # Sparse: block t's BatchNorm statistics come from the images whose policy keeps t; a block no image
    # keeps is not run, so its running statistics do not move. The dense masked form runs it on all.
    torch.manual_seed(0)
    x = torch.randn(6, 3, 8, 8)
    policy = torch.ones(6, 3)
    policy[:, 1] = 0.0  # nobody keeps block 1
    policy[3:, 2] = 0.0  # only images 0-2 keep block 2
    for masked in (False, True):
        model = cifar_resnet(8, 4, 3).train()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 1.0  # running stats := this batch's stats
        seen: list[int] = []
        hook = model.blocks[2].bn1.register_forward_pre_hook(lambda _, args, seen=seen: seen.append(len(args[0])))
        (model.forward_masked if masked else model)(x, policy).sum().backward()
        hook.remove()
        assert seen == [6 if masked else 3]
        untouched = bool((model.blocks[1].bn1.running_mean == 0).all())
        assert untouched is not masked


def test_policy_values_between_0_and_1_interpolate_in_masked_form() -> None:
    # forward_masked is linear in a: a = 0.5 gives the midpoint of a = 0 and a = 1 for a single block.
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = calibrated(cifar_resnet(8, 4, 3), x)  # K = 3; the last block feeds the head directly
    base = torch.ones(2, 3)
    lo, mid, hi = base.clone(), base.clone(), base.clone()
    lo[:, 2], mid[:, 2] = 0.0, 0.5
    with torch.no_grad():
        a, b, c = (model.forward_masked(x, p) for p in (lo, mid, hi))
    torch.testing.assert_close(b, (a + c) / 2, **TOL)


# ----------------------------------------------------------------------------------------------------------
# checkpoints


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_backbone_round_trip(tmp_path: Path, resnet20: tuple[CifarResNet, torch.Tensor]) -> None:
    model, x = resnet20
    one_channel = cifar_resnet(32, 100, 1)
    save_backbone(model, tmp_path / "a.pt")
    save_backbone(one_channel, tmp_path / "sub" / "b.pt")  # creates the folder
    a, b = load_backbone(tmp_path / "a.pt"), load_backbone(tmp_path / "sub" / "b.pt")
    assert same_state(a, model) and not a.training
    assert (b.num_blocks, b.fc.out_features, b.stem[0].in_channels) == (15, 100, 1) and same_state(b, one_channel)
    with torch.no_grad():
        torch.testing.assert_close(a(x), model(x), atol=0, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "sub"]  # no temporary files left


def test_policy_and_blockdrop_round_trip(tmp_path: Path) -> None:
    backbone, policy = cifar_resnet(20, 10, 1), policy_resnet8(9, 1)
    save_policy(policy, tmp_path / "p.pt")
    p = load_policy(tmp_path / "p.pt")
    assert same_state(p, policy) and p.fc.out_features == 9 and not p.training
    save_blockdrop(backbone, policy, tmp_path / "bd.pt")
    b2, p2 = load_blockdrop(tmp_path / "bd.pt")
    assert same_state(b2, backbone) and same_state(p2, policy) and not b2.training and not p2.training


def test_same_weights_give_the_same_file_bytes(tmp_path: Path) -> None:
    # DVC versions model files by md5: the same weights must hash the same whatever the file's name
    # (torch.save into a named file would embed that name, and ours are written via random temp names).
    torch.manual_seed(0)
    model = cifar_resnet(20, 10, 1)
    save_backbone(model, tmp_path / "a.pt")
    save_backbone(model, tmp_path / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    assert same_state(load_backbone(tmp_path / "b.pt"), model)


@pytest.mark.parametrize("loader", [load_backbone, load_policy, load_blockdrop])
def test_corrupted_checkpoint_names_the_file(tmp_path: Path, loader) -> None:
    path = tmp_path / "broken.pt"
    path.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        loader(path)


@pytest.mark.parametrize("loader", [load_backbone, load_policy, load_blockdrop])
def test_missing_checkpoint_names_the_file(tmp_path: Path, loader) -> None:
    path = tmp_path / "absent.pt"
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        loader(path)


def test_wrong_kind_of_checkpoint(tmp_path: Path) -> None:
    save_policy(policy_resnet8(9, 3), tmp_path / "policy.pt")
    with pytest.raises(CheckpointError, match=r"policy\.pt.*lacks arch"):
        load_backbone(tmp_path / "policy.pt")
    torch.save({"arch": {"depth": 20, "num_classes": 10, "in_channels": 3},
                "model": cifar_resnet(32, 10, 3).state_dict()}, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match=r"mismatch\.pt"):
        load_backbone(tmp_path / "mismatch.pt")


@pytest.mark.parametrize("loader", ["backbone", "policy", "blockdrop"])
def test_a_flipped_bit_in_the_weights_is_refused(tmp_path: Path, loader: str) -> None:
    """torch.load reads a zip whose tensor bytes changed without complaint; the saved digest catches it."""
    backbone, policy = cifar_resnet(20, 10, 3), policy_resnet8(9, 3)
    path = tmp_path / f"{loader}.pt"
    save, load = {"backbone": (lambda: save_backbone(backbone, path), load_backbone),
                  "policy": (lambda: save_policy(policy, path), load_policy),
                  "blockdrop": (lambda: save_blockdrop(backbone, policy, path), load_blockdrop)}[loader]
    save()
    load(path)  # intact: loads
    data = bytearray(path.read_bytes())
    weights = torch.load(path, weights_only=True)["model"]["fc.weight"]
    at = bytes(data).find(weights.numpy().tobytes()[:64])  # the tensor's bytes are stored uncompressed
    assert at > 0
    data[at + 3] ^= 0x01
    path.write_bytes(bytes(data))
    assert not torch.equal(torch.load(path, weights_only=True)["model"]["fc.weight"], weights)  # torch loads it
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))} is corrupted"):
        load(path)


def test_checkpoint_that_is_not_a_dict_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_backbone(path)


def test_checkpoint_with_impossible_arch_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "arch33.pt"
    torch.save({"arch": {"depth": 33, "num_classes": 10, "in_channels": 3}, "model": {}}, path)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_backbone(path)


# ----------------------------------------------------------------------------------------------------------
# inference


def test_fold_batchnorm_keeps_the_logits(resnet20: tuple[CifarResNet, torch.Tensor]) -> None:
    model, x = resnet20
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    policy = random_policies(len(x), model.num_blocks, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(folded(x, policy), model(x, policy), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(FullPredictor(model)(x), model(x), atol=1e-4, rtol=1e-4)


def test_skipping_predictor_matches_the_greedy_policy(resnet20: tuple[CifarResNet, torch.Tensor]) -> None:
    backbone, x = resnet20
    torch.manual_seed(1)
    policy_net = calibrated(policy_resnet8(backbone.num_blocks, 3), x, seed=1)
    with torch.no_grad():
        policy_net.fc.weight *= 30  # spread the probabilities away from 0.5
    predictor = SkippingPredictor(backbone, policy_net)
    with torch.no_grad():
        probs = torch.sigmoid(policy_net(x))
        greedy = (probs >= 0.5).float()
        expected = backbone(x, greedy)
    assert (probs - 0.5).abs().min() > 1e-3  # no probability so close to 0.5 that folding could flip it
    assert 0 < greedy.sum() < greedy.numel()  # a mixed policy, so the comparison means something
    for i in range(len(x)):
        logits, actions = predictor(x[i : i + 1])
        assert actions == [bool(a) for a in greedy[i]]
        torch.testing.assert_close(logits[0], expected[i], atol=1e-4, rtol=1e-4)


def test_a_pooled_policy_sees_the_pooled_image_at_a_quarter_of_the_flops(tmp_path: Path) -> None:
    from blockdrop.config import Model
    from blockdrop.flops import module_flops
    from blockdrop.models import build_policy
    from blockdrop.models.io import _digest

    torch.manual_seed(0)
    whole, pooled = policy_resnet8(15, 1, pool=1).eval(), policy_resnet8(15, 1, pool=2).eval()
    pooled.load_state_dict(whole.state_dict())
    x = torch.randn(3, 1, 28, 28)
    assert torch.allclose(pooled(x), whole(torch.nn.functional.avg_pool2d(x, 2)))
    fc = 2 * 64 * 15  # the classifier does not shrink with the image; on even sides every convolution does, by 4
    full, quarter = module_flops(whole, (1, 32, 32))["Global"], module_flops(pooled, (1, 32, 32))["Global"]
    assert quarter - fc == (full - fc) // 4
    # 28 px: 14 -> 7 -> 4 in the last stage (the shortcut pools with ceil_mode), so a little over a quarter
    full, pooled_flops = module_flops(whole, (1, 28, 28))["Global"], module_flops(pooled, (1, 28, 28))["Global"]
    assert 0.25 < (pooled_flops - fc) / (full - fc) < 0.28

    save_policy(pooled, tmp_path / "p.pt")
    assert load_policy(tmp_path / "p.pt").pool == 2
    # a file written before the option existed has no "pool": it is the authors' whole-image policy
    blob = torch.load(tmp_path / "p.pt", weights_only=True)
    del blob["pool"]
    blob["weights_sha256"] = _digest(blob)
    torch.save(blob, tmp_path / "old.pt")
    assert load_policy(tmp_path / "old.pt").pool == 1

    backbone = cifar_resnet(32, 10, 1)
    assert build_policy(backbone, 1, Model()).pool == 1  # 0: the authors' factor, 1 on CIFAR
    assert build_policy(backbone, 1, Model(policy_pool=2)).pool == 2
