"""The report stage: one Markdown file and one self-contained HTML page from the committed results.

Everything is read from the files the earlier stages wrote under ``reports/`` (metrics JSON, tables,
histories, the analyze stage's figures). The sentences, each computed from those numbers, come from
:mod:`blockdrop.readings`; this module lays out the tables, the figures and the params. The HTML embeds
each PNG as a ``data:`` URI and its CSS inline, so it opens offline and makes no request; the Markdown
links the PNGs by their path relative to ``reports/``.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import pandas as pd

from blockdrop.analysis.analyze import FIGURES
from blockdrop.analysis.style import VARIANT_LABELS, VARIANTS
from blockdrop.config import Params, flatten
from blockdrop.files import atomic_write_text
from blockdrop.project import git_commit
from blockdrop.readings import PAPER_ROW, READINGS, ReportInputs, num, pct, summary

__all__ = ["PAPER_ROW", "build_report", "write_report"]

FIGURE_TITLES = {
    "accuracy_flops": "Accuracy against FLOPs",
    "flops_saved": "FLOPs saved per image",
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


# --- tables -------------------------------------------------------------------------------------------------


def _sci(v: float) -> str:
    """1.81e8 style (the paper's notation)."""
    if v == 0 or not math.isfinite(v):
        return f"{v:g}"
    exp = math.floor(math.log10(abs(v)))
    return f"{v / 10**exp:.2f}e{exp}"


def _results_table(ev: dict, latency: dict | None = None) -> tuple[list[str], list[list[str]]]:
    """One row per variant, then the paper's; the FLOPs and speedup columns are against the pretrained full
    network (both full networks have its FLOPs)."""
    k = ev["num_blocks"]
    full_flops = ev["full"]["flops_mean"]
    header = ["Variant", "Accuracy", "Blocks (mean ± std)", "Blocks used", "FLOPs / image (mean ± std)",
              "FLOPs vs full", "Unique policies", "Speedup vs pretrained full (FLOPs / measured, batch 1)"]
    rows = []
    for v in VARIANTS:
        m = ev.get(v)
        if not isinstance(m, dict):
            continue
        ratio = full_flops / m["flops_mean"] if m["flops_mean"] else float("nan")
        if v == "blockdrop":
            measured = ev.get("speedup", {}).get("measured_batch1")
            speed = f"{ratio:.2f}x / {num(measured)}x"
            unique = str(m.get("unique_policies", "n/a"))
        elif v == "full_finetuned":  # the pretrained one's architecture: a measured ratio off 1 is timing noise
            lat = latency or {}
            timed = {"full_ms", "full_finetuned_ms"} <= set(lat)
            measured = lat["full_ms"] / lat["full_finetuned_ms"] if timed else None
            speed, unique = f"{ratio:.2f}x / {num(measured)}x", "1"
        else:
            speed = "1.00x / 1.00x" if v == "full" else f"{ratio:.2f}x / not measured"
            unique = "1" if v in ("full", "firstk") else "random"
        rows.append([VARIANT_LABELS[v], pct(m["accuracy"]), f"{m['blocks_mean']:.2f} ± {m['blocks_std']:.2f} of {k}",
                     pct(m["block_fraction"], 0), f"{_sci(m['flops_mean'])} ± {_sci(m['flops_std'])}",
                     pct(m["flops_mean"] / full_flops, 0), unique, speed])
    p = PAPER_ROW
    rows.append([p["name"], pct(p["accuracy"]), f"{p['blocks_mean']:.2f} ± {p['blocks_std']:.2f} of {p['num_blocks']}",
                 pct(p["blocks_mean"] / p["num_blocks"], 0), f"{_sci(p['flops_mean'])} ± {_sci(p['flops_std'])}",
                 pct(p["flops_mean"] / p["full_flops"], 0), str(p["unique_policies"]),
                 f"{p['full_flops'] / p['flops_mean']:.2f}x / not reported"])
    return header, rows




def _savings(ev: dict) -> str | None:
    """One sentence on the distribution of per-image FLOPs saved, the way the paper reports it."""
    s = ev.get("blockdrop", {}).get("flops_saved")
    if s is None:
        return None
    return (f"Per image, BlockDrop saves {pct(s['mean'])} of the full network's FLOPs (the same for the pretrained "
            f"and the trained full network) on average (median "
            f"{pct(s['median'])}, 5th to 95th percentile {pct(s['p5'])} to {pct(s['p95'])}, at most {pct(s['max'])}), "
            "the policy network paid; the paper reports 20% on average and up to 36% for some images on ImageNet "
            "ResNet-101.")


def _per_class_table(inp: ReportInputs) -> tuple[list[str], list[list[str]]] | None:
    pc = inp.per_class
    if pc is None or pc.empty:
        return None
    top = inp.top_policies
    header = ["Class", "Images", "BlockDrop accuracy", "Full (pretrained) accuracy", "Blocks (mean ± std)",
              "Top policy share"]
    rows = []
    for _, r in pc.iterrows():
        share = "n/a"
        if top is not None:
            hit = top[(top["scope"] == "class") & (top["label"] == r["label"]) & (top["rank"] == 1)]
            share = pct(hit["share"].iloc[0]) if len(hit) else "n/a"
        std = 0.0 if pd.isna(r["blocks_std"]) else r["blocks_std"]
        rows.append([str(r.get("class", r["label"])), str(int(r["images"])), pct(r["accuracy"]),
                     pct(r["full_accuracy"]), f"{r['blocks_mean']:.2f} ± {std:.2f}", share])
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
    inp = ReportInputs.load(reports)
    commit = commit if commit is not None else git_commit()
    title = params.report.title
    blocks: list[tuple] = [("h1", title)]
    blocks.append(("meta", f"Made from git commit {commit}; dataset {params.data.dataset}, ResNet-{params.model.depth} "
                           f"({inp.evaluate['num_blocks']} residual blocks)."))
    blocks.append(("h2", "Results"))
    blocks.append(("p", summary(inp)))
    header, rows = _results_table(inp.evaluate, inp.latency)
    blocks.append(("table", header, rows, len(rows) - 1))
    blocks.append(("p", "FLOPs per image count convolutions and linear layers (2 x multiply-adds), the policy "
                        "network included for BlockDrop. FirstK runs the first k blocks and RandomK k random "
                        "blocks of the pretrained backbone, with k BlockDrop's mean rounded. The paper's row is "
                        "another dataset and a 3.6x deeper network: compare the shape (fraction of blocks, "
                        "accuracy kept), not the numbers."))
    blocks.extend(_seed_blocks(reports, params))
    if isinstance(inp.evaluate.get("full_finetuned"), dict):
        blocks.append(("p", "Two full networks: the pretrained backbone BlockDrop starts from, never trained "
                            "further (the paper's baseline), and the same backbone trained further exactly as "
                            "finetune trains BlockDrop's (the finetune-full stage): every block on, with the same "
                            "images, epochs, batch size, optimizer, learning rate and its decay, augmentation and "
                            "precision. BlockDrop against the second is the policy's effect alone."))
    if (saved := _savings(inp.evaluate)) is not None:
        blocks.append(("p", saved))
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
    blocks.extend(_sweep_blocks(reports))
    blocks.append(("h2", "Parameters"))
    blocks.append(("details", "params.yaml", params_text))
    return _markdown(blocks), _html(blocks, title)


def _sweep_blocks(reports: Path) -> list[tuple]:
    """The sweep's table and trade-off figure (``reports/sweep``, written by ``make sweep``), if there is one."""
    folder = reports / "sweep"
    if not (folder / "settings.csv").exists():
        return []
    table = pd.read_csv(folder / "settings.csv")
    info = json.loads((folder / "sweep.json").read_text()) if (folder / "sweep.json").exists() else {}
    keys = [k for k in info.get("grid", {}) if k in table.columns]
    header = [*keys, "seeds", "accuracy", "blocks", "GFLOPs", "speedup (FLOPs)", "speedup (measured)",
              "FirstK at equal FLOPs", "RandomK at equal FLOPs", "Pareto"]

    def spread(name: str, scale: float = 1.0, digits: int = 2, unit: str = "") -> str:
        mean, std = scale * row[f"{name}_mean"], scale * row[f"{name}_std"]
        return f"{mean:.{digits}f}{unit}" + (f" ± {std:.{digits}f}" if row["seeds"] > 1 else "")

    rows = []
    for _, row in table.iterrows():
        rows.append([*(str(row[k]) for k in keys), str(row["seeds"]), spread("accuracy", 100, 2, "%"),
                     f"{spread('blocks')} ({100 * row['block_fraction_mean']:.0f}%)", spread("flops", 1e-9, 4),
                     spread("speedup_flops", digits=2), spread("speedup_measured", digits=2),
                     _pct(row["firstk_at_flops"]), _pct(row["randomk_at_flops"]), "yes" if row["pareto"] else ""])
    blocks: list[tuple] = [("h2", "Sweep"), ("p", _sweep_reading(table, info)), ("table", header, rows, None)]
    if (folder / "tradeoff.png").exists():
        blocks.append(("figure", folder / "tradeoff.png", "sweep/tradeoff.png",
                       "BlockDrop's settings joined in order of FLOPs (the ringed ones form the Pareto front), FirstK "
                       "and RandomK at every k on the pretrained backbone, the full network with the pretrained "
                       "backbone as the dotted line (and, where the experiments evaluated it, the one trained as "
                       "BlockDrop's backbone as the dash-dotted line)."))
    if (folder / "speedup.png").exists():
        blocks.append(("figure", folder / "speedup.png", "sweep/speedup.png",
                       "The same settings against the speedup their evaluate stage measured at batch 1 over the "
                       "pretrained full network, on the machine that ran the sweep; the full networks at 1x."))
    return blocks


SEED_ROWS = (  # (label, experiments.csv column or a function of a row, scale, digits, unit)
    ("Full ResNet, pretrained", "full.accuracy", 100, 2, "%"),
    ("Full ResNet, trained as BlockDrop's backbone", "full_finetuned.accuracy", 100, 2, "%"),
    ("BlockDrop", "blockdrop.accuracy", 100, 2, "%"),
    ("BlockDrop minus the trained full ResNet (points)",
     lambda r: r["blockdrop.accuracy"] - r["full_finetuned.accuracy"], 100, 2, ""),
    ("Blocks used", "blockdrop.block_fraction", 100, 1, "%"),
    ("Speedup, FLOPs", "speedup.flops_ratio", 1, 2, "x"),
    ("Speedup, measured at batch 1", "speedup.measured_batch1", 1, 2, "x"),
)


def _seed_blocks(reports: Path, params: Params) -> list[tuple]:
    """This run's setting over seeds: the committed sweep's experiments (``reports/sweep``) whose every grid key
    but ``seed`` has this run's value, as a table of each seed and the mean ± standard deviation. Nothing when
    the sweep did not vary the seed or ran this setting on fewer than two seeds."""
    folder = reports / "sweep"
    if not (folder / "experiments.csv").exists() or not (folder / "sweep.json").exists():
        return []
    grid = json.loads((folder / "sweep.json").read_text()).get("grid", {})
    table = pd.read_csv(folder / "experiments.csv")
    if "seed" not in grid or "seed" not in table.columns or "full_finetuned.accuracy" not in table.columns:
        return []
    ours = flatten(params.model_dump())
    for key in grid:
        if key != "seed":
            table = table[table[key].astype(str) == str(ours[key])]
    table = table.sort_values("seed")
    if len(table) < 2:
        return []
    header = ["", *(f"seed {s}" for s in table["seed"]), "mean ± std"]
    rows = []
    for label, column, scale, digits, unit in SEED_ROWS:
        values = scale * (table.apply(column, axis=1) if callable(column) else table[column])
        cells = [f"{v:.{digits}f}{unit}" for v in values]
        rows.append([label, *cells, f"{values.mean():.{digits}f} ± {values.std():.{digits}f}{unit}"])
    setting = ", ".join(f"{k} = {ours[k]}" for k in grid if k != "seed") or "this run's setting"
    text = (f"Over {len(table)} seeds ({setting}; every seed reruns every stage, from its own validation split "
            f"and backbone; `make sweep`, files in reports/sweep), sample standard deviation:")
    return [("p", text), ("table", header, rows, None)]


def _pct(v: float) -> str:
    return pct(v, 2) if math.isfinite(v) else "n/a"


def _sweep_reading(table: pd.DataFrame, info: dict) -> str:
    """What the sweep shows, in numbers: its size and cost, the cheapest setting that keeps the pretrained full
    backbone's accuracy (within 0.3 points), and whether BlockDrop beats the heuristics at equal FLOPs."""
    n, experiments = len(table), int(table["seeds"].sum())
    full = table["full_accuracy_mean"].mean()
    text = (f"{n} settings ({experiments} experiments) of {', '.join(info.get('grid', {})) or 'the grid'}"
            + (f"; the sweep run that wrote this table ran {info['ran']} of them in {info['wall_seconds']:.0f} s"
               if "ran" in info else "")
            + f", baseline commit {str(info.get('baseline', 'unknown'))[:7]}. Full network, pretrained backbone: "
            + f"{_pct(full)}.")
    keep = table[table["accuracy_mean"] >= full - 0.003].sort_values("flops_mean")
    if len(keep):
        best = keep.iloc[0]
        text += (f" The cheapest setting within 0.3 points of it runs {100 * best['block_fraction_mean']:.0f}% of the "
                 f"blocks at {_pct(best['accuracy_mean'])} ({best['speedup_flops_mean']:.2f}x fewer FLOPs).")
    else:
        text += " No setting comes within 0.3 points of it."
    margin = table[["firstk_at_flops", "randomk_at_flops"]].max(axis=1)
    known = margin.notna()
    if known.any():
        lead = table["accuracy_mean"][known] - margin[known]
        text += (f" At equal FLOPs BlockDrop is above both FirstK and RandomK in {int((lead > 0).sum())} of "
                 f"{int(known.sum())} settings (smallest margin {100 * lead.min():+.2f} points).")
    return text


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
