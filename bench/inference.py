"""BlockDrop against the full backbone on the CPU at batch sizes 1, 16, 64 and 256, measured in one run.

Both sides run the same inference code (``blockdrop.inference``: BatchNorm folded, channels_last, branches
as direct convolution calls): the full backbone with every block on (``FullPredictor``), BlockDrop as the
policy network once per batch then each block once on the images that keep it (``BatchedSkippingPredictor``,
policy included in the time). For each batch size the same images are split into batches and every batch
goes through both predictors, alternating which goes first; a round is one pass over the images, and the
table shows the median over rounds of images/s and of the paired per-round speedup (full time / BlockDrop
time), next to the FLOPs ratio of exactly those images (paper convention, policy network included) and the
speedup divided by it: 1.0 would mean the measured time falls exactly as the FLOPs do.

Without ``models/blockdrop.pt`` the models are seeded random ResNet-32 and ResNet-8 and the actions come from
a fixed set of policies (``bench/inference_models.py``); ``--min-stretch inf`` times the engine with every
partly kept block gathered and scattered instead of run on the sorted batch's stretches.

    python bench/inference.py                          # models/ and data/prepared of this workspace
    python bench/inference.py --models-dir /other/models --data-dir /other/data/prepared --threads 1
    python bench/inference.py --random                 # random images (say so in any number you quote)

About a minute on 2 cores with the defaults (256 images x 7 rounds per batch size).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from inference_models import blockdrop_runner, cpu_model, load_models, synthetic_actions

from blockdrop.data import Normalize, load_meta, load_split
from blockdrop.flops import count_flops
from blockdrop.inference import MIN_STRETCH, BatchedSkippingPredictor, FullPredictor

GOALS = {1: 0.9, 64: 0.85, 256: 0.85}  # speedup / FLOPs ratio (docs/benchmarks.md, batched inference)


def load_images(args: argparse.Namespace, in_channels: int, n: int) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """(n normalised channels_last images, their labels or None, a note)."""
    if args.random:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, in_channels, args.size, args.size, generator=g)
        return x.contiguous(memory_format=torch.channels_last), None, f"RANDOM images N(0, 1), {args.size} px"
    meta = load_meta(args.data_dir)
    test = load_split(args.data_dir, "test", meta)
    if len(test) < n:
        sys.exit(f"error: {args.data_dir} has {len(test)} test images, {n} needed")
    x = Normalize(meta.mean, meta.std, torch.device("cpu"))(test.images[:n])
    return x, test.labels[:n], f"the first {n} test images of {args.data_dir} ({meta.source})"


def time_pair(full: Callable, bd: Callable, batches: list[tuple[torch.Tensor, torch.Tensor]], rounds: int
              ) -> dict[str, list[float]]:
    """Seconds per round (one pass over ``batches``) of each predictor; each batch goes through both,
    alternating which goes first, so drift in the machine's speed hits both alike."""
    for x, actions in batches[:2]:  # warm-up: allocator, oneDNN primitives for these shapes
        full(x), bd(x, actions)
    times: dict[str, list[float]] = {"full": [], "blockdrop": []}
    for r in range(rounds):
        total = {"full": 0.0, "blockdrop": 0.0}
        for j, (x, actions) in enumerate(batches):
            order = [("full", lambda x, _: full(x)), ("blockdrop", bd)]
            for name, fn in order if (r + j) % 2 else order[::-1]:
                t0 = time.perf_counter()
                fn(x, actions)
                total[name] += time.perf_counter() - t0
        for name, seconds in total.items():
            times[name].append(seconds)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--data-dir", type=Path, default=Path("data/prepared"))
    parser.add_argument("--random", action="store_true", help="random images instead of the test split")
    parser.add_argument("--size", type=int, default=28, help="side of the random images")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--batch-sizes", default="1,16,64,256")
    parser.add_argument("--images", type=int, default=256, help="images per round (a multiple of every batch size)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min-stretch", type=float, default=MIN_STRETCH,
                        help="FastResNet.min_stretch: images per stretch, on average, for a block to run in place on "
                             "the sorted batch's stretches (inf: every partly kept block gathered and scattered)")
    args = parser.parse_args()
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    if any(args.images % b for b in sizes):
        sys.exit(f"error: --images {args.images} is not a multiple of every batch size {sizes}")
    if args.threads:
        torch.set_num_threads(args.threads)

    full_net, backbone, policy_net, synthetic, models_note = load_models(args.models_dir, args.size)
    x, labels, images_note = load_images(args, backbone.in_channels, args.images)
    full, predictor = FullPredictor(full_net), BatchedSkippingPredictor(backbone, policy_net)
    predictor.fast.min_stretch = args.min_stretch
    bd = blockdrop_runner(predictor, synthetic)
    chosen = synthetic_actions(len(x), backbone.num_blocks).float()

    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; load average {os.getloadavg()[0]:.2f} at start")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32; "
          f"{args.rounds} rounds x {args.images} images per batch size; min_stretch {args.min_stretch:g}")
    print(f"models: {models_note}")
    print(f"images: {images_note}")

    # What is timed computes what the model computes: the logits of the model's own forward under the
    # same greedy actions (BatchNorm unfolded, per-image sub-batches of BlockResNet.forward).
    bd_logits, keep = bd(x, chosen)
    keep = keep > 0.5
    with torch.inference_mode():
        reference = backbone(x, keep.float())
        full_logits = full(x)
    diff = (bd_logits - reference).abs().max().item()
    print(f"check: BlockDrop logits vs the model's forward under the same actions: max |diff| {diff:.1e}")
    if labels is not None:
        acc = {name: (logits.argmax(1) == labels).float().mean().item() for name, logits in
               (("full", full_logits), ("blockdrop", bd_logits))}
        print(f"accuracy on these images: full {acc['full']:.4f}, BlockDrop {acc['blockdrop']:.4f}")

    shape = tuple(x.shape[1:])
    flops = count_flops(backbone, shape, policy_net)
    full_flops = count_flops(full_net, shape).full
    bd_flops = flops.per_image(keep.float()).mean().item()
    flops_ratio = full_flops / bd_flops
    print(f"blocks kept: {keep.float().sum(1).mean().item():.2f} of {backbone.num_blocks} on average, "
          f"{len(torch.unique(keep, dim=0))} distinct policies; FLOPs per image: full {full_flops / 1e6:.1f} M, "
          f"BlockDrop {bd_flops / 1e6:.1f} M (policy {flops.policy / 1e6:.1f} M included)")

    print(f"\n{'batch':>5} {'full img/s':>11} {'BlockDrop img/s':>16} {'speedup':>8} {'FLOPs ratio':>12} "
          f"{'speedup/FLOPs':>14}  goal")
    results = {}
    t0 = time.perf_counter()
    for b in sizes:
        times = time_pair(full, bd, list(zip(x.split(b), chosen.split(b), strict=True)), args.rounds)
        rate = {name: args.images / statistics.median(ts) for name, ts in times.items()}
        speedup = statistics.median(f / d for f, d in zip(times["full"], times["blockdrop"], strict=True))
        share = speedup / flops_ratio
        goal = GOALS.get(b)
        verdict = "" if goal is None else f">= {goal}: {'met' if share >= goal else 'NOT met'}"
        results[b] = share
        print(f"{b:>5} {rate['full']:>11.0f} {rate['blockdrop']:>16.0f} {speedup:>8.3f} {flops_ratio:>12.3f} "
              f"{share:>14.2f}  {verdict}", flush=True)
    print(f"\n(speedup: median over rounds of full time / BlockDrop time, each round both predictors on the "
          f"same batches; timed {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.2f} at end)")


if __name__ == "__main__":
    main()
