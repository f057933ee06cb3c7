"""The analysis figures, drawn with matplotlib's object API on the Agg canvas (no pyplot, no display).

Every function takes plain arrays / DataFrames, writes one PNG and returns its path. Sizes are chosen so
the text is at least 9 pt at the saved resolution; the four evaluated variants keep one colour each.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before anything could pick an interactive backend

import numpy as np
import pandas as pd
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize, to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator

from blockdrop.analysis.style import VARIANT_COLORS, VARIANT_LABELS, VARIANTS, save_figure, styled

__all__ = [
    "VARIANT_COLORS",
    "VARIANT_LABELS",
    "accuracy_flops",
    "block_usage_heatmap",
    "blocks_per_class",
    "difficulty_scatter",
    "extreme_images",
    "montage",
    "policies_by_class",
    "policy_embedding",
    "top_policies",
    "training_curves",
]

ON_COLOR, OFF_COLOR = "#1f6fb4", "#e3e3e3"
TRAIN_COLOR, VAL_COLOR, EXTRA_COLOR = "#1f77b4", "#ff7f0e", "#7f7f7f"


def _class_colors(n: int) -> list:
    if n <= 10:
        return [matplotlib.colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [matplotlib.colormaps["tab20"](i) for i in range(n)]
    return [matplotlib.colormaps["turbo"](i / max(1, n - 1)) for i in range(n)]


def montage(images: np.ndarray, slots: int | None = None, gap: int = 2) -> np.ndarray:
    """(n, C, H, W) uint8 -> one RGB row (H, slots*W + gaps, 3) in [0, 1]; empty slots stay white."""
    n, c, h, w = images.shape
    slots = max(slots or n, 1)
    out = np.ones((h, slots * w + (slots - 1) * gap, 3))
    for i, img in enumerate(images[:slots]):
        rgb = img.astype(float).transpose(1, 2, 0) / 255.0
        out[:, i * (w + gap): i * (w + gap) + w] = np.repeat(rgb, 3, axis=2) if c == 1 else rgb[..., :3]
    return out


def _tick_step(k: int, width_pt: float) -> int:
    for step in (1, 2, 3, 5, 6, 9, 10, 15, 20, 25, 50):
        if math.ceil(k / step) * 16 <= width_pt:
            return step
    return max(1, k // 4)


def _draw_policy(ax, policy: str) -> None:
    """A row of squares, one per block: filled when the block runs; labelled with the block number."""
    k = len(policy)
    for t, bit in enumerate(policy):
        ax.add_patch(Rectangle((t + 0.06, 0.08), 0.88, 0.84, color=ON_COLOR if bit == "1" else OFF_COLOR, lw=0))
    ax.set_xlim(0, k)
    ax.set_ylim(0, 1)
    width_pt = ax.get_position().width * ax.figure.get_figwidth() * 72
    step = _tick_step(k, width_pt)
    ticks = [t for t in range(k) if (t + 1) % step == 0 or t == 0]
    ax.set_xticks([t + 0.5 for t in ticks], [str(t + 1) for t in ticks])
    ax.set_yticks([])
    ax.tick_params(axis="x", length=0, pad=1)
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)


class _Grid:
    """Panels of fixed size in inches: a title line, an image montage, then the policy strip under it."""

    TITLE, GAP, TICKS, PAD = 0.30, 0.05, 0.22, 0.18

    def __init__(self, rows: int, cols: int, panel_w: float, image_hw: tuple[int, int], slots: int, k: int,
                 top: float = 0.75, bottom: float = 0.45, left: float = 0.3, right: float = 0.3, hgap: float = 0.4):
        h, w = image_hw
        self.panel_w, self.left, self.hgap, self.top = panel_w, left, hgap, top
        self.montage_h = panel_w * h / (slots * w + (slots - 1) * 2)
        self.strip_h = min(0.32, max(0.12, panel_w / k))
        self.panel_h = self.TITLE + self.montage_h + self.GAP + self.strip_h + self.TICKS + self.PAD
        self.width = left + cols * panel_w + (cols - 1) * hgap + right
        self.height = top + rows * self.panel_h + bottom

    def axes(self, fig: Figure, row: int, col: int):
        x = self.left + col * (self.panel_w + self.hgap)
        y_top = self.height - self.top - row * self.panel_h - self.TITLE
        W, H = self.width, self.height
        img = fig.add_axes((x / W, (y_top - self.montage_h) / H, self.panel_w / W, self.montage_h / H))
        strip_y = y_top - self.montage_h - self.GAP - self.strip_h
        strip = fig.add_axes((x / W, strip_y / H, self.panel_w / W, self.strip_h / H))
        return img, strip


def _panel(img_ax, strip_ax, images: np.ndarray, slots: int, policy: str, title: str) -> None:
    img_ax.imshow(montage(images, slots), interpolation="nearest", aspect="auto")
    img_ax.set_axis_off()
    img_ax.set_title(title, loc="left", fontsize=10, pad=4)
    _draw_policy(strip_ax, policy)


def _legend_blocks(fig: Figure, y: float) -> None:
    fig.legend(handles=[Patch(color=ON_COLOR, label="block runs"), Patch(color=OFF_COLOR, label="block skipped")],
               loc="lower center", bbox_to_anchor=(0.5, y), ncol=2, frameon=False, fontsize=10)


def _sample(indices: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(indices, n, replace=False)) if len(indices) > n else np.asarray(indices)


@styled
def top_policies(per_image: pd.DataFrame, groups: pd.DataFrame, images: np.ndarray, path: str | Path,
                 n: int = 8, samples: int = 8, seed: int = 0, dpi: int = 150) -> Path:
    """The ``n`` most frequent policies over the whole test set, each with up to ``samples`` images."""
    rng = np.random.default_rng(seed)
    top = groups.head(n)
    k = len(top["policy"].iloc[0])
    cols = 2 if len(top) > 1 else 1
    grid = _Grid(math.ceil(len(top) / cols), cols, 5.2, images.shape[2:], samples, k)
    fig = Figure(figsize=(grid.width, grid.height))
    by_policy = per_image.groupby("policy")["index"].apply(np.asarray)
    for i, row in enumerate(top.itertuples()):
        img_ax, strip_ax = grid.axes(fig, i // cols, i % cols)
        chosen = _sample(by_policy[row.policy], samples, rng)
        title = (f"#{row.rank}: {row.count} images ({row.share:.1%}), {row.blocks}/{k} blocks, "
                 f"{row.accuracy:.0%} correct")
        _panel(img_ax, strip_ax, images[chosen], samples, row.policy, title)
    head = "The most frequent BlockDrop policy" if len(top) == 1 else f"The {len(top)} most frequent BlockDrop policies"
    sep = "\n" if cols == 1 else " "
    fig.suptitle(f"{head}{sep}on {len(per_image)} test images ({len(groups)} distinct)", y=1 - 0.12 / grid.height,
                 va="top")
    _legend_blocks(fig, 0.1 / grid.height)
    return save_figure(fig, path, dpi)


@styled
def policies_by_class(per_image: pd.DataFrame, per_class: pd.DataFrame, images: np.ndarray,
                      classes: Sequence[str], path: str | Path, samples: int = 8, seed: int = 0,
                      dpi: int = 150) -> Path:
    """One row per class (of those in ``per_class``): its most frequent policies with sample images."""
    rng = np.random.default_rng(seed)
    labels = sorted(per_class["label"].unique())
    cols = int(per_class["rank"].max())
    k = len(per_class["policy"].iloc[0])
    grid = _Grid(len(labels), cols, 4.6, images.shape[2:], samples, k)
    fig = Figure(figsize=(grid.width, grid.height))
    for r, label in enumerate(labels):
        part = per_image[per_image["label"] == label]
        name = classes[label] if 0 <= label < len(classes) else str(label)
        for row in per_class[per_class["label"] == label].itertuples():
            img_ax, strip_ax = grid.axes(fig, r, row.rank - 1)
            chosen = _sample(part.loc[part["policy"] == row.policy, "index"].to_numpy(), samples, rng)
            title = f"{name} #{row.rank}: {row.count} images ({row.share:.1%}), {row.blocks}/{k} blocks"
            _panel(img_ax, strip_ax, images[chosen], samples, row.policy, title)
    head = "Each class's most frequent policy" if cols == 1 else f"Each class's {cols} most frequent policies"
    sep = "\n" if cols == 1 else " "
    fig.suptitle(f"{head}{sep}(share = of the class's test images)", y=1 - 0.12 / grid.height, va="top")
    _legend_blocks(fig, 0.1 / grid.height)
    return save_figure(fig, path, dpi)


@styled
def blocks_per_class(per_image: pd.DataFrame, classes: Sequence[str], num_blocks: int, path: str | Path,
                     dpi: int = 150) -> Path:
    """Box plot of the blocks executed per image, one box per class, the mean marked."""
    labels = sorted(per_image["label"].unique())
    data = [per_image.loc[per_image["label"] == c, "blocks"].to_numpy() for c in labels]
    names = [classes[c] if 0 <= c < len(classes) else str(c) for c in labels]
    many = len(labels) > 20
    fig = Figure(figsize=(min(24.0, max(7.0, (0.22 if many else 0.75) * len(labels) + 2)), 5.6 if many else 4.8),
                 layout="constrained")
    ax = fig.add_subplot()
    colors = _class_colors(len(classes))
    boxes = ax.boxplot(data, tick_labels=names, patch_artist=True, showmeans=True, widths=0.6,
                       medianprops={"color": "black"},
                       meanprops={"marker": "D", "markerfacecolor": "white", "markeredgecolor": "black",
                                  "markersize": 5},
                       flierprops={"marker": ".", "markersize": 3, "alpha": 0.4})
    for patch, c in zip(boxes["boxes"], labels, strict=True):
        patch.set_facecolor((*to_rgb(colors[c % len(colors)]), 0.55))
    overall = per_image["blocks"].mean()
    ax.axhline(overall, color=VARIANT_COLORS["blockdrop"], ls="--", lw=1,
               label=f"all images: mean {overall:.2f}")
    ax.set_ylabel(f"blocks executed per image (of {num_blocks})")
    ax.set_xlabel("class")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(-0.5, num_blocks + 0.5)
    if many:
        ax.tick_params(axis="x", labelrotation=90)
    elif len(labels) > 6:
        ax.tick_params(axis="x", labelrotation=30)
        for t in ax.get_xticklabels():
            t.set_horizontalalignment("right")
    ax.legend(loc="lower right", handles=[*ax.get_legend_handles_labels()[0],
                                          boxes["means"][0]], labels=[f"all images: mean {overall:.2f}",
                                                                      "class mean"])
    ax.set_title("Blocks executed per test image, by class (box: quartiles, whiskers: 1.5 IQR)")
    return save_figure(fig, path, dpi)


@styled
def block_usage_heatmap(usage: np.ndarray, classes: Sequence[str], path: str | Path, dpi: int = 150) -> Path:
    """(classes, K) fraction of each class's images that run block t, with a colour bar."""
    n, k = usage.shape
    fig = Figure(figsize=(min(16.0, max(7.0, 0.45 * k + 3.5)), max(3.5, (0.38 if n <= 20 else 0.17) * n + 1.8)),
                 layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(usage, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    step = _tick_step(k, ax.get_position().width * fig.get_figwidth() * 72 * 0.9)
    ticks = [t for t in range(k) if (t + 1) % step == 0 or t == 0]
    ax.set_xticks(ticks, [str(t + 1) for t in ticks])
    ax.set_yticks(range(n), list(classes[:n]))
    ax.set_xlabel("residual block (1 = nearest the input)")
    ax.set_ylabel("class")
    if k <= 24 and n <= 20:
        for c in range(n):
            for t in range(k):
                v = usage[c, t]
                if np.isfinite(v):
                    ax.text(t, c, f"{100 * v:.0f}", ha="center", va="center", fontsize=9,
                            color="black" if v > 0.6 else "white")
    for side in ("top", "right"):
        ax.spines[side].set_visible(True)
    bar = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02)
    bar.set_label("fraction of the class's images that run the block")
    ax.set_title("Block usage by class" + (" (numbers: % of images)" if k <= 24 and n <= 20 else ""))
    return save_figure(fig, path, dpi)


@styled
def difficulty_scatter(per_image: pd.DataFrame, num_blocks: int, rho_confidence: float | None,
                       rho_loss: float | None, path: str | Path, seed: int = 0, max_points: int = 5000,
                       dpi: int = 150) -> Path:
    """Blocks executed against the full network's confidence in the true class and its loss."""
    rng = np.random.default_rng(seed)
    shown = per_image.iloc[_sample(np.arange(len(per_image)), max_points, rng)]
    x = shown["blocks"].to_numpy() + rng.uniform(-0.3, 0.3, len(shown))
    ok = shown["correct"].astype(bool).to_numpy()
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    axes = fig.subplots(1, 2)
    columns = (("full_confidence", "full network's probability of the true class", rho_confidence, False),
               ("full_loss", "full network's cross-entropy loss (log scale)", rho_loss, True))
    for ax, (col, label, rho, log) in zip(axes, columns, strict=True):
        y = shown[col].to_numpy(dtype=float)
        if log:
            y = np.clip(y, 1e-4, None)
        ax.scatter(x[ok], y[ok], s=5, alpha=0.3, color="#1f77b4", lw=0, label="BlockDrop correct")
        ax.scatter(x[~ok], y[~ok], s=9, alpha=0.6, color="#d62728", lw=0, label="BlockDrop wrong")
        med = per_image.groupby("blocks")[col].median()
        ax.plot(med.index, np.clip(med.to_numpy(), 1e-4, None) if log else med.to_numpy(), "k-o", ms=4, lw=1.5,
                label="median per block count")
        if log:
            ax.set_yscale("log")
        ax.set_xlabel(f"blocks executed by BlockDrop (of {num_blocks}; jittered)")
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        rho_text = "undefined" if rho is None else f"{rho:+.3f}"
        ax.set_title(f"Spearman ρ(blocks, {col.replace('full_', '')}) = {rho_text}")
        ax.legend(loc="best", markerscale=2)
    fig.suptitle(f"Difficulty against compute ({len(shown)} of {len(per_image)} test images shown)")
    return save_figure(fig, path, dpi)


@styled
def extreme_images(per_image: pd.DataFrame, images: np.ndarray, classes: Sequence[str], path: str | Path,
                   n: int = 12, dpi: int = 150) -> Path:
    """The ``n`` images with the fewest blocks (ties: most confident first) and with the most (ties:
    least confident first); a red caption marks a wrong BlockDrop prediction."""
    fewest = per_image.sort_values(["blocks", "full_confidence", "index"], ascending=[True, False, True]).head(n)
    most = per_image.sort_values(["blocks", "full_confidence", "index"], ascending=[False, True, True]).head(n)
    cols = max(len(fewest), 1)
    fig = Figure(figsize=(1.15 * cols + 1.4, 3.9), layout="constrained")
    axes = np.atleast_2d(fig.subplots(2, cols, squeeze=False))
    for r, (rows, name) in enumerate(((fewest, "fewest blocks"), (most, "most blocks"))):
        for ax in axes[r]:
            ax.set_axis_off()
        for ax, row in zip(axes[r], rows.itertuples(), strict=False):
            img = images[row.index]
            ax.imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=255,
                      interpolation="nearest")
            label = classes[row.label] if 0 <= row.label < len(classes) else str(row.label)
            ax.set_title(f"{label}\n{row.blocks} blocks", fontsize=9, color="black" if row.correct else "#d62728")
        axes[r][0].text(-0.15, 0.5, name, transform=axes[r][0].transAxes, rotation=90, ha="right", va="center",
                        fontsize=10, fontweight="bold")
    fig.suptitle("Test images using the fewest and the most blocks (red caption: BlockDrop's prediction is wrong)")
    return save_figure(fig, path, dpi)


