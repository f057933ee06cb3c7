"""The accuracy-vs-FLOPs trade-off of a parameter sweep: one table row and one figure point per setting.

A sweep runs every setting of a grid (e.g. ``{finetune.penalty: [2, 5, 8], seed: [0, 1]}``) as one experiment
each. Seeds are not settings: the experiments that differ only in the seed collapse into one setting, shown as
the mean with its spread (population std over seeds). Inputs are what each experiment's evaluate stage wrote
(``metrics.json`` and ``heuristics_by_k.csv``); nothing here trains or reads files.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from blockdrop.analysis.style import VARIANT_COLORS, save_figure, styled

__all__ = ["PAPER", "Experiment", "reference_points", "settings_table", "speedup_figure", "tradeoff_figure"]

# (source, depth) -> variant -> (accuracy, FLOPs per image), the authors' README's numbers (docs/paper.md,
# published numbers). The full-model FLOPs are this project's count under the authors' convention; CIFAR-100
# adds 1.2e4 to CIFAR-10's classifier, far below the precision shown. Fashion-MNIST has no published point.
PAPER: dict[tuple[str, int], dict[str, tuple[float, float]]] = {
    ("cifar10", 110): {"blockdrop": (0.936, 1.81e8), "full": (0.932, 5.058e8)},
    ("cifar10", 32): {"full": (0.923, 1.377e8)},
    ("cifar100", 32): {"full": (0.693, 1.377e8)},
    ("cifar100", 110): {"full": (0.723, 5.058e8)},
    ("imagenet", 101): {"blockdrop": (0.764, 1.25e10), "full": (0.7646, 1.560e10)},
}
# table column -> (section of the evaluate metrics, key); BlockDrop's numbers unless the section says otherwise
QUANTITIES = {
    "accuracy": ("blockdrop", "accuracy"),
    "blocks": ("blockdrop", "blocks_mean"),
    "block_fraction": ("blockdrop", "block_fraction"),
    "flops": ("blockdrop", "flops_mean"),
    "speedup_measured": ("speedup", "measured_batch1"),
    "speedup_flops": ("speedup", "flops_ratio"),
    "full_accuracy": ("full", "accuracy"),
}
DEPTH_MARKERS = ("s", "D", "^", "v", "P", "X")
# the full networks BlockDrop is compared with: (evaluate variant, description, line style at its accuracy)
FULL_NETWORKS = (("full", "pretrained", ":"), ("full_finetuned", "trained as BlockDrop's backbone", "-."))


@dataclass
class Experiment:
    """One finished experiment of a sweep: its grid params (dotted keys) and what its evaluate stage wrote."""

    name: str
    params: dict
    metrics: dict
    heuristics: pd.DataFrame | None = None  # per-k table: k, firstk_accuracy, firstk_flops, randomk_...
    source: str = "fashion-mnist"
    depth: int = 32

    @classmethod
    def load(cls, name: str, params: dict, evaluate_dir: str | Path, source: str, depth: int) -> Experiment:
        """From an evaluate stage's outputs: ``metrics.json`` and, when present, ``heuristics_by_k.csv``."""
        evaluate_dir = Path(evaluate_dir)
        metrics = json.loads((evaluate_dir / "metrics.json").read_text())
        per_k = evaluate_dir / "heuristics_by_k.csv"
        return cls(name, dict(params), metrics, pd.read_csv(per_k) if per_k.exists() else None, source, depth)


def _setting(e: Experiment, seed_key: str) -> tuple:
    return tuple(sorted((k, v) for k, v in e.params.items() if k != seed_key))


def _value(metrics: dict, section: str, key: str) -> float:
    v = (metrics.get(section) or {}).get(key)
    return float(v) if v is not None else float("nan")


def _pareto(accuracy: np.ndarray, flops: np.ndarray) -> np.ndarray:
    """True where no other point is at least as accurate for at most the FLOPs, and strictly better in one."""
    better_eq = (accuracy[None, :] >= accuracy[:, None]) & (flops[None, :] <= flops[:, None])
    strict = (accuracy[None, :] > accuracy[:, None]) | (flops[None, :] < flops[:, None])
    return ~(better_eq & strict).any(axis=1)


