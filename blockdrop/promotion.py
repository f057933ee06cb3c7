"""Champion / challenger: score a BlockDrop model on the test split, and decide whether it replaces the champion.

:func:`decide` is a pure function of the two sets of numbers, so the rule is tested without models or a
registry. The retrain flow (``pipelines/flow.py``) scores both models with :func:`score_model`, calls
:func:`decide`, and moves the registry alias ``champion`` when it says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from blockdrop.data import Normalize, Split, load_meta, load_split
from blockdrop.evaluation import variant_metrics
from blockdrop.flops import count_flops
from blockdrop.models import BlockDropNet
from blockdrop.predict import run_policy

__all__ = ["Decision", "decide", "score_model", "score_on_test"]

FLOPS_RTOL = 1e-9  # equal FLOPs, up to float summation order, are "not higher"


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    accuracy_delta: float | None = None  # challenger - champion (fractions)
    flops_ratio: float | None = None  # challenger / champion mean FLOPs per image

    def as_dict(self) -> dict:
        return asdict(self)


def decide(challenger: dict, champion: dict | None, tolerance: float, require_flops: bool = True) -> Decision:
    """Promote ``challenger`` unless it is less accurate than ``champion`` by more than ``tolerance``
    (accuracies are fractions, so 0.002 is 0.2 points), or, with ``require_flops``, uses more FLOPs per
    image on average. Without a champion the challenger is promoted.

    Both dicts hold at least ``accuracy`` and ``flops_mean`` (as :func:`score_model` returns them).
    """
    if champion is None:
        return Decision(True, "no champion yet")
    delta = challenger["accuracy"] - champion["accuracy"]
    ratio = challenger["flops_mean"] / champion["flops_mean"] if champion["flops_mean"] else float("inf")
    if -delta > tolerance + 1e-12:
        return Decision(False, f"accuracy {challenger['accuracy']:.4f} is {-delta:.4f} below the champion's "
                               f"{champion['accuracy']:.4f} (tolerance {tolerance:g})", delta, ratio)
    if require_flops and challenger["flops_mean"] > champion["flops_mean"] * (1 + FLOPS_RTOL):
        return Decision(False, f"mean FLOPs {challenger['flops_mean']:.4g} above the champion's "
                               f"{champion['flops_mean']:.4g}", delta, ratio)
    return Decision(True, f"accuracy {delta:+.4f} within tolerance {tolerance:g}, FLOPs x{ratio:.3f}", delta, ratio)


@torch.no_grad()
def score_model(model: BlockDropNet, test: Split, normalize: Normalize, batch_size: int = 500) -> dict:
    """Accuracy, blocks and FLOPs per image of ``model`` (greedy policy, policy network FLOPs included),
    measured exactly as the evaluate stage measures its ``blockdrop`` variant."""
    model = model.cpu().eval()
    test = test.to("cpu")
    flops = count_flops(model.backbone, tuple(test.images.shape[1:]), model.policy_net)
    logits, actions = run_policy(model.backbone, model.policy_net, test, normalize, batch_size)
    correct = logits.argmax(1) == test.labels.cpu()
    return {**variant_metrics(correct, actions, flops.per_image(actions)), "images": len(test)}


def score_on_test(model: BlockDropNet, data_dir: str | Path = "data/prepared") -> dict:
    """:func:`score_model` on the prepared test split in ``data_dir``."""
    meta = load_meta(data_dir)
    return score_model(model, load_split(data_dir, "test"), Normalize(meta.mean, meta.std, torch.device("cpu")))