@styled
def policy_embedding(coords: np.ndarray, labels: np.ndarray, classes: Sequence[str], description: str,
                     path: str | Path, seed: int = 0, dpi: int = 150) -> Path:
    """2-D embedding of the policy vectors, one colour per class (points jittered: many coincide)."""
    rng = np.random.default_rng(seed)
    span = np.ptp(coords, axis=0) if len(coords) else np.ones(2)
    jitter = rng.normal(0, 0.015, coords.shape) * np.where(span > 0, span, 1.0)
    xy = coords + jitter
    fig = Figure(figsize=(9, 6.2), layout="constrained")
    ax = fig.add_subplot()
    colors = _class_colors(len(classes))
    for c in sorted(np.unique(labels)):
        sel = labels == c
        ax.scatter(xy[sel, 0], xy[sel, 1], s=9, alpha=0.55, lw=0, color=colors[c % len(colors)],
                   label=classes[c] if 0 <= c < len(classes) else str(c))
    ax.set_xlabel("component 1")
    ax.set_ylabel("component 2")
    ax.set_title(f"{description}\n{len(coords)} test images, coloured by class, jittered")
    if len(classes) <= 20:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), markerscale=2.5, frameon=False, title="class")
    else:  # a legend of 100 names is unreadable: a colour bar of the class index instead
        mappable = ScalarMappable(Normalize(0, len(classes) - 1), "turbo")
        fig.colorbar(mappable, ax=ax, label="class index")
    return save_figure(fig, path, dpi)


