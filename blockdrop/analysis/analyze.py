"""The analyze stage's work, callable from a test: numbers, tables and every figure under one folder.

Inputs are the evaluate stage's per-image table and metrics, the test images, and (optional) the
per-epoch histories of the training stages; outputs (``out_dir`` = ``reports/analyze``):

* ``metrics.json``: ``policies``, ``blocks``, ``difficulty``, ``purity`` (see :func:`analysis_metrics`);
* ``top_policies.csv``: the most frequent policies overall and per class;
* ``block_usage.csv``: per class, the fraction of its images that run each block;
* ``accuracy_flops.csv``: one point per variant (variant, flops, accuracy, ...) for a DVC plot;
* ``figures/*.png``: the figures of :data:`FIGURES` (the per-class montage is split in pages of
  ``CLASSES_PER_PAGE`` classes: ``policies_by_class.png``, ``policies_by_class_2.png``, ...).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from blockdrop.analysis import figures, policies
from blockdrop.config import Analyze
from blockdrop.files import atomic_write_text, write_json

__all__ = ["CLASSES_PER_PAGE", "FIGURES", "accuracy_flops_table", "read_history", "run_analysis"]

log = logging.getLogger("blockdrop.analyze")
CLASSES_PER_PAGE = 10
# figure key -> file name; the report stage reads this to know what to embed and in which order
FIGURES = {
    "accuracy_flops": "accuracy_flops.png",
    "flops_saved": "flops_saved.png",
    "training_curves": "training_curves.png",
    "policies_top": "policies_top.png",
    "policies_by_class": "policies_by_class.png",
    "blocks_per_class": "blocks_per_class.png",
    "block_usage": "block_usage.png",
    "difficulty": "difficulty.png",
    "extremes": "extremes.png",
    "policy_embedding": "policy_embedding.png",
}
RUN_FIGURES = ("accuracy_flops", "flops_saved", "training_curves")  # need the evaluate metrics / the histories


def read_history(path: str | Path) -> pd.DataFrame | None:
    """A stage's per-epoch ``history.csv``, or None when it is missing or empty."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return None
    return frame if "epoch" in frame.columns and len(frame) else None


def accuracy_flops_table(evaluate_metrics: dict) -> pd.DataFrame:
    """One row per evaluated variant: variant, flops (mean per image), accuracy (fraction), blocks_mean,
    flops_std."""
    rows = [{"variant": v, "flops": m["flops_mean"], "accuracy": m["accuracy"], "blocks_mean": m["blocks_mean"],
             "flops_std": m.get("flops_std", 0.0)}
            for v in figures.VARIANTS if isinstance(m := evaluate_metrics.get(v), dict)]
    return pd.DataFrame(rows, columns=["variant", "flops", "accuracy", "blocks_mean", "flops_std"])


def _class_names(classes: list[str], labels: np.ndarray) -> list[str]:
    top = int(labels.max()) + 1 if len(labels) else 0
    return list(classes) + [str(i) for i in range(len(classes), top)]


