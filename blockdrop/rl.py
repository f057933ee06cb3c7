"""The policy-gradient pieces of BlockDrop, as small pure functions (each unit-tested by hand).

Notation: K blocks; ``probs`` are the policy network's keep-probabilities p in (0, 1), shape (B, K);
``actions`` are 0/1 floats of the same shape; ``learnable`` is a (K,) bool mask of the blocks the policy
decides on (the curriculum unlocks them from the last block backwards).
"""

from __future__ import annotations

import torch

from blockdrop.dist import SINGLE, Dist

__all__ = [
    "ENTROPY_FORMS",
    "authors_entropy",
    "bernoulli_entropy",
    "bound_probs",
    "curriculum_mask",
    "force_on",
    "greedy_actions",
    "policy_gradient_loss",
    "reward",
    "sample_actions",
]


def bound_probs(probs: torch.Tensor, alpha: float) -> torch.Tensor:
    """``p' = alpha p + (1 - alpha)(1 - p)``: keeps every probability in [1-alpha, alpha] so the policy
    never stops exploring (alpha = 0.8 bounds it to [0.2, 0.8])."""
    return alpha * probs + (1 - alpha) * (1 - probs)


def sample_actions(probs: torch.Tensor, generator: torch.Generator, dist: Dist = SINGLE) -> torch.Tensor:
    """Bernoulli samples of ``probs`` drawn from a CPU ``generator`` (reproducible on any device).

    With several ranks (``dist``), ``probs`` holds this rank's rows of the global batch: the uniforms of the
    whole global batch are drawn and this rank's rows kept, so every rank's generator stays in step."""
    u = dist.local(torch.rand((len(probs) * dist.world, *probs.shape[1:]), generator=generator)).to(probs.device)
    return (u < probs).to(probs.dtype)


def greedy_actions(probs: torch.Tensor) -> torch.Tensor:
    """The deterministic policy used for the baseline and at test time: keep a block iff p >= 0.5.
    (For alpha > 0.5 bounding does not move p across 0.5, so bounded or not gives the same actions.)"""
    return (probs >= 0.5).to(probs.dtype)


def reward(actions: torch.Tensor, correct: torch.Tensor, penalty: float, weights: torch.Tensor | None = None
           ) -> torch.Tensor:
    """Per image: ``1 - u^2`` if the prediction is correct, else ``-penalty``, where ``u`` is the used fraction.

    ``weights`` None: ``u = blocks / K``, the paper's. Else ``u = sum_k w_k a_k`` with the (K,) ``weights`` summing
    to 1, each block's share of the cost (``curriculum.cost``, ``finetune.cost``; blockdrop.train.block_costs).
    """
    # weights None keeps the paper's arithmetic as it was: 1/K weights summed would round differently
    used = actions.sum(1) / actions.shape[1] if weights is None else actions @ weights.to(actions.device, actions.dtype)
    return torch.where(correct, 1 - used**2, torch.full_like(used, -penalty))


def curriculum_mask(epoch: int, num_blocks: int) -> torch.Tensor:
    """Blocks the policy may decide on in curriculum epoch ``epoch`` (from 0): the last
    ``min(K, epoch + 1)``. All K are learnable from epoch K - 1 on."""
    k = min(num_blocks, epoch + 1)
    return torch.arange(num_blocks) >= num_blocks - k


def force_on(actions: torch.Tensor, learnable: torch.Tensor) -> torch.Tensor:
    """Blocks outside ``learnable`` are always run (action 1)."""
    return torch.where(learnable.to(actions.device), actions, torch.ones_like(actions))


def bernoulli_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Elementwise entropy of Bernoulli(p), in nats."""
    p = probs.clamp(1e-6, 1 - 1e-6)
    return -(p * p.log() + (1 - p) * (1 - p).log())


def authors_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Elementwise ``-p log p`` of the authors' curriculum loss (``cl_training.py``), ``p`` clamped to
    [1e-15, 1 - 1e-15] as they clamp it. Not the Bernoulli entropy: it leaves out the ``(1 - p) log(1 - p)``
    half, so it peaks at ``p' = 1/e`` (a keep-probability p of about 0.28 before bounding with alpha 0.8),
    below the greedy threshold 0.5: it pulls every block toward being dropped."""
    p = probs.clamp(1e-15, 1 - 1e-15)
    return -p * p.log()


# curriculum.entropy: the per-block term, and whether it covers only the learnable blocks (True) or all K
ENTROPY_FORMS = {"bernoulli": (bernoulli_entropy, True), "authors": (authors_entropy, False)}


def policy_gradient_loss(
    probs: torch.Tensor,
    actions: torch.Tensor,
    advantage: torch.Tensor,
    learnable: torch.Tensor | None = None,
    beta: float = 0.0,
    reduction: str = "mean",
    entropy: str = "bernoulli",
) -> torch.Tensor:
    """REINFORCE with a baseline: ``-A * sum_k log pi(a_k)`` over the batch (``mean`` or ``sum``),
    minus ``beta`` times an entropy term summed over blocks and averaged over the batch.

    ``probs`` are the (bounded) probabilities the actions were sampled from; only blocks in
    ``learnable`` contribute to the policy-gradient term, since forced-on blocks were not the policy's
    choice. ``entropy`` (``curriculum.entropy``): ``bernoulli`` is the Bernoulli entropy of the learnable
    blocks; ``authors`` is ``-p log p`` over all K blocks, forced-on ones included, as ``cl_training.py``.
    """
    mask = torch.ones(probs.shape[1], dtype=torch.bool) if learnable is None else learnable
    mask = mask.to(probs.device).to(probs.dtype)
    p = probs.clamp(1e-6, 1 - 1e-6)
    log_pi = actions * p.log() + (1 - actions) * (1 - p).log()
    per_image = -advantage.detach() * (log_pi * mask).sum(1)
    pg = per_image.mean() if reduction == "mean" else per_image.sum()
    if beta:
        term, masked = ENTROPY_FORMS[entropy]
        h = term(probs) * mask if masked else term(probs)
        pg = pg - beta * h.sum(1).mean()
    return pg