def _curve(ax, history: pd.DataFrame, column: str, label: str, color: str, scale: float = 1.0, ls: str = "-"):
    if column in history.columns and history[column].notna().any():
        ax.plot(history["epoch"], history[column] * scale, ls, marker="o", ms=3.5, color=color, label=label)
        return True
    return False


@styled
def training_curves(histories: dict[str, pd.DataFrame | None], num_blocks: int | None, path: str | Path,
                    dpi: int = 150) -> Path:
    """Per-epoch curves of pretraining, curriculum and finetuning: objective, accuracy, blocks."""
    stages = (("pretrain", "Pretraining (backbone)"), ("curriculum", "Curriculum (policy)"),
              ("finetune", "Joint finetuning"))
    rows = (("objective", "loss / reward"), ("accuracy", "accuracy (%)"), ("blocks", "blocks executed"))
    fig = Figure(figsize=(13, 9.5), layout="constrained")
    axes = fig.subplots(3, 3, sharex="col")
    for col, (name, title) in enumerate(stages):
        h = histories.get(name)
        axes[0, col].set_title(title)
        for r, (_, ylabel) in enumerate(rows):
            ax = axes[r, col]
            if col == 0 or (h is None or h.empty):
                ax.set_ylabel(ylabel)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if h is None or h.empty:
                ax.text(0.5, 0.5, "no history", ha="center", va="center", transform=ax.transAxes, color="gray")
                continue
            drawn = False
            if r == 0:
                drawn |= _curve(ax, h, "train/loss", "train loss", TRAIN_COLOR) if name == "pretrain" else False
                drawn |= _curve(ax, h, "train/reward", "train reward", TRAIN_COLOR)
                drawn |= _curve(ax, h, "val/reward", "val reward", VAL_COLOR)
                if name == "finetune":
                    drawn |= _curve(ax, h, "train/loss", "train loss", EXTRA_COLOR, ls="--")
            elif r == 1:
                drawn |= _curve(ax, h, "train/accuracy", "train", TRAIN_COLOR, 100)
                drawn |= _curve(ax, h, "val/accuracy", "val", VAL_COLOR, 100)
            else:
                if name == "pretrain" and num_blocks:
                    ax.text(0.5, 0.5, f"every image runs all {num_blocks} blocks", ha="center", va="center",
                            transform=ax.transAxes, color="gray")
                drawn |= _curve(ax, h, "train/blocks", "train (sampled)", TRAIN_COLOR)
                drawn |= _curve(ax, h, "val/blocks_mean", "val (greedy)", VAL_COLOR)
                drawn |= _curve(ax, h, "unlocked_blocks", "blocks the policy may drop", EXTRA_COLOR, ls="--")
                if num_blocks and drawn:
                    ax.set_ylim(0, num_blocks + 0.5)
            if drawn:
                ax.legend(loc="best")
            elif name == "pretrain" and r == 2:
                ax.set_yticks([])
            else:
                ax.set_axis_off()
        axes[2, col].set_xlabel("epoch")
        if h is not None and len(h) == 1:  # one epoch: a single point, centred, with an integer tick
            epoch = int(h["epoch"].iloc[0])
            axes[2, col].set_xlim(epoch - 1, epoch + 1)
            axes[2, col].set_xticks([epoch])
    fig.suptitle("Training curves of every stage (per epoch)")
    return save_figure(fig, path, dpi)


