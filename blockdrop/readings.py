"""What the report says: its inputs (the files the earlier stages wrote under ``reports/``), the summary
under the results table, and one reading per figure. Every number in a sentence is computed from those files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from blockdrop.analysis.analyze import read_history
from blockdrop.analysis.style import VARIANT_LABELS

__all__ = ["PAPER_ROW", "READINGS", "ReportInputs", "num", "pct", "summary"]

# The authors' published CIFAR-10 ResNet-110 result (README of the original code; docs/paper.md, published numbers).
PAPER_ROW = {
    "name": "Paper: BlockDrop, CIFAR-10 ResNet-110 (γ = 10)",
    "accuracy": 0.936,
    "blocks_mean": 16.93,
    "blocks_std": 3.72,
    "num_blocks": 54,
    "flops_mean": 1.81e8,
    "flops_std": 3.43e7,
    "full_flops": 5.058e8,  # ResNet-110 under the same FLOPs convention
    "unique_policies": 469,
}


def pct(v: float, digits: int = 1) -> str:
    """A fraction as a percentage: ``pct(0.8922)`` is ``"89.2%"``."""
    return f"{100 * v:.{digits}f}%"


def num(v: float | None, fmt: str = ".2f") -> str:
    """``v`` formatted, or ``"n/a"`` when it is missing or not finite."""
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_csv(path: Path, **kwargs) -> pd.DataFrame | None:
    try:
        return pd.read_csv(path, **kwargs)
    except (OSError, ValueError):
        return None


@dataclass
class ReportInputs:
    """Everything the report reads; only the evaluate and analyze metrics are required."""

    evaluate: dict
    analyze: dict
    latency: dict | None = None
    per_class: pd.DataFrame | None = None
    top_policies: pd.DataFrame | None = None
    block_usage: pd.DataFrame | None = None
    histories: dict = field(default_factory=dict)
    stage_metrics: dict = field(default_factory=dict)

    @classmethod
    def load(cls, reports: Path) -> ReportInputs:
        evaluate, analyze = _read_json(reports / "evaluate/metrics.json"), _read_json(reports / "analyze/metrics.json")
        for name, blob in (("evaluate", evaluate), ("analyze", analyze)):
            if blob is None:
                raise FileNotFoundError(f"{reports / name / 'metrics.json'} is missing or unreadable: "
                                        f"run the {name} stage first")
        return cls(
            evaluate, analyze,
            latency=_read_json(reports / "evaluate/latency.json"),
            per_class=_read_csv(reports / "evaluate/per_class.csv"),
            top_policies=_read_csv(reports / "analyze/top_policies.csv", dtype={"policy": str}),
            block_usage=_read_csv(reports / "analyze/block_usage.csv"),
            histories={s: read_history(reports / s / "history.csv")
                       for s in ("pretrain", "curriculum", "finetune", "finetune-full")},
            stage_metrics={s: _read_json(reports / s / "metrics.json") for s in ("pretrain", "finetune-full")},
        )


def _gap(bd: dict, full: dict) -> str:
    """"0.4 points above" / "1.2 points below": BlockDrop's accuracy against a full network's."""
    gap = 100 * (bd["accuracy"] - full["accuracy"])
    return f"{abs(gap):.1f} points {'below' if gap < 0 else 'above'}"


def summary(inp: ReportInputs) -> str:
    """The paragraph under the results table: blocks, accuracy gap to each full network, FLOPs and measured
    speedup, heuristics. Every comparison names its full network: the pretrained backbone, or the one trained as
    BlockDrop's backbone (the ``finetune-full`` stage), when evaluated."""
    ev = inp.evaluate
    k, full, bd, trained = ev["num_blocks"], ev["full"], ev["blockdrop"], ev.get("full_finetuned")
    text = (f"BlockDrop runs {bd['blocks_mean']:.1f} of {k} blocks on average ({pct(bd['block_fraction'], 0)}) at "
            f"{pct(bd['accuracy'])} accuracy, {_gap(bd, full)} the full network with the pretrained backbone "
            f"({pct(full['accuracy'])})")
    if isinstance(trained, dict):
        text += (f" and {_gap(bd, trained)} the full network trained as BlockDrop's backbone "
                 f"({pct(trained['accuracy'])}: the pretrained backbone trained further, every block on, with "
                 "finetune's images, epochs, optimizer, learning rate and augmentation). The second gap is "
                 "BlockDrop's own; the difference between the two is what finetune's extra training is worth.")
    else:
        text += "."
    speed = ev.get("speedup", {})
    if "flops_ratio" in speed:
        both = " than either full network" if isinstance(trained, dict) else " than the full network"
        text += (f" It needs {speed['flops_ratio']:.2f}x fewer FLOPs per image{both} ({bd['flops_mean'] / 1e6:.1f} vs "
                 f"{full['flops_mean'] / 1e6:.1f} MFLOPs, policy network included)")
        lat = inp.latency or {}
        if speed.get("measured_batch1") is not None:
            text += f" and runs {speed['measured_batch1']:.2f}x as fast at batch size 1 as the pretrained full network"
            if {"full_ms", "blockdrop_ms"} <= set(lat):
                n = lat.get("threads")
                threads = "" if n is None else ", on the GPU" if n == 0 else f", {n} CPU thread{'s' * (n > 1)}"
                text += (f" ({lat['full_ms']:.2f} ms → {lat['blockdrop_ms']:.2f} ms per image, median of "
                         f"{lat.get('images', '?')} images{threads})")
            if speed.get("measured_batch1_vs_full_finetuned") is not None:
                text += (f", {speed['measured_batch1_vs_full_finetuned']:.2f}x as fast as the one trained as "
                         "BlockDrop's backbone")
                if "full_finetuned_ms" in lat:
                    text += f" ({lat['full_finetuned_ms']:.2f} ms per image, timed in the same turns)"
        text += "."
    heur = [(VARIANT_LABELS[v], ev[v]) for v in ("firstk", "randomk") if isinstance(ev.get(v), dict)]
    if heur:
        parts = ", ".join(f"{name} {pct(m['accuracy'])}" for name, m in heur)
        text += f" Dropping the same number of blocks ({heur[0][1]['blocks_mean']:.0f}) without learning gives {parts}."
    p = PAPER_ROW
    text += (f" For scale, the paper's CIFAR-10 ResNet-110 ran {p['blocks_mean']} of {p['num_blocks']} blocks "
             f"({pct(p['blocks_mean'] / p['num_blocks'], 0)}) at {pct(p['accuracy'])} with {p['unique_policies']} "
             f"unique policies; here {bd.get('unique_policies', 'n/a')} unique policies.")
    return text


