"""The authors' forms, wired where the stages use them: the curriculum's entropy term (``curriculum.entropy``),
the policy ``models/policy_cl.pt`` keeps (``curriculum.keep_epoch``), the batch-wide skip of the dense masked
forward (``finetune.execution: masked``) and ``precision: fp32`` without TF32.

Each test fails if its piece is swapped for the other form, or left out. The stand-ins come from
tests/test_wiring.py (an oracle backbone, easy bar images).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from test_wiring import CLASSES, NORM, Oracle, bar_split
from torch import nn

from blockdrop.config import Curriculum, Finetune
from blockdrop.data import Split
from blockdrop.files import load_checkpoint
from blockdrop.models import CifarResNet, cifar_resnet
from blockdrop.runtime import CompiledNet, resolve_precision
from blockdrop.train.context import TrainContext
from blockdrop.train.curriculum import KeptPolicy, train_curriculum
from blockdrop.train.finetune import finetune_jointly

# ----------------------------------------------------------------------------------------------------------
# curriculum.entropy: the gradient of the entropy term, by hand


class RowPolicy(nn.Module):
    """A stand-in policy whose K logits are one parameter, the same for every image."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(len(x), -1)


LOGITS = [0.5, -1.0, 2.0]  # K = 3; in epoch 1 of the curriculum only the last block is learnable
BETA, ALPHA = 0.5, 0.8


def entropy_gradient(entropy: str | None, tmp_path: Path) -> torch.Tensor:
    """The gradient reaching the logits in the curriculum's first step when every prediction is wrong: the
    advantage is then 0 and the entropy term is the loss's only part with a gradient."""
    images = bar_split(16, 1).images
    split = Split(images, torch.full((len(images),), 3))  # label 3: the oracle never predicts it
    policy = RowPolicy(LOGITS)
    seen: list[torch.Tensor] = []
    policy.logits.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))
    extra = {} if entropy is None else {"entropy": entropy}
    cfg = Curriculum(epochs=1, images_per_epoch=16, batch_size=16, beta=BETA, alpha=ALPHA, penalty=1.0,
                     crop_padding=0, flip=False, **extra)
    (row,) = train_curriculum(Oracle(3), policy, split, split, NORM, cfg,
                              TrainContext(torch.Generator().manual_seed(0), "fp32", tmp_path / "s.pt", "key"))
    assert row["train/advantage"] == 0.0 and len(seen) == 1
    return seen[0]


def by_hand(entropy: str) -> list[float]:
    """d/dz of ``-beta * mean_i sum_k H(p'_k)``, p' = alpha p + (1 - alpha)(1 - p), p = sigmoid(z), where every
    image has the same z; dp'/dz = (2 alpha - 1) p (1 - p)."""
    grads = []
    for k, z in enumerate(LOGITS):
        p = 1 / (1 + torch.exp(torch.tensor(-z, dtype=torch.float64))).item()
        q = ALPHA * p + (1 - ALPHA) * (1 - p)
        dq = (2 * ALPHA - 1) * p * (1 - p)
        if entropy == "authors":  # cl_training.py: (-q log q) over all K blocks; d/dq = -(log q + 1)
            grads.append(-BETA * -(torch.tensor(q).log().item() + 1) * dq)
        else:  # Bernoulli entropy over the learnable blocks (the last one); d/dq = log((1 - q) / q)
            grads.append(-BETA * torch.tensor((1 - q) / q).log().item() * dq if k == 2 else 0.0)
    return grads


@pytest.mark.parametrize("entropy", ["bernoulli", "authors", None], ids=["bernoulli", "authors", "default"])
def test_curriculum_entropy_gradient_is_the_chosen_form(entropy: str | None, tmp_path: Path) -> None:
    got = entropy_gradient(entropy, tmp_path)
    expected = by_hand(entropy or "bernoulli")  # the default is the Bernoulli form
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-4, atol=1e-7)
    # each form is caught when swapped for the other, and the mask when dropped or applied: the forced-on
    # blocks (0, 1) get the authors' gradient and none of the Bernoulli one, and the learnable block's differ
    other = by_hand("bernoulli" if entropy == "authors" else "authors")
    assert all(abs(g - o) > 1e-3 for g, o in zip(got.tolist(), other, strict=True))
    forced = got[:2].abs()
    assert bool((forced > 1e-3).all()) if entropy == "authors" else forced.tolist() == [0.0, 0.0]


