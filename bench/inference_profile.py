"""Where BlockDrop's inference time goes, next to the full backbone's, at batch sizes 1, 64 and 256.

Each predictor of ``bench/inference.py`` (``FullPredictor``, ``BatchedSkippingPredictor``) runs on the same
batches under ``torch.profiler``; every top-level ATen call is put in one part by what it computes:

    policy network      everything the policy network runs (its own stem, blocks and classifier)
    stem, head          the backbone's first convolution and its pooling + classifier
    blocks 16/32/64 ch  the residual branches' convolutions, additions and ReLUs, by their width
    shortcuts           pooling and zero-padding of the stage-first blocks (run on every image)
    gather / scatter    copying the images that keep a block into a sub-batch and back, sorting the batch
    plan                deciding the actions and which images run each block (thresholds, sort keys, nonzero)
    Python + dispatch   the profiled wall time outside any ATen call (inflated by the profiler's own cost)

and the table gives each part's share of the predictor's profiled time. The first (warm-up) pass of each
predictor is not profiled. Models and actions are ``bench/inference_models.py``'s.

    python bench/inference_profile.py                  # 256 images, 2 passes per batch size
    python bench/inference_profile.py --threads 1 --batch-sizes 1,64
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's start/stop lines
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from inference_models import blockdrop_runner, cpu_model, load_models, synthetic_actions
from torch.profiler import ProfilerActivity, profile, record_function

from blockdrop.inference import BatchedSkippingPredictor, FullPredictor

PARTS = ["policy network", "stem", "blocks 16 ch", "blocks 32 ch", "blocks 64 ch", "shortcuts", "gather / scatter",
         "plan", "head", "Python + dispatch"]
GATHER = {"aten::index", "aten::index_copy_", "aten::index_select", "aten::index_put_", "aten::copy_", "aten::clone",
          "aten::contiguous"}


def part_of(name: str, shapes: list, in_policy: bool, in_channels: int) -> str:
    """The part of the table an ATen call belongs to, from its name and input shapes."""
    if in_policy:
        return "policy network"
    first = shapes[0] if shapes and shapes[0] else []
    if name in ("aten::conv2d", "aten::add_", "aten::relu_", "aten::add", "aten::relu") and len(first) == 4:
        channels = first[1]
        if name == "aten::conv2d" and channels == in_channels:
            return "stem"
        return f"blocks {channels} ch" if channels in (16, 32, 64) else "stem"
    if name in ("aten::avg_pool2d", "aten::pad", "aten::constant_pad_nd"):
        return "shortcuts"
    if name in ("aten::adaptive_avg_pool2d", "aten::flatten", "aten::linear", "aten::mean"):
        return "head"
    if name in GATHER:
        return "gather / scatter"
    return "plan"


def profile_parts(calls: list[Callable[[], object]], in_channels: int) -> dict[str, float]:
    """Seconds per part of ``calls``, run one after the other under one profiler (see the docstring)."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for fn in calls:
            with record_function("call"):
                fn()
    events = prof.events()
    policy_ranges = [e.time_range for e in events if e.name == "policy"]
    seconds: dict[str, float] = defaultdict(float)
    for e in events:
        parent = e.cpu_parent
        if parent is None or parent.name not in ("call", "policy") or not e.name.startswith("aten::"):
            continue  # only top-level ATen calls: a convolution's inner calls are part of its time
        in_policy = any(r.start <= e.time_range.start and e.time_range.end <= r.end for r in policy_ranges)
        seconds[part_of(e.name, e.input_shapes, in_policy, in_channels)] += e.cpu_time_total / 1e6
    wall = sum(e.cpu_time_total for e in events if e.name == "call") / 1e6
    seconds["Python + dispatch"] = max(0.0, wall - sum(seconds.values()))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--batch-sizes", default="1,64,256")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--min-stretch", type=float, default=None,
                        help="FastResNet.min_stretch (inf: every partly kept block gathered and scattered)")
    parser.add_argument("--passes", type=int, default=2, help="profiled passes over the images per batch size")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.images, 1, 28, 28, generator=g).contiguous(memory_format=torch.channels_last)
    full_net, backbone, policy_net, synthetic, note = load_models(args.models_dir)
    full, bd = FullPredictor(full_net), BatchedSkippingPredictor(backbone, policy_net)
    if args.min_stretch is not None:
        bd.fast.min_stretch = args.min_stretch
    actions = synthetic_actions(len(x), backbone.num_blocks).float()
    run_bd = blockdrop_runner(bd, synthetic)
    policy = bd.policy

    def labelled_policy(images: torch.Tensor) -> torch.Tensor:
        with record_function("policy"):
            return policy(images)

    bd.policy = labelled_policy
    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs, load average {os.getloadavg()[0]:.2f}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; models: {note}")
    sides = {"full": lambda xb, kb: full(xb), "BlockDrop": run_bd}
    for b in [int(s) for s in args.batch_sizes.split(",")]:
        batches = list(zip(x.split(b), actions.split(b), strict=True))
        totals = {}
        for side, fn in sides.items():
            fn(*batches[0])  # warm-up
            calls = [lambda f=fn, xb=xb, kb=kb: f(xb, kb) for xb, kb in batches] * args.passes
            totals[side] = profile_parts(calls, x.shape[1])
        wall = {side: sum(t.values()) for side, t in totals.items()}
        print(f"\nbatch {b}: profiled ms per image, and share of each predictor's time")
        print(f"{'part':<20} {'full ms':>9} {'share':>6} {'BlockDrop ms':>13} {'share':>6}")
        per_image = args.passes * len(x) / 1e3
        for part in PARTS:
            f, d = totals["full"][part], totals["BlockDrop"][part]
            if f or d:
                print(f"{part:<20} {f / per_image:>9.3f} {f / wall['full']:>6.1%} {d / per_image:>13.3f} "
                      f"{d / wall['BlockDrop']:>6.1%}")
        print(f"{'total':<20} {wall['full'] / per_image:>9.3f} {'':>6} {wall['BlockDrop'] / per_image:>13.3f}")


if __name__ == "__main__":
    main()
