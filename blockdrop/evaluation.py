"""The evaluate stage's numbers: BlockDrop against the full backbone and the paper's two heuristics.

All variants are scored on the same test images with the same FLOPs table:
* ``full``: the pretrained backbone, every block on (the paper's baseline);
* ``full_finetuned``: the full network trained as BlockDrop's backbone (the ``finetune-full`` stage: the
  pretrained backbone trained further, every block on, on exactly finetune's budget), every block on: the
  baseline that separates what the policy does from what finetune's extra training does;
* ``blockdrop``: the finetuned backbone under the greedy policy (policy network FLOPs included);
* ``firstk`` / ``randomk``: the pretrained backbone running the first k, or k random, blocks, where k is
  BlockDrop's mean number of blocks, rounded (the paper's heuristics: dropping without learning).
"""

from __future__ import annotations

import pandas as pd
import torch

from blockdrop.data import Normalize, Split
from blockdrop.flops import FlopTable
from blockdrop.models import BlockResNet, PolicyNet
from blockdrop.predict import predict, run_policy

__all__ = ["evaluate_variants", "firstk_actions", "flops_saved_summary", "heuristic_curves", "per_class_table",
           "randomk_actions", "variant_metrics"]


def variant_metrics(correct: torch.Tensor, actions: torch.Tensor, flops: torch.Tensor) -> dict[str, float]:
    """Accuracy, blocks used and FLOPs per image (mean and population std) of one variant."""
    blocks = actions.sum(1).double()
    return {
        "accuracy": correct.double().mean().item(),
        "blocks_mean": blocks.mean().item(),
        "blocks_std": blocks.std(unbiased=False).item(),
        "block_fraction": blocks.mean().item() / actions.shape[1],
        "flops_mean": flops.double().mean().item(),
        "flops_std": flops.double().std(unbiased=False).item(),
    }


def flops_saved_summary(flops: torch.Tensor, full: float) -> dict[str, float]:
    """The distribution of the fraction of the full backbone's FLOPs each image saves (the paper's "20% on
    average, up to 36% for some images"): mean, median, 5th and 95th percentile, min and max. Negative for
    an image whose skipped blocks cost less than the policy network it pays for."""
    saved = 1.0 - flops.double() / full
    q = torch.quantile(saved, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64))
    return {"mean": saved.mean().item(), "median": q[1].item(), "p5": q[0].item(), "p95": q[2].item(),
            "min": saved.min().item(), "max": saved.max().item()}


def firstk_actions(n: int, num_blocks: int, k: int) -> torch.Tensor:
    """Run the first ``k`` blocks of every image."""
    return (torch.arange(num_blocks) < k).float().expand(n, num_blocks).clone()


