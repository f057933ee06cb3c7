"""torchvision's ImageNet weights files, read from a local path (never downloaded at run time) and checked.

torchvision names each weights file after its content: ``resnet101-63fe2227.pth`` holds bytes whose sha256
starts with ``63fe2227``. The check here is torch.hub's own rule (``torch.hub.HASH_REGEX`` on the name, the
digest must start with it), so the file's name pins its content: a params entry naming the file is all DVC
needs to track it, and a truncated, corrupted or renamed file is refused before a single weight is used.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torchvision
from torch.hub import HASH_REGEX

from blockdrop.files import CheckpointError

__all__ = ["check_torchvision_arch", "load_torchvision_weights"]

MIN_HASH = 8  # torch.hub: "the first eight or more digits of the SHA256 hash"


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def load_torchvision_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a torchvision weights file, after checking its sha256 against the hash in its name.

    Every failure is a ``CheckpointError`` whose one-line message names the file and what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} is missing: copy torchvision's file there under its own name "
                              "(weights are never downloaded at run time)")
    match = HASH_REGEX.search(path.name)
    if match is None or len(match[1]) < MIN_HASH:
        raise CheckpointError(f"weights file {path} has no hash in its name: keep torchvision's name, "
                              f"<arch>-<first {MIN_HASH}+ hex digits of its sha256>.pth (resnet101-63fe2227.pth)")
    expected, digest = match[1], _sha256(path)
    if not digest.startswith(expected):
        raise CheckpointError(f"weights file {path} does not match the hash in its name (its sha256 starts "
                              f"{digest[:len(expected)]}, not {expected}): it is corrupted or misnamed; copy it again")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"weights file {path} is unreadable ({type(e).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"weights file {path} does not hold a state dict of tensors")
    return state


def check_torchvision_arch(state: dict[str, torch.Tensor], arch: str, path: str | Path) -> None:
    """Refuse (``CheckpointError``) a state dict that would not load strictly into ``torchvision.models.<arch>()``.

    The reference network is built on the meta device: names and shapes are checked, nothing is allocated.
    """
    with torch.device("meta"):
        reference = getattr(torchvision.models, arch)()
    try:
        reference.load_state_dict(state, strict=True, assign=True)  # assign: no copies into meta tensors
    except RuntimeError:
        expected = reference.state_dict()
        missing = sorted(expected.keys() - state.keys())
        unexpected = sorted(state.keys() - expected.keys())
        resized = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
        found = ", ".join(f"{len(keys)} {what} (e.g. {keys[0]})" for what, keys in
                          (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", resized))
                          if keys)
        raise CheckpointError(f"weights file {path} is not torchvision's {arch} ({found or 'does not load'}): "
                              f"name the {arch} weights file") from None
