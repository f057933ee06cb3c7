"""The models, images and actions the inference benchmarks run on (``bench/inference.py``,
``bench/inference_profile.py``).

With ``models/blockdrop.pt`` present they are the workspace's own models and the policy network's greedy
actions. Without it (a fresh checkout: ``models/`` is made by the pipeline) the networks are the default
profile's ResNet-32 and ResNet-8 on 1-channel 28 px images with seeded random weights and BatchNorm
statistics taken from the images, and the actions are drawn from a fixed set of policies instead of the
untrained policy network's: each image gets one of ``SYNTHETIC_POLICIES`` seeded policies, each keeping a
block with probability ``SYNTHETIC_KEEP``, about what the finetuned default model does (50-65% of the blocks,
tens of distinct policies on 256 test images). The policy network still runs on every image, so the time is
that of the real thing.
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' calibrated random weights

from fakeweights import calibrated

from blockdrop.inference import BatchedSkippingPredictor
from blockdrop.models import (
    BlockResNet,
    PolicyNet,
    cifar_resnet,
    load_backbone,
    load_blockdrop,
    policy_resnet8,
)

SYNTHETIC_POLICIES = 30
SYNTHETIC_KEEP = 0.55


def cpu_model() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_models(models_dir: Path, size: int = 28) -> tuple[BlockResNet, BlockResNet, PolicyNet, bool, str]:
    """(full backbone, finetuned backbone, policy network, whether the actions are synthetic, a note);
    random networks are calibrated on seeded N(0, 1) images of ``size`` px."""
    bd_path, full_path = models_dir / "blockdrop.pt", models_dir / "backbone.pt"
    if not bd_path.exists():
        torch.manual_seed(0)
        images = torch.randn(64, 1, size, size)
        backbone = calibrated(cifar_resnet(32, 10, 1), images)
        policy = calibrated(policy_resnet8(backbone.num_blocks, 1), images, seed=1)
        return backbone, backbone, policy, True, (
            f"RANDOM WEIGHTS ({bd_path} missing): ResNet-32 + ResNet-8; actions drawn from {SYNTHETIC_POLICIES} "
            f"fixed policies keeping each block with p = {SYNTHETIC_KEEP}")
    backbone, policy = load_blockdrop(bd_path)
    if full_path.exists():
        return load_backbone(full_path), backbone, policy, False, f"{full_path} (full), {bd_path} (BlockDrop)"
    # same architecture, so the same time: only the full side's accuracy would differ
    return backbone, backbone, policy, False, f"{bd_path}; {full_path} missing: full = its backbone, every block on"


def synthetic_actions(n: int, k: int, policies: int = SYNTHETIC_POLICIES, keep: float = SYNTHETIC_KEEP,
                      seed: int = 0) -> torch.Tensor:
    """(n, k) bool actions: image i takes one of ``policies`` seeded random policies (block kept with
    probability ``keep``), drawn uniformly."""
    g = torch.Generator().manual_seed(seed)
    table = torch.rand(policies, k, generator=g) < keep
    return table[torch.randint(policies, (n,), generator=g)]


def blockdrop_runner(predictor: BatchedSkippingPredictor, synthetic: bool
                     ) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``run(images, actions)``: BlockDrop's logits and actions. With real models the actions are the
    policy network's (the argument is ignored); with ``synthetic`` ones the policy network still runs, so its
    cost is counted, but the given (B, K) 0/1 actions are taken."""
    if not synthetic:
        return lambda images, actions: predictor(images)

    def run(images: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        predictor.policy_logits(images)
        return predictor.backbone_under(images, actions), actions

    return run