# ----------------------------------------------------------------------------------------------------------
# curriculum.keep_epoch: models/policy_cl.pt holds the kept epoch's policy


def test_kept_policy_is_the_one_after_its_epoch_and_survives_a_resume(tmp_path: Path) -> None:
    split = bar_split(32, 1)

    def run(epochs: int, keep: int, state: Path, kept: KeptPolicy | None = None) -> tuple[RowPolicy, KeptPolicy]:
        policy, kept = RowPolicy(LOGITS), kept or KeptPolicy()
        cfg = Curriculum(epochs=epochs, images_per_epoch=16, batch_size=16, lr=0.05, penalty=1.0, crop_padding=0,
                         flip=False, keep_epoch=keep)
        train_curriculum(Oracle(3), policy, split, split, NORM, cfg,
                         TrainContext(torch.Generator().manual_seed(0), "fp32", state, "key"), kept)
        return policy, kept

    after_two, _ = run(2, 0, tmp_path / "two.pt")
    after_four, kept = run(4, 2, tmp_path / "four.pt")
    assert torch.equal(kept.weights["logits"], after_two.logits.detach())  # the policy after epoch 2 ...
    assert not torch.equal(after_four.logits, after_two.logits)  # ... not the last one
    # A run killed after epoch 3 and resumed still hands over epoch 2's policy (it is in the resume state).
    state = tmp_path / "resumed.pt"
    run(3, 2, state)
    resumed_policy, resumed = run(4, 2, state)
    assert torch.equal(resumed.weights["logits"], kept.weights["logits"])
    assert torch.equal(resumed_policy.logits, after_four.logits)


def test_default_curriculum_keeps_nothing_in_the_resume_state(tmp_path: Path) -> None:
    # keep_epoch 0: the resume state holds what it held before the option existed
    split = bar_split(16, 1)
    kept = KeptPolicy()
    cfg = Curriculum(epochs=1, images_per_epoch=16, batch_size=16, crop_padding=0, flip=False)
    train_curriculum(Oracle(3), RowPolicy(LOGITS), split, split, NORM, cfg,
                     TrainContext(torch.Generator().manual_seed(0), "fp32", tmp_path / "s.pt", "key"), kept)
    assert kept.weights is None
    assert "kept" not in load_checkpoint(tmp_path / "s.pt")  # read as the resume reads it (weights only)


def test_keep_epoch_past_the_last_epoch_is_refused() -> None:
    with pytest.raises(ValueError, match="never reached"):
        Curriculum(epochs=3, keep_epoch=4)
    assert Curriculum(epochs=3, keep_epoch=3).keep_epoch == 3


# ----------------------------------------------------------------------------------------------------------
# finetune.execution: masked skips a block no image of the batch keeps


def bn_buffers(model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers() if n.startswith(prefix)}


@pytest.mark.parametrize("skip", [True, False])
def test_masked_forward_skip_leaves_an_unused_blocks_statistics(skip: bool) -> None:
    torch.manual_seed(0)
    model = cifar_resnet(8, 4, 3).train()
    x = torch.randn(6, 3, 8, 8)
    policy = torch.ones(6, 3)
    policy[:, 1] = 0.0  # no image keeps block 1
    policy[:3, 2] = 0.0
    reference = copy.deepcopy(model)
    before, kept_before = bn_buffers(model, "blocks.1."), bn_buffers(model, "blocks.2.")
    logits = model.forward_masked(x, policy, skip_unused=skip)
    logits.sum().backward()
    after, kept_after = bn_buffers(model, "blocks.1."), bn_buffers(model, "blocks.2.")
    assert len(before) == 6  # two BatchNorms: running mean, variance, batches tracked
    unchanged = all(torch.equal(before[n], after[n]) for n in before)
    assert unchanged is skip  # the skip is what keeps them
    assert all(p.grad is None for p in model.blocks[1].parameters()) is skip
    # the logits are the same either way (a dropped block's output is multiplied by 0), and a block some
    # image keeps updates its statistics as before
    torch.testing.assert_close(logits, reference.forward_masked(x, policy), rtol=0, atol=0)
    reference_after = bn_buffers(reference, "blocks.2.")
    assert all(not torch.equal(kept_before[n], kept_after[n]) for n in kept_before)
    assert all(torch.equal(kept_after[n], reference_after[n]) for n in kept_after)


