"""BlockDrop wired end to end: each test fails if one connection between the pieces is made wrong.

tests/test_rl.py checks every formula on its own; here the formulas are checked *where the stages use them*:
the advantage's sign as the rollout computes it, the greedy baseline taken from the unbounded probabilities, a
curriculum that learns to drop blocks that do nothing (and touches nothing but the policy), the finetune
options that must change what is computed, and the evaluation and latency paths that must run the right network
with the right decisions. Models are tiny, or stand-ins whose behaviour is known exactly.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blockdrop import rl
from blockdrop.config import Curriculum, Finetune
from blockdrop.data import Normalize, Split, batches
from blockdrop.evaluation import evaluate_variants, randomk_actions
from blockdrop.flops import FlopTable
from blockdrop.inference import SkippingPredictor
from blockdrop.models import CifarResNet, policy_resnet8
from blockdrop.predict import accuracy, predict, run_policy
from blockdrop.train.context import TrainContext
from blockdrop.train.curriculum import train_curriculum
from blockdrop.train.finetune import distillation, finetune_jointly
from blockdrop.train.rollout import rollout

NORM = Normalize([0.2], [0.3], "cpu")
CLASSES = 4


def bar_split(n: int, seed: int) -> Split:
    """Easy 1x16x16 uint8 images: class c is a bright bar in rows 4c..4c+2 over faint noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    images = torch.randint(0, 40, (n, 1, 16, 16), generator=g, dtype=torch.uint8)
    for i, c in enumerate(labels.tolist()):
        images[i, 0, 4 * c : 4 * c + 3, 2:14] = 230
    return Split(images, labels)


def calibrate_batchnorm(model: nn.Module, split: Split, seed: int = 0) -> nn.Module:
    """Random BN affine parameters and running statistics measured on ``split``, then eval mode, so that
    activations keep their scale and eval-mode BN (and folding it) is not an identity."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = 0.5 + torch.rand(m.num_features, generator=g)
            m.bias.data = 0.2 * torch.randn(m.num_features, generator=g)
            m.momentum = None  # a cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for x, _ in batches(split, 256, NORM):
            model(x)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1  # back to the default: a later train-mode pass must be able to move the stats
    return model.eval()


def standardised(policy: CifarResNet, split: Split) -> CifarResNet:
    """Rescale the policy network's output layer so that each block's logit has mean 0 and std 1 over
    ``split``: a random network's images otherwise share one policy, and the tests need many."""
    with torch.no_grad():
        logits = policy(NORM(split.images))
        mean, std = logits.mean(0), logits.std(0)
        policy.fc.weight.div_(std[:, None])
        policy.fc.bias.sub_(mean).div_(std)
    return policy


