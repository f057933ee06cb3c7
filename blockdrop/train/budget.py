"""What finetuning gives BlockDrop's backbone to learn with: its Adam learning rate and the step decay of it.

The ``finetune`` stage trains the backbone under the policy, the ``finetune-full`` stage trains it with every
block on (the fair full-network baseline); both read the backbone's rate here, so the two cannot drift apart.
"""

from __future__ import annotations

from blockdrop.config import Finetune

__all__ = ["backbone_lr", "lr_factor"]


def backbone_lr(cfg: Finetune) -> float:
    """Adam's rate for the backbone before any decay: ``backbone_lr``, or ``lr`` when it is 0 (the paper's one
    rate for both networks)."""
    return cfg.backbone_lr or cfg.lr


def lr_factor(epoch: int, cfg: Finetune) -> float:
    """The multiplier of both learning rates in 0-based ``epoch``: ``lr_decay`` from ``lr_decay_epoch`` on
    (0: never). A function of the epoch alone, so a resumed run sets the same rates as an unbroken one."""
    return cfg.lr_decay if cfg.lr_decay_epoch and epoch >= cfg.lr_decay_epoch else 1.0
