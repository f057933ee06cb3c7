"""Saving and loading models as self-describing state dicts (read back with ``weights_only=True``)."""

from __future__ import annotations

from pathlib import Path

from blockdrop.files import CheckpointError, load_checkpoint, save_atomic
from blockdrop.models.resnet import CifarResNet, cifar_resnet, policy_resnet8

__all__ = ["load_backbone", "load_blockdrop", "load_policy", "save_backbone", "save_blockdrop", "save_policy"]


def _arch(model: CifarResNet) -> dict[str, int]:
    return {"depth": 6 * model.blocks_per_stage[0] + 2, "num_classes": model.fc.out_features,
            "in_channels": model.stem[0].in_channels}


def save_backbone(model: CifarResNet, path: str | Path) -> None:
    save_atomic({"arch": _arch(model), "model": model.state_dict()}, path)


def _build_backbone(path: Path, blob: dict) -> CifarResNet:
    try:
        model = cifar_resnet(**blob["arch"])
        model.load_state_dict(blob["model"])
    except (RuntimeError, TypeError, KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} does not hold a matching backbone ({e})") from None
    return model


def load_backbone(path: str | Path) -> CifarResNet:
    """The backbone ResNet saved by ``save_backbone`` (on CPU, in eval mode)."""
    path = Path(path)
    return _build_backbone(path, load_checkpoint(path, required=("arch", "model"))).eval()


def save_policy(policy: CifarResNet, path: str | Path) -> None:
    save_atomic({"num_blocks": policy.fc.out_features, "in_channels": policy.stem[0].in_channels,
                 "model": policy.state_dict()}, path)


def _build_policy(path: Path, blob: dict) -> CifarResNet:
    try:
        policy = policy_resnet8(blob["num_blocks"], blob["in_channels"])
        policy.load_state_dict(blob["model"])
    except (RuntimeError, TypeError, KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} does not hold a matching policy network ({e})") from None
    return policy


def load_policy(path: str | Path) -> CifarResNet:
    path = Path(path)
    return _build_policy(path, load_checkpoint(path, required=("num_blocks", "in_channels", "model"))).eval()


def save_blockdrop(backbone: CifarResNet, policy: CifarResNet, path: str | Path) -> None:
    """Backbone and policy in one file: the finetuned BlockDrop model."""
    save_atomic({"arch": _arch(backbone), "model": backbone.state_dict(), "num_blocks": policy.fc.out_features,
                 "in_channels": policy.stem[0].in_channels, "policy": policy.state_dict()}, path)


def load_blockdrop(path: str | Path) -> tuple[CifarResNet, CifarResNet]:
    path = Path(path)
    blob = load_checkpoint(path, required=("arch", "model", "num_blocks", "in_channels", "policy"))
    backbone = _build_backbone(path, blob)
    policy = _build_policy(path, {**blob, "model": blob["policy"]})
    return backbone.eval(), policy.eval()