def _reading_accuracy_flops(inp: ReportInputs) -> str:
    ev = inp.evaluate
    full, bd, trained = ev["full"], ev["blockdrop"], ev.get("full_finetuned")
    text = f"The full network with the pretrained backbone reaches {pct(full['accuracy'])}"
    if isinstance(trained, dict):
        text += f", the full network trained as BlockDrop's backbone {pct(trained['accuracy'])},"
    text += (f" at {full['flops_mean'] / 1e6:.1f} MFLOPs per image; BlockDrop {pct(bd['accuracy'])} at "
             f"{bd['flops_mean'] / 1e6:.1f} MFLOPs ({pct(bd['flops_mean'] / full['flops_mean'], 0)} of the full cost"
             + (", the same for both full networks" if isinstance(trained, dict) else "") + ").")
    for v in ("firstk", "randomk"):
        if isinstance(m := ev.get(v), dict):
            d = 100 * (bd["accuracy"] - m["accuracy"])
            text += (f" {VARIANT_LABELS[v]} at {m['blocks_mean']:.0f} blocks: {pct(m['accuracy'])}, "
                     f"{abs(d):.1f} points {'below' if d > 0 else 'above'} BlockDrop.")
    return text


def _first_last(h: pd.DataFrame, col: str, scale: float = 1.0, fmt: str = ".1f") -> str | None:
    if h is None or col not in h.columns or h[col].dropna().empty:
        return None
    s = h[col].dropna() * scale
    return f"{s.iloc[0]:{fmt}} → {s.iloc[-1]:{fmt}}" if len(s) > 1 else f"{s.iloc[-1]:{fmt}}"


