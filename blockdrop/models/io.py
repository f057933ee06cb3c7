"""Saving and loading models as self-describing state dicts (read back with ``weights_only=True``).

A file records its network's family, ``cifar`` or ``imagenet`` (``policy_family`` too in a BlockDrop file);
files written before the ImageNet family existed have none and are CIFAR.

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
from blockdrop.models.factory import PolicyNet, family
from blockdrop.models.imagenet import ImageNetResNet, policy_resnet10
from blockdrop.models.resnet import BlockResNet, cifar_resnet, policy_resnet8

FAMILIES = ("cifar", "imagenet")

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


def _arch(model: BlockResNet) -> dict[str, Any]:
    arch: dict[str, Any] = {"depth": model.depth, "num_classes": model.fc.out_features,
                            "in_channels": model.in_channels}
    if isinstance(model, ImageNetResNet):
        arch["blocks_per_stage"] = list(model.blocks_per_stage)
    return arch


def save_backbone(model: BlockResNet, path: str | Path) -> None:
    _save({"family": family(model), "arch": _arch(model), "model": model.state_dict()}, path)


def _family(path: Path, blob: dict, key: str = "family") -> str:
    name = blob.get(key, "cifar")  # files written before the ImageNet family existed have no family: CIFAR
    if name not in FAMILIES:
        raise CheckpointError(f"checkpoint {path} holds a network of unknown family {name!r} (known: {FAMILIES})")
    return name


def _build_backbone(path: Path, blob: dict) -> BlockResNet:
    try:
        arch = blob["arch"]
        if _family(path, blob) == "imagenet":
            with torch.device("meta"):  # no random init of the weights the file replaces
                model: BlockResNet = ImageNetResNet(arch["num_classes"], arch["blocks_per_stage"])
            model.load_state_dict(blob["model"], assign=True)
            if model.depth != arch["depth"]:
                raise ValueError(f"depth {model.depth} is not the recorded {arch['depth']}")
        else:
            model = cifar_resnet(**arch)
            model.load_state_dict(blob["model"])
    except (RuntimeError, TypeError, KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} does not hold a matching backbone ({e})") from None
    return model


def load_backbone(path: str | Path) -> BlockResNet:
    """The backbone ResNet saved by ``save_backbone`` (on CPU, in eval mode)."""
    path = Path(path)
    return _build_backbone(path, _load(path, ("arch", "model"))).eval()


def _policy_blob(policy: PolicyNet) -> dict[str, Any]:
    return {"num_blocks": policy.fc.out_features, "in_channels": policy.in_channels, "pool": policy.pool,
            "model": policy.state_dict()}


def save_policy(policy: PolicyNet, path: str | Path) -> None:
    _save({"family": family(policy), **_policy_blob(policy)}, path)


def _build_policy(path: Path, blob: dict, family_key: str = "family") -> PolicyNet:
    try:
        # files written before model.policy_pool existed have no "pool": the authors' factor then
        if _family(path, blob, family_key) == "imagenet":
            policy: PolicyNet = policy_resnet10(blob["num_blocks"], pool=blob.get("pool", 2))
        else:
            policy = policy_resnet8(blob["num_blocks"], blob["in_channels"], blob.get("pool", 1))
        policy.load_state_dict(blob["model"])
    except (RuntimeError, TypeError, KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} does not hold a matching policy network ({e})") from None
    return policy


def load_policy(path: str | Path) -> PolicyNet:
    path = Path(path)
    return _build_policy(path, _load(path, ("num_blocks", "in_channels", "model"))).eval()


def save_blockdrop(backbone: BlockResNet, policy: PolicyNet, path: str | Path) -> None:
    """Backbone and policy in one file: the finetuned BlockDrop model."""
    p = _policy_blob(policy)
    _save({"family": family(backbone), "arch": _arch(backbone), "model": backbone.state_dict(),
           "policy_family": family(policy), "num_blocks": p["num_blocks"], "in_channels": p["in_channels"],
           "pool": p["pool"], "policy": p["model"]}, path)


def load_blockdrop(path: str | Path) -> tuple[BlockResNet, PolicyNet]:
    path = Path(path)
    blob = _load(path, ("arch", "model", "num_blocks", "in_channels", "policy"))
    backbone = _build_backbone(path, blob)
    policy = _build_policy(path, {**blob, "model": blob["policy"]}, "policy_family")
    return backbone.eval(), policy.eval()
