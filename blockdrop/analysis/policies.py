"""Numbers behind the qualitative analysis (paper section 4.3), on the evaluate stage's per-image table.

Pure pandas / numpy / scikit-learn: images grouped by their exact policy vector, the most frequent
policies overall and per class, how often each class runs each block, how blocks used track the full
network's difficulty (Spearman rank correlation), how well the policy separates the classes (normalised
mutual information, majority purity) and a 2-D embedding of the policy vectors.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "PER_IMAGE_COLUMNS",
    "analysis_metrics",
    "block_usage_by_class",
    "embed_policies",
    "group_policies",
    "policy_matrix",
    "policy_purity",
    "read_per_image",
    "spearman",
    "top_policies_per_class",
    "top_policies_table",
]

PER_IMAGE_COLUMNS = ("index", "label", "predicted", "correct", "blocks", "flops", "policy", "full_correct",
                     "full_confidence", "full_loss")


def read_per_image(path: str | Path) -> pd.DataFrame:
    """The evaluate stage's per-image CSV; ``policy`` stays a string ("0110..."), never an integer."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the evaluate stage first (dvc repro evaluate)")
    df = pd.read_csv(path, dtype={"policy": str})
    missing = [c for c in PER_IMAGE_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path} lacks columns {', '.join(missing)}")
    lengths = df["policy"].str.len().unique()
    if len(lengths) != 1:
        raise ValueError(f"{path}: policies of different lengths {sorted(lengths.tolist())}")
    return df


def policy_matrix(policies: pd.Series | list[str]) -> np.ndarray:
    """``["0110", ...]`` -> uint8 array (N, K) of 0/1."""
    policies = list(policies)
    if not policies:
        return np.zeros((0, 0), dtype=np.uint8)
    raw = np.frombuffer("".join(policies).encode("ascii"), dtype=np.uint8)
    return (raw.reshape(len(policies), -1) - ord("0")).astype(np.uint8)


def _groups(df: pd.DataFrame) -> pd.DataFrame:
    grouped = df.groupby("policy", sort=False).agg(count=("policy", "size"), accuracy=("correct", "mean"))
    grouped = grouped.reset_index()
    grouped["blocks"] = grouped["policy"].str.count("1")
    # most frequent first; ties broken by the policy string so the order never depends on row order
    return grouped.sort_values(["count", "policy"], ascending=[False, True], kind="stable").reset_index(drop=True)


def group_policies(df: pd.DataFrame) -> pd.DataFrame:
    """One row per distinct policy: rank (1 = most frequent), policy, blocks, count, share, accuracy."""
    grouped = _groups(df)
    grouped["share"] = grouped["count"] / len(df)
    grouped.insert(0, "rank", np.arange(1, len(grouped) + 1))
    return grouped[["rank", "policy", "blocks", "count", "share", "accuracy"]]


