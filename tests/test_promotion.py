"""Champion / challenger rule, the logged BlockDrop module, the registry helpers, and the flow params."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from blockdrop import tracking
from blockdrop.config import Params, ParamsError, parse_params
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


def _log(net: BlockDropNet, name: str, version_tags: dict | None = None) -> int:
    """Log ``net`` as finetune does: its weights-only checkpoint ``models/blockdrop.pt`` inside the pyfunc."""
    from pathlib import Path

    from blockdrop import serving
    from blockdrop.models import save_blockdrop

    ckpt = Path("models/blockdrop.pt")
    save_blockdrop(net.backbone, net.policy_net, ckpt)
    spec = serving.model_spec("fashion-mnist", [f"class {c}" for c in range(10)], [1, 28, 28], [0.5], [0.25],
                              net.backbone, net.policy_net)
    example = pd.DataFrame({"image": list(_split(2)[0].images[:, 0].numpy())})
    return tracking.log_blockdrop_model(ckpt, spec, example, name, version_tags=version_tags)


def test_registry_helpers_round_trip_a_blockdrop_net(store: MlflowClient) -> None:
    name = "blockdrop-test-resnet20"
    assert tracking.latest_version(name) is None and tracking.get_alias_version(name, "champion") is None
    net, (split, normalize) = _net(), _split(4)
    with tracking.stage_run("finetune", Params()):
        v1 = _log(net, name)
        v2 = _log(_net(1), name)
    assert (v1, v2) == (1, 2) and tracking.latest_version(name) == 2
    assert tracking.get_alias_version(name, "challenger") == 2
    tracking.set_alias(name, "champion", 1)
    assert tracking.get_alias_version(name, "champion") == 1
    # the champion's pyfunc takes the raw images and answers what the network it was logged from answers
    images = pd.DataFrame({"image": list(split.images[:, 0].numpy())})
    answer = tracking.load_registered_model(name, "champion").predict(images)
    logits, actions = run_policy(net.backbone, net.policy_net, split, normalize)
    assert answer["class_index"].tolist() == logits.argmax(1).tolist()
    assert answer["policy"].tolist() == ["".join(str(int(a)) for a in row) for row in actions.tolist()]
    assert answer["class_name"].tolist() == [f"class {c}" for c in logits.argmax(1).tolist()]


def test_flow_and_tracking_params() -> None:
    p = Params()
    assert (p.flow.retries, p.flow.accuracy_tolerance, p.flow.require_flops_not_higher) == (2, 0.002, True)
    assert p.tracking.experiment == "blockdrop" and p.tracking.log_model is True
    for bad, key in ((({"flow": {"retries": -1}}), "flow.retries"), ({"flow": {"accuracy_tolerance": 2}},
                     "flow.accuracy_tolerance"),
                     ({"tracking": {"log_model": "yes"}}, "tracking.log_model"),
                     ({"tracking": {"experimnt": "x"}}, "tracking.experimnt")):
        with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
            parse_params(bad)


@pytest.mark.parametrize("expr", ["0 3 * * 1", "*/15 0-6 1,15 jan-mar mon-fri", "@daily", "5 4 * * sun",
                                  "* * *", "61 * * * *", "0 3 * * 8", "*/0 * * * *", "0 3 * * funday",
                                  "0 3 32 * *", "0 3 * 13 *", "a b c d e"])
def test_cron_is_checked_by_prefects_own_schedule_model(expr: str) -> None:
    from orchestration.cron import cron_schedule

    assert parse_params({"flow": {"cron": expr}}).flow.cron == expr  # to the library, a plain string
    if expr in ("0 3 * * 1", "*/15 0-6 1,15 jan-mar mon-fri", "@daily", "5 4 * * sun"):
        assert cron_schedule(expr).cron == expr
    else:
        with pytest.raises(ParamsError) as info:
            cron_schedule(expr)
        message = str(info.value)
        assert message.startswith("flow.cron: ") and f'"{expr}"' in message and "\n" not in message, message


# ------------------------------------------------------------ registry tied to DVC, race-free promotion

MODEL = "blockdrop-test-resnet20"


def _register(seed: int) -> tuple[int, str, BlockDropNet]:
    """Register a BlockDrop net as finetune does: its weights-only checkpoint as a run artifact, and the
    version tagged with that file's DVC md5. Returns (version, md5, net)."""
    from pathlib import Path

    from blockdrop.models import save_blockdrop

    net = _net(seed)
    ckpt = Path("models/blockdrop.pt")
    save_blockdrop(net.backbone, net.policy_net, ckpt)
    with tracking.stage_run("finetune", Params()) as run:
        run.log_artifacts([ckpt])
        version = _log(net, MODEL, version_tags=run.lineage_tags(ckpt))
    return version, tracking.dvc_md5(ckpt), net


