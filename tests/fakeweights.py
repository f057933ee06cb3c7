"""Writers of torchvision weights files, named the way torchvision names its own (``resnet101-63fe2227.pth``:
the arch, then the first 8 hex digits of the file's sha256), so the hash check is tested on real names.

The weights are a seeded random init of ``torchvision.models.<arch>()``: the shapes and names of the real
files, none of their knowledge. Two touches make them useful in tests: every BatchNorm gets its own random
affine parameters (torchvision starts them all at 1 and 0, so a BN loaded under the wrong name would go
unnoticed), and its running statistics are those of one batch of noise, so activations keep a sane scale
through 100 layers instead of growing to 1e4. Imported by the tests (``from fakeweights import ...``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torchvision
from torch import nn


def write_torchvision_weights(folder: Path, arch: str, seed: int = 0) -> Path:
    """Save a seeded random ``torchvision.models.<arch>()`` state dict as ``<folder>/<arch>-<sha256[:8]>.pth``."""
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # seeded without moving the caller's random stream
        torch.manual_seed(seed)
        model = getattr(torchvision.models, arch)()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.data = 0.5 + torch.rand(m.num_features)
                m.bias.data = 0.2 * torch.randn(m.num_features)
                m.momentum = 1.0  # running stats := the stats of the one batch below
        with torch.no_grad():
            model.train()(torch.randn(8, 3, 64, 64))
        state = model.state_dict()
    tmp = folder / f"{arch}.pth.tmp"
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return tmp.replace(folder / f"{arch}-{digest[:8]}.pth")


def calibrated(model: nn.Module, x: torch.Tensor, seed: int = 0) -> nn.Module:
    """Seeded random BatchNorm affine parameters and running statistics of ``x``, then eval mode: random weights
    whose activations keep a sane scale through the depth (so 1e-5 tolerances mean something), and a BatchNorm
    that folding does not turn into a no-op. Used by the model tests and the inference benches."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = 0.5 + torch.rand(m.num_features, generator=g)
            m.bias.data = 0.2 * torch.randn(m.num_features, generator=g)
            m.momentum = 1.0  # running stats := the stats of the one batch below
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()