def _reading_curves(inp: ReportInputs) -> str:
    parts = []
    h = inp.histories.get("pretrain")
    if h is not None:
        s = f"Pretraining ran {len(h)} epochs: validation accuracy {_first_last(h, 'val/accuracy', 100)}%"
        if (loss := _first_last(h, "train/loss", fmt=".3f")) is not None:
            s += f", training loss {loss}"
        test = ((inp.stage_metrics.get("pretrain") or {}).get("test") or {}).get("accuracy")
        if test is not None:
            s += f"; the backbone's test accuracy is {pct(test)}"
        parts.append(s + ".")
    elif ((inp.stage_metrics.get("pretrain") or {}).get("train") or {}).get("epochs") == 0:
        test = inp.stage_metrics["pretrain"].get("test", {}).get("accuracy")
        score = f"; its test accuracy is {pct(test)}" if test is not None else ""
        parts.append("The backbone was not trained here: its weights were imported as they are (pretrain.epochs 0, "
                     f"as the authors did on ImageNet){score}.")
    h = inp.histories.get("curriculum")
    if h is not None:
        s = f"The curriculum ran {len(h)} epochs: greedy validation blocks {_first_last(h, 'val/blocks_mean')}"
        if "unlocked_blocks" in h.columns:
            s += f" with {int(h['unlocked_blocks'].iloc[-1])} blocks droppable at the end"
        s += (f", validation accuracy {_first_last(h, 'val/accuracy', 100)}%, "
              f"reward {_first_last(h, 'val/reward', fmt='.3f')}.")
        parts.append(s)
    h = inp.histories.get("finetune")
    if h is not None:
        parts.append(f"Joint finetuning ran {len(h)} epoch{'s' if len(h) > 1 else ''}: validation accuracy "
                     f"{_first_last(h, 'val/accuracy', 100)}% at {_first_last(h, 'val/blocks_mean')} blocks.")
    h = inp.histories.get("finetune-full")
    if h is not None:
        images = ((inp.stage_metrics.get("finetune-full") or {}).get("train") or {}).get("images")
        parts.append(f"The full network trained as BlockDrop's backbone ran the same {len(h)} "
                     f"epoch{'s' if len(h) > 1 else ''}{f' ({images} images)' if images else ''}, every block on: "
                     f"validation accuracy {_first_last(h, 'val/accuracy', 100)}%.")
    return " ".join(parts) or "No training history was found."


def _reading_policies(inp: ReportInputs) -> str:
    pol, blocks = inp.analyze["policies"], inp.analyze.get("blocks", {})
    images = int(inp.per_class["images"].sum()) if inp.per_class is not None and "images" in inp.per_class else None
    unique = pol["unique"]
    text = (f"{'The ' + str(images) if images else 'The'} test images use {unique} distinct "
            f"{'policy' if unique == 1 else 'policies'}"
            + (f" ({pol['singletons']} of them by a single image)" if pol.get("singletons") else "") + ".")
    top = inp.top_policies
    if top is not None and len(overall := top[top["scope"] == "all"]):
        first = overall.iloc[0]
        k = len(first["policy"])
        text += (f" The most frequent runs {first['blocks']} of {k} blocks and covers {pct(first['share'])} of the "
                 f"images (BlockDrop is right on {pct(first['accuracy'], 0)} of them)")
        text += (f"; the top {len(overall)} together cover {pct(overall['share'].sum())}." if len(overall) > 1
                 else ".")
    elif "top1_share" in pol:
        text += f" The most frequent covers {pct(pol['top1_share'])} of the images."
    if blocks:
        text += f" Blocks used: {blocks['mean']:.2f} ± {blocks['std']:.2f} per image."
    return text


def _reading_by_class(inp: ReportInputs) -> str:
    top = inp.top_policies
    if top is None:
        return "The per-class policy table is missing."
    per = top[(top["scope"] == "class") & (top["rank"] == 1)]
    if per.empty:
        return "No class has a policy."
    lo, hi = per.loc[per["share"].idxmin()], per.loc[per["share"].idxmax()]
    distinct = per["policy"].nunique()
    if lo["share"] == hi["share"]:
        text = f"Within every class, its most frequent policy covers {pct(lo['share'])} of the class's images."
    else:
        text = (f"Within a class, its most frequent policy covers from {pct(lo['share'])} ({lo['class']}) to "
                f"{pct(hi['share'])} ({hi['class']}) of the class's images.")
    policies = "1 distinct policy" if distinct == 1 else f"{distinct} distinct policies"
    return (text + f" The {len(per)} classes' top policies are {policies}"
            + (" (each class has its own)." if distinct == len(per) > 1 else ".")
            + " The paper reports that images sharing a policy share visual style (pose, background, colour): "
            "compare the images within a row.")