def _dvc_lock(md5: str) -> None:
    from pathlib import Path

    import yaml

    lock = {"schema": "2.0", "stages": {"finetune": {"cmd": "python -m pipelines.finetune", "outs": [
        {"path": "models/blockdrop.pt", "hash": "md5", "md5": md5, "size": 1}]}}}
    Path("dvc.lock").write_text(yaml.safe_dump(lock))


def test_promotion_selects_the_dvc_lock_version_not_the_challenger_alias(store: MlflowClient) -> None:
    from blockdrop.promotion import PromotionError, load_version, locked_md5, select_version

    v1, md5_1, net1 = _register(0)
    v2, md5_2, _ = _register(1)  # e.g. a `dvc exp run` elsewhere: it moved `challenger`
    assert (v1, v2) == (1, 2) and md5_1 != md5_2
    assert tracking.get_alias_version(MODEL, "challenger") == 2
    tags = store.get_model_version(MODEL, "1").tags
    assert tags["dvc_md5"] == md5_1 and tags["params_sha256"] and tags["git_commit"]
    _dvc_lock(md5_1)
    assert locked_md5(".") == md5_1
    assert select_version(MODEL, locked_md5(".")) == 1
    loaded = load_version(MODEL, 1)  # from the run artifact (no DVC cache here), weights only
    for a, b in zip(loaded.state_dict().values(), net1.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    _dvc_lock("0" * 32)
    with pytest.raises(PromotionError, match=f"no version of registered model {MODEL} has tag dvc_md5=0{{32}}"):
        select_version(MODEL, locked_md5("."))


class _Payload:
    """Unpickling this creates a file: what a tampered artifact could do if it were ever unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_tampered_checkpoint_is_refused_before_it_is_loaded(store: MlflowClient, tmp_path) -> None:
    import pickle
    from pathlib import Path

    from blockdrop.promotion import PromotionError, load_version

    version, md5, _ = _register(0)
    run_id = store.get_model_version(MODEL, str(version)).run_id
    artifact = Path(store.get_run(run_id).info.artifact_uri.removeprefix("file://")) / "models/blockdrop.pt"
    assert tracking.dvc_md5(artifact) == md5
    marker = tmp_path / "code-ran"
    evil = pickle.dumps(_Payload(str(marker)))
    pickle.loads(evil)  # the payload works: unpickling it runs code
    assert marker.exists()
    marker.unlink()

    artifact.write_bytes(evil)
    with pytest.raises(PromotionError, match=rf"{MODEL} version {version}: checkpoint md5 \w+ != its dvc_md5 tag"):
        load_version(MODEL, version)
    assert not marker.exists()

    # The DVC cache is read first when it holds the file; tampered there, it is refused the same way.
    cached = Path(".dvc/cache/files/md5") / md5[:2] / md5[2:]
    cached.parent.mkdir(parents=True)
    cached.write_bytes(evil)
    with pytest.raises(PromotionError, match=f"version {version}: checkpoint md5"):
        load_version(MODEL, version)
    assert not marker.exists()
    cached.write_bytes(Path("models/blockdrop.pt").read_bytes())  # the genuine bytes: loads
    assert isinstance(load_version(MODEL, version), BlockDropNet)


def test_two_promotions_racing_one_loses_cleanly(store: MlflowClient) -> None:
    import threading

    from blockdrop.promotion import ChampionChangedError, promote

    v1, _, _ = _register(0)
    v2, _, _ = _register(1)
    tracking.get_alias_version(MODEL, "champion")  # warm the store before the threads start
    barrier, outcome = threading.Barrier(2), {}

    def contender(version: int) -> None:
        expected = tracking.get_alias_version(MODEL, "champion")  # both read "no champion"...
        barrier.wait()  # ...then both try to swap it in at once
        try:
            promote(MODEL, version, expected)
            outcome[version] = "won"
        except ChampionChangedError as error:
            outcome[version] = str(error)

    threads = [threading.Thread(target=contender, args=(v,)) for v in (v1, v2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    (winner,) = [v for v, o in outcome.items() if o == "won"]
    (loser,) = [v for v in (v1, v2) if v != winner]
    assert outcome[loser] == (f"champion of {MODEL} changed from none to v{winner} while version {loser} was being "
                              "scored: not promoted (another promotion won; rerun the retrain flow to compare again)")
    assert tracking.get_alias_version(MODEL, "champion") == winner
    promote(MODEL, loser, expected=winner)  # with the current champion as expected, the swap goes through
    assert tracking.get_alias_version(MODEL, "champion") == loser