def randomk_actions(n: int, num_blocks: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """Run ``k`` blocks chosen uniformly at random, independently per image."""
    ranks = torch.rand(n, num_blocks, generator=generator).argsort(1).argsort(1)
    return (ranks < k).float()


def evaluate_variants(
    pretrained: BlockResNet,
    backbone: BlockResNet,
    policy_net: PolicyNet,
    test: Split,
    normalize: Normalize,
    flops: FlopTable,
    generator: torch.Generator,
    batch_size: int = 500,
    full_finetuned: BlockResNet | None = None,
) -> tuple[dict, pd.DataFrame]:
    """Metrics of the variants (the shape of ``reports/evaluate/metrics.json`` minus the speedup) and a per-image
    table for the analysis stage. ``full_finetuned``: the full network trained as BlockDrop's backbone, scored
    beside the pretrained one when given."""
    labels = test.labels.cpu()
    n, num_blocks = len(labels), backbone.num_blocks
    full_logits = predict(pretrained, test, normalize, batch_size)
    bd_logits, bd_actions = run_policy(backbone, policy_net, test, normalize, batch_size)
    bd_correct = bd_logits.argmax(1) == labels
    bd_flops = flops.per_image(bd_actions)

    k = round(bd_actions.sum(1).mean().item())
    heuristics = {"firstk": firstk_actions(n, num_blocks, k), "randomk": randomk_actions(n, num_blocks, k, generator)}
    metrics: dict = {"num_blocks": num_blocks}
    metrics["full"] = variant_metrics(full_logits.argmax(1) == labels, torch.ones(n, num_blocks),
                                      torch.full((n,), float(flops.full)))
    if full_finetuned is not None:  # the same architecture: the full network's FLOPs
        correct = predict(full_finetuned, test, normalize, batch_size).argmax(1) == labels
        metrics["full_finetuned"] = variant_metrics(correct, torch.ones(n, num_blocks),
                                                    torch.full((n,), float(flops.full)))
    metrics["blockdrop"] = {**variant_metrics(bd_correct, bd_actions, bd_flops),
                            "unique_policies": len(torch.unique(bd_actions, dim=0)),
                            "flops_saved": flops_saved_summary(bd_flops, flops.full)}
    for name, actions in heuristics.items():
        logits = predict(pretrained, test, normalize, batch_size, policy_fn=_rows_of(actions, batch_size))
        metrics[name] = variant_metrics(logits.argmax(1) == labels, actions, flops.per_image(actions, False))

    full_log_probs = full_logits.log_softmax(1)
    per_image = pd.DataFrame({
        "index": range(n),
        "label": labels.numpy(),
        "predicted": bd_logits.argmax(1).numpy(),
        "correct": bd_correct.numpy(),
        "blocks": bd_actions.sum(1).int().numpy(),
        "flops": bd_flops.numpy(),
        "flops_saved": (1.0 - bd_flops / flops.full).numpy(),
        "policy": ["".join(str(int(a)) for a in row) for row in bd_actions.tolist()],
        "full_correct": (full_logits.argmax(1) == labels).numpy(),
        "full_confidence": full_log_probs.exp().gather(1, labels[:, None])[:, 0].numpy(),
        "full_loss": (-full_log_probs.gather(1, labels[:, None])[:, 0]).numpy(),
    })
    return metrics, per_image


def heuristic_curves(
    pretrained: BlockResNet,
    test: Split,
    normalize: Normalize,
    flops: FlopTable,
    generator: torch.Generator,
    batch_size: int = 500,
    k_step: int = 1,
) -> pd.DataFrame:
    """FirstK and RandomK on the pretrained backbone at k = 1, 1 + ``k_step``, ... and always K (the full
    network): one row per k with each heuristic's accuracy and mean FLOPs per image (no policy network: they
    have none).

    The paper compares BlockDrop with these baselines as curves, not at one k; a dropped block is skipped
    for real here, so at ``k_step`` 1 the whole table costs about K full passes over the test set, and about
    K / ``k_step`` at a larger step (readers interpolate between the rows by FLOPs).
    """
    labels = test.labels.cpu()
    n, num_blocks = len(labels), pretrained.num_blocks
    rows = []
    for k in sorted({*range(1, num_blocks + 1, k_step), num_blocks}):
        row: dict[str, float] = {"k": k}
        for name, actions in (("firstk", firstk_actions(n, num_blocks, k)),
                              ("randomk", randomk_actions(n, num_blocks, k, generator))):
            logits = predict(pretrained, test, normalize, batch_size, policy_fn=_rows_of(actions, batch_size))
            row[f"{name}_accuracy"] = (logits.argmax(1) == labels).double().mean().item()
            row[f"{name}_flops"] = flops.per_image(actions, with_policy=False).mean().item()
        rows.append(row)
    return pd.DataFrame(rows)


def _rows_of(actions: torch.Tensor, batch_size: int):
    """A ``policy_fn`` for :func:`predict` that hands out consecutive rows of a fixed action table."""
    batches = iter(actions.split(batch_size))
    return lambda x: next(batches).to(x.device)


def per_class_table(per_image: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Accuracy and blocks used (mean, std) of BlockDrop for each class."""
    table = per_image.groupby("label").agg(
        images=("correct", "size"), accuracy=("correct", "mean"), full_accuracy=("full_correct", "mean"),
        blocks_mean=("blocks", "mean"), blocks_std=("blocks", "std"),
    ).reset_index()
    table.insert(1, "class", [classes[i] for i in table["label"]])
    return table