def _reading_blocks_per_class(inp: ReportInputs) -> str:
    pc = inp.per_class
    if pc is None or pc.empty:
        return "The per-class table is missing."
    lo, hi = pc.loc[pc["blocks_mean"].idxmin()], pc.loc[pc["blocks_mean"].idxmax()]
    std = inp.analyze.get("blocks", {}).get("std")
    text = (f"{lo['class']} uses the fewest blocks (mean {lo['blocks_mean']:.2f}), {hi['class']} the most "
            f"({hi['blocks_mean']:.2f}): the class means span {hi['blocks_mean'] - lo['blocks_mean']:.2f} blocks")
    text += f", against a standard deviation of {std:.2f} over all images." if std is not None else "."
    acc_lo, acc_hi = pc.loc[pc["accuracy"].idxmin()], pc.loc[pc["accuracy"].idxmax()]
    return text + (f" BlockDrop is least accurate on {acc_lo['class']} ({pct(acc_lo['accuracy'])}) and most on "
                   f"{acc_hi['class']} ({pct(acc_hi['accuracy'])}).")


def _reading_usage(inp: ReportInputs) -> str:
    u = inp.block_usage
    if u is None:
        return "The block usage table is missing."
    cols = [c for c in u.columns if c.startswith("block_")]
    frame = u.dropna(subset=cols, how="all")
    values = frame[cols]
    always = [c.split("_")[1] for c in cols if (values[c] >= 0.99).all()]
    never = [c.split("_")[1] for c in cols if (values[c] <= 0.01).all()]
    spread = (values.max() - values.min())
    t = spread.idxmax()
    text = (f"Blocks run by at least 99% of every class's images: {', '.join(always) or 'none'}; blocks skipped by at "
            f"least 99% of every class's images: {', '.join(never) or 'none'}.")
    if spread[t] > 0:
        text += (f" Block {t.split('_')[1]} differs most between classes: run on "
                 f"{pct(values[t].min(), 0)} of {frame.loc[values[t].idxmin(), 'class']} images and "
                 f"{pct(values[t].max(), 0)} of {frame.loc[values[t].idxmax(), 'class']} images.")
    return text


def _reading_difficulty(inp: ReportInputs) -> str:
    d = inp.analyze["difficulty"]
    rc, rl = d.get("spearman_blocks_vs_confidence"), d.get("spearman_blocks_vs_loss")
    text = (f"Spearman's rank correlation between the blocks BlockDrop runs and the pretrained full network's "
            f"probability of the true class is {num(rc, '+.2f')}, and with its loss {num(rl, '+.2f')}: ")
    if rc is None:
        text += "undefined, as every image runs the same number of blocks."
    elif rc <= -0.1:
        text += "images the pretrained full network finds harder get more blocks, as the paper observes."
    elif rc >= 0.1:
        text += "harder images get fewer blocks here, the opposite of the paper's observation."
    else:
        text += "blocks used barely track difficulty here."
    a, b = d.get("blocks_mean_full_correct"), d.get("blocks_mean_full_wrong")
    if a is not None and b is not None:
        text += (f" Images the pretrained full network classifies correctly use {a:.2f} blocks on average, the "
                 f"others {b:.2f}.")
    return text


def _reading_extremes(inp: ReportInputs) -> str:
    b = inp.analyze.get("blocks")
    if not b:
        return "Top row: the images with the fewest blocks; bottom row: the most."
    return (f"Blocks per image range from {b['min']} to {b['max']} (mean {b['mean']:.2f} ± {b['std']:.2f}). Top row: "
            f"the images with the fewest blocks, the most confident first; bottom row: the most blocks, the least "
            f"confident first.")


def _reading_embedding(inp: ReportInputs) -> str:
    p = inp.analyze["purity"]
    text = f"The normalised mutual information between policy and class is {p['nmi']:.2f}"
    if "nmi_shuffled" in p:
        text += f" ({p['nmi_shuffled']:.2f} with the labels shuffled)"
    text += f"; {pct(p['majority_purity'], 0)} of the images belong to their policy group's majority class"
    if "majority_purity_shuffled" in p:
        text += f" ({pct(p['majority_purity_shuffled'], 0)} with the labels shuffled)"
    margin = p["nmi"] - p.get("nmi_shuffled", 0.0)
    text += (": the policy carries class information." if margin >= 0.1
             else ": the policy says little about the class.")
    return text


READINGS = {
    "accuracy_flops": _reading_accuracy_flops,
    "training_curves": _reading_curves,
    "policies_top": _reading_policies,
    "policies_by_class": _reading_by_class,
    "blocks_per_class": _reading_blocks_per_class,
    "block_usage": _reading_usage,
    "difficulty": _reading_difficulty,
    "extremes": _reading_extremes,
    "policy_embedding": _reading_embedding,
}
