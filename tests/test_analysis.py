"""The analyze and report stages on small fabricated inputs (no training, no MLflow)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from blockdrop.analysis import (
    FIGURES,
    analysis_metrics,
    block_usage_by_class,
    group_policies,
    policy_matrix,
    policy_purity,
    read_per_image,
    run_analysis,
    spearman,
    top_policies_per_class,
)
from blockdrop.config import Analyze, Params
from blockdrop.evaluation import flops_saved_summary
from blockdrop.report import PAPER_ROW, build_report, write_report

CLASSES = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat"]


def fabricate(root: Path, n: int = 400, k: int = 15, classes: list[str] = CLASSES, seed: int = 0,
              images: np.ndarray | None = None, labels: np.ndarray | None = None) -> dict:
    """A fake workspace with every input of analyze and report: per-image table (policies that depend on
    the class, more blocks for harder images), evaluate metrics, per-class table, latency and histories."""
    rng = np.random.default_rng(seed)
    c = len(classes)
    if labels is None:
        labels = np.arange(n) % c
    if images is None:  # blobs whose size depends on the class, so montages are not blank
        yy, xx = np.mgrid[:28, :28]
        radius = 4 + 2 * (labels % 5)[:, None, None] + rng.uniform(-1, 1, (n, 1, 1))
        images = ((np.hypot(yy - 14, xx - 14)[None] < radius) * rng.uniform(120, 255, (n, 1, 1)))
        images = images.astype(np.uint8)[:, None]
    prototypes = rng.random((c, 3, k)) < 0.5
    prototypes[:, :, 0] = True  # the first block always runs, as a trained policy tends to learn
    choice = rng.choice(3, n, p=[0.6, 0.25, 0.15])
    actions = prototypes[labels, choice] ^ (rng.random((n, k)) < 0.04)
    blocks = actions.sum(1)
    confidence = 1 / (1 + np.exp(-(3.0 - 0.5 * (blocks - blocks.mean()) + rng.normal(0, 1, n))))
    full_correct = rng.random(n) < confidence
    correct = rng.random(n) < np.clip(confidence + 0.02, 0, 1)
    predicted = np.where(correct, labels, (labels + 1) % c)
    flops = 2.5e7 + 7.5e6 * blocks
    full_flops = 7.5e6 * k + 1e6
    per_image = pd.DataFrame({
        "index": np.arange(n), "label": labels, "predicted": predicted, "correct": correct, "blocks": blocks,
        "flops": flops, "flops_saved": 1 - flops / full_flops,
        "policy": ["".join("1" if a else "0" for a in row) for row in actions],
        "full_correct": full_correct, "full_confidence": confidence, "full_loss": -np.log(confidence),
    })
    (root / "data/evaluate").mkdir(parents=True, exist_ok=True)
    per_image.to_csv(root / "data/evaluate/per_image.csv", index=False)

    def variant(acc: float, b: float, bstd: float, f: float, fstd: float) -> dict:
        return {"accuracy": acc, "blocks_mean": b, "blocks_std": bstd, "block_fraction": b / k,
                "flops_mean": f, "flops_std": fstd}

    metrics = {
        "num_blocks": k,
        "full": variant(float(full_correct.mean()), k, 0.0, full_flops, 0.0),
        "full_finetuned": variant(float(full_correct.mean()) + 0.01, k, 0.0, full_flops, 0.0),
        "blockdrop": {**variant(float(correct.mean()), float(blocks.mean()), float(blocks.std()), float(flops.mean()),
                                float(flops.std())), "unique_policies": int(per_image["policy"].nunique()),
                      "flops_saved": flops_saved_summary(torch.from_numpy(flops), full_flops)},
        "firstk": variant(0.31, round(blocks.mean()), 0.0, 7.5e6 * round(blocks.mean()) + 1e6, 0.0),
        "randomk": variant(0.42, round(blocks.mean()), 0.0, 7.5e6 * round(blocks.mean()) + 1e6, 2e5),
        "speedup": {"flops_ratio": full_flops / float(flops.mean()), "measured_batch1": 1.37,
                    "flops_ratio_vs_full_finetuned": full_flops / float(flops.mean()),
                    "measured_batch1_vs_full_finetuned": 1.4},
    }
    ev = root / "reports/evaluate"
    ev.mkdir(parents=True, exist_ok=True)
    (ev / "metrics.json").write_text(json.dumps(metrics, indent=2))
    per_class = per_image.groupby("label").agg(
        images=("correct", "size"), accuracy=("correct", "mean"), full_accuracy=("full_correct", "mean"),
        blocks_mean=("blocks", "mean"), blocks_std=("blocks", "std")).reset_index()
    per_class.insert(1, "class", [classes[i] for i in per_class["label"]])
    per_class.to_csv(ev / "per_class.csv", index=False)
    (ev / "latency.json").write_text(json.dumps({"full_ms": 4.1, "blockdrop_ms": 3.0, "speedup": 1.37,
                                                 "images": 300, "full_finetuned_ms": 4.2,
                                                 "speedup_vs_full_finetuned": 1.4}))
    epochs = {"pretrain": 3, "curriculum": 6, "finetune": 1, "finetune-full": 1}
    hist = {
        "pretrain": lambda e: {"train/loss": 1.5 / e, "train/accuracy": 0.8 + 0.03 * e, "val/accuracy": 0.82 + 0.02 * e,
                               "lr": 0.1, "images_per_s": 500.0, "epoch_seconds": 100.0},
        "curriculum": lambda e: {"unlocked_blocks": min(k, e * 3), "train/reward": 0.1 * e, "train/accuracy": 0.9,
                                 "train/blocks": k - e, "train/advantage": 0.01, "val/accuracy": 0.9,
                                 "val/blocks_mean": k - e - 0.5, "val/reward": 0.1 * e + 0.05},
        "finetune": lambda e: {"train/loss": 0.4, "train/ce": 0.3, "train/reward": 0.5, "train/accuracy": 0.91,
                               "train/blocks": 8.0, "val/accuracy": 0.9, "val/blocks_mean": 7.5, "val/reward": 0.55},
        "finetune-full": lambda e: {"train/loss": 0.35, "train/accuracy": 0.92, "train/images": 256,
                                    "val/accuracy": 0.905, "lr": 3e-4},
    }
    for name, count in epochs.items():
        folder = root / "reports" / name
        folder.mkdir(parents=True, exist_ok=True)
        pd.DataFrame([{"epoch": e, **hist[name](e)} for e in range(1, count + 1)]).to_csv(folder / "history.csv",
                                                                                         index=False)
        (folder / "metrics.json").write_text(json.dumps({"val": {"accuracy": 0.9}, "train": {"images": 256}}))
    return {"per_image": per_image, "images": images, "metrics": metrics, "classes": classes}


# --- the numbers -------------------------------------------------------------------------------------------


def _table(policies: list[str], labels: list[int]) -> pd.DataFrame:
    n = len(policies)
    return pd.DataFrame({"index": range(n), "label": labels, "policy": policies, "correct": [True] * n,
                         "blocks": [p.count("1") for p in policies], "full_correct": [True] * n,
                         "full_confidence": np.linspace(0.2, 0.9, n), "full_loss": np.linspace(2, 0.1, n)})


def test_grouping_counts_and_order():
    df = _table(["011", "011", "111", "011", "001", "111"], [0, 0, 1, 1, 2, 2])
    groups = group_policies(df)
    assert groups["policy"].tolist() == ["011", "111", "001"]
    assert groups["count"].tolist() == [3, 2, 1]
    assert groups["rank"].tolist() == [1, 2, 3]
    assert groups["blocks"].tolist() == [2, 3, 1]
    assert groups["share"].sum() == pytest.approx(1.0)
    assert policy_matrix(df["policy"]).tolist()[:3] == [[0, 1, 1], [0, 1, 1], [1, 1, 1]]


def test_top_policies_per_class():
    policies = ["10"] * 3 + ["01"] * 2 + ["11"] + ["00"] * 4 + ["11"]
    labels = [0] * 6 + [1] * 5
    top = top_policies_per_class(_table(policies, labels), n=2)
    zero, one = top[top["label"] == 0], top[top["label"] == 1]
    assert zero["policy"].tolist() == ["10", "01"] and zero["count"].tolist() == [3, 2]
    assert zero["share"].tolist() == pytest.approx([3 / 6, 2 / 6])
    assert one["policy"].tolist() == ["00", "11"] and one["share"].tolist() == pytest.approx([4 / 5, 1 / 5])


def test_block_usage_by_class():
    usage = block_usage_by_class(_table(["10", "11", "01", "01"], [0, 0, 1, 1]), num_classes=3)
    assert usage[0].tolist() == [1.0, 0.5] and usage[1].tolist() == [0.0, 1.0]
    assert np.isnan(usage[2]).all()


def test_nmi_is_one_when_each_class_has_its_own_policy_and_near_zero_when_random():
    labels = np.repeat(np.arange(5), 200)
    own = [format(1 << c, "05b") for c in labels]
    assert policy_purity(labels, own)["nmi"] == pytest.approx(1.0)
    assert policy_purity(labels, own)["majority_purity"] == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    random = [format(int(v), "03b") for v in rng.integers(0, 4, len(labels))]
    assert policy_purity(labels, random)["nmi"] < 0.02


def test_majority_purity_by_hand():
    # group "11": labels 0,0,1 -> majority 2; group "01": labels 1,2 -> 1; group "00": label 2 -> 1
    result = policy_purity([0, 0, 1, 1, 2, 2], ["11", "11", "11", "01", "01", "00"], seed=0)
    assert result["majority_purity"] == pytest.approx(4 / 6)
    assert 0 <= result["majority_purity_shuffled"] <= 1 and "nmi_shuffled" in result


def test_spearman_sign_and_degenerate_cases():
    x = np.arange(20)
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -np.exp(x / 5)) == pytest.approx(-1.0)
    assert spearman(x, np.ones(20)) is None


def test_metrics_keys(tmp_path: Path):
    data = fabricate(tmp_path, n=300)
    df = read_per_image(tmp_path / "data/evaluate/per_image.csv")
    assert df["policy"].str.len().eq(15).all()  # leading zeros kept: never parsed as an integer
    m = analysis_metrics(df, seed=0)
    assert {"unique", "top1_share"} <= set(m["policies"])
    assert {"spearman_blocks_vs_confidence", "spearman_blocks_vs_loss"} <= set(m["difficulty"])
    assert {"nmi", "majority_purity"} <= set(m["purity"])
    assert m["policies"]["unique"] == data["per_image"]["policy"].nunique()
    # the fabricated harder images use more blocks: rank correlation with confidence must be negative
    assert m["difficulty"]["spearman_blocks_vs_confidence"] < 0 < m["difficulty"]["spearman_blocks_vs_loss"]


# --- the stage outputs -------------------------------------------------------------------------------------


def _valid_png(path: Path, min_kb: float = 8) -> None:
    from PIL import Image

    assert path.stat().st_size > min_kb * 1024, f"{path.name} is only {path.stat().st_size} bytes"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        w, h = img.size
        assert w >= 600 and h >= 300
        assert len(np.unique(np.asarray(img.convert("L"))[::4, ::4])) > 8  # not a blank canvas


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("ws")
    data = fabricate(root, n=400)
    histories = {name: pd.read_csv(root / f"reports/{name}/history.csv") for name in ("pretrain", "curriculum",
                                                                                       "finetune")}
    per_image = read_per_image(root / "data/evaluate/per_image.csv")
    metrics, written = run_analysis(per_image, data["images"], data["classes"], Analyze(samples_per_policy=6, dpi=100),
                                    root / "reports/analyze", 0, data["metrics"], histories)
    return root, metrics, written


def test_analysis_writes_every_figure_and_table(analyzed):
    root, metrics, written = analyzed
    out = root / "reports/analyze"
    for name in FIGURES.values():
        _valid_png(out / "figures" / name)
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    top = pd.read_csv(out / "top_policies.csv", dtype={"policy": str})
    assert (top["scope"] == "all").sum() == 8 and (top["scope"] == "class").sum() == 3 * len(CLASSES)
    points = pd.read_csv(out / "accuracy_flops.csv")
    assert points["variant"].tolist() == ["full", "full_finetuned", "blockdrop", "firstk", "randomk"]
    assert {"variant", "flops", "accuracy"} <= set(points.columns)
    assert all(p.exists() for p in written)


def test_report_embeds_figures_and_has_table(analyzed):
    root, _, _ = analyzed
    (root / "params.yaml").write_text("seed: 0\nanalyze:\n  dpi: 150\n")
    md, html = build_report(root / "reports", Params(), (root / "params.yaml").read_text(), commit="abc1234 (dirty)")
    paths = write_report(root / "reports", md, html)
    html_text, md_text = paths[1].read_text(), paths[0].read_text()
    sources = re.findall(r"""\bsrc\s*=\s*["']([^"']*)["']""", html_text, re.IGNORECASE)
    assert len(sources) >= len(FIGURES) and all(s.startswith("data:image/png;base64,") for s in sources)
    # self-contained: no link, stylesheet, script, import or url() that could make a request
    assert not re.search(r"""\bhref\s*=|<link|<script|@import|url\(""", html_text, re.IGNORECASE)
    assert "<details" in html_text and "abc1234" in html_text
    for name in FIGURES.values():
        assert f"analyze/figures/{name}" in md_text  # the markdown links the PNGs by relative path
    # the results table: the five variants and the paper's row
    for row in ("| Full ResNet, pretrained |", "| Full ResNet, trained as BlockDrop's backbone |", "| BlockDrop",
                "| FirstK", "| RandomK", PAPER_ROW["name"]):
        assert row in md_text
    assert "93.6" in md_text and "469" in md_text
    saved = json.loads((root / "reports/evaluate/metrics.json").read_text())["blockdrop"]["flops_saved"]
    assert (f"saves {100 * saved['mean']:.1f}% of the full network's FLOPs (the same for the pretrained and the "
            f"trained full network) on average (median {100 * saved['median']:.1f}%") in md_text


FULL_MENTION = re.compile(r"\bfull (network|backbone|resnet)", re.IGNORECASE)
WHICH_FULL = ("pretrained", "trained as BlockDrop's backbone", "either full network", "both full networks",
              "two full networks", "the trained full network")


def test_every_sentence_comparing_with_the_full_network_names_which(analyzed):
    root, _, _ = analyzed
    evaluate = json.loads((root / "reports/evaluate/metrics.json").read_text())
    md, _ = build_report(root / "reports", Params(), "seed: 0\n", commit="abc1234")
    prose = "\n".join(line for line in md.split("<details>")[0].splitlines() if not line.startswith("|"))
    sentences = [s for s in re.split(r"(?<=[.;])\s+", prose) if FULL_MENTION.search(s)]
    assert len(sentences) >= 4  # the summary, the FLOPs saved, the trade-off figure, the difficulty reading
    unnamed = [s for s in sentences if not any(w in s for w in WHICH_FULL)]
    assert unnamed == []
    trained = evaluate["full_finetuned"]["accuracy"]
    assert f"the full network trained as BlockDrop's backbone ({100 * trained:.1f}%" in md
    gap = 100 * (evaluate["blockdrop"]["accuracy"] - trained)
    assert f"{abs(gap):.1f} points {'below' if gap < 0 else 'above'} the full network trained as" in md


def test_report_shows_this_setting_over_seeds_from_the_sweep(analyzed):
    # A sweep of two penalties over three seeds: the report's headline table holds this run's setting's three
    # seeds (penalty 2) with their mean and sample std, and nothing of the other setting.
    root, _, _ = analyzed
    sweep = root / "reports/sweep"
    sweep.mkdir(exist_ok=True)
    rows = []
    for penalty, shift in ((2.0, 0.0), (5.0, 0.05)):
        for seed, (bd, ft) in enumerate(((0.885, 0.900), (0.890, 0.902), (0.880, 0.907))):
            rows.append({"experiment": f"sweep-penalty-{penalty}_seed-{seed}", "finetune.penalty": penalty,
                         "seed": seed, "full.accuracy": 0.88, "full_finetuned.accuracy": ft,
                         "blockdrop.accuracy": bd + shift, "blockdrop.block_fraction": 0.5 + shift,
                         "speedup.flops_ratio": 1.8, "speedup.measured_batch1": 1.4 + seed / 10})
    pd.DataFrame(rows).to_csv(sweep / "experiments.csv", index=False)
    (sweep / "sweep.json").write_text(json.dumps({"grid": {"finetune.penalty": [2.0, 5.0], "seed": [0, 1, 2]}}))
    params = Params.model_validate({"finetune": {"penalty": 2.0}})
    try:  # the workspace is the module's: leave it as found
        md, _ = build_report(root / "reports", params, "seed: 0\n", commit="abc1234")
        other, _ = build_report(root / "reports", Params.model_validate({"finetune": {"penalty": 3.0}}), "", "x")
    finally:
        for name in ("experiments.csv", "sweep.json"):
            (sweep / name).unlink()
    assert "Over 3 seeds (finetune.penalty = 2.0;" in md
    assert "| BlockDrop | 88.50% | 89.00% | 88.00% | 88.50 ± 0.50% |" in md
    assert "| BlockDrop minus the trained full ResNet (points) | -1.50 | -1.20 | -2.70 | -1.80 ± 0.79 |" in md
    assert "| Speedup, measured at batch 1 | 1.40x | 1.50x | 1.60x | 1.50 ± 0.10x |" in md
    assert "93.50%" not in md  # the other penalty's seeds
    assert "Over 3 seeds" not in other  # a setting the sweep never ran gets no seed table