def test_compiled_masked_forward_skips_too() -> None:
    # Compiled (compile: true), a batch with an unused block runs the eager network with the skip; a batch
    # that uses every block runs the compiled graph. The "eager" backend keeps the test fast on a CPU.
    torch.manual_seed(0)
    model = cifar_resnet(8, 4, 3).train()
    net = CompiledNet(model, backend="eager")
    x, policy = torch.randn(4, 3, 8, 8), torch.ones(4, 3)
    policy[:, 0] = 0.0
    before = bn_buffers(model, "blocks.0.")
    net.forward_masked(x, policy, skip_unused=True)
    assert all(torch.equal(before[n], b) for n, b in bn_buffers(model, "blocks.0.").items())
    net.forward_masked(x, torch.ones(4, 3), skip_unused=True)
    assert not torch.equal(before["blocks.0.bn1.running_mean"], model.blocks[0].bn1.running_mean)


def unused_block_statistics_after_finetune(execution: str, tmp_path: Path) -> tuple[dict, dict]:
    """Block 1's BatchNorm buffers before and after one finetuning step whose policy never keeps it."""
    torch.manual_seed(0)
    backbone = CifarResNet((1, 1, 1), CLASSES, 1)
    policy = RowPolicy([3.0, -30.0, 3.0])  # alpha 1: p' = p, so block 1 is never sampled and never greedy
    before = bn_buffers(backbone, "blocks.1.")
    cfg = Finetune(epochs=1, images_per_epoch=32, batch_size=32, alpha=1.0, crop_padding=0, flip=False,
                   execution=execution)
    finetune_jointly(backbone, policy, bar_split(32, 1), bar_split(16, 2), NORM, cfg,
                     TrainContext(torch.Generator().manual_seed(0), "fp32", tmp_path / "s.pt", "key"))
    return before, bn_buffers(backbone, "blocks.1.")


@pytest.mark.parametrize("execution", ["masked", "sparse"])
def test_finetune_runs_no_block_that_no_image_keeps(execution: str, tmp_path: Path) -> None:
    before, after = unused_block_statistics_after_finetune(execution, tmp_path)
    assert before.keys() == after.keys() and len(before) > 0
    assert [n for n in before if not torch.equal(before[n], after[n])] == []


# ----------------------------------------------------------------------------------------------------------
# precision: fp32 means fp32 on CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 is a CUDA setting: needs a GPU")
def test_fp32_on_cuda_turns_tf32_off() -> None:
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        assert resolve_precision("fp32", torch.device("cuda")) == "fp32"
        assert torch.backends.cuda.matmul.allow_tf32 is False
        assert torch.backends.cudnn.allow_tf32 is False
        a = torch.randn(256, 256, device="cuda", dtype=torch.float64)
        b = torch.randn(256, 256, device="cuda", dtype=torch.float64)
        err = ((a.float() @ b.float()).double() - a @ b).abs().max().item()
        assert err < 1e-3  # TF32's 10-bit mantissa would leave errors near 1e-1 here
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def test_precision_on_a_cpu_leaves_the_cuda_flags_alone() -> None:
    cudnn = torch.backends.cudnn.allow_tf32
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert torch.backends.cudnn.allow_tf32 == cudnn
