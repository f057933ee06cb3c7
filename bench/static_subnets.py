"""What BlockDrop's per-image choice of blocks is worth over a fixed choice, on the same training budget.

BlockDrop's backbone is trained further in ``finetune`` on the paths its policy picks, one per image; the fair
baseline (``finetune-full``) trains every block on the same budget. Between the two lies a question the paper
does not ask: what does a network that always runs the same few blocks reach on that budget? This bench takes the
blocks BlockDrop's policy keeps most often on the validation split (the k most used, for each k asked), trains the
pretrained backbone with only those blocks on, on exactly finetune's budget (``finetune_full`` with ``keep``: the
same images in the same order, crops, flips, Adam at the backbone's rate, precision), and prints each static
network's test accuracy beside BlockDrop's and the fair baseline's, all scored in this run, in the stage's
precision (bf16 where the CPU runs it natively: a few hundredths from ``evaluate``'s fp32 accuracies).

    python bench/static_subnets.py                   # models/ and params.yaml; k = 7, 8 and 10
    python bench/static_subnets.py --keep 6,8 --models DIR   # blockdrop.pt, backbone.pt, backbone_finetuned.pt
    python bench/static_subnets.py --choice spread --keep 8  # each stage's first blocks in turn: no policy's choice

The splits are prepared here from the raw data for the seed of ``--params``, exactly as ``prepare`` writes them:
the training images, the validation images and the normalisation depend on the seed, and ``data/prepared`` holds
one seed's only.

Each k trains for as long as ``finetune-full`` does with k/K of its blocks (minutes per k on a 2-core CPU). FLOPs
fewer is per image against the full backbone, BlockDrop's policy network included; a static network needs none.
``batch 1`` is the speedup over the full backbone, one image at a time, all in turns as ``evaluate`` times
BlockDrop (``evaluate.latency_*`` params; run it on a quiet machine). ``--no-train`` times and counts only.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import torch
from inference_models import cpu_model

from blockdrop.config import Params, load_params
from blockdrop.data import Meta, Normalize, load_source, load_split, split_train_val, write_prepared
from blockdrop.flops import count_flops
from blockdrop.inference import FullPredictor, SkippingPredictor, measure_latency
from blockdrop.models import load_backbone, load_blockdrop
from blockdrop.predict import accuracy, predict, run_policy
from blockdrop.runtime import resolve_precision, seed_everything
from blockdrop.train.context import TrainContext
from blockdrop.train.finetune_full import finetune_full

TENSOR_SOURCES = ("fashion-mnist", "cifar10", "cifar100")


def prepare_seed(params: Params, out: Path) -> Meta:
    """Write the splits ``prepare`` writes for ``params``' seed into ``out``. The training images (the budget's),
    the validation images (which blocks count as most used) and the normalisation all depend on the seed, and a
    clone's ``data/prepared`` holds one seed's only: the models of another seed's experiment need their own."""
    d = params.data
    raw = load_source(d.source, d.raw, d.verify_checksums)
    return write_prepared(split_train_val(raw, d.val_size, params.seed, d.train_limit, d.test_limit), raw, d.source,
                          out)


def most_used(actions: torch.Tensor, k: int) -> torch.Tensor:
    """The 0/1 mask of the ``k`` blocks kept by the most images (ties: the earlier block)."""
    usage = actions.float().mean(0)
    keep = torch.zeros(len(usage))
    keep[torch.sort(-usage, stable=True).indices[:k]] = 1.0
    return keep


def spread(blocks_per_stage: tuple[int, ...], k: int) -> torch.Tensor:
    """The 0/1 mask of ``k`` blocks chosen without any policy: each stage's first blocks, taken a stage at a
    time in turn (k = 8 of 5/5/5: the first 3, 3 and 2 of the three stages)."""
    starts = [sum(blocks_per_stage[:s]) for s in range(len(blocks_per_stage))]
    order = [start + i for i in range(max(blocks_per_stage))
             for start, n in zip(starts, blocks_per_stage, strict=True) if i < n]
    keep = torch.zeros(sum(blocks_per_stage))
    keep[order[:k]] = 1.0
    return keep


