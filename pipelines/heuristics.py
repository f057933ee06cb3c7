"""DVC stage ``heuristics``: FirstK and RandomK from k = 1 to K on the pretrained backbone.

The paper compares BlockDrop with these two baselines as curves. They depend on the backbone alone, so they
are a stage of their own: a sweep over the policy's settings (penalty, policy size) reuses this stage's
output from DVC's cache instead of paying for K passes over the test set in every experiment.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from blockdrop import stage, tracking
from blockdrop.evaluation import heuristic_curves
from blockdrop.files import atomic_write_text
from blockdrop.flops import count_flops
from blockdrop.models import load_backbone

BACKBONE = Path("models/backbone.pt")
BY_K = Path("reports/heuristics/by_k.csv")
log = logging.getLogger("blockdrop.heuristics")


def main() -> None:
    ctx = stage.start("heuristics")
    with stage.failures_reported("heuristics"):
        meta, data, normalize = stage.load_data(ctx, "test")
        pretrained = load_backbone(BACKBONE)
        flops = count_flops(pretrained, tuple(meta.shape))  # no policy network: the heuristics have none
        pretrained = pretrained.to(ctx.device, memory_format=torch.channels_last)
        with tracking.stage_run("heuristics", ctx.params, data_sha256=meta.data_sha256) as run:
            curves = heuristic_curves(pretrained, data["test"], normalize, flops, ctx.generator,
                                      ctx.params.evaluate.batch_size, ctx.params.heuristics.k_step)
            for row in curves.itertuples():
                log.info("k=%2d  FirstK %.4f  RandomK %.4f  GFLOPs %.4f", row.k, row.firstk_accuracy,
                         row.randomk_accuracy, row.firstk_flops / 1e9)
            atomic_write_text(BY_K, curves.to_csv(index=False))
            last = curves.iloc[-1]  # k = K: every block, the full backbone
            run.log_metrics({"full_accuracy": float(last.firstk_accuracy), "num_blocks": int(last.k)})
            run.log_artifacts([BY_K])


if __name__ == "__main__":
    main()
