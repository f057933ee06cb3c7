"""blockdrop.flops against closed forms of the paper's convention (conv 2*Cin*Cout*kh*kw*Hout*Wout,
linear 2*in*out, everything else free)."""

from __future__ import annotations

import pytest
import torch

from blockdrop.flops import FlopTable, count_flops
from blockdrop.models import cifar_resnet, policy_resnet8


def conv(cin: int, cout: int, k: int, hout: int, wout: int) -> int:
    return 2 * cin * cout * k * k * hout * wout


def linear(n_in: int, n_out: int) -> int:
    return 2 * n_in * n_out


def block_flops(n: int, size: int = 32) -> list[int]:
    """Per-block FLOPs of a CIFAR ResNet with n blocks per stage on size x size images."""
    out = []
    cin = 16
    for stage, width in enumerate((16, 32, 64)):
        side = size // (2**stage)
        for b in range(n):
            c_in = cin if b == 0 else width
            out.append(conv(c_in, width, 3, side, side) + conv(width, width, 3, side, side))
        cin = width
    return out


def base_flops(cin: int, classes: int, size: int = 32) -> int:
    return conv(cin, 16, 3, size, size) + linear(64, classes)


def test_closed_forms_match_the_published_numbers() -> None:
    r32 = base_flops(3, 10) + sum(block_flops(5))
    r110 = base_flops(3, 10) + sum(block_flops(18))
    r8 = base_flops(3, 15) + sum(block_flops(1))
    assert (r32, r110, r8) == (137_725_184, 505_775_360, 24_479_616)
    # docs/paper.md, FLOPs convention: R32 1.377e8, R110 5.058e8, ResNet-8 policy 2.45e7
    assert f"{r32:.3e}" == "1.377e+08" and f"{r110:.3e}" == "5.058e+08" and f"{r8:.2e}" == "2.45e+07"


@pytest.fixture(scope="module")
def r32_table() -> FlopTable:
    return count_flops(cifar_resnet(32, 10, 3), (3, 32, 32), policy_resnet8(15, 3))


def test_resnet32_counted(r32_table: FlopTable) -> None:
    assert r32_table.full == 137_725_184
    assert r32_table.policy == 24_479_616
    assert r32_table.base == base_flops(3, 10) == 884_736 + 1_280
    assert list(r32_table.blocks) == block_flops(5)
    # by hand: a 16-channel block at 32x32 is two 16->16 convs = 2 * 2*16*16*9*1024
    assert r32_table.blocks[0] == 9_437_184
    assert r32_table.blocks[5] == conv(16, 32, 3, 16, 16) + conv(32, 32, 3, 16, 16) == 7_077_888
    assert r32_table.blocks[10] == 7_077_888  # 32->64 at 8x8 costs the same as 16->32 at 16x16


def test_resnet110_counted() -> None:
    table = count_flops(cifar_resnet(110, 10, 3), (3, 32, 32))
    assert table.full == 505_775_360 and table.policy == 0 and len(table.blocks) == 54


def test_one_channel_input_at_28px() -> None:
    # Fashion-MNIST unpadded: the stem sees 1 channel, stages run at 28, 14, 7
    table = count_flops(cifar_resnet(20, 10, 1), (1, 28, 28))
    assert table.base == conv(1, 16, 3, 28, 28) + linear(64, 10)
    assert table.blocks[0] == 2 * conv(16, 16, 3, 28, 28)
    assert table.blocks[3] == conv(16, 32, 3, 14, 14) + conv(32, 32, 3, 14, 14)
    assert table.blocks[6] == conv(32, 64, 3, 7, 7) + conv(64, 64, 3, 7, 7)


def test_per_image(r32_table: FlopTable) -> None:
    t = r32_table
    ones, zeros = torch.ones(1, 15), torch.zeros(1, 15)
    assert t.per_image(ones).item() == t.full + t.policy == 137_725_184 + 24_479_616
    assert t.per_image(zeros).item() == t.base + t.policy
    assert t.per_image(ones, with_policy=False).item() == t.full
    assert t.per_image(zeros, with_policy=False).item() == t.base
    first_and_sixth = torch.zeros(2, 15)
    first_and_sixth[0, 0] = first_and_sixth[0, 5] = 1
    out = t.per_image(first_and_sixth)
    assert out.dtype == torch.float64 and out.shape == (2,)
    assert out.tolist() == [t.base + t.policy + 9_437_184 + 7_077_888, t.base + t.policy]


def test_flop_table_arithmetic() -> None:
    t = FlopTable(base=10, blocks=(1, 2, 4), policy=100)
    assert t.full == 17
    actions = torch.tensor([[1, 0, 1], [0, 1, 0]])
    assert t.per_image(actions).tolist() == [115.0, 112.0]
    assert t.per_image(actions, with_policy=False).tolist() == [15.0, 12.0]