def grads(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient, zeros where none reached it."""
    return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in module.named_parameters()}


# ----------------------------------------------------------------------------------------------------------
# the rollout: advantage = R(sampled) - R(greedy), greedy from the unbounded p


class Oracle(nn.Module):
    """A stand-in backbone whose correctness is known: every label is 0; image i predicts 0 when it keeps
    every block or when it is *robust* (its first pixel is positive), and 1 otherwise."""

    def __init__(self, num_blocks: int) -> None:
        super().__init__()
        self.num_blocks = num_blocks

    def forward(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        ok = (x[:, 0, 0, 0] > 0) | (policy > 0.5).all(1)
        return F.one_hot((~ok).long(), 2).float()

    forward_masked = forward


class Table(nn.Module):
    """A stand-in policy network whose output logits are a (B, K) parameter, whatever the images."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert len(x) == len(self.logits)
        return self.logits


def sampled_log_prob(table: Table, actions: torch.Tensor, alpha: float) -> torch.Tensor:
    """log pi(actions) per image under the bounded probabilities the actions were drawn from."""
    with torch.no_grad():
        p = rl.bound_probs(torch.sigmoid(table.logits), alpha)
        return torch.where(actions > 0, p, 1 - p).log().sum(1)


def test_policy_gradient_step_reinforces_samples_that_beat_greedy() -> None:
    # Every image's p is 0.73: greedy keeps all 4 blocks, is always correct and earns 1 - 1 = 0. A robust
    # image that drops blocks earns 1 - (s/4)^2 > 0 (better than greedy); a fragile one is then wrong and
    # earns -penalty (worse). One SGD step must make the first kind of sample more likely and the second
    # less likely; with the advantage's sign flipped it does the opposite.
    n, k, alpha, penalty = 16, 4, 0.8, 2.0
    x = torch.zeros(n, 1, 2, 2)
    x[: n // 2, 0, 0, 0] = 1.0  # the first half is robust
    table = Table(torch.full((n, k), 1.0))
    r = rollout(Oracle(k), table, x, torch.zeros(n, dtype=torch.long), alpha=alpha, penalty=penalty,
                learnable=torch.ones(k, dtype=torch.bool), generator=torch.Generator().manual_seed(0))

    assert r.greedy.tolist() == [[1.0] * k] * n and r.baseline.tolist() == [0.0] * n
    kept_all = r.actions.sum(1) == k
    robust = torch.arange(n) < n // 2
    expected = torch.where(kept_all, 0.0, torch.where(robust, 1 - (r.actions.sum(1) / k) ** 2, -penalty))
    torch.testing.assert_close(r.reward, expected)
    torch.testing.assert_close(r.advantage, r.reward - r.baseline)
    better, worse = r.advantage > 0, r.advantage < 0
    assert better.sum() >= 3 and worse.sum() >= 3  # the seed gives both kinds of sample

    before = sampled_log_prob(table, r.actions, alpha)
    loss = rl.policy_gradient_loss(r.bounded, r.actions, r.advantage)
    optimizer = torch.optim.SGD(table.parameters(), lr=0.5)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    change = sampled_log_prob(table, r.actions, alpha) - before
    assert (change[better] > 1e-3).all()
    assert (change[worse] < -1e-3).all()
    assert (change[~better & ~worse] == 0).all()  # A = 0: nothing to learn from that image


class Shared(nn.Module):
    """A stand-in policy network with one (K,) logit parameter shared by every image."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), -1)


def logit_step(weights: torch.Tensor | None, n: int = 4000) -> torch.Tensor:
    """The change of each block's logit after one SGD step from p = 0.5, every image right whatever it runs."""
    k = 4
    policy = Shared(torch.zeros(k))
    x = torch.ones(n, 1, 2, 2)  # robust: every policy is correct, so only the usage term differs
    r = rollout(Oracle(k), policy, x, torch.zeros(n, dtype=torch.long), alpha=0.8, penalty=1.0,
                learnable=torch.ones(k, dtype=torch.bool), generator=torch.Generator().manual_seed(0), weights=weights)
    correct = torch.ones(n, dtype=torch.bool)
    assert torch.equal(r.reward, rl.reward(r.actions, correct, 1.0, weights))
    assert torch.equal(r.baseline, rl.reward(r.greedy, correct, 1.0, weights))
    optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
    rl.policy_gradient_loss(r.bounded, r.actions, r.advantage).backward()
    optimizer.step()
    return policy.logits.detach().clone()


def test_a_costly_block_is_penalised_more_than_a_cheap_one() -> None:
    # cost flops / latency: block 0 weighs 0.7 of the network, each other 0.1. Running block 0 then costs far more
    # of the reward (1 - u^2) than running another, so one policy-gradient step lowers its probability most: in
    # expectation the step is proportional to Cov(A, a_k), -0.175 for block 0 and -0.025 for the others (p = 0.5).
    # With the paper's cost (no weights) every block pays 1/4, and they all move alike (-0.0625 each).
    heavy = logit_step(torch.tensor([0.7, 0.1, 0.1, 0.1], dtype=torch.float64))
    assert (heavy < 0).all()  # running any block costs something
    assert heavy[0] < 3 * heavy[1:].min()
    uniform = logit_step(None)
    assert (uniform < 0).all()
    assert uniform.max() - uniform.min() < 0.5 * uniform.abs().mean()  # sampling noise only (here 0.3)
    assert heavy[0] < uniform.min() and heavy[1:].max() > uniform.max()


def test_the_rollouts_baseline_pays_the_same_block_costs() -> None:
    # Greedy keeps blocks 0 and 2 (p >= 0.5): with weights (0.7, 0.1, 0.1, 0.1) it uses 0.8 of the network and
    # earns 1 - 0.64, not the 1 - 0.25 of two blocks in four.
    n, weights = 8, torch.tensor([0.7, 0.1, 0.1, 0.1], dtype=torch.float64)
    r = rollout(Oracle(4), Shared(torch.tensor([1.0, -1.0, 1.0, -1.0])), torch.ones(n, 1, 2, 2),
                torch.zeros(n, dtype=torch.long), alpha=0.8, penalty=1.0, learnable=torch.ones(4, dtype=torch.bool),
                generator=torch.Generator().manual_seed(0), weights=weights)
    torch.testing.assert_close(r.baseline, torch.full((n,), 1 - 0.8**2))


@pytest.mark.parametrize("alpha", [0.8, 0.3])
def test_greedy_actions_come_from_the_unbounded_probabilities(alpha: float) -> None:
    # For alpha > 0.5 bounding keeps p on its side of 0.5, so p and p' give the same greedy actions; with
    # alpha < 0.5 it moves every p across (p' - 0.5 = (2 alpha - 1)(p - 0.5)), which shows which of the two
    # the rollout thresholds. The rule is p >= 0.5 whatever alpha (the stage configs refuse alpha <= 0.5).
    g = torch.Generator().manual_seed(0)
    n, k = 4000, 4
    logits = 3 * torch.randn(n, k, generator=g) + 1.5  # p mostly above 0.5, so p' and p differ on average
    probs = torch.sigmoid(logits)
    learnable = torch.tensor([False, True, True, True])
    x = torch.ones(n, 1, 2, 2)  # robust: every policy is correct
    r = rollout(Oracle(k), Table(logits), x, torch.zeros(n, dtype=torch.long), alpha=alpha, penalty=1.0,
                learnable=learnable, generator=g)
    expected = (probs >= 0.5).float()
    expected[:, 0] = 1.0  # forced on
    assert torch.equal(r.greedy, expected)
    assert (r.actions[:, 0] == 1).all()
    torch.testing.assert_close(r.bounded, rl.bound_probs(probs, alpha))
    # the samples are drawn from p', not p: their frequency per block is the mean of p' (std < 0.01)
    bounded = rl.bound_probs(probs, alpha)[:, 1:].mean(0)
    assert ((bounded - probs[:, 1:].mean(0)).abs() > 0.05).all()
    torch.testing.assert_close(r.actions[:, 1:].mean(0), bounded, atol=0.025, rtol=0)
    torch.testing.assert_close(r.baseline, rl.reward(expected, torch.ones(n, dtype=torch.bool), 1.0))


@pytest.mark.parametrize("masked", [False, True], ids=["sparse", "masked"])
def test_rollout_scores_sampled_and_greedy_policies_with_the_same_forward(masked: bool) -> None:
    # In train mode (finetuning) the sparse and the dense masked forwards differ (what BatchNorm sees), so
    # the reward and its baseline must come from the same one, or the advantage mixes the two policies'
    # difference with the two forwards' difference. The authors run both through one rnet.forward.
    split = bar_split(32, 6)
    torch.manual_seed(0)
    backbone = calibrate_batchnorm(CifarResNet((2, 2, 2), CLASSES, 1), split).train()
    policy = standardised(calibrate_batchnorm(policy_resnet8(backbone.num_blocks, 1), split, seed=1), split)
    x, y = next(batches(split, len(split), NORM))
    r = rollout(backbone, policy, x, y, alpha=0.8, penalty=1.0, learnable=torch.ones(6, dtype=torch.bool),
                generator=torch.Generator().manual_seed(0), masked=masked)
    same, other = (backbone.forward_masked, backbone) if masked else (backbone, backbone.forward_masked)
    with torch.no_grad():
        torch.testing.assert_close(r.logits, same(x, r.actions), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r.greedy_logits, same(x, r.greedy), atol=1e-5, rtol=1e-5)
        assert (r.greedy_logits - other(x, r.greedy)).abs().max() > 1e-2  # the forwards do differ here


# ----------------------------------------------------------------------------------------------------------
# the curriculum on a backbone whose last blocks do nothing

DEAD = 3  # the last 3 of K = 6 blocks: exactly what the 3 curriculum epochs below unlock


def dead_tail_backbone(train: Split) -> CifarResNet:
    """A ResNet-14 (K = 6) whose last ``DEAD`` residual branches output exactly 0 (their last BN's weight
    and bias are zero), so running or dropping them gives the same logits; its classifier is fitted by
    least squares on ``train``, where it is right on every image."""
    torch.manual_seed(0)
    net = calibrate_batchnorm(CifarResNet((2, 2, 2), CLASSES, 1), train)
    for block in net.blocks[-DEAD:]:
        nn.init.zeros_(block.bn2.weight)
        nn.init.zeros_(block.bn2.bias)
    features = []
    hook = net.fc.register_forward_pre_hook(lambda _, args: features.append(args[0]))
    predict(net, train, NORM)
    hook.remove()
    f = torch.cat(features)
    solution = torch.linalg.lstsq(torch.cat([f, torch.ones(len(f), 1)], 1),
                                  F.one_hot(train.labels, CLASSES).float()).solution
    with torch.no_grad():
        net.fc.weight.copy_(solution[:-1].T)
        net.fc.bias.copy_(solution[-1])
    return net


@pytest.fixture(scope="module")
def curriculum_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three curriculum epochs on the dead-tail backbone: the models before and after, the history, and the
    policy network's classifier after each epoch."""
    train, val = bar_split(256, 1), bar_split(64, 2)
    backbone = dead_tail_backbone(train)
    assert accuracy(predict(backbone, val, NORM), val.labels) == 1.0
    torch.manual_seed(1)
    policy = policy_resnet8(backbone.num_blocks, 1)
    with torch.no_grad():  # start by keeping the dead blocks (p = 0.73) and dropping the live ones (p = 0.27)
        policy.fc.bias.copy_(torch.tensor([-1.0] * (6 - DEAD) + [1.0] * DEAD))
    before = {"backbone": copy.deepcopy(backbone.state_dict()), "policy": copy.deepcopy(policy.state_dict())}
    fc_after_epoch = []
    cfg = Curriculum(epochs=DEAD, images_per_epoch=128, batch_size=32, lr=1e-2, penalty=1.0, crop_padding=0,
                     flip=False)
    history = train_curriculum(backbone, policy, train, val, NORM, cfg, TrainContext(
        torch.Generator().manual_seed(0), "fp32", tmp_path_factory.mktemp("curriculum") / "state.pt", "key",
        on_epoch=lambda _: fc_after_epoch.append((policy.fc.weight.detach().clone(), policy.fc.bias.detach().clone())),
    ))
    return {"history": history, "before": before, "backbone": backbone, "policy": policy, "fc": fc_after_epoch,
            "val": val}


def test_curriculum_learns_to_drop_blocks_that_do_nothing(curriculum_run: dict) -> None:
    history, k = curriculum_run["history"], 6
    assert [r["unlocked_blocks"] for r in history] == [1, 2, 3]
    # Greedy, the policy drops every unlocked (dead) block and keeps every forced-on (live) one, although it
    # started keeping the dead ones and dropping the live ones: exactly K - unlocked blocks per image.
    assert [r["val/blocks_mean"] for r in history] == [5.0, 4.0, 3.0]
    assert [r["val/accuracy"] for r in history] == [1.0, 1.0, 1.0]  # dropping dead blocks costs nothing
    assert history[-1]["val/reward"] == pytest.approx(1 - (3 / 6) ** 2)
    # Sampled (p' in [0.2, 0.8]): every image is right, the reward rises and the blocks used fall epoch by
    # epoch, and by the last epoch the sampler drops most unlocked blocks: fewer than the 3 + 0.5 * 3 of a
    # coin flip, far fewer than the 3 + 0.64 * 3 the starting policy would use.
    rewards = [r["train/reward"] for r in history]
    blocks = [r["train/blocks"] for r in history]
    assert all(r["train/accuracy"] == 1.0 for r in history)
    assert rewards[1] > rewards[0] + 0.1 and rewards[2] > rewards[1] + 0.1
    assert blocks[1] < blocks[0] - 0.3 and blocks[2] < blocks[1] - 0.3
    assert blocks[-1] < 4.4 and rewards[-1] > 0.45
    for row in history:
        assert row["train/blocks"] >= k - row["unlocked_blocks"]  # forced-on blocks always run


def test_curriculum_changes_only_the_policy(curriculum_run: dict) -> None:
    # The backbone is frozen: weights AND BatchNorm running statistics bit-identical (a backbone left in train
    # mode would move its running statistics, though no optimiser touches it).
    before, after = curriculum_run["before"]["backbone"], curriculum_run["backbone"].state_dict()
    assert before.keys() == after.keys()
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    policy_before = curriculum_run["before"]["policy"]
    for name, p in curriculum_run["policy"].named_parameters():
        assert not torch.equal(p, policy_before[name]), f"policy parameter {name} was not trained"


def test_curriculum_forced_on_blocks_get_no_gradient(curriculum_run: dict) -> None:
    # Adam moves a weight whose gradient is exactly 0 by exactly 0 (no weight decay), so the policy's output
    # rows of blocks not yet unlocked stay bit-identical to their start: neither the policy-gradient term nor
    # the entropy bonus reached them. The rows of unlocked blocks did move.
    w0, b0 = curriculum_run["before"]["policy"]["fc.weight"], curriculum_run["before"]["policy"]["fc.bias"]
    k = len(b0)
    for epoch, (w, b) in enumerate(curriculum_run["fc"], 1):
        forced = k - epoch  # blocks 0 .. forced-1 were forced on in every epoch so far
        assert torch.equal(w[:forced], w0[:forced]) and torch.equal(b[:forced], b0[:forced]), f"epoch {epoch}"
        assert (b[forced:] != b0[forced:]).all() and (w[forced:] != w0[forced:]).any(1).all(), f"epoch {epoch}"


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_curriculum_entropy_bonus_is_the_only_signal_when_every_prediction_is_wrong(beta: float,
                                                                                     tmp_path: Path) -> None:
    # Every label is 3, which the stand-in backbone never predicts: sampled and greedy policies both earn
    # -penalty, the advantage is 0, and only the entropy bonus (beta) can move the policy. With beta = 0 no
    # weight moves; with beta > 0 the unlocked block's probability is pushed from 0.88 towards 0.5.
    images = bar_split(64, 1).images
    split = Split(images, torch.full((len(images),), 3))
    torch.manual_seed(0)
    policy = policy_resnet8(3, 1)
    with torch.no_grad():
        policy.fc.bias.fill_(2.0)
    before = copy.deepcopy(dict(policy.named_parameters()))
    cfg = Curriculum(epochs=1, images_per_epoch=64, batch_size=32, lr=1e-2, beta=beta, penalty=1.0, crop_padding=0,
                     flip=False)
    (row,) = train_curriculum(Oracle(3), policy, split, split, NORM, cfg,
                              TrainContext(torch.Generator().manual_seed(0), "fp32", tmp_path / "state.pt", "key"))
    assert row["train/accuracy"] == 0.0 and row["train/advantage"] == 0.0
    moved = [n for n, p in policy.named_parameters() if not torch.equal(p, before[n])]
    if beta == 0:
        assert moved == []
    else:
        assert len(moved) == len(before)
        assert policy.fc.bias[2] < 2.0 - 0.01  # towards p = 0.5, where the entropy is largest
        assert torch.equal(policy.fc.bias[:2], before["fc.bias"][:2])  # forced-on blocks: no entropy gradient


# ----------------------------------------------------------------------------------------------------------
# finetuning: the options change what is computed


def first_step_grads(cfg: Finetune, state: Path, never_keep: int | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The gradients of the policy's and the backbone's parameters at finetuning's first step (same seed,
    data and models every call). ``never_keep``: a block the policy keeps with probability 1e-13 (with
    ``alpha`` 1, neither the sampled nor the greedy actions ever keep it)."""
    train = bar_split(64, 1)
    torch.manual_seed(0)
    backbone, policy = CifarResNet((1, 1, 1), CLASSES, 1), policy_resnet8(3, 1)
    if never_keep is not None:
        with torch.no_grad():
            policy.fc.bias[never_keep] = -30.0
    seen: dict[str, dict[str, torch.Tensor]] = {"policy": {}, "backbone": {}}

    def keep_first(p: torch.Tensor, part: str, name: str) -> None:
        seen[part].setdefault(name, p.grad.clone())

    for part, module in (("policy", policy), ("backbone", backbone)):
        for name, p in module.named_parameters():
            p.register_post_accumulate_grad_hook(lambda p, part=part, name=name: keep_first(p, part, name))
    finetune_jointly(backbone, policy, train, bar_split(16, 2), NORM, cfg,
                     TrainContext(torch.Generator().manual_seed(0), "fp32", state, "key"))
    return seen["policy"], seen["backbone"]


def finetune_cfg(**overrides: object) -> Finetune:
    return Finetune(epochs=1, images_per_epoch=32, batch_size=32, crop_padding=0, flip=False, **overrides)


def test_finetune_pg_reduction_sum_scales_the_policy_gradient(tmp_path: Path) -> None:
    # The authors sum the policy-gradient term over the batch in finetuning: the policy's gradient is the
    # batch size times the mean's. The backbone's gradient (cross-entropy only) does not change.
    # (Adam's step is nearly invariant to that scale, so the *weights* after a step barely differ.)
    mean_policy, mean_backbone = first_step_grads(finetune_cfg(pg_reduction="mean"), tmp_path / "mean.pt")
    sum_policy, sum_backbone = first_step_grads(finetune_cfg(pg_reduction="sum"), tmp_path / "sum.pt")
    assert mean_policy.keys() == sum_policy.keys() and len(mean_policy) > 0
    assert max(g.abs().max().item() for g in mean_policy.values()) > 1e-4  # a policy gradient to compare
    for name, g in mean_policy.items():
        torch.testing.assert_close(sum_policy[name], 32 * g, rtol=1e-4, atol=1e-6, msg=name)
    assert all(torch.equal(sum_backbone[n], g) for n, g in mean_backbone.items())


def test_finetune_execution_masked_changes_the_backbone_gradient(tmp_path: Path) -> None:
    # In train mode the masked form's BatchNorm sees every image, the sparse form's only those that keep the
    # block: same seed, same batch, same sampled actions, different backbone gradients.
    _, sparse = first_step_grads(finetune_cfg(execution="sparse"), tmp_path / "sparse.pt")
    _, masked = first_step_grads(finetune_cfg(execution="masked"), tmp_path / "masked.pt")
    assert sparse.keys() == masked.keys()
    differs = {n: (sparse[n] - masked[n]).abs().max().item() / (sparse[n].abs().max().item() + 1e-12)
               for n in sparse if n.startswith("blocks.")}
    assert max(differs.values()) > 1e-2, differs


@pytest.mark.parametrize("execution", ["sparse", "masked"])
def test_finetune_distill_trains_every_block_and_leaves_the_policy_alone(execution: str, tmp_path: Path) -> None:
    # distill runs every block beside the policy's paths: a block no path keeps gets a gradient from the full
    # path only. The policy learns from the reward alone, so its gradient, and the sampled actions behind it,
    # do not change.
    grads = {d: first_step_grads(finetune_cfg(alpha=1.0, distill=d, execution=execution), tmp_path / f"{d}.pt",
                                 never_keep=2) for d in (0.0, 1.0)}
    (paper_policy, paper_backbone), (distill_policy, distill_backbone) = grads[0.0], grads[1.0]
    dropped = [n for n in distill_backbone if n.startswith("blocks.2.")]  # a gradient reached them ...
    assert dropped and not any(n in paper_backbone for n in dropped)  # ... and none without distill
    assert all(distill_backbone[n].abs().max() > 1e-6 for n in dropped if "conv" in n)
    kept = "blocks.0.conv1.weight"
    assert (distill_backbone[kept] - paper_backbone[kept]).abs().max() > 1e-3 * paper_backbone[kept].abs().max()
    assert max(g.abs().max().item() for g in paper_policy.values()) > 1e-6
    for name, g in paper_policy.items():
        torch.testing.assert_close(distill_policy[name], g, rtol=1e-5, atol=1e-8, msg=name)


def test_distillation_teaches_the_paths_and_leaves_the_teacher_to_the_labels() -> None:
    # The full path's prediction is the target: a path that predicts it exactly pays nothing, and no gradient of
    # the distillation term reaches the full path (it learns from the labels alone).
    torch.manual_seed(0)
    full = torch.randn(8, CLASSES, requires_grad=True)
    paths = {name: torch.randn(8, CLASSES, requires_grad=True) for name in ("sampled", "greedy")}

    def rollout_of(logits: torch.Tensor, greedy_logits: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=logits, greedy_logits=greedy_logits, full_logits=full)

    assert distillation(rollout_of(full * 1, full * 1), 1.0).item() == pytest.approx(0.0, abs=1e-6)
    sampled_only = distillation(rollout_of(paths["sampled"], paths["greedy"]), 0.0)
    both = distillation(rollout_of(paths["sampled"], paths["greedy"]), 2.0)
    greedy_kl = F.kl_div(F.log_softmax(paths["greedy"], 1), F.softmax(full, 1), reduction="batchmean")
    assert sampled_only.item() > 0
    assert both.item() == pytest.approx(sampled_only.item() + 2.0 * greedy_kl.item(), rel=1e-6)
    both.backward()
    assert full.grad is None and paths["sampled"].grad.abs().max() > 0 and paths["greedy"].grad.abs().max() > 0


def test_sparse_and_masked_forward_give_equal_gradients_in_eval_mode() -> None:
    split = bar_split(24, 3)
    torch.manual_seed(0)
    model = calibrate_batchnorm(CifarResNet((2, 2, 2), CLASSES, 1), split)
    g = torch.Generator().manual_seed(1)
    policy = (torch.rand(len(split), model.num_blocks, generator=g) < 0.5).float()
    policy[:, 2] = 0.0  # a block no image keeps: no gradient either way
    x, y = next(batches(split, len(split), NORM))
    out = {}
    for name, forward in (("sparse", model), ("masked", model.forward_masked)):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(forward(x, policy), y).backward()
        out[name] = grads(model)
    assert out["sparse"]["blocks.0.conv1.weight"].abs().max() > 0
    assert (out["masked"]["blocks.2.conv1.weight"] == 0).all()
    for name, grad in out["sparse"].items():
        torch.testing.assert_close(out["masked"][name], grad, atol=1e-5, rtol=1e-4, msg=name)


# ----------------------------------------------------------------------------------------------------------
# evaluation and the batch-1 latency path


def test_evaluate_variants_uses_the_right_networks_and_flops() -> None:
    # The pretrained backbone always says class 0 and the finetuned one always class 1 (a classifier bias
    # nothing else can outweigh): half the labels are 0 and a quarter 1, so every variant's accuracy names
    # the network it ran. The FLOPs table has made-up, well separated numbers.
    test = bar_split(64, 4)
    labels = torch.tensor([0] * 32 + [1] * 16 + [2] * 16)
    test = Split(test.images, labels)
    torch.manual_seed(0)
    backbone = calibrate_batchnorm(CifarResNet((2, 2, 2), CLASSES, 1), test)
    pretrained = copy.deepcopy(backbone)
    with torch.no_grad():
        pretrained.fc.bias[0] += 1e4
        backbone.fc.bias[1] += 1e4
    policy = standardised(calibrate_batchnorm(policy_resnet8(backbone.num_blocks, 1), test, seed=1), test)
    flops = FlopTable(base=7, blocks=(10, 100, 1_000, 10_000, 100_000, 1_000_000), policy=10**8)
    metrics, per_image = evaluate_variants(pretrained, backbone, policy, test, NORM, flops,
                                           torch.Generator().manual_seed(5), batch_size=24)

    for name in ("full", "firstk", "randomk"):
        assert metrics[name]["accuracy"] == 0.5, name  # the pretrained backbone's
    assert metrics["blockdrop"]["accuracy"] == 0.25  # the finetuned one's
    assert per_image["full_correct"].mean() == 0.5 and per_image["correct"].mean() == 0.25

    _, actions = run_policy(backbone, policy, test, NORM)
    k = round(actions.sum(1).mean().item())
    assert 0 < k < backbone.num_blocks and len(torch.unique(actions, dim=0)) > 1  # a policy that decides
    blocks = torch.tensor(flops.blocks, dtype=torch.float64)
    assert metrics["full"]["flops_mean"] == 7 + sum(flops.blocks)
    # BlockDrop pays for its policy network; the heuristics have none to pay for
    assert metrics["blockdrop"]["flops_mean"] == pytest.approx(7 + 10**8 + (actions.double() @ blocks).mean().item())
    assert metrics["firstk"]["flops_mean"] == 7 + sum(flops.blocks[:k]) and metrics["firstk"]["flops_std"] == 0
    randomk = randomk_actions(len(test), backbone.num_blocks, k, torch.Generator().manual_seed(5))
    assert metrics["randomk"]["flops_mean"] == pytest.approx(7 + (randomk.double() @ blocks).mean().item())
    assert metrics["firstk"]["blocks_mean"] == metrics["randomk"]["blocks_mean"] == k

    # The full network trained as BlockDrop's backbone (here: always class 2, a quarter of the labels) is one
    # more variant, scored with every block at the full FLOPs; every other number stays what it was.
    trained = copy.deepcopy(pretrained)
    with torch.no_grad():
        trained.fc.bias[2] += 1e5
    more, more_per_image = evaluate_variants(pretrained, backbone, policy, test, NORM, flops,
                                             torch.Generator().manual_seed(5), batch_size=24, full_finetuned=trained)
    assert more["full_finetuned"]["accuracy"] == 0.25
    assert more["full_finetuned"]["flops_mean"] == metrics["full"]["flops_mean"]
    assert more["full_finetuned"]["blocks_mean"] == backbone.num_blocks and more["full_finetuned"]["flops_std"] == 0
    assert list(more) == ["num_blocks", "full", "full_finetuned", "blockdrop", "firstk", "randomk"]
    assert {k: v for k, v in more.items() if k != "full_finetuned"} == metrics
    assert more_per_image.equals(per_image)


def test_batch1_latency_path_takes_the_evaluation_decisions() -> None:
    # The evaluate stage times SkippingPredictor (BN folded, policy thresholded on logits, dropped blocks
    # never called) on normalize(test.images); its decisions and logits must be run_policy's on that split.
    test = bar_split(48, 5)
    torch.manual_seed(0)
    backbone = calibrate_batchnorm(CifarResNet((2, 2, 2), CLASSES, 1), test)
    policy = standardised(calibrate_batchnorm(policy_resnet8(backbone.num_blocks, 1), test, seed=1), test)
    with torch.no_grad():
        probs = torch.sigmoid(policy(NORM(test.images)))
    assert (probs - 0.5).abs().min() > 1e-4  # none so close to 0.5 that folding BN could flip it
    assert ((probs > 0.5) & (probs < torch.sigmoid(torch.tensor(0.5)))).any()  # logits in (0, 0.5): thresholds differ
    logits, actions = run_policy(backbone, policy, test, NORM, batch_size=20)
    assert len(torch.unique(actions, dim=0)) > 3
    predictor = SkippingPredictor(backbone, policy)
    images = NORM(test.images)
    for i in range(len(test)):
        out, decided = predictor(images[i : i + 1])
        assert decided == actions[i].bool().tolist(), f"image {i}"
        torch.testing.assert_close(out[0], logits[i], atol=1e-4, rtol=1e-4, msg=f"image {i}")
