"""DVC stage ``curriculum``: train the policy network on the frozen backbone, one more block per epoch."""

from __future__ import annotations

from pathlib import Path

import torch

from blockdrop import stage
from blockdrop.files import write_json
from blockdrop.models import build_policy, load_backbone, save_policy
from blockdrop.train.block_costs import cost_table
from blockdrop.train.context import TrainContext
from blockdrop.train.curriculum import KeptPolicy, train_curriculum

BACKBONE = Path("models/backbone.pt")
POLICY = Path("models/policy_cl.pt")
REPORTS = Path("reports/curriculum")
COSTS = REPORTS / "block_costs.json"


def main() -> None:
    ctx = stage.start("curriculum")
    p = ctx.params
    with stage.failures_reported("curriculum"):
        meta, data, normalize = stage.load_data(ctx, "train", "val")
        backbone = load_backbone(BACKBONE).to(ctx.device, memory_format=torch.channels_last)
        policy_net = build_policy(backbone, meta.shape[0], p.model)  # ImageNet: ResNet-10 from ResNet-18's weights
        policy_net = policy_net.to(ctx.device, memory_format=torch.channels_last)
        # What each block costs in the reward (curriculum.cost), timed here at this process's batch for latency
        costs = cost_table(p.curriculum.cost, backbone, meta.shape, precision=ctx.precision, dist=ctx.dist,
                           batch_size=p.curriculum.batch_size // ctx.dist.world)
        with stage.tracked_run(ctx, meta.data_sha256) as run:
            kept = KeptPolicy()
            history = train_curriculum(backbone, policy_net, data["train"], data["val"], normalize, p.curriculum,
                                       TrainContext.for_stage(ctx, run), kept, costs)
            if not ctx.dist.is_main:
                return  # rank 0 alone scores the model and writes the outputs
            write_json(COSTS, costs.to_json())  # the table the reward used (a resumed run's: the one it began with)
            run.log_artifacts([COSTS])
            keep = p.curriculum.keep_epoch
            last = history[keep - 1] if keep else history[-1]  # the epoch whose policy finetuning starts from
            metrics = {
                "val": {"accuracy": last["val/accuracy"], "blocks_mean": last["val/blocks_mean"],
                        "reward": last["val/reward"]},
                "train": {"reward": last["train/reward"], "epochs": len(history),
                          "unlocked_blocks": last["unlocked_blocks"]},
            }
            if keep:
                metrics["train"]["kept_epoch"] = keep
                policy_net.load_state_dict(kept.weights)
            save_policy(policy_net.cpu(), POLICY)
            stage.publish(run, REPORTS, history, metrics, [POLICY])
            ctx.clear_state()


if __name__ == "__main__":
    main()