def run_analysis(
    per_image: pd.DataFrame,
    images: np.ndarray,
    classes: list[str],
    settings: Analyze,
    out_dir: str | Path,
    seed: int = 0,
    evaluate_metrics: dict | None = None,
    histories: dict[str, pd.DataFrame | None] | None = None,
) -> tuple[dict, list[Path]]:
    """Write every output of the analyze stage under ``out_dir``; return the metrics and the files written.

    ``images`` is the test split as uint8 (N, C, H, W), indexed by the table's ``index`` column.
    """
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    for stale in fig_dir.glob("*.png"):  # a smaller class count must not leave old pages behind
        stale.unlink()
    if len(per_image) == 0:
        raise ValueError("the per-image table is empty: nothing to analyse")
    if per_image["index"].max() >= len(images) or per_image["index"].min() < 0:
        raise ValueError(f"per-image indices reach {per_image['index'].max()} but the test split has "
                         f"{len(images)} images: the evaluate outputs and data/prepared disagree")
    labels = per_image["label"].to_numpy()
    classes = _class_names(classes, labels)
    num_blocks = len(per_image["policy"].iloc[0])
    dpi = settings.dpi
    written: list[Path] = []

    metrics = policies.analysis_metrics(per_image, seed=seed)
    groups = policies.group_policies(per_image)
    per_class = policies.top_policies_per_class(per_image, settings.policies_per_class)
    table = policies.top_policies_table(per_image, classes, settings.top_policies, settings.policies_per_class)
    usage = policies.block_usage_by_class(per_image, len(classes))
    usage_frame = pd.DataFrame(usage, columns=[f"block_{t + 1}" for t in range(num_blocks)])
    usage_frame.insert(0, "class", classes)
    usage_frame.insert(0, "label", range(len(classes)))
    for name, frame in (("top_policies.csv", table), ("block_usage.csv", usage_frame)):
        atomic_write_text(out_dir / name, frame.to_csv(index=False, float_format="%.6g"))
        written.append(out_dir / name)

    log.info("%d images, %d distinct policies; top policy covers %.1f%%; NMI(policy, class) %.3f",
             len(per_image), metrics["policies"]["unique"], 100 * metrics["policies"]["top1_share"],
             metrics["purity"]["nmi"])
    written.append(figures.top_policies(per_image, groups, images, fig_dir / FIGURES["policies_top"],
                                        settings.top_policies, settings.samples_per_policy, seed, dpi))
    present = sorted(per_class["label"].unique())
    for page, start in enumerate(range(0, len(present), CLASSES_PER_PAGE)):
        name = FIGURES["policies_by_class"] if page == 0 else f"policies_by_class_{page + 1}.png"
        part = per_class[per_class["label"].isin(present[start: start + CLASSES_PER_PAGE])]
        written.append(figures.policies_by_class(per_image, part, images, classes, fig_dir / name,
                                                 settings.samples_per_policy, seed, dpi))
    written.append(figures.blocks_per_class(per_image, classes, num_blocks, fig_dir / FIGURES["blocks_per_class"],
                                            dpi))
    shown = sorted(set(present))
    written.append(figures.block_usage_heatmap(usage[shown], [classes[c] for c in shown],
                                               fig_dir / FIGURES["block_usage"], dpi))
    d = metrics["difficulty"]
    written.append(figures.difficulty_scatter(per_image, num_blocks, d["spearman_blocks_vs_confidence"],
                                              d["spearman_blocks_vs_loss"], fig_dir / FIGURES["difficulty"],
                                              seed, dpi=dpi))
    written.append(figures.extreme_images(per_image, images, classes, fig_dir / FIGURES["extremes"],
                                          settings.extreme_images, dpi))
    matrix = policies.policy_matrix(per_image["policy"])
    rows, coords, description = policies.embed_policies(matrix, settings.embedding, settings.embedding_points, seed)
    written.append(figures.policy_embedding(coords, labels[rows], classes, description,
                                            fig_dir / FIGURES["policy_embedding"], seed, dpi))

    # figures of the whole run
    histories = histories or {}
    written.append(figures.training_curves(histories, num_blocks, fig_dir / FIGURES["training_curves"], dpi))
    if evaluate_metrics:
        points = accuracy_flops_table(evaluate_metrics)
        atomic_write_text(out_dir / "accuracy_flops.csv", points.to_csv(index=False, float_format="%.6g"))
        written.append(out_dir / "accuracy_flops.csv")
        written.append(figures.accuracy_flops(points, fig_dir / FIGURES["accuracy_flops"], dpi))
        if "flops_saved" in per_image and "flops_saved" in evaluate_metrics.get("blockdrop", {}):
            written.append(figures.flops_saved_histogram(per_image, evaluate_metrics["blockdrop"]["flops_saved"],
                                                         fig_dir / FIGURES["flops_saved"], dpi))

    write_json(out_dir / "metrics.json", metrics)
    written.append(out_dir / "metrics.json")
    return metrics, written