def top_policies_per_class(df: pd.DataFrame, n: int = 3) -> pd.DataFrame:
    """For each label, its ``n`` most frequent policies: label, rank, policy, blocks, count, share (of the
    class's images), accuracy (BlockDrop's, within the group)."""
    frames = []
    for label, part in df.groupby("label", sort=True):
        top = _groups(part).head(n).copy()
        top["share"] = top["count"] / len(part)
        top.insert(0, "rank", np.arange(1, len(top) + 1))
        top.insert(0, "label", label)
        frames.append(top)
    columns = ["label", "rank", "policy", "blocks", "count", "share", "accuracy"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def top_policies_table(df: pd.DataFrame, classes: list[str], n_overall: int = 8, n_per_class: int = 3
                       ) -> pd.DataFrame:
    """The ``top_policies.csv`` table: the most frequent policies overall (scope ``all``, label -1) then
    each class's own (scope ``class``)."""
    overall = group_policies(df).head(n_overall).copy()
    overall.insert(0, "label", -1)
    overall.insert(0, "scope", "all")
    overall.insert(2, "class", "")
    per_class = top_policies_per_class(df, n_per_class)
    per_class.insert(0, "scope", "class")
    per_class.insert(2, "class", [classes[i] if 0 <= i < len(classes) else str(i) for i in per_class["label"]])
    return pd.concat([overall, per_class], ignore_index=True)


def block_usage_by_class(df: pd.DataFrame, num_classes: int) -> np.ndarray:
    """(num_classes, K): the fraction of each class's images that run block t (NaN for an absent class)."""
    matrix = policy_matrix(df["policy"])
    labels = df["label"].to_numpy()
    usage = np.full((num_classes, matrix.shape[1]), np.nan)
    for c in range(num_classes):
        rows = matrix[labels == c]
        if len(rows):
            usage[c] = rows.mean(0)
    return usage


def spearman(x, y) -> float | None:
    """Spearman rank correlation (average ranks for ties); None when either side is constant or empty."""
    x, y = pd.Series(np.asarray(x, dtype=float)), pd.Series(np.asarray(y, dtype=float))
    keep = x.notna() & y.notna()
    rx, ry = x[keep].rank().to_numpy(), y[keep].rank().to_numpy()
    if len(rx) < 2 or rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def _majority_purity(labels: np.ndarray, groups: np.ndarray) -> float:
    counts = pd.crosstab(groups, labels)
    return float(counts.max(axis=1).sum() / len(labels))


def policy_purity(labels, policies, seed: int | None = None) -> dict[str, float]:
    """How much the policy says about the class.

    * ``nmi``: normalised mutual information between the policy id and the label (1: the policy
      determines the class and vice versa; 0: independent);
    * ``majority_purity``: the fraction of images whose class is the majority class of their policy group.

    With ``seed``, the same two numbers with the labels shuffled (``*_shuffled``): what chance alone gives
    with this many groups (singletons make purity look high).
    """
    from sklearn.metrics import normalized_mutual_info_score

    labels = np.asarray(labels)
    groups = pd.factorize(pd.Series(list(policies)))[0]
    out = {"nmi": float(normalized_mutual_info_score(labels, groups)),
           "majority_purity": _majority_purity(labels, groups)}
    if seed is not None:
        shuffled = np.random.default_rng(seed).permutation(labels)
        out["nmi_shuffled"] = float(normalized_mutual_info_score(shuffled, groups))
        out["majority_purity_shuffled"] = _majority_purity(shuffled, groups)
    return out


def embed_policies(matrix: np.ndarray, method: str = "pca", max_points: int = 2000, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray, str]:
    """A 2-D embedding of (a subsample of at most ``max_points``) policy vectors.

    Returns the row indices embedded, their (n, 2) coordinates and a one-line description (PCA: the
    variance explained). Policies are binary, so many images share a point; the figure jitters them.
    """
    n = len(matrix)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, max_points, replace=False)) if n > max_points else np.arange(n)
    x = matrix[rows].astype(float)
    if len(rows) < 3 or np.all(x.std(0) == 0):
        return rows, np.zeros((len(rows), 2)), "all policies identical"
    if method == "tsne":
        from sklearn.manifold import TSNE

        # Hamming distance fits binary vectors; jitter breaks the exact ties t-SNE dislikes
        perplexity = float(min(30, max(5, (len(rows) - 1) // 4)))
        coords = TSNE(2, perplexity=perplexity, metric="hamming", init="random", random_state=seed,
                      n_jobs=1).fit_transform(x + rng.normal(0, 1e-3, x.shape))
        return rows, coords, f"t-SNE of the policy vectors (Hamming distance, perplexity {perplexity:.0f})"
    from sklearn.decomposition import PCA

    components = min(2, x.shape[1])
    pca = PCA(components, random_state=seed).fit(matrix.astype(float))
    coords = pca.transform(x)
    if components < 2:
        coords = np.column_stack([coords, np.zeros(len(coords))])
    explained = ", ".join(f"{v:.0%}" for v in pca.explained_variance_ratio_)
    return rows, coords, f"PCA of the policy vectors (variance explained: {explained})"


def _none_if_nan(value: float | None) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def analysis_metrics(df: pd.DataFrame, seed: int = 0, top_k: int = 5) -> dict:
    """The ``reports/analyze/metrics.json`` tree (nested, plain names; None where undefined)."""
    groups = group_policies(df)
    blocks = df["blocks"].astype(float)
    full_right = df["full_correct"].astype(bool)
    return {
        "policies": {
            "unique": len(groups),
            "top1_share": float(groups["share"].iloc[0]) if len(groups) else 0.0,
            f"top{top_k}_share": float(groups["share"].head(top_k).sum()),
            "singletons": int((groups["count"] == 1).sum()),
        },
        "blocks": {
            "mean": float(blocks.mean()),
            "std": float(blocks.std(ddof=0)),
            "min": int(blocks.min()),
            "max": int(blocks.max()),
        },
        "difficulty": {
            "spearman_blocks_vs_confidence": spearman(blocks, df["full_confidence"]),
            "spearman_blocks_vs_loss": spearman(blocks, df["full_loss"]),
            "blocks_mean_full_correct": _none_if_nan(float(blocks[full_right].mean())),
            "blocks_mean_full_wrong": _none_if_nan(float(blocks[~full_right].mean())),
        },
        "purity": policy_purity(df["label"], df["policy"], seed=seed),
    }
