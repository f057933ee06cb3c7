"""The report stage: one Markdown file and one self-contained HTML page from the committed results.

Everything is read from the files the earlier stages wrote under ``reports/`` (metrics JSON, tables,
histories, the analyze stage's figures); every sentence of a figure's reading is computed from those
numbers. The HTML embeds each PNG as a ``data:`` URI and its CSS inline, so it opens offline and makes
no request; the Markdown links the PNGs by their path relative to ``reports/``.
"""

from __future__ import annotations

import base64
import html
import json
import math
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from blockdrop.analysis.analyze import FIGURES, read_history
from blockdrop.analysis.figures import VARIANT_LABELS, VARIANTS
from blockdrop.config import Params
from blockdrop.files import atomic_write_text

__all__ = ["PAPER_ROW", "build_report", "git_commit", "write_report"]

# The authors' published CIFAR-10 ResNet-110 result (README of the original code; REFERENCE.md).
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
FIGURE_TITLES = {
    "accuracy_flops": "Accuracy against FLOPs",
    "training_curves": "Training curves",
    "policies_top": "The most frequent policies",
    "policies_by_class": "Each class's most frequent policies",
    "blocks_per_class": "Blocks executed per class",
    "block_usage": "Block usage by class",
    "difficulty": "Difficulty against compute",
    "extremes": "Images using the fewest and the most blocks",
    "policy_embedding": "Map of the policy vectors",
}
CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1180px; margin: 2em auto;
       padding: 0 1.2em; color: #222; line-height: 1.5; }
