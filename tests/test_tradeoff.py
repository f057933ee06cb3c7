"""The sweep's trade-off table and figure, from hand-made experiments (no training)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pandas as pd
import pytest

from blockdrop.analysis.tradeoff import (
    Experiment,
    _baselines,
    _heuristic_curves,
    reference_points,
    settings_table,
    speedup_figure,
    tradeoff_figure,
)

K = 15
FULL_FLOPS = 1.05e8


def _metrics(acc: float, flops: float, blocks: float, measured: float = 1.0, full_acc: float = 0.89) -> dict:
    return {
        "num_blocks": K,
        "full": {"accuracy": full_acc, "blocks_mean": K, "block_fraction": 1.0, "flops_mean": FULL_FLOPS},
        "blockdrop": {"accuracy": acc, "blocks_mean": blocks, "block_fraction": blocks / K, "flops_mean": flops},
        "firstk": {"accuracy": acc - 0.05, "blocks_mean": 9.0, "block_fraction": 0.6, "flops_mean": 6.3e7},
        "randomk": {"accuracy": acc - 0.06, "blocks_mean": 9.0, "block_fraction": 0.6, "flops_mean": 6.3e7},
        "speedup": {"flops_ratio": FULL_FLOPS / flops, "measured_batch1": measured},
    }


def _heuristics(shift: float = 0.0) -> pd.DataFrame:
    k = np.arange(1, K + 1)
    return pd.DataFrame({"k": k, "firstk_accuracy": 0.1 + 0.78 * k / K + shift, "firstk_flops": 7e6 * k,
                         "randomk_accuracy": 0.1 + 0.7 * k / K + shift, "randomk_flops": 7e6 * k})


def _sweep() -> list[Experiment]:
    """Penalty 2 and 8 over seeds 0 and 1, penalty 5 over seed 0 only (a crashed run)."""
    # penalty -> seed -> (accuracy, flops, blocks, measured speedup)
    runs = {2: {0: (0.88, 9.0e7, 12.0, 1.1), 1: (0.86, 8.0e7, 11.0, 1.3)},
            5: {0: (0.85, 8.5e7, 11.5, 1.2)},
            8: {0: (0.80, 5.0e7, 6.0, 1.8), 1: (0.82, 7.0e7, 8.0, 1.6)}}
    return [Experiment(f"exp-p{p}-s{s}", {"finetune.penalty": float(p), "seed": s}, _metrics(*values),
                       _heuristics(0.01 * s), "fashion-mnist", 32)
            for p, seeds in runs.items() for s, values in seeds.items()]


def test_seeds_collapse_into_one_row_per_setting_with_means_and_population_stds():
    table = settings_table(_sweep())
    assert list(table["finetune.penalty"]) == [8.0, 5.0, 2.0]  # sorted by mean FLOPs: 6e7, 8.5e7, 8.5e7
    assert list(table["seeds"]) == [2, 1, 2]
    assert "seed" not in table.columns
    p8, p5, p2 = (table.iloc[i] for i in range(3))
    assert p2["accuracy_mean"] == pytest.approx(0.87) and p2["accuracy_std"] == pytest.approx(0.01)
    assert p2["flops_mean"] == pytest.approx(8.5e7) and p2["flops_std"] == pytest.approx(5e6)
    assert p2["blocks_mean"] == pytest.approx(11.5) and p2["blocks_std"] == pytest.approx(0.5)
    assert p2["block_fraction_mean"] == pytest.approx(11.5 / K)
    assert p2["speedup_measured_mean"] == pytest.approx(1.2) and p2["speedup_measured_std"] == pytest.approx(0.1)
    ratio = [FULL_FLOPS / 9e7, FULL_FLOPS / 8e7]
    assert p2["speedup_flops_mean"] == pytest.approx(np.mean(ratio))
    assert p2["speedup_flops_std"] == pytest.approx(abs(ratio[0] - ratio[1]) / 2)
    assert p2["full_accuracy_mean"] == pytest.approx(0.89)
    assert p8["accuracy_mean"] == pytest.approx(0.81) and p8["flops_mean"] == pytest.approx(6e7)
    assert p5["accuracy_std"] == 0.0 and p5["flops_std"] == 0.0  # one seed: no spread
    assert p2["experiments"] == "exp-p2-s0, exp-p2-s1"


def test_pareto_flags_by_hand():
    # penalty 8: cheapest, so on the front; penalty 2 (87% at 8.5e7) dominates penalty 5 (85% at 8.5e7):
    # same FLOPs, strictly more accurate
    table = settings_table(_sweep())
    assert dict(zip(table["finetune.penalty"], table["pareto"], strict=True)) == {8.0: True, 5.0: False, 2.0: True}


def test_identical_settings_are_all_on_the_front_and_a_single_setting_is_too():
    twins = [Experiment(f"e{i}", {"finetune.penalty": float(i)}, _metrics(0.8, 7e7, 8.0)) for i in range(2)]
    assert settings_table(twins)["pareto"].tolist() == [True, True]  # neither is strictly better
    assert settings_table(twins[:1])["pareto"].tolist() == [True]


def test_missing_measured_speedup_is_nan_not_an_error():
    m = _metrics(0.8, 7e7, 8.0)
    del m["speedup"]["measured_batch1"]
    table = settings_table([Experiment("e", {"finetune.penalty": 3.4}, m)])
    assert np.isnan(table.loc[0, "speedup_measured_mean"]) and table.loc[0, "speedup_flops_mean"] > 1


def test_reference_points_only_for_a_published_dataset_and_depth():
    def exp(source: str, depth: int) -> Experiment:
        return Experiment("e", {}, _metrics(0.9, 7e7, 8.0), source=source, depth=depth)

    assert reference_points([exp("fashion-mnist", 32)]) == []
    assert reference_points([exp("cifar100", 101)]) == []  # a depth the paper did not use on that dataset
    points = reference_points([exp("cifar10", 110)])
    assert {(acc, flops) for _, acc, flops in points} == {(0.936, 1.81e8), (0.932, 5.058e8)}
    assert all(label.startswith("paper (authors' README)") for label, _, _ in points)
    imagenet = reference_points([exp("imagenet", 101), exp("fashion-mnist", 32)])
    assert {(acc, flops) for _, acc, flops in imagenet} == {(0.764, 1.25e10), (0.7646, 1.560e10)}


def test_heuristic_curves_average_a_shared_backbone_once_then_over_seeds():
    # seed 0's backbone appears in two settings (identical tables), seed 1's in one: each backbone counts once
    members = [e for e in _sweep() if e.params["finetune.penalty"] in (2.0, 5.0)]
    curves = _heuristic_curves(members, "seed")
    base = _heuristics()
    assert curves["k"].tolist() == list(range(1, K + 1))
    np.testing.assert_allclose(curves["firstk_accuracy"], base["firstk_accuracy"] + 0.005)
    np.testing.assert_allclose(curves["firstk_accuracy_std"], 0.005)
    np.testing.assert_allclose(curves["randomk_flops"], base["randomk_flops"])
    assert _heuristic_curves([Experiment("e", {}, _metrics(0.8, 7e7, 8.0))], "seed") is None



def test_baselines_one_per_network_the_settings_were_compared_with():
    """A penalty x finetune.epochs sweep: each seed's pretrained backbone is shared by all four settings, the
    fair baseline only by the settings with the same epochs, and each marker averages over seeds, not runs."""
    fair = {(2, 0): 0.90, (2, 1): 0.92, (4, 0): 0.91, (4, 1): 0.95}  # (epochs, seed) -> fair accuracy
    experiments = []
    for epochs, seed in fair:
        for penalty in (2.0, 3.4):
            metrics = _metrics(0.88, 6e7, 8.0, full_acc=0.88 + 0.01 * seed)
            metrics["full_finetuned"] = {"accuracy": fair[epochs, seed], "flops_mean": FULL_FLOPS}
            experiments.append(Experiment(f"e{epochs}-p{penalty}-s{seed}", {"finetune.penalty": penalty,
                                          "finetune.epochs": epochs, "seed": seed}, metrics))
    # seed 0 only, and no fair baseline: shares the pretrained backbone, left out of the fair ones
    experiments.append(Experiment("one-seed", {"finetune.penalty": 5.0, "finetune.epochs": 2, "seed": 0},
                                  _metrics(0.8, 5e7, 6.0, full_acc=0.88)))

    [(label, per_seed, flops)] = _baselines(experiments, "full", "seed")
    assert label == "" and per_seed == {0: 0.88, 1: 0.89} and flops == FULL_FLOPS
    fair_groups = {label: per_seed for label, per_seed, _ in _baselines(experiments, "full_finetuned", "seed")}
    assert fair_groups == {"epochs 2": {0: 0.90, 1: 0.92}, "epochs 4": {0: 0.91, 1: 0.95}}
    assert _baselines(experiments[:2], "full_finetuned", "seed")[0][0] == ""  # one network: no label

def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("n_settings", [1, 20])
def test_figure_is_a_png_of_sensible_size(tmp_path, n_settings):
    rng = np.random.default_rng(0)
    experiments = [Experiment(f"e{i}-s{s}", {"finetune.penalty": round(1 + 0.5 * i, 1), "seed": s},
                              _metrics(0.85 - 0.004 * i + 0.01 * rng.random(), 9e7 - 2e6 * i, 12 - 0.3 * i),
                              _heuristics(0.01 * s), "cifar10", 110)
                   for i in range(n_settings) for s in (0, 1)]
    path = tradeoff_figure(experiments, tmp_path / "tradeoff.png", dpi=100)
    assert path == tmp_path / "tradeoff.png"
    assert _png_size(path) == (1100, 600)  # 11 x 6 inches at 100 dpi
    assert path.stat().st_size > 20_000  # curves, markers and text, not a blank canvas


def test_speedup_figure_places_each_setting_at_its_measured_speedup(tmp_path, monkeypatch):
    # Three cost settings on one seed: the points drawn are the measured speedups and accuracies, labelled by
    # the one grid key that differs.
    from matplotlib.figure import Figure

    experiments = [Experiment(f"c-{c}", {"finetune.cost": c}, _metrics(acc, 6e7, 7.5, measured), _heuristics(),
                              "fashion-mnist", 32)
                   for c, acc, measured in (("blocks", 0.90, 1.43), ("flops", 0.89, 1.40), ("latency", 0.91, 1.35))]
    drawn = {}
    savefig = Figure.savefig

    def capture(fig, *args, **kwargs):
        ax = fig.axes[0]
        drawn["points"] = sorted((round(float(x), 2), round(float(y), 2)) for line in ax.lines
                                 if line.get_marker() == "o" for x, y in line.get_xydata())
        drawn["labels"] = sorted(t.get_text() for t in ax.texts)
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", capture)
    path = speedup_figure(experiments, tmp_path / "speedup.png", dpi=72)
    assert _png_size(path) == (792, 432)  # 11 x 6 inches at 72 dpi
    assert drawn["points"] == [(1.35, 91.0), (1.4, 89.0), (1.43, 90.0)]
    assert drawn["labels"] == ["cost blocks", "cost flops", "cost latency"]


def test_figure_without_heuristics_tables_and_with_two_depths(tmp_path):
    experiments = [Experiment(f"d{d}", {"model.depth": d}, _metrics(0.8 + d / 1000, 7e7 * d / 32, 8.0),
                              None, "fashion-mnist", d) for d in (32, 56)]
    path = tradeoff_figure(experiments, tmp_path / "t.png", dpi=72)
    assert _png_size(path) == (792, 432)


def test_load_reads_the_evaluate_outputs(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps(_metrics(0.8, 7e7, 8.0)))
    e = Experiment.load("exp-a", {"finetune.penalty": 3.4}, tmp_path, "cifar10", 32)
    assert e.metrics["blockdrop"]["accuracy"] == 0.8 and e.heuristics is None and e.depth == 32
    _heuristics().to_csv(tmp_path / "heuristics_by_k.csv", index=False)
    e = Experiment.load("exp-a", {"finetune.penalty": 3.4}, tmp_path, "cifar10", 32)
    assert len(e.heuristics) == K and e.heuristics["firstk_flops"].iloc[-1] == pytest.approx(7e6 * K)


def test_heuristics_at_a_settings_flops_are_interpolated_on_their_mean_curve():
    """Penalty 8: mean FLOPs 6e7 lies between k = 8 (5.6e7) and k = 9 (6.3e7) on the curves, averaged over
    seeds 0 and 1 (shifts 0 and 0.01); outside the curve's FLOPs there is no heuristic to compare with."""
    table = settings_table(_sweep()).set_index("finetune.penalty")
    k = 8 + (6e7 - 5.6e7) / 7e6
    assert table.loc[8.0, "firstk_at_flops"] == pytest.approx(0.1 + 0.78 * k / K + 0.005)
    assert table.loc[8.0, "randomk_at_flops"] == pytest.approx(0.1 + 0.7 * k / K + 0.005)
    far = [Experiment("e", {"finetune.penalty": 1.0}, _metrics(0.9, 2e8, 15.0), _heuristics(), "fashion-mnist", 32)]
    assert np.isnan(settings_table(far).loc[0, "firstk_at_flops"])
    alone = [Experiment("e", {"finetune.penalty": 1.0}, _metrics(0.9, 6e7, 9.0), None, "fashion-mnist", 32)]
    assert np.isnan(settings_table(alone).loc[0, "randomk_at_flops"])
