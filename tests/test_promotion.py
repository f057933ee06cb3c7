"""Champion / challenger rule, the logged BlockDrop module, the registry helpers, and the flow params."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from blockdrop import tracking
from blockdrop.config import Params, ParamsError, cron_error, parse_params
from blockdrop.data import Normalize, Split
from blockdrop.models import BlockDropNet, cifar_resnet, policy_resnet8
from blockdrop.predict import run_policy
from blockdrop.promotion import decide, score_model

CHAMP = {"accuracy": 0.900, "flops_mean": 100.0}


@pytest.mark.parametrize(
    ("challenger", "promote", "why"),
    [
        ({"accuracy": 0.905, "flops_mean": 90.0}, True, "within"),  # better and cheaper
        ({"accuracy": 0.899, "flops_mean": 100.0}, True, "within"),  # 0.001 lower: inside 0.002
        ({"accuracy": 0.898, "flops_mean": 100.0}, True, "within"),  # exactly at the tolerance
        ({"accuracy": 0.897, "flops_mean": 80.0}, False, "accuracy"),  # 0.003 lower: cheaper does not help
        ({"accuracy": 0.950, "flops_mean": 101.0}, False, "FLOPs"),  # more accurate but costlier
    ],
)
def test_decide(challenger: dict, promote: bool, why: str) -> None:
    d = decide(challenger, CHAMP, tolerance=0.002, require_flops=True)
    assert d.promote is promote and why in d.reason
    assert d.accuracy_delta == pytest.approx(challenger["accuracy"] - CHAMP["accuracy"])
    assert d.flops_ratio == pytest.approx(challenger["flops_mean"] / CHAMP["flops_mean"])


def test_decide_without_champion_or_flops_rule() -> None:
    assert decide({"accuracy": 0.1, "flops_mean": 1e9}, None, 0.002).promote
    assert decide({"accuracy": 0.95, "flops_mean": 101.0}, CHAMP, 0.002, require_flops=False).promote
    assert not decide({"accuracy": 0.5, "flops_mean": 1.0}, CHAMP, 0.0).promote
    assert decide({"accuracy": 0.9, "flops_mean": 100.0 * (1 + 1e-12)}, CHAMP, 0.0).promote  # float noise


def _net(seed: int = 0) -> BlockDropNet:
    torch.manual_seed(seed)
    backbone = cifar_resnet(20, 10, 1)
    policy = policy_resnet8(backbone.num_blocks, 1)
    with torch.no_grad():
        policy.fc.bias.copy_(torch.linspace(-2, 2, backbone.num_blocks))  # some blocks on, some off
    return BlockDropNet(backbone, policy).eval()


def _split(n: int = 24) -> tuple[Split, Normalize]:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g)
    return Split(images, torch.arange(n) % 10), Normalize([0.5], [0.25], torch.device("cpu"))


def test_blockdrop_net_matches_run_policy_and_score() -> None:
    net, (split, normalize) = _net(), _split()
    logits, actions = run_policy(net.backbone, net.policy_net, split, normalize, batch_size=10)
    with torch.no_grad():
        x = normalize(split.images)
        assert torch.equal(net.actions(x), actions)
        torch.testing.assert_close(net(x), logits, rtol=1e-4, atol=1e-4)
    score = score_model(net, split, normalize, batch_size=10)
    assert score["accuracy"] == pytest.approx((logits.argmax(1) == split.labels).double().mean().item())
    assert 0 < score["blocks_mean"] < net.backbone.num_blocks and score["images"] == len(split)
    with pytest.raises(ValueError, match="blocks"):
        BlockDropNet(net.backbone, policy_resnet8(3, 1))


@pytest.fixture
def store(mlflow_project: str) -> MlflowClient:
    return MlflowClient(mlflow_project)


def test_registry_helpers_round_trip_a_blockdrop_net(store: MlflowClient) -> None:
    name = "blockdrop-test-resnet20"
    assert tracking.latest_version(name) is None and tracking.get_alias_version(name, "champion") is None
    net, (split, normalize) = _net(), _split(4)
    example = normalize(split.images[:1]).numpy().astype(np.float32)
    with tracking.stage_run("finetune", Params()):
        v1 = tracking.log_blockdrop_model(net, example, name)
        v2 = tracking.log_blockdrop_model(_net(1), example, name)
    assert (v1, v2) == (1, 2) and tracking.latest_version(name) == 2
    assert tracking.get_alias_version(name, "challenger") == 2
    tracking.set_alias(name, "champion", 1)
    assert tracking.get_alias_version(name, "champion") == 1
    loaded = tracking.load_registered_model(name, "champion")
    assert isinstance(loaded, BlockDropNet)
    with torch.no_grad():
        x = normalize(split.images)
        torch.testing.assert_close(loaded(x), net(x))
    assert score_model(tracking.load_registered_model(name, 1), split, normalize) == score_model(net, split, normalize)


def test_flow_and_tracking_params() -> None:
    p = Params()
    assert (p.flow.retries, p.flow.accuracy_tolerance, p.flow.require_flops_not_higher) == (2, 0.002, True)
    assert p.tracking.experiment == "blockdrop" and p.tracking.log_model is True
    for bad, key in ((({"flow": {"retries": -1}}), "flow.retries"), ({"flow": {"accuracy_tolerance": 2}},
                     "flow.accuracy_tolerance"), ({"flow": {"cron": "0 25 * * *"}}, "flow.cron"),
                     ({"tracking": {"log_model": "yes"}}, "tracking.log_model"),
                     ({"tracking": {"experimnt": "x"}}, "tracking.experimnt")):
        with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
            parse_params(bad)


@pytest.mark.parametrize("expr", ["0 3 * * 1", "*/15 0-6 1,15 jan-mar mon-fri", "@daily", "5 4 * * sun",
                                  "* * *", "61 * * * *", "0 3 * * 8", "*/0 * * * *", "0 3 * * funday",
                                  "0 3 32 * *", "0 3 * 13 *", "a b c d e"])
def test_cron_validation_accepts_only_what_prefect_accepts(expr: str) -> None:
    croniter = pytest.importorskip("prefect._vendor.croniter").croniter  # what Prefect's schedules parse with
    if cron_error(expr) is None:
        assert croniter.is_valid(expr), expr
    else:
        assert expr in cron_error(expr)
    if expr in ("0 3 * * 1", "@daily", "5 4 * * sun"):
        assert cron_error(expr) is None