def time_batch1(full: torch.nn.Module, backbone: torch.nn.Module, policy: torch.nn.Module,
                keeps: dict[int, torch.Tensor], images: torch.Tensor, warmup: int, threads: int) -> dict:
    """Speedup over the full backbone at batch 1 of BlockDrop and of each static network, timed in turns as
    ``evaluate`` times BlockDrop. A static network's time depends on its blocks, not its weights: it is timed on
    the pretrained backbone's, before any training."""
    full_predictor = FullPredictor(full)
    fast = full_predictor.fast  # the static networks run the full predictor's folded network, fewer blocks

    def static(keep: torch.Tensor):
        mask, counts = keep.bool()[None], [int(a) for a in keep.tolist()]
        return lambda image: fast(image.contiguous(memory_format=torch.channels_last), mask, counts)

    with torch.inference_mode():
        result = measure_latency(full_predictor, SkippingPredictor(backbone, policy), images, warmup, threads,
                                 others={str(k): static(keep) for k, keep in keeps.items()})
    return {"blockdrop": result["speedup"], **{k: result["full_ms"] / result[f"{k}_ms"] for k in keeps}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, default=Path("models"))
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--keep", default="7,8,10", help="block counts of the static networks, comma-separated")
    ap.add_argument("--no-train", action="store_true", help="time and count the static networks, train none")
    ap.add_argument("--choice", choices=("most-used", "spread"), default="most-used",
                    help="the k blocks: BlockDrop's most used, or each stage's first in turn (no policy)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")  # a line per epoch
    params = load_params(args.params)
    if params.data.source not in TENSOR_SOURCES:
        sys.exit(f"data.source {params.data.source!r}: the bench prepares in-memory sources only {TENSOR_SOURCES}")
    device = torch.device("cpu")
    precision = resolve_precision(params.precision, device)
    with tempfile.TemporaryDirectory() as tmp:
        meta = prepare_seed(params, Path(tmp))
        train, val, test = (load_split(tmp, s, meta) for s in ("train", "val", "test"))
    normalize = Normalize(meta.mean, meta.std, device)

    backbone, policy = load_blockdrop(args.models / "blockdrop.pt")
    val_actions = run_policy(backbone, policy, val, normalize, precision=precision)[1]
    logits, actions = run_policy(backbone, policy, test, normalize, precision=precision)
    blockdrop_acc = accuracy(logits, test.labels)
    fair_acc = accuracy(predict(load_backbone(args.models / "backbone_finetuned.pt"), test, normalize,
                                precision=precision), test.labels)
    num_blocks = actions.shape[1]
    flops = count_flops(backbone, tuple(meta.shape), policy)  # one image; BlockDrop pays its policy network too
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, {precision}; seed {params.seed}; finetune budget "
          f"{params.finetune.epochs} x {params.finetune.images_per_epoch} images; K = {num_blocks}")
    print("BlockDrop's use of each block (validation): "
          + " ".join(f"{u:.2f}" for u in val_actions.float().mean(0).tolist()))
    ks = sorted({int(k) for k in args.keep.split(",")})
    if not all(0 < k <= num_blocks for k in ks):
        sys.exit(f"--keep: every count must be between 1 and {num_blocks}")
    keeps = {k: most_used(val_actions, k) if args.choice == "most-used" else spread(backbone.blocks_per_stage, k)
             for k in ks}
    speedups = time_batch1(load_backbone(args.models / "backbone.pt"), backbone, policy, keeps,
                           normalize(test.images[:params.evaluate.latency_warmup + params.evaluate.latency_images]),
                           params.evaluate.latency_warmup, params.evaluate.latency_threads)
    rows = [("full, trained as BlockDrop's backbone", float(num_blocks), fair_acc, 1.0, "", 1.0),
            ("BlockDrop (per image)", actions.sum(1).mean().item(), blockdrop_acc,
             flops.full / flops.per_image(actions).mean().item(), "", speedups["blockdrop"])]
    for k, keep in keeps.items():
        fewer = flops.full / flops.per_image(keep[None], with_policy=False).item()
        kept, name = "".join(str(int(a)) for a in keep.tolist()), f"static, {k} {args.choice}"
        if args.no_train:
            rows.append((name, float(k), float("nan"), fewer, kept, speedups[k]))
            continue
        static = load_backbone(args.models / "backbone.pt").to(memory_format=torch.channels_last)
        with tempfile.TemporaryDirectory() as tmp:
            loop = TrainContext(seed_everything(params.seed), precision, Path(tmp) / "state.pt", "static")
            finetune_full(static, train, val, normalize, params.finetune, loop, keep=keep)
        acc = accuracy(predict(static, test, normalize, precision=precision,
                               policy_fn=lambda x, keep=keep: keep.expand(len(x), -1)), test.labels)
        rows.append((name, float(k), acc, fewer, kept, speedups[k]))
        print(f"  static k={k} trained: {100 * acc:.2f}%", flush=True)

    print(f"\n{'network':40s} {'blocks':>7s} {'test acc':>9s} {'below fair':>11s} {'FLOPs fewer':>12s} "
          f"{'batch 1':>8s}  blocks kept")
    for name, blocks, acc, fewer, kept, speedup in rows:
        scored = f"{100 * acc:8.2f}% {100 * (fair_acc - acc):11.2f}" if acc == acc else f"{'-':>9s} {'-':>11s}"  # nan
        print(f"{name:40s} {blocks:7.2f} {scored} {fewer:11.2f}x {speedup:7.2f}x  {kept}")


if __name__ == "__main__":
    main()