def settings_table(experiments: list[Experiment], seed_key: str = "seed") -> pd.DataFrame:
    """One row per setting (the params without ``seed_key``): the params, ``seeds``, ``experiments`` and the
    mean and population std over seeds of each of :data:`QUANTITIES` (``<name>_mean``, ``<name>_std``; the
    full backbone's accuracy as a mean only), ``firstk_at_flops`` / ``randomk_at_flops`` (the heuristics' accuracy
    at the setting's mean FLOPs, from their per-k curves), and ``pareto``. Sorted by mean FLOPs, then accuracy."""
    if not experiments:
        raise ValueError("no experiments: nothing to tabulate")
    groups: dict[tuple, list[Experiment]] = {}
    for e in experiments:
        groups.setdefault(_setting(e, seed_key), []).append(e)
    rows = []
    for setting, members in groups.items():
        row: dict = dict(setting)
        row["seeds"] = len(members)
        row["experiments"] = ", ".join(e.name for e in members)
        for name, (section, key) in QUANTITIES.items():
            values = np.array([_value(e.metrics, section, key) for e in members])
            row[f"{name}_mean"] = values.mean()
            if name != "full_accuracy":
                row[f"{name}_std"] = values.std()  # numpy's default ddof=0: the population std, 0 for one seed
        curves = _heuristic_curves(members, seed_key)
        for variant in ("firstk", "randomk"):  # the heuristics' accuracy at this setting's FLOPs, interpolated
            row[f"{variant}_at_flops"] = float("nan") if curves is None else _at(curves, variant, row["flops_mean"])
        rows.append(row)
    # ties in FLOPs by accuracy, so the line joining the settings never runs backwards
    table = pd.DataFrame(rows).sort_values(["flops_mean", "accuracy_mean"], kind="stable").reset_index(drop=True)
    table["pareto"] = _pareto(table["accuracy_mean"].to_numpy(), table["flops_mean"].to_numpy())
    return table


def _at(curves: pd.DataFrame, variant: str, flops: float) -> float:
    """``variant``'s accuracy at ``flops`` on its per-k curve, linear between neighbouring k (NaN outside it)."""
    c = curves.sort_values(f"{variant}_flops")
    return float(np.interp(flops, c[f"{variant}_flops"], c[f"{variant}_accuracy"], left=np.nan, right=np.nan))


def reference_points(experiments: list[Experiment]) -> list[tuple[str, float, float]]:
    """(label, accuracy, FLOPs) of the published points whose dataset and depth match an experiment's; an
    empty list when none does (every Fashion-MNIST sweep)."""
    points = []
    for source, depth in sorted({(e.source, e.depth) for e in experiments}):
        for variant, (acc, flops) in PAPER.get((source, depth), {}).items():
            what = "BlockDrop" if variant == "blockdrop" else "full"
            points.append((f"paper (authors' README): {what} ResNet-{depth}", acc, flops))
    return points


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _series(table: pd.DataFrame, keys: list[str]) -> tuple[str | None, list[str]]:
    """The grid key each BlockDrop line runs along (the first that varies, in grid order) and the keys that
    split the settings into lines (the others that vary): a penalty x policy_pool sweep draws one line per
    pool, its points joined in order of FLOPs and labelled by their penalty."""
    varying = [k for k in keys if table[k].astype(str).nunique() > 1]
    return (varying[0] if varying else None), varying[1:]


def _heuristic_curves(members: list[Experiment], seed_key: str) -> pd.DataFrame | None:
    """Per-k mean and std over backbones (same depth, different seeds) of the FirstK/RandomK tables; the
    experiments that share one backbone (a penalty sweep) have identical tables, so they are averaged first."""
    by_seed: dict = {}
    for e in members:
        if e.heuristics is not None and len(e.heuristics):
            by_seed.setdefault(e.params.get(seed_key), []).append(e.heuristics)
    if not by_seed:
        return None
    backbones = [pd.concat(tables).groupby("k").mean() for tables in by_seed.values()]
    joined = pd.concat(backbones).groupby("k")
    return joined.mean().join(joined.std(ddof=0), rsuffix="_std").reset_index()