@styled
def accuracy_flops(points: pd.DataFrame, path: str | Path, dpi: int = 150) -> Path:
    """Accuracy against mean FLOPs per image for the variants (error bars: FLOPs std). The two full networks
    share their FLOPs: the more accurate one is labelled above its point, the other below."""
    fig = Figure(figsize=(8, 5.4), layout="constrained")
    ax = fig.add_subplot()
    rows = {r.variant: r for r in points.itertuples()}
    heuristics = sorted((v for v in ("firstk", "randomk") if v in rows), key=lambda v: rows[v].accuracy)
    offsets = {"full": (-10, -18, "right"), "full_finetuned": (-10, 10, "right"), "blockdrop": (0, 12, "center")}
    if {"full", "full_finetuned"} <= set(rows) and rows["full"].accuracy > rows["full_finetuned"].accuracy:
        offsets["full"], offsets["full_finetuned"] = offsets["full_finetuned"], offsets["full"]
    short = {"full": "Full, pretrained", "full_finetuned": "Full, trained as BlockDrop's"}  # the legend has it all
    for i, v in enumerate(heuristics):
        offsets[v] = (12, -14 if i == 0 and len(heuristics) == 2 else 2, "left")
    for v in VARIANTS:
        if v not in rows:
            continue
        r = rows[v]
        x, y = r.flops / 1e6, 100 * r.accuracy
        ax.errorbar(x, y, xerr=getattr(r, "flops_std", 0) / 1e6, fmt="s" if v == "full_finetuned" else "o", ms=9,
                    capsize=4, color=VARIANT_COLORS[v], label=VARIANT_LABELS[v])
        dx, dy, ha = offsets[v]
        text = f"{short[v]}: {y:.1f}%" if v in short else f"{VARIANT_LABELS[v]}: {y:.1f}%, {r.blocks_mean:.1f} blocks"
        ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, fontsize=10,
                    color=VARIANT_COLORS[v])
    for v, style in (("full", ":"), ("full_finetuned", "-.")):
        if v in rows:
            ax.axhline(100 * rows[v].accuracy, color=VARIANT_COLORS[v], ls=style, lw=1)
    lo, hi = 100 * points["accuracy"].min(), 100 * points["accuracy"].max()
    ax.set_ylim(max(0, lo - 0.12 * (hi - lo) - 2), min(100, hi + 0.15 * (hi - lo) + 2))
    xmax = (points["flops"] + points.get("flops_std", 0)).max() / 1e6
    ax.set_xlim(0, 1.12 * xmax)
    ax.set_xlabel("FLOPs per test image (MFLOPs, mean; bars: ±1 std)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy against compute: BlockDrop and dropping without learning")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return save_figure(fig, path, dpi)


@styled
def flops_saved_histogram(per_image: pd.DataFrame, summary: dict[str, float], path: str | Path, dpi: int = 150
                          ) -> Path:
    """How much of the full backbone's FLOPs each test image saves under BlockDrop (policy network paid)."""
    fig = Figure(figsize=(8, 4.6), layout="constrained")
    ax = fig.add_subplot()
    saved = 100 * per_image["flops_saved"].to_numpy()
    ax.hist(saved, bins=40, color=VARIANT_COLORS["blockdrop"], alpha=0.85)
    for key, ls in (("mean", "-"), ("p5", ":"), ("p95", ":")):
        ax.axvline(100 * summary[key], color="#222", ls=ls, lw=1.2)
    ax.set_xlabel("FLOPs saved against the full backbone (% of its FLOPs, per test image)")
    ax.set_ylabel("test images")
    ax.set_title(f"Per-image savings: mean {100 * summary['mean']:.1f}% (line), 5th-95th percentile "
                 f"{100 * summary['p5']:.1f}-{100 * summary['p95']:.1f}% (dotted), max {100 * summary['max']:.1f}%")
    ax.grid(alpha=0.3)
    return save_figure(fig, path, dpi)
