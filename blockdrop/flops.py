"""FLOPs per image under the paper's convention, measured by torch's own counter.

Convention (the authors' test script): a convolution costs 2*Cin*Cout*kh*kw*Hout*Wout, a linear layer
2*in*out; BatchNorm, ReLU, pooling and additions are free, and so are the parameter-free CIFAR shortcuts.
The ImageNet ResNet's downsample convolutions live in ``shortcuts``, not ``blocks``: they run even when
their block is dropped, so they count in the always-run base (the authors' convention).
``torch.utils.flop_counter.FlopCounterMode`` counts exactly convolutions and matrix products with these
formulas, so one forward pass of a single image, broken down by module, gives every number we need:
what always runs (stem, shortcuts and classifier), what each residual block adds, and what the policy network costs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from blockdrop.models import BlockResNet

__all__ = ["FlopTable", "count_flops", "module_flops"]


def module_flops(model: torch.nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """Total FLOPs of one forward pass of one image, keyed by module path ('Global' is the whole model)."""
    x = torch.zeros(1, *input_shape)
    counter = FlopCounterMode(display=False, depth=None)
    with counter, torch.no_grad():
        model.eval()(x)
    return {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}


@dataclass(frozen=True)
class FlopTable:
    """FLOPs of the parts of a BlockDrop model for one image of a given shape."""

    base: int  # stem + classifier: always run
    blocks: tuple[int, ...]  # residual block t, when it runs
    policy: int = 0  # the policy network, which runs once per image

    @property
    def full(self) -> int:
        """The backbone with every block on (no policy network)."""
        return self.base + sum(self.blocks)

    def per_image(self, actions: torch.Tensor, with_policy: bool = True) -> torch.Tensor:
        """FLOPs of each row of a (N, K) 0/1 ``actions`` tensor, float64."""
        blocks = torch.tensor(self.blocks, dtype=torch.float64)
        return self.base + (self.policy if with_policy else 0) + actions.double() @ blocks


def count_flops(backbone: BlockResNet, input_shape: tuple[int, ...], policy_net: torch.nn.Module | None = None
                ) -> FlopTable:
    """Count the backbone's per-block FLOPs (and the policy network's) for images of ``input_shape``."""
    counts = module_flops(backbone, input_shape)
    root = type(backbone).__name__
    blocks = tuple(counts.get(f"{root}.blocks.{t}", 0) for t in range(backbone.num_blocks))
    policy = module_flops(policy_net, input_shape)["Global"] if policy_net is not None else 0
    return FlopTable(base=counts["Global"] - sum(blocks), blocks=blocks, policy=policy)