h1 { border-bottom: 2px solid #d62728; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: .15em; }
table { border-collapse: collapse; margin: 1em 0; font-size: .95em; }
th, td { border: 1px solid #ccc; padding: .35em .7em; text-align: right; }
th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
tr.paper td { background: #fff8e6; font-style: italic; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { margin-top: .4em; color: #333; }
.meta { color: #666; font-size: .9em; }
details { margin: 1em 0; } pre { background: #f7f7f7; padding: .8em; overflow-x: auto; font-size: .9em; }
"""


def git_commit(cwd: str | Path | None = None) -> str:
    """``abc1234``, ``abc1234 (dirty)`` when tracked files differ from it, or ``unknown`` outside git."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"{commit} (dirty)" if dirty else commit


# --- numbers to text --------------------------------------------------------------------------------------


def _sci(v: float) -> str:
    """1.81e8 style (the paper's notation)."""
    if v == 0 or not math.isfinite(v):
        return f"{v:g}"
    exp = math.floor(math.log10(abs(v)))
    return f"{v / 10**exp:.2f}e{exp}"


def _pct(v: float, digits: int = 1) -> str:
    return f"{100 * v:.{digits}f}%"


def _num(v: float | None, fmt: str = ".2f") -> str:
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
class _Inputs:
    evaluate: dict
    analyze: dict
    latency: dict | None = None
    per_class: pd.DataFrame | None = None
    top_policies: pd.DataFrame | None = None
    block_usage: pd.DataFrame | None = None
    histories: dict = field(default_factory=dict)
    stage_metrics: dict = field(default_factory=dict)

    @classmethod
    def load(cls, reports: Path) -> _Inputs:
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
            histories={s: read_history(reports / s / "history.csv") for s in ("pretrain", "curriculum", "finetune")},
            stage_metrics={"pretrain": _read_json(reports / "pretrain/metrics.json")},
        )


def _results_table(ev: dict) -> tuple[list[str], list[list[str]]]:
    k = ev["num_blocks"]
    full_flops = ev["full"]["flops_mean"]
    header = ["Variant", "Accuracy", "Blocks (mean ± std)", "Blocks used", "FLOPs / image (mean ± std)",
              "FLOPs vs full", "Unique policies", "Speedup (FLOPs / measured, batch 1)"]
    rows = []
    for v in VARIANTS:
        m = ev.get(v)
        if not isinstance(m, dict):
            continue
        ratio = full_flops / m["flops_mean"] if m["flops_mean"] else float("nan")
        if v == "blockdrop":
            measured = ev.get("speedup", {}).get("measured_batch1")
            speed = f"{ratio:.2f}x / {_num(measured)}x"
            unique = str(m.get("unique_policies", "n/a"))
        else:
            speed = "1.00x / 1.00x" if v == "full" else f"{ratio:.2f}x / not measured"
            unique = "1" if v in ("full", "firstk") else "random"
        rows.append([VARIANT_LABELS[v], _pct(m["accuracy"]), f"{m['blocks_mean']:.2f} ± {m['blocks_std']:.2f} of {k}",
                     _pct(m["block_fraction"], 0), f"{_sci(m['flops_mean'])} ± {_sci(m['flops_std'])}",
                     _pct(m["flops_mean"] / full_flops, 0), unique, speed])
    p = PAPER_ROW
    rows.append([p["name"], _pct(p["accuracy"]), f"{p['blocks_mean']:.2f} ± {p['blocks_std']:.2f} of {p['num_blocks']}",
                 _pct(p["blocks_mean"] / p["num_blocks"], 0), f"{_sci(p['flops_mean'])} ± {_sci(p['flops_std'])}",
                 _pct(p["flops_mean"] / p["full_flops"], 0), str(p["unique_policies"]),
                 f"{p['full_flops'] / p['flops_mean']:.2f}x / not reported"])
    return header, rows


def _summary(inp: _Inputs) -> str:
    ev = inp.evaluate
    k, full, bd = ev["num_blocks"], ev["full"], ev["blockdrop"]
    gap = 100 * (bd["accuracy"] - full["accuracy"])
    side = "below" if gap < 0 else "above"
    text = (f"BlockDrop runs {bd['blocks_mean']:.1f} of {k} blocks on average ({_pct(bd['block_fraction'], 0)}) at "
            f"{_pct(bd['accuracy'])} accuracy, {abs(gap):.1f} points {side} the full network "
            f"({_pct(full['accuracy'])}).")
    speed = ev.get("speedup", {})
    if "flops_ratio" in speed:
        text += (f" It needs {speed['flops_ratio']:.2f}x fewer FLOPs per image ({bd['flops_mean'] / 1e6:.1f} vs "
                 f"{full['flops_mean'] / 1e6:.1f} MFLOPs, policy network included)")
        lat = inp.latency or {}
        if speed.get("measured_batch1") is not None:
            text += f" and runs {speed['measured_batch1']:.2f}x as fast at batch size 1"
            if {"full_ms", "blockdrop_ms"} <= set(lat):
                n = lat.get("threads")
                threads = "" if n is None else ", on the GPU" if n == 0 else f", {n} CPU thread{'s' * (n > 1)}"
                text += (f" ({lat['full_ms']:.2f} ms → {lat['blockdrop_ms']:.2f} ms per image, median of "
                         f"{lat.get('images', '?')} images{threads})")
        text += "."
    heur = [(VARIANT_LABELS[v], ev[v]) for v in ("firstk", "randomk") if isinstance(ev.get(v), dict)]
    if heur:
        parts = ", ".join(f"{name} {_pct(m['accuracy'])}" for name, m in heur)
        text += f" Dropping the same number of blocks ({heur[0][1]['blocks_mean']:.0f}) without learning gives {parts}."
    p = PAPER_ROW
    text += (f" For scale, the paper's CIFAR-10 ResNet-110 ran {p['blocks_mean']} of {p['num_blocks']} blocks "
             f"({_pct(p['blocks_mean'] / p['num_blocks'], 0)}) at {_pct(p['accuracy'])} with {p['unique_policies']} "
             f"unique policies; here {bd.get('unique_policies', 'n/a')} unique policies.")
    return text


def _reading_accuracy_flops(inp: _Inputs) -> str:
    ev = inp.evaluate
    full, bd = ev["full"], ev["blockdrop"]
    text = (f"The full network reaches {_pct(full['accuracy'])} at {full['flops_mean'] / 1e6:.1f} MFLOPs per image; "
            f"BlockDrop {_pct(bd['accuracy'])} at {bd['flops_mean'] / 1e6:.1f} MFLOPs "
            f"({_pct(bd['flops_mean'] / full['flops_mean'], 0)} of the full cost).")
    for v in ("firstk", "randomk"):
        if isinstance(m := ev.get(v), dict):
            d = 100 * (bd["accuracy"] - m["accuracy"])
            text += (f" {VARIANT_LABELS[v]} at {m['blocks_mean']:.0f} blocks: {_pct(m['accuracy'])}, "
                     f"{abs(d):.1f} points {'below' if d > 0 else 'above'} BlockDrop.")
    return text


def _first_last(h: pd.DataFrame, col: str, scale: float = 1.0, fmt: str = ".1f") -> str | None:
    if h is None or col not in h.columns or h[col].dropna().empty:
        return None
    s = h[col].dropna() * scale
    return f"{s.iloc[0]:{fmt}} → {s.iloc[-1]:{fmt}}" if len(s) > 1 else f"{s.iloc[-1]:{fmt}}"


def _reading_curves(inp: _Inputs) -> str:
    parts = []
    h = inp.histories.get("pretrain")
    if h is not None:
        s = f"Pretraining ran {len(h)} epochs: validation accuracy {_first_last(h, 'val/accuracy', 100)}%"
        if (loss := _first_last(h, "train/loss", fmt=".3f")) is not None:
            s += f", training loss {loss}"
        test = ((inp.stage_metrics.get("pretrain") or {}).get("test") or {}).get("accuracy")
        if test is not None:
            s += f"; the backbone's test accuracy is {_pct(test)}"
        parts.append(s + ".")
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
    return " ".join(parts) or "No training history was found."


def _reading_policies(inp: _Inputs) -> str:
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
        text += (f" The most frequent runs {first['blocks']} of {k} blocks and covers {_pct(first['share'])} of the "
                 f"images (BlockDrop is right on {_pct(first['accuracy'], 0)} of them)")
        text += (f"; the top {len(overall)} together cover {_pct(overall['share'].sum())}." if len(overall) > 1
                 else ".")
    elif "top1_share" in pol:
        text += f" The most frequent covers {_pct(pol['top1_share'])} of the images."
    if blocks:
        text += f" Blocks used: {blocks['mean']:.2f} ± {blocks['std']:.2f} per image."
    return text


def _reading_by_class(inp: _Inputs) -> str:
    top = inp.top_policies
    if top is None:
        return "The per-class policy table is missing."
    per = top[(top["scope"] == "class") & (top["rank"] == 1)]
    if per.empty:
        return "No class has a policy."
    lo, hi = per.loc[per["share"].idxmin()], per.loc[per["share"].idxmax()]
    distinct = per["policy"].nunique()
    if lo["share"] == hi["share"]:
        text = f"Within every class, its most frequent policy covers {_pct(lo['share'])} of the class's images."
    else:
        text = (f"Within a class, its most frequent policy covers from {_pct(lo['share'])} ({lo['class']}) to "
                f"{_pct(hi['share'])} ({hi['class']}) of the class's images.")
    policies = "1 distinct policy" if distinct == 1 else f"{distinct} distinct policies"
    return (text + f" The {len(per)} classes' top policies are {policies}"
            + (" (each class has its own)." if distinct == len(per) > 1 else ".")
            + " The paper reports that images sharing a policy share visual style (pose, background, colour): "
            "compare the images within a row.")


def _reading_blocks_per_class(inp: _Inputs) -> str:
    pc = inp.per_class
    if pc is None or pc.empty:
        return "The per-class table is missing."
    lo, hi = pc.loc[pc["blocks_mean"].idxmin()], pc.loc[pc["blocks_mean"].idxmax()]
    std = inp.analyze.get("blocks", {}).get("std")
    text = (f"{lo['class']} uses the fewest blocks (mean {lo['blocks_mean']:.2f}), {hi['class']} the most "
            f"({hi['blocks_mean']:.2f}): the class means span {hi['blocks_mean'] - lo['blocks_mean']:.2f} blocks")
    text += f", against a standard deviation of {std:.2f} over all images." if std is not None else "."
    acc_lo, acc_hi = pc.loc[pc["accuracy"].idxmin()], pc.loc[pc["accuracy"].idxmax()]
    return text + (f" BlockDrop is least accurate on {acc_lo['class']} ({_pct(acc_lo['accuracy'])}) and most on "
                   f"{acc_hi['class']} ({_pct(acc_hi['accuracy'])}).")


def _reading_usage(inp: _Inputs) -> str:
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
                 f"{_pct(values[t].min(), 0)} of {frame.loc[values[t].idxmin(), 'class']} images and "
                 f"{_pct(values[t].max(), 0)} of {frame.loc[values[t].idxmax(), 'class']} images.")
    return text


def _reading_difficulty(inp: _Inputs) -> str:
    d = inp.analyze["difficulty"]
    rc, rl = d.get("spearman_blocks_vs_confidence"), d.get("spearman_blocks_vs_loss")
    text = (f"Spearman's rank correlation between the blocks BlockDrop runs and the full network's probability of "
            f"the true class is {_num(rc, '+.2f')}, and with its loss {_num(rl, '+.2f')}: ")
    if rc is None:
        text += "undefined, as every image runs the same number of blocks."
    elif rc <= -0.1:
        text += "images the full network finds harder get more blocks, as the paper observes."
    elif rc >= 0.1:
        text += "harder images get fewer blocks here, the opposite of the paper's observation."
    else:
        text += "blocks used barely track difficulty here."
    a, b = d.get("blocks_mean_full_correct"), d.get("blocks_mean_full_wrong")
    if a is not None and b is not None:
        text += f" Images the full network classifies correctly use {a:.2f} blocks on average, the others {b:.2f}."
    return text


def _reading_extremes(inp: _Inputs) -> str:
    b = inp.analyze.get("blocks")
    if not b:
        return "Top row: the images with the fewest blocks; bottom row: the most."
    return (f"Blocks per image range from {b['min']} to {b['max']} (mean {b['mean']:.2f} ± {b['std']:.2f}). Top row: "
            f"the images with the fewest blocks, the most confident first; bottom row: the most blocks, the least "
            f"confident first.")


def _reading_embedding(inp: _Inputs) -> str:
    p = inp.analyze["purity"]
    text = f"The normalised mutual information between policy and class is {p['nmi']:.2f}"
    if "nmi_shuffled" in p:
        text += f" ({p['nmi_shuffled']:.2f} with the labels shuffled)"
    text += f"; {_pct(p['majority_purity'], 0)} of the images belong to their policy group's majority class"
    if "majority_purity_shuffled" in p:
        text += f" ({_pct(p['majority_purity_shuffled'], 0)} with the labels shuffled)"
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


def _per_class_table(inp: _Inputs) -> tuple[list[str], list[list[str]]] | None:
    pc = inp.per_class
    if pc is None or pc.empty:
        return None
    top = inp.top_policies
    header = ["Class", "Images", "BlockDrop accuracy", "Full accuracy", "Blocks (mean ± std)", "Top policy share"]
    rows = []
    for _, r in pc.iterrows():
        share = "n/a"
        if top is not None:
            hit = top[(top["scope"] == "class") & (top["label"] == r["label"]) & (top["rank"] == 1)]
            share = _pct(hit["share"].iloc[0]) if len(hit) else "n/a"
        std = 0.0 if pd.isna(r["blocks_std"]) else r["blocks_std"]
        rows.append([str(r.get("class", r["label"])), str(int(r["images"])), _pct(r["accuracy"]),
                     _pct(r["full_accuracy"]), f"{r['blocks_mean']:.2f} ± {std:.2f}", share])
    return header, rows


# --- the document ------------------------------------------------------------------------------------------


def _figure_entries(figures_dir: Path) -> list[tuple[str, Path]]:
    """(key, path) of the figures present, in the report's order; extra per-class pages after the first."""
    entries = []
    for key, name in FIGURES.items():
        if (figures_dir / name).exists():
            entries.append((key, figures_dir / name))
        if key == "policies_by_class":
            pages = sorted(figures_dir.glob("policies_by_class_*.png"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
            entries.extend((key, p) for p in pages)
    return entries


def build_report(reports_dir: str | Path, params: Params, params_text: str, commit: str | None = None
                 ) -> tuple[str, str]:
    """The Markdown and the HTML of the report, from the files under ``reports_dir``."""
    reports = Path(reports_dir)
    inp = _Inputs.load(reports)
    commit = commit if commit is not None else git_commit()
    title = params.report.title
    blocks: list[tuple] = [("h1", title)]
    blocks.append(("meta", f"Made from git commit {commit}; dataset {params.data.source}, ResNet-{params.model.depth} "
                           f"({inp.evaluate['num_blocks']} residual blocks)."))
    blocks.append(("h2", "Results"))
    blocks.append(("p", _summary(inp)))
    header, rows = _results_table(inp.evaluate)
    blocks.append(("table", header, rows, len(rows) - 1))
    blocks.append(("p", "FLOPs per image count convolutions and linear layers (2 x multiply-adds), the policy "
                        "network included for BlockDrop. FirstK runs the first k blocks and RandomK k random "
                        "blocks of the pretrained backbone, with k BlockDrop's mean rounded. The paper's row is "
                        "another dataset and a 3.6x deeper network: compare the shape (fraction of blocks, "
                        "accuracy kept), not the numbers."))
    if (per_class := _per_class_table(inp)) is not None:
        blocks.append(("h2", "Per class"))
        blocks.append(("table", *per_class, None))
    blocks.append(("h2", "Figures"))
    fig_dir = reports / "analyze" / "figures"
    entries = _figure_entries(fig_dir)
    if not entries:
        blocks.append(("p", f"No figures found under {fig_dir}: run the analyze stage."))
    seen = set()
    for key, path in entries:
        first = key not in seen
        seen.add(key)
        if first:
            blocks.append(("h3", FIGURE_TITLES.get(key, key)))
        blocks.append(("figure", path, path.relative_to(reports).as_posix(),
                       READINGS[key](inp) if first and key in READINGS else ""))
    blocks.append(("h2", "Parameters"))
    blocks.append(("details", "params.yaml", params_text))
    return _markdown(blocks), _html(blocks, title)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def _markdown(blocks: list[tuple]) -> str:
    out: list[str] = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            out.append(f"{'#' * int(kind[1])} {b[1]}")
        elif kind == "meta":
            out.append(f"_{b[1]}_")
        elif kind == "p":
            out.append(b[1])
        elif kind == "table":
            _, header, rows, _ = b
            lines = ["| " + " | ".join(map(_md_cell, header)) + " |",
                     "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
            lines += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows]
            out.append("\n".join(lines))
        elif kind == "figure":
            _, _, rel, reading = b
            out.append(f"![{Path(rel).stem}]({rel})" + (f"\n\n{reading}" if reading else ""))
        elif kind == "details":
            out.append(f"<details><summary>{b[1]}</summary>\n\n```yaml\n{b[2].rstrip()}\n```\n\n</details>")
    return "\n\n".join(out) + "\n"


def _html(blocks: list[tuple], title: str) -> str:
    e = html.escape
    body: list[str] = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{e(b[1])}</{kind}>")
        elif kind == "meta":
            body.append(f'<p class="meta">{e(b[1])}</p>')
        elif kind == "p":
            body.append(f"<p>{e(b[1])}</p>")
        elif kind == "table":
            _, header, rows, highlight = b
            head = "".join(f"<th>{e(h)}</th>" for h in header)
            trs = []
            for i, r in enumerate(rows):
                cls = ' class="paper"' if i == highlight else ""
                trs.append(f"<tr{cls}>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>")
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(trs)}</tbody></table>")
        elif kind == "figure":
            _, path, rel, reading = b
            data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
            caption = f"<figcaption>{e(reading)}</figcaption>" if reading else ""
            body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{e(rel)}">{caption}</figure>')
        elif kind == "details":
            body.append(f"<details><summary>{e(b[1])}</summary><pre>{e(b[2])}</pre></details>")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{e(title)}</title>\n'
            f"<style>{CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


def write_report(reports_dir: str | Path, markdown: str, page: str) -> list[Path]:
    """Write ``report.md`` and ``report.html`` under ``reports_dir``; return their paths."""
    reports = Path(reports_dir)
    paths = [reports / "report.md", reports / "report.html"]
    for path, text in zip(paths, (markdown, page), strict=True):
        atomic_write_text(path, text)
    return paths
