"""blockdrop.rl: every piece of the policy gradient against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from blockdrop.rl import (
    authors_entropy,
    bernoulli_entropy,
    bound_probs,
    curriculum_mask,
    force_on,
    greedy_actions,
    policy_gradient_loss,
    reward,
    sample_actions,
)


def test_bound_probs_by_hand() -> None:
    p = torch.tensor([0.9, 0.0, 1.0, 0.5, 0.25])
    # 0.8*0.9 + 0.2*0.1 = 0.74; 0 -> 0.2; 1 -> 0.8; 0.5 stays; 0.8*0.25 + 0.2*0.75 = 0.35
    torch.testing.assert_close(bound_probs(p, 0.8), torch.tensor([0.74, 0.2, 0.8, 0.5, 0.35]))
    torch.testing.assert_close(bound_probs(p, 1.0), p)  # alpha = 1: no bound


def test_bound_probs_keeps_gradient() -> None:
    p = torch.tensor([0.3], requires_grad=True)
    bound_probs(p, 0.8).sum().backward()
    assert p.grad.item() == pytest.approx(0.6)  # d/dp (alpha p + (1-alpha)(1-p)) = 2 alpha - 1


def test_reward_by_hand() -> None:
    actions = torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    correct = torch.tensor([True, True, False, True, False])
    r = reward(actions, correct, penalty=5.0)
    # 1 - (2/4)^2 = 0.75; all blocks on: 1 - 1 = 0; wrong: -5 whatever the blocks; none: 1
    torch.testing.assert_close(r, torch.tensor([0.75, 0.0, -5.0, 1.0, -5.0]))
    assert reward(actions[2:3], correct[2:3], penalty=0.0).item() == 0.0


def paper_reward(actions: torch.Tensor, correct: torch.Tensor, penalty: float) -> torch.Tensor:
    """blockdrop.rl.reward as it was before per-block costs: the reference the ``blocks`` cost must equal."""
    used = actions.sum(1) / actions.shape[1]
    return torch.where(correct, 1 - used**2, torch.full_like(used, -penalty))


@pytest.mark.parametrize("k", [3, 7, 15, 33, 54])
def test_reward_without_weights_is_the_papers_bit_for_bit(k: int) -> None:
    g = torch.Generator().manual_seed(k)
    actions = (torch.rand(4096, k, generator=g) < 0.5).float()
    correct = torch.rand(4096, generator=g) < 0.7
    assert torch.equal(reward(actions, correct, 3.4), paper_reward(actions, correct, 3.4))
    # uniform weights give the same numbers up to rounding, not bit for bit: that is why blocks passes none
    uniform = torch.full((k,), 1 / k, dtype=torch.float64)
    torch.testing.assert_close(reward(actions, correct, 3.4, uniform), paper_reward(actions, correct, 3.4))


def test_reward_with_weights_by_hand() -> None:
    weights = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    actions = torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]])
    correct = torch.tensor([True, True, True, True, False])
    r = reward(actions, correct, 5.0, weights)
    # u = 0.7: 1 - 0.49; u = 0.3: 1 - 0.09; every block: 0; none: 1; wrong: -5 whatever it used
    torch.testing.assert_close(r, torch.tensor([0.51, 0.91, 0.0, 1.0, -5.0]))
    assert r.dtype == actions.dtype  # the weights follow the actions' dtype
    # the same number of blocks earns less when they are the costly ones
    assert reward(actions[:1], correct[:1], 5.0, weights) < reward(actions[1:2], correct[1:2], 5.0, weights)


def test_curriculum_mask_by_hand() -> None:
    assert curriculum_mask(0, 5).tolist() == [False, False, False, False, True]
    assert curriculum_mask(2, 5).tolist() == [False, False, True, True, True]
    assert curriculum_mask(4, 5).tolist() == [True] * 5  # all learnable from epoch K - 1
    assert curriculum_mask(10, 5).tolist() == [True] * 5
    assert curriculum_mask(0, 1).tolist() == [True]


def test_force_on() -> None:
    actions = torch.tensor([[0.0, 1, 0, 0], [0, 0, 1, 0]])
    learnable = torch.tensor([False, False, True, True])
    assert force_on(actions, learnable).tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]]
    assert force_on(actions, torch.ones(4, dtype=torch.bool)).tolist() == actions.tolist()


def test_greedy_actions() -> None:
    p = torch.tensor([[0.5, 0.4999, 0.5001, 0.0, 1.0]])
    assert greedy_actions(p).tolist() == [[1.0, 0.0, 1.0, 0.0, 1.0]]
    # bounding with alpha > 0.5 never moves p across 0.5
    grid = torch.linspace(0, 1, 101)
    assert torch.equal(greedy_actions(bound_probs(grid, 0.8)), greedy_actions(grid))


def test_bernoulli_entropy() -> None:
    h = bernoulli_entropy(torch.tensor([0.5, 0.2, 0.0, 1.0]))
    assert h[0].item() == pytest.approx(math.log(2))
    assert h[1].item() == pytest.approx(-(0.2 * math.log(0.2) + 0.8 * math.log(0.8)))
    assert 0 <= h[2].item() < 1e-4 and 0 <= h[3].item() < 1e-4


# A 2 x 2 example: two images, two blocks.
PROBS = torch.tensor([[0.8, 0.4], [0.3, 0.6]])
ACTIONS = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
ADVANTAGE = torch.tensor([2.0, -1.0])
# log pi(a): image 0: log 0.8 + log(1 - 0.4) = log 0.8 + log 0.6; image 1: log 0.3 + log 0.6
LOG_PI = [[math.log(0.8), math.log(0.6)], [math.log(0.3), math.log(0.6)]]


def per_image(mask: tuple[float, float] = (1, 1)) -> list[float]:
    return [-a * (lp[0] * mask[0] + lp[1] * mask[1]) for a, lp in zip(ADVANTAGE.tolist(), LOG_PI, strict=True)]


def test_policy_gradient_loss_mean_and_sum() -> None:
    img = per_image()  # [-2 (log .8 + log .6), +1 (log .3 + log .6)] = [1.4680, -1.7148]
    assert img[0] == pytest.approx(1.46797, abs=1e-4) and img[1] == pytest.approx(-1.71480, abs=1e-4)
    mean = policy_gradient_loss(PROBS, ACTIONS, ADVANTAGE)
    total = policy_gradient_loss(PROBS, ACTIONS, ADVANTAGE, reduction="sum")
    assert mean.item() == pytest.approx((img[0] + img[1]) / 2, rel=1e-5)
    assert total.item() == pytest.approx(img[0] + img[1], rel=1e-5)


def test_policy_gradient_loss_learnable_mask() -> None:
    learnable = torch.tensor([False, True])  # block 0 forced on: not the policy's choice
    img = per_image((0, 1))  # [-2 log .6, + log .6]
    loss = policy_gradient_loss(PROBS, ACTIONS, ADVANTAGE, learnable=learnable)
    assert loss.item() == pytest.approx((img[0] + img[1]) / 2, rel=1e-5)
    assert loss.item() == pytest.approx(-0.5 * math.log(0.6), rel=1e-5)
    # and no gradient reaches the masked column
    probs = PROBS.clone().requires_grad_()
    policy_gradient_loss(probs, ACTIONS, ADVANTAGE, learnable=learnable, beta=0.1).backward()
    assert probs.grad[:, 0].tolist() == [0.0, 0.0] and bool((probs.grad[:, 1] != 0).all())


def test_policy_gradient_loss_entropy_term() -> None:
    learnable = torch.tensor([False, True])
    h = lambda p: -(p * math.log(p) + (1 - p) * math.log(1 - p))  # noqa: E731
    # the entropy of the learnable blocks, summed over blocks and averaged over images
    entropy = (h(0.4) + h(0.6)) / 2
    base = policy_gradient_loss(PROBS, ACTIONS, ADVANTAGE, learnable=learnable)
    with_beta = policy_gradient_loss(PROBS, ACTIONS, ADVANTAGE, learnable=learnable, beta=0.1)
    assert (with_beta - base).item() == pytest.approx(-0.1 * entropy, rel=1e-5)
    full = policy_gradient_loss(PROBS, ACTIONS, ADVANTAGE, beta=0.1)
    entropy_all = (h(0.8) + h(0.4) + h(0.3) + h(0.6)) / 2
    assert full.item() == pytest.approx(sum(per_image()) / 2 - 0.1 * entropy_all, rel=1e-5)


def test_authors_entropy_is_minus_p_log_p_peaking_at_1_over_e() -> None:
    h = authors_entropy(torch.tensor([0.5, 0.2, 0.0, 1.0, math.exp(-1)]))
    assert h[0].item() == pytest.approx(0.5 * math.log(2))
    assert h[1].item() == pytest.approx(-0.2 * math.log(0.2))
    assert h[2].item() == pytest.approx(0.0, abs=1e-12) and h[3].item() == pytest.approx(0.0, abs=1e-6)
    grid = torch.linspace(0.01, 0.99, 981)
    assert grid[authors_entropy(grid).argmax()].item() == pytest.approx(math.exp(-1), abs=1e-3)


def test_policy_gradient_loss_authors_entropy_is_cl_trainings_loss() -> None:
    # cl_training.py: loss = (sum over images and learnable blocks of -A log pi  -  beta * sum over images and
    # ALL blocks of -p' log p') / batch size
    learnable = torch.tensor([False, True])
    hp = lambda p: -p * math.log(p)  # noqa: E731
    theirs = (sum(per_image((0, 1))) - 0.1 * (hp(0.8) + hp(0.4) + hp(0.3) + hp(0.6))) / 2
    ours = policy_gradient_loss(PROBS, ACTIONS, ADVANTAGE, learnable=learnable, beta=0.1, entropy="authors")
    assert ours.item() == pytest.approx(theirs, rel=1e-6)


def test_policy_gradient_loss_detaches_the_advantage() -> None:
    advantage = ADVANTAGE.clone().requires_grad_()
    policy_gradient_loss(PROBS.clone().requires_grad_(), ACTIONS, advantage).backward()
    assert advantage.grad is None


def test_policy_gradient_gradient_by_hand() -> None:
    # d/dp of -A log p = -A / p for action 1, and of -A log(1 - p) = A / (1 - p) for action 0 (mean over 2)
    probs = PROBS.clone().requires_grad_()
    policy_gradient_loss(probs, ACTIONS, ADVANTAGE).backward()
    expected = torch.tensor([[-2 / 0.8, 2 / 0.6], [1 / 0.3, 1 / 0.6]]) / 2
    torch.testing.assert_close(probs.grad, expected)


@pytest.mark.parametrize(("advantage", "up"), [(1.5, True), (-1.5, False)])
def test_advantage_sign_moves_the_sampled_action(advantage: float, up: bool) -> None:
    # A sampled policy better than greedy (A > 0) gets its probability pushed up by one SGD step.
    logits = torch.tensor([[0.3, -0.2, 0.1]], requires_grad=True)
    actions = torch.tensor([[1.0, 0.0, 1.0]])
    opt = torch.optim.SGD([logits], lr=0.5)

    def prob_of_actions() -> float:
        p = bound_probs(torch.sigmoid(logits), 0.8)
        return torch.where(actions > 0, p, 1 - p).prod().item()

    before = prob_of_actions()
    loss = policy_gradient_loss(bound_probs(torch.sigmoid(logits), 0.8), actions, torch.tensor([advantage]))
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = prob_of_actions()
    assert (after > before) if up else (after < before)
    # each block moves the right way: kept blocks towards 1, dropped towards 0 (reversed for A < 0)
    sign = 1 if up else -1
    moved = logits.detach() - torch.tensor([[0.3, -0.2, 0.1]])
    assert (sign * moved[0, [0, 2]] > 0).all() and (sign * moved[0, 1] < 0)


def test_self_critical_advantage_end_to_end() -> None:
    # correct with 1 of 4 blocks beats the greedy policy's correct-with-4: A = (1 - 1/16) - 0 > 0
    sampled, greedy = torch.tensor([[1.0, 0, 0, 0]]), torch.ones(1, 4)
    correct = torch.tensor([True])
    advantage = reward(sampled, correct, 5.0) - reward(greedy, correct, 5.0)
    assert advantage.item() == pytest.approx(15 / 16)


def test_sample_actions_frequency_and_reproducible() -> None:
    probs = torch.tensor([0.1, 0.5, 0.9, 0.0, 1.0]).expand(4000, 5)
    a = sample_actions(probs, torch.Generator().manual_seed(0))
    assert a.dtype == probs.dtype and set(a.unique().tolist()) <= {0.0, 1.0}
    freq = a.mean(0)
    # 4000 draws: std of the frequency is at most 0.008
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.5, 0.9, 0.0, 1.0]), atol=0.03, rtol=0)
    assert freq[3].item() == 0.0 and freq[4].item() == 1.0
    b = sample_actions(probs, torch.Generator().manual_seed(0))
    c = sample_actions(probs, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