SERIES_COLORS = (VARIANT_COLORS["blockdrop"], "#9467bd", "#8c564b", "#e377c2", "#ff7f0e", "#17becf")
SERIES_MARKERS = ("o", "s", "^", "D", "v", "P")


def _draw_blockdrop(ax, table: pd.DataFrame, keys: list[str]) -> None:
    along, split = _series(table, keys)
    groups = list(table.groupby(split, sort=True)) if split else [((), table)]
    many = len(table) > 8
    for i, (values, rows) in enumerate(groups):
        values = values if isinstance(values, tuple) else (values,)
        name = ", ".join(f"{_short(k)} {_fmt(v)}" for k, v in zip(split, values, strict=True))
        color, marker = SERIES_COLORS[i % len(SERIES_COLORS)], SERIES_MARKERS[i % len(SERIES_MARKERS)]
        x, y = rows["flops_mean"] / 1e9, 100 * rows["accuracy_mean"]  # rows stay in FLOPs order (the table's)
        ax.errorbar(x, y, xerr=rows["flops_std"] / 1e9, yerr=100 * rows["accuracy_std"], fmt="-" + marker,
                    ms=5 if many else 6, lw=1.2, capsize=3, elinewidth=0.8, color=color, alpha=0.85, zorder=3,
                    label=f"BlockDrop{', ' + name if name else ''} (mean ± std over seeds)")
        if along is None:
            continue
        # labels up-left and down-right of the points in turn, so neighbours along the line do not collide
        for j, (xi, yi, v) in enumerate(zip(x, y, rows[along], strict=True)):
            dx, dy, ha = (-7, 5, "right") if j % 2 == 0 else (7, -12, "left")
            text = _fmt(v) if many else f"{_short(along)} {_fmt(v)}"
            ax.annotate(text, (xi, yi), xytext=(dx, dy), textcoords="offset points", ha=ha,
                        fontsize=8 if many else 9, color=color, zorder=6)
    front = table[table["pareto"]]
    ax.plot(front["flops_mean"] / 1e9, 100 * front["accuracy_mean"], "o:", ms=9 if many else 12, mfc="none",
            mec="black", mew=1.2, color="black", lw=1, label="Pareto front of the settings", zorder=4)


def _draw_backbones(ax, experiments: list[Experiment], seed_key: str) -> None:
    groups: dict[tuple[str, int], list[Experiment]] = {}
    for e in experiments:
        groups.setdefault((e.source, e.depth), []).append(e)
    sources = {s for s, _ in groups}
    for i, ((source, depth), members) in enumerate(sorted(groups.items())):
        name_of = f"ResNet-{depth}" + (f" {source}" if len(sources) > 1 else "")
        tag = f" {name_of}" if len(groups) > 1 else ""  # one backbone: the legend need not repeat it
        curves = _heuristic_curves(members, seed_key)
        for variant, style in (("firstk", "-"), ("randomk", "--")):
            name, color = ("FirstK" if variant == "firstk" else "RandomK"), VARIANT_COLORS[variant]
            if curves is not None:
                gx, acc = curves[f"{variant}_flops"] / 1e9, 100 * curves[f"{variant}_accuracy"]
                spread = 100 * curves[f"{variant}_accuracy_std"]
                ax.plot(gx, acc, style, marker=".", color=color, lw=1.2, label=f"{name}{tag} (k = 1..K)")
                ax.fill_between(gx, acc - spread, acc + spread, color=color, alpha=0.15, lw=0)
            else:  # no per-k table: each experiment's single point, at its BlockDrop's mean k
                gx = np.array([_value(e.metrics, variant, "flops_mean") for e in members]) / 1e9
                acc = 100 * np.array([_value(e.metrics, variant, "accuracy") for e in members])
                ax.plot(gx, acc, "x", ms=7, mew=1.5, ls="none", color=color, label=f"{name}{tag} (k = BlockDrop's)")
        _draw_full_networks(ax, members, seed_key, f"Full {name_of}", x_at=lambda flops: flops / 1e9,
                            marker=lambda j, _, i=i: DEPTH_MARKERS[(i + j) % 6])


