"""DVC stage ``finetune``: train the policy and the backbone jointly; writes the BlockDrop model."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pandas as pd
import torch

from blockdrop import stage, tracking
from blockdrop.data import load_split
from blockdrop.files import write_json
from blockdrop.models import load_backbone, load_policy, save_blockdrop
from blockdrop.train.block_costs import cost_table
from blockdrop.train.context import TrainContext
from blockdrop.train.finetune import finetune_jointly

BACKBONE = Path("models/backbone.pt")
POLICY = Path("models/policy_cl.pt")
MODEL = Path("models/blockdrop.pt")
REPORTS = Path("reports/finetune")
COSTS = REPORTS / "block_costs.json"
log = logging.getLogger("blockdrop.finetune")


def main() -> None:
    ctx = stage.start("finetune")
    p = ctx.params
    with stage.failures_reported("finetune"):
        meta, data, normalize = stage.load_data(ctx, "train", "val")
        backbone = load_backbone(BACKBONE).to(ctx.device, memory_format=torch.channels_last)
        policy_net = load_policy(POLICY).to(ctx.device, memory_format=torch.channels_last)
        # What each block costs in the reward (finetune.cost), timed here at this process's batch for latency
        costs = cost_table(p.finetune.cost, backbone, meta.shape, precision=ctx.precision, dist=ctx.dist,
                           batch_size=p.finetune.batch_size // ctx.dist.world)
        with stage.tracked_run(ctx, meta.data_sha256) as run:
            history = finetune_jointly(backbone, policy_net, data["train"], data["val"], normalize, p.finetune,
                                       TrainContext.for_stage(ctx, run), costs)
            if not ctx.dist.is_main:
                return  # rank 0 alone scores the model and writes the outputs
            write_json(COSTS, costs.to_json())  # the table the reward used (a resumed run's: the one it began with)
            run.log_artifacts([COSTS])
            last = history[-1]
            metrics = {
                "val": {"accuracy": last["val/accuracy"], "blocks_mean": last["val/blocks_mean"],
                        "reward": last["val/reward"]},
                "train": {"reward": last["train/reward"], "loss": last["train/loss"], "epochs": len(history)},
            }
            save_blockdrop(backbone.cpu(), policy_net.cpu(), MODEL)
            stage.publish(run, REPORTS, history, metrics, [MODEL])
            if p.tracking.log_model:
                # The served form (blockdrop.serving): raw images in, class, probabilities, policy and
                # FLOPs out; this checkpoint as its weights; the example is two raw test images.
                from blockdrop import serving  # here: it only builds the MLflow model, no DVC out depends on it

                backbone, policy_net = backbone.cpu(), policy_net.cpu()
                spec = serving.model_spec(meta.dataset, meta.classes, meta.shape, meta.mean, meta.std, backbone,
                                          policy_net)
                images = load_split(stage.DATA_DIR, "test").images[:2].cpu().numpy()
                images = images[:, 0] if images.shape[1] == 1 else images  # (H, W) per image for one channel
                example = pd.DataFrame({serving.IMAGE_COLUMN: [image.tolist() for image in images]})
                name = tracking.registry_name(meta.dataset, backbone.depth)
                t0 = time.perf_counter()
                # The checkpoint also as a run artifact: promotion loads it after checking its md5 against
                # the version's dvc_md5 tag.
                run.log_artifacts([MODEL])
                version = tracking.log_blockdrop_model(
                    MODEL, spec, example, name, version_tags=run.lineage_tags(MODEL),
                    description=serving.describe(spec, "validation", last["val/accuracy"], last["val/blocks_mean"]))
                log.info("registered %s version %d (alias challenger) in %.1f s", name, version,
                         time.perf_counter() - t0)
            ctx.clear_state()


if __name__ == "__main__":
    main()
