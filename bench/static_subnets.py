"""What BlockDrop's per-image choice of blocks is worth over a fixed choice, on the same training budget.

BlockDrop's backbone is trained further in ``finetune`` on the paths its policy picks, one per image; the fair
baseline (``finetune-full``) trains every block on the same budget. Between the two lies a question the paper
does not ask: what does a network that always runs the same few blocks reach on that budget? This bench takes the
blocks BlockDrop's policy keeps most often on the validation split (the k most used, for each k asked), trains the
pretrained backbone with only those blocks on, on exactly finetune's budget (``finetune_full`` with ``keep``: the
same images in the same order, crops, flips, Adam at the backbone's rate, precision), and prints each static
network's test accuracy beside BlockDrop's and the fair baseline's, all scored in this run.

    python bench/static_subnets.py                   # models/ and params.yaml; k = 7, 8 and 10
    python bench/static_subnets.py --keep 6,8 --models DIR   # blockdrop.pt, backbone.pt, backbone_finetuned.pt

Each k trains for as long as ``finetune-full`` does with k/K of its blocks (minutes per k on a 2-core CPU). The
static networks need no policy network at inference and run the same blocks on every image; BlockDrop's FLOPs
and speed are in ``reports/evaluate``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from inference_models import cpu_model

from blockdrop.config import load_params
from blockdrop.data import load_meta, load_split
from blockdrop.data.batches import Normalize
from blockdrop.models import load_backbone, load_blockdrop
from blockdrop.predict import accuracy, predict, run_policy
from blockdrop.runtime import resolve_precision, seed_everything
from blockdrop.stage import DATA_DIR
from blockdrop.train.context import TrainContext
from blockdrop.train.finetune_full import finetune_full


def most_used(actions: torch.Tensor, k: int) -> torch.Tensor:
    """The 0/1 mask of the ``k`` blocks kept by the most images (ties: the earlier block)."""
    usage = actions.float().mean(0)
    order = sorted(range(len(usage)), key=lambda t: (-usage[t].item(), t))
    keep = torch.zeros(len(usage))
    keep[order[:k]] = 1.0
    return keep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, default=Path("models"))
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--keep", default="7,8,10", help="block counts of the static networks, comma-separated")
    args = ap.parse_args()
    params = load_params(args.params)
    device = torch.device("cpu")
    precision = resolve_precision(params.precision, device)
    meta = load_meta(DATA_DIR)
    train, val, test = (load_split(DATA_DIR, s, meta) for s in ("train", "val", "test"))
    normalize = Normalize(meta.mean, meta.std, device)

    backbone, policy = load_blockdrop(args.models / "blockdrop.pt")
    val_actions = run_policy(backbone, policy, val, normalize, precision=precision)[1]
    logits, actions = run_policy(backbone, policy, test, normalize, precision=precision)
    blockdrop_acc = accuracy(logits, test.labels)
    fair_acc = accuracy(predict(load_backbone(args.models / "backbone_finetuned.pt"), test, normalize,
                                precision=precision), test.labels)
    num_blocks = actions.shape[1]
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, {precision}; seed {params.seed}; finetune budget "
          f"{params.finetune.epochs} x {params.finetune.images_per_epoch} images; K = {num_blocks}")
    print("BlockDrop's use of each block (validation): "
          + " ".join(f"{u:.2f}" for u in val_actions.float().mean(0).tolist()))
    rows = [("full, trained as BlockDrop's backbone", float(num_blocks), fair_acc, ""),
            ("BlockDrop (per image)", actions.sum(1).mean().item(), blockdrop_acc, "")]
    for k in sorted({int(k) for k in args.keep.split(",")}):
        if not 0 < k <= num_blocks:
            sys.exit(f"--keep: {k} is not between 1 and {num_blocks}")
        keep = most_used(val_actions, k)
        static = load_backbone(args.models / "backbone.pt").to(memory_format=torch.channels_last)
        with tempfile.TemporaryDirectory() as tmp:
            loop = TrainContext(seed_everything(params.seed), precision, Path(tmp) / "state.pt", "static")
            finetune_full(static, train, val, normalize, params.finetune, loop, keep=keep)
        acc = accuracy(predict(static, test, normalize, precision=precision,
                               policy_fn=lambda x, keep=keep: keep.expand(len(x), -1)), test.labels)
        rows.append((f"static, the {k} most used", float(k), acc, "".join(str(int(a)) for a in keep.tolist())))
        print(f"  static k={k} trained: {100 * acc:.2f}%", flush=True)

    print(f"\n{'network':40s} {'blocks':>7s} {'test acc':>9s} {'below fair':>11s}  blocks kept")
    for name, blocks, acc, kept in rows:
        print(f"{name:40s} {blocks:7.2f} {100 * acc:8.2f}% {100 * (fair_acc - acc):11.2f}  {kept}")


if __name__ == "__main__":
    main()
