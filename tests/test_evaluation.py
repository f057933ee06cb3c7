"""blockdrop.evaluation: the heuristics' action tables and the metrics, on hand-made examples."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from blockdrop.evaluation import (
    firstk_actions,
    flops_saved_summary,
    per_class_table,
    randomk_actions,
    variant_metrics,
)


def test_firstk_actions() -> None:
    a = firstk_actions(3, 5, 2)
    assert a.tolist() == [[1, 1, 0, 0, 0]] * 3 and a.dtype == torch.float32
    assert firstk_actions(2, 4, 0).tolist() == [[0] * 4] * 2
    assert firstk_actions(2, 4, 4).tolist() == [[1] * 4] * 2
    a[0, 4] = 1  # a real tensor, not a view of one row
    assert a[1, 4] == 0


def test_randomk_actions() -> None:
    a = randomk_actions(50, 15, 7, torch.Generator().manual_seed(0))
    assert a.shape == (50, 15) and set(a.unique().tolist()) == {0.0, 1.0}
    assert a.sum(1).tolist() == [7.0] * 50  # exactly k per row
    assert len({tuple(r) for r in a.tolist()}) > 40  # rows differ
    assert torch.equal(a, randomk_actions(50, 15, 7, torch.Generator().manual_seed(0)))
    assert not torch.equal(a, randomk_actions(50, 15, 7, torch.Generator().manual_seed(1)))
    assert randomk_actions(3, 4, 0, torch.Generator().manual_seed(0)).sum() == 0
    assert randomk_actions(3, 4, 4, torch.Generator().manual_seed(0)).sum() == 12


def test_randomk_is_uniform_over_blocks() -> None:
    a = randomk_actions(3000, 10, 3, torch.Generator().manual_seed(0))
    # each block is chosen with probability k/K = 0.3; std of the frequency over 3000 rows is 0.008
    torch.testing.assert_close(a.mean(0), torch.full((10,), 0.3), atol=0.03, rtol=0)


def test_variant_metrics_by_hand() -> None:
    correct = torch.tensor([True, False, True, True])
    actions = torch.tensor([[1.0, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [0, 1, 0, 1]])  # 2, 1, 3, 2 blocks
    flops = torch.tensor([10.0, 20.0, 30.0, 40.0])
    m = variant_metrics(correct, actions, flops)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["blocks_mean"] == pytest.approx(2.0)
    assert m["blocks_std"] == pytest.approx(math.sqrt((0 + 1 + 1 + 0) / 4))  # population std
    assert m["block_fraction"] == pytest.approx(0.5)
    assert m["flops_mean"] == pytest.approx(25.0)
    assert m["flops_std"] == pytest.approx(math.sqrt((225 + 25 + 25 + 225) / 4))
    assert set(m) == {"accuracy", "blocks_mean", "blocks_std", "block_fraction", "flops_mean", "flops_std"}
    assert all(isinstance(v, float) for v in m.values())


def test_per_class_table_by_hand() -> None:
    per_image = pd.DataFrame({
        "label": [0, 2, 0, 2, 2, 0],
        "correct": [True, True, False, True, False, True],
        "full_correct": [True, True, True, False, True, True],
        "blocks": [4, 6, 2, 8, 10, 3],
    })
    table = per_class_table(per_image, ["cat", "dog", "emu"])
    assert table["label"].tolist() == [0, 2]  # only classes that occur
    assert table["class"].tolist() == ["cat", "emu"]
    assert list(table.columns[:2]) == ["label", "class"]
    assert table["images"].tolist() == [3, 3]
    assert table["accuracy"].tolist() == pytest.approx([2 / 3, 2 / 3])
    assert table["full_accuracy"].tolist() == pytest.approx([1.0, 2 / 3])
    assert table["blocks_mean"].tolist() == pytest.approx([3.0, 8.0])
    # pandas' std: the sample std (n - 1), unlike variant_metrics' population std
    assert table["blocks_std"].tolist() == pytest.approx([1.0, 2.0])


def _random_backbone_and_images():
    """A random ResNet-14 (K = 6) in eval mode, 30 random 8x8 images, their normalisation and a FLOPs table
    with well separated made-up numbers."""
    from blockdrop.data import Normalize, Split
    from blockdrop.flops import FlopTable
    from blockdrop.models import cifar_resnet

    torch.manual_seed(0)
    model = cifar_resnet(14, 3, 1).eval()
    test = Split(torch.randint(0, 256, (30, 1, 8, 8), dtype=torch.uint8), torch.randint(0, 3, (30,)))
    norm = Normalize([0.5], [0.25], torch.device("cpu"))
    flops = FlopTable(base=7, blocks=(1, 10, 100, 1_000, 10_000, 100_000), policy=10**9)
    return model, test, norm, flops


def test_heuristic_curves_at_every_k_run_the_pretrained_backbone() -> None:
    # A random backbone on random images: the curves must be what predict() gives under each k's actions,
    # FirstK at k = K must be the full network, and FLOPs (no policy) must follow the table exactly.
    from blockdrop.evaluation import heuristic_curves
    from blockdrop.predict import predict

    model, test, norm, flops = _random_backbone_and_images()
    curves = heuristic_curves(model, test, norm, flops, torch.Generator().manual_seed(3), batch_size=8)

    assert curves["k"].tolist() == [1, 2, 3, 4, 5, 6]
    assert curves["firstk_flops"].tolist() == [7 + sum(flops.blocks[:k]) for k in range(1, 7)]
    assert curves["randomk_flops"].is_monotonic_increasing and curves["randomk_flops"].iloc[-1] == 7 + 111_111
    full = (predict(model, test, norm).argmax(1) == test.labels).double().mean().item()
    assert curves["firstk_accuracy"].iloc[-1] == full == curves["randomk_accuracy"].iloc[-1]
    first2 = predict(model, test, norm, policy_fn=lambda x: firstk_actions(len(x), 6, 2))
    assert curves["firstk_accuracy"].iloc[1] == (first2.argmax(1) == test.labels).double().mean().item()


def test_heuristic_curves_with_a_step_keep_those_ks_and_always_the_full_network() -> None:
    # K = 6 at step 2: k = 1, 3, 5 and K. FirstK draws nothing at random, so its rows are the step-1 table's.
    from blockdrop.evaluation import heuristic_curves

    model, test, norm, flops = _random_backbone_and_images()
    every = heuristic_curves(model, test, norm, flops, torch.Generator().manual_seed(3), batch_size=8)
    stepped = heuristic_curves(model, test, norm, flops, torch.Generator().manual_seed(3), batch_size=8, k_step=2)

    assert stepped["k"].tolist() == [1, 3, 5, 6]
    columns = ["k", "firstk_accuracy", "firstk_flops"]
    assert stepped[columns].equals(every[columns].iloc[[0, 2, 4, 5]].reset_index(drop=True))
    assert stepped["randomk_accuracy"].iloc[-1] == every["firstk_accuracy"].iloc[-1]  # k = K: every block
    assert heuristic_curves(model, test, norm, flops, torch.Generator(), batch_size=8, k_step=6)["k"].tolist() == [1, 6]


def test_flops_saved_summary_is_the_distribution_of_per_image_savings() -> None:
    # 101 images costing 0..100 FLOPs against a full backbone of 100: image i saves (100 - i)%
    summary = flops_saved_summary(torch.arange(101.0), 100.0)
    assert summary == pytest.approx({"mean": 0.5, "median": 0.5, "p5": 0.05, "p95": 0.95, "min": 0.0, "max": 1.0})
    # an image running every block still pays for the policy network: it saves a negative amount
    assert flops_saved_summary(torch.tensor([110.0, 50.0]), 100.0)["min"] == pytest.approx(-0.1)
