"""DVC stage ``evaluate``: BlockDrop vs the full backbone (pretrained, and trained as BlockDrop's backbone), FirstK
and RandomK, FLOPs and measured speedup.

FirstK and RandomK here run at BlockDrop's own mean number of blocks; their curves over every k are the
``heuristics`` stage's (they depend on the backbone only).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from blockdrop import stage, tracking
from blockdrop.evaluation import evaluate_variants, per_class_table
from blockdrop.files import atomic_write_text, write_json
from blockdrop.flops import count_flops
from blockdrop.inference import FullPredictor, SkippingPredictor, measure_latency
from blockdrop.models import load_backbone, load_blockdrop

BACKBONE = Path("models/backbone.pt")
FULL_FINETUNED = Path("models/backbone_finetuned.pt")  # the finetune-full stage's
MODEL = Path("models/blockdrop.pt")
REPORTS = Path("reports/evaluate")
PER_IMAGE = Path("data/evaluate/per_image.csv")
log = logging.getLogger("blockdrop.evaluate")


def main() -> None:
    ctx = stage.start("evaluate")
    p = ctx.params.evaluate
    with stage.failures_reported("evaluate"):
        meta, data, normalize = stage.load_data(ctx, "test")
        test = data["test"]
        pretrained = load_backbone(BACKBONE).to(ctx.device, memory_format=torch.channels_last)
        full_finetuned = load_backbone(FULL_FINETUNED).to(ctx.device, memory_format=torch.channels_last)
        backbone, policy_net = (m.to(ctx.device, memory_format=torch.channels_last)
                                for m in load_blockdrop(MODEL))
        flops = count_flops(backbone.cpu(), tuple(meta.shape), policy_net.cpu())
        backbone, policy_net = backbone.to(ctx.device), policy_net.to(ctx.device)
        with tracking.stage_run("evaluate", ctx.params, data_sha256=meta.data_sha256) as run:
            metrics, per_image = evaluate_variants(pretrained, backbone, policy_net, test, normalize, flops,
                                                   ctx.generator, p.batch_size, full_finetuned=full_finetuned)
            n = min(len(test), p.latency_warmup + p.latency_images)
            images = normalize(test.images[:n])
            latency = measure_latency(FullPredictor(pretrained), SkippingPredictor(backbone, policy_net),
                                      images, p.latency_warmup, p.latency_threads,
                                      others={"full_finetuned": FullPredictor(full_finetuned)})
            latency["speedup_vs_full_finetuned"] = latency["full_finetuned_ms"] / latency["blockdrop_ms"]
            # Both ratios against each full network (the same FLOPs: one architecture): > 1, BlockDrop is faster.
            metrics["speedup"] = {"flops_ratio": flops.full / metrics["blockdrop"]["flops_mean"],
                                  "measured_batch1": latency["speedup"],
                                  "flops_ratio_vs_full_finetuned": (metrics["full_finetuned"]["flops_mean"]
                                                                    / metrics["blockdrop"]["flops_mean"]),
                                  "measured_batch1_vs_full_finetuned": latency["speedup_vs_full_finetuned"]}
            for name in ("full", "full_finetuned", "blockdrop", "firstk", "randomk"):
                m = metrics[name]
                log.info("%-14s accuracy %.4f  blocks %5.2f +- %.2f  FLOPs %.3g", name, m["accuracy"],
                         m["blocks_mean"], m["blocks_std"], m["flops_mean"])
            saved = metrics["blockdrop"]["flops_saved"]
            log.info("FLOPs saved per image: mean %.1f%%, median %.1f%%, 5th-95th percentile %.1f-%.1f%%, max %.1f%%",
                     *(100 * saved[k] for k in ("mean", "median", "p5", "p95", "max")))
            log.info("speedup: FLOPs %.2fx, measured at batch 1 %.2fx (%.2f ms -> %.2f ms, median of %d, "
                     "threads: %d)", metrics["speedup"]["flops_ratio"], latency["speedup"], latency["full_ms"],
                     latency["blockdrop_ms"], latency["images"], latency["threads"])
            log.info("against the full network trained as BlockDrop's backbone: %.2fx measured (%.2f ms -> %.2f ms)",
                     latency["speedup_vs_full_finetuned"], latency["full_finetuned_ms"], latency["blockdrop_ms"])
            PER_IMAGE.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(PER_IMAGE, per_image.to_csv(index=False))
            atomic_write_text(REPORTS / "per_class.csv", per_class_table(per_image, meta.classes).to_csv(index=False))
            write_json(REPORTS / "latency.json", latency)
            write_json(REPORTS / "metrics.json", metrics)
            run.log_metrics(metrics)
            run.log_metrics({"latency": latency})
            run.log_artifacts([REPORTS / "metrics.json", REPORTS / "per_class.csv", REPORTS / "latency.json"])
            if ctx.params.tracking.log_model:
                # The registered version built from exactly this checkpoint (its dvc_md5 tag) gets the
                # numbers measured here; none (a model finetuned with log_model off): nothing to tag.
                name = tracking.registry_name(meta.dataset, backbone.depth)
                version = tracking.find_version(name, "dvc_md5", tracking.dvc_md5(MODEL))
                if version is not None:
                    bd = metrics["blockdrop"]
                    tracking.set_version_tags(name, version, {
                        "test_accuracy": bd["accuracy"], "flops_mean": bd["flops_mean"], "evaluate_run_id": run.run_id})
                    from blockdrop import serving  # here: it only describes the MLflow model

                    spec = serving.model_spec(meta.dataset, meta.classes, meta.shape, meta.mean, meta.std,
                                              backbone.cpu(), policy_net.cpu())
                    tracking.describe_version(name, version, serving.describe(
                        spec, "test", bd["accuracy"], bd["blocks_mean"], bd["flops_mean"]))
                    log.info("tagged and described %s version %d with its test numbers", name, version)


if __name__ == "__main__":
    main()
