"""Qualitative analysis of the learned policies (paper section 4.3) and the figures of the whole run."""

from blockdrop.analysis.analyze import FIGURES, accuracy_flops_table, read_history, run_analysis
from blockdrop.analysis.policies import (
    analysis_metrics,
    block_usage_by_class,
    embed_policies,
    group_policies,
    policy_matrix,
    policy_purity,
    read_per_image,
    spearman,
    top_policies_per_class,
    top_policies_table,
)
from blockdrop.analysis.tradeoff import Experiment, reference_points, settings_table, speedup_figure, tradeoff_figure

__all__ = [
    "FIGURES",
    "Experiment",
    "accuracy_flops_table",
    "analysis_metrics",
    "block_usage_by_class",
    "embed_policies",
    "group_policies",
    "policy_matrix",
    "policy_purity",
    "read_history",
    "read_per_image",
    "reference_points",
    "run_analysis",
    "settings_table",
    "spearman",
    "speedup_figure",
    "top_policies_per_class",
    "top_policies_table",
    "tradeoff_figure",
]