def _draw_full_networks(ax, members: list[Experiment], seed_key: str, name: str, x_at: Callable[[float], float],
                        marker: Callable[[int, str], str], suffix: str = "") -> None:
    """The pretrained full network and (experiments that evaluated it) the one trained as BlockDrop's backbone,
    mean ± std over seeds at ``x_at(its FLOPs)``, each with a line at the accuracy BlockDrop has to keep: one
    marker (``marker(j, variant)`` for the j-th) per network the settings were compared with (a sweep over
    finetune's budget has several)."""
    networks = [(variant, what, style, *baseline) for variant, what, style in FULL_NETWORKS
                for baseline in _baselines(members, variant, seed_key)]
    for j, (variant, what, style, label, per_seed, flops) in enumerate(networks):
        acc = 100 * np.array(list(per_seed.values()))
        ax.errorbar(x_at(flops), acc.mean(), yerr=acc.std(), fmt=marker(j, variant), ms=9, capsize=3,
                    color=VARIANT_COLORS[variant], zorder=3,
                    label=f"{name}, {what}{', ' + label if label else ''}{suffix}")
        ax.axhline(acc.mean(), color=VARIANT_COLORS[variant], ls=style, lw=0.8)


def _baselines(members: list[Experiment], variant: str, seed_key: str) -> list[tuple[str, dict, float]]:
    """The full networks of ``variant`` the settings were compared with: (label, accuracy per seed, FLOPs).

    Settings whose accuracies agree on every seed both ran share one network (a penalty sweep shares each
    seed's backbone and fair baseline, also with a setting that ran on fewer seeds); a sweep over what trains it
    (``finetune.epochs`` for the fair baseline) has one per value, labelled by the grid values that set it
    apart. Settings that did not evaluate it are left out.
    """
    groups: list[tuple[list[dict], dict, float]] = []  # (the settings' grid values, accuracy per seed, FLOPs)
    by_setting: dict[tuple, list[Experiment]] = {}
    for e in members:
        by_setting.setdefault(tuple((k, v) for k, v in e.params.items() if k != seed_key), []).append(e)
    for setting, es in by_setting.items():
        per_seed = {e.params.get(seed_key): _value(e.metrics, variant, "accuracy") for e in es}
        if any(np.isnan(v) for v in per_seed.values()):
            continue
        same = [g for g in groups if all(g[1][k] == v for k, v in per_seed.items() if k in g[1])
                and per_seed.keys() & g[1].keys()]
        if same:
            same[0][0].append(dict(setting))
            same[0][1].update(per_seed)
        else:
            groups.append(([dict(setting)], dict(per_seed), _value(es[0].metrics, variant, "flops_mean")))
    # what each group's settings share, and of that, the keys whose values tell the groups apart
    shared = [{k: v for k, v in settings[0].items() if all(str(s.get(k)) == str(v) for s in settings)}
              for settings, _, _ in groups]
    apart = [k for k in dict.fromkeys(k for c in shared for k in c) if len({str(c.get(k)) for c in shared}) > 1]
    return [(", ".join(f"{_short(k)} {_fmt(c[k])}" for k in apart if k in c), per_seed, flops)
            for c, (_, per_seed, flops) in zip(shared, groups, strict=True)]


def _grid_keys(experiments: list[Experiment], table: pd.DataFrame) -> list[str]:
    """The params keys that are columns of the settings table, in the grid's order."""
    return [k for k in dict.fromkeys(k for e in experiments for k in e.params) if k in table.columns]


