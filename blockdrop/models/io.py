"""Saving and loading models as self-describing state dicts (read back with ``weights_only=True``).

Each file also carries ``weights_sha256``, a digest of every tensor it holds. ``torch.load`` reads a file whose
weights had a bit flipped without complaint (a zip's records are not checksummed on read), so a load
recomputes the digest and refuses a file whose tensors are not the ones that were saved.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from blockdrop.files import CheckpointError, load_checkpoint, save_atomic
from blockdrop.models.resnet import CifarResNet, cifar_resnet, policy_resnet8

__all__ = ["load_backbone", "load_blockdrop", "load_policy", "save_backbone", "save_blockdrop", "save_policy"]


def _digest(blob: dict[str, Any]) -> str:
    """sha256 over every tensor in ``blob`` (names, dtypes, shapes and bytes, in a fixed order)."""
    h = hashlib.sha256()

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key in sorted(value):
                walk(f"{prefix}/{key}", value[key])
        elif isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{prefix}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")

    walk("", {k: v for k, v in blob.items() if k != "weights_sha256"})
    return h.hexdigest()


def _save(blob: dict[str, Any], path: str | Path) -> None:
    save_atomic({**blob, "weights_sha256": _digest(blob)}, path)


def _load(path: Path, required: tuple[str, ...]) -> dict[str, Any]:
    blob = load_checkpoint(path, required=required)
    recorded = blob.get("weights_sha256")  # files written before the digest existed have none
    if recorded is not None and recorded != _digest(blob):
        raise CheckpointError(f"checkpoint {path} is corrupted: its weights do not match the digest saved with them")
    return blob


def _arch(model: CifarResNet) -> dict[str, int]:
    return {"depth": 6 * model.blocks_per_stage[0] + 2, "num_classes": model.fc.out_features,
            "in_channels": model.stem[0].in_channels}


def save_backbone(model: CifarResNet, path: str | Path) -> None:
    _save({"arch": _arch(model), "model": model.state_dict()}, path)


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
    return _build_backbone(path, _load(path, ("arch", "model"))).eval()


def save_policy(policy: CifarResNet, path: str | Path) -> None:
    _save({"num_blocks": policy.fc.out_features, "in_channels": policy.stem[0].in_channels,
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
    return _build_policy(path, _load(path, ("num_blocks", "in_channels", "model"))).eval()


def save_blockdrop(backbone: CifarResNet, policy: CifarResNet, path: str | Path) -> None:
    """Backbone and policy in one file: the finetuned BlockDrop model."""
    _save({"arch": _arch(backbone), "model": backbone.state_dict(), "num_blocks": policy.fc.out_features,
           "in_channels": policy.stem[0].in_channels, "policy": policy.state_dict()}, path)


def load_blockdrop(path: str | Path) -> tuple[CifarResNet, CifarResNet]:
    path = Path(path)
    blob = _load(path, ("arch", "model", "num_blocks", "in_channels", "policy"))
    backbone = _build_backbone(path, blob)
    policy = _build_policy(path, {**blob, "model": blob["policy"]})
    return backbone.eval(), policy.eval()