@styled
def tradeoff_figure(experiments: list[Experiment], path: str | Path, title: str = "Accuracy against compute "
                    "across the sweep", dpi: int = 150, seed_key: str = "seed") -> Path:
    """Accuracy (%) against GFLOPs per image: BlockDrop per setting (joined in order of FLOPs, Pareto front
    ringed), FirstK/RandomK curves and the full backbone per depth (pretrained, and trained as BlockDrop's backbone
    where the experiments evaluated it), and the published points that match."""
    table = settings_table(experiments, seed_key)
    keys = _grid_keys(experiments, table)
    fig = Figure(figsize=(11, 6), layout="constrained")
    ax = fig.add_subplot()
    _draw_blockdrop(ax, table, keys)
    _draw_backbones(ax, experiments, seed_key)
    references = reference_points(experiments)
    for label, acc, flops in references:
        ax.plot(flops / 1e9, 100 * acc, "*", ms=14, mec="black", mfc="gold" if "BlockDrop" in label else "white",
                label=label, zorder=5)
    ax.set_xlabel("FLOPs per test image (GFLOPs, mean)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.set_xlim(left=0)
    # the heuristics fall to chance at small k: keep the y range on the sweep, let their curves leave below
    ours = 100 * np.concatenate([table["accuracy_mean"], table["full_accuracy_mean"], [a for _, a, _ in references]])
    lo, hi = np.nanmin(ours), np.nanmax(ours)
    ax.set_ylim(max(0.0, lo - max(10.0, 1.5 * (hi - lo))), min(100.0, hi + max(2.0, 0.3 * (hi - lo))))
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()  # matplotlib lists error-bar artists last: BlockDrop first
    order = sorted(range(len(labels)), key=lambda i: (not labels[i].startswith("BlockDrop"), i))
    fig.legend([handles[i] for i in order], [labels[i] for i in order], loc="outside right upper", fontsize=8)
    return save_figure(fig, path, dpi)


@styled
def speedup_figure(experiments: list[Experiment], path: str | Path, title: str = "Accuracy against measured "
                   "speed across the sweep", dpi: int = 150, seed_key: str = "seed") -> Path:
    """Accuracy (%) against the measured speedup at batch 1 over the pretrained full backbone (the evaluate
    stage's ``speedup.measured_batch1``), mean ± std over seeds per setting, each labelled by the grid values
    that differ; the full networks at 1x. The FLOPs figure shows what a setting saves on paper, this one what
    the machine that ran the sweep gave (a cost-aware reward can differ on one and not the other)."""
    table = settings_table(experiments, seed_key)
    differ = [k for k in _grid_keys(experiments, table) if table[k].astype(str).nunique() > 1]
    fig = Figure(figsize=(11, 6), layout="constrained")
    ax = fig.add_subplot()
    ax.errorbar(table["speedup_measured_mean"], 100 * table["accuracy_mean"], xerr=table["speedup_measured_std"],
                yerr=100 * table["accuracy_std"], fmt="o", ms=6, capsize=3, elinewidth=0.8, zorder=3,
                color=SERIES_COLORS[0], label="BlockDrop (mean ± std over seeds)")
    # each label right of its point, above and below in turn along the speedup, so close settings stay apart
    for j, values in enumerate(sorted(table.to_dict("records"), key=lambda r: r["speedup_measured_mean"])):
        text = ", ".join(f"{_short(k)} {_fmt(values[k])}" for k in differ)
        ax.annotate(text, (values["speedup_measured_mean"], 100 * values["accuracy_mean"]), fontsize=9,
                    xytext=(7, 5 if j % 2 == 0 else -12), textcoords="offset points", color=SERIES_COLORS[0])
    _draw_full_networks(ax, experiments, seed_key, "Full", x_at=lambda _: 1.0,
                        marker=lambda _, variant: "s" if variant == "full" else "D", suffix=" (1x)")
    ax.set_xlabel("measured speedup at batch 1 over the pretrained full network (evaluate stage, x)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    fastest = float(np.nanmax(table["speedup_measured_mean"] + table["speedup_measured_std"]))
    ax.set_xlim(min(0.9, float(np.nanmin(table["speedup_measured_mean"])) - 0.1), max(1.1, fastest + 0.15))
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8)
    return save_figure(fig, path, dpi)
