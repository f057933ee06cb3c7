"""The batch-1 speedup of every experiment of one or more sweeps, measured again in one run, in rounds.

Each experiment's ``evaluate`` stage times its own speedup when it runs, minutes or hours after the others. On a
machine whose speed drifts (a shared host, another job), those numbers are taken under different conditions: the
ratio is measured in turns, full backbone and BlockDrop alternating, yet one model measured 1.46x in its stage,
while the host ran the full backbone at half its usual speed, and 1.29-1.31x here on a quiet one. To compare
settings, this bench loads every experiment's models (its commit's ``models/backbone.pt`` and
``models/blockdrop.pt``, through ``dvc.api`` from the DVC cache or remote) and times them the way ``evaluate`` does
(``measure_latency``: one image at a time, the two predictors in turns, fp32, on ``--threads`` threads), every
experiment once per round, so that drift hits all of them alike.

    python bench/sweep_speedups.py                               # reports/sweep/sweep.json, 3 rounds
    python bench/sweep_speedups.py --sweep a/sweep.json --sweep b/sweep.json --rounds 5

It prints, per experiment, the speedup its stage measured, this run's per round and their median, and the median as
a ratio to the FLOPs ratio. To show where the time goes it also times each residual block alone at batch 1 (the
first experiment's backbone: every experiment shares the architecture) and prints, per experiment, the speedup its
blocks alone would give: the blocks' total time over the time of the blocks its policy keeps on the test split, each
counted as often as it is kept. What the measured speedup falls short of that is the policy network and the stem and
head, which BlockDrop runs in full. Run it on a quiet machine: the experiments' commits must be in this repository
(``make sweep`` leaves them under ``refs/exps``) and their models in its DVC cache or remote.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import dvc.api
import torch
from inference_models import cpu_model

from blockdrop import project
from blockdrop.data import Normalize, load_meta, load_split
from blockdrop.inference import BatchedSkippingPredictor, FastResNet, FullPredictor, SkippingPredictor, measure_latency
from blockdrop.models import load_backbone, load_blockdrop

MODELS = ("models/backbone.pt", "models/blockdrop.pt")
METRICS = "reports/evaluate/metrics.json"


def experiments(sweeps: list[Path]) -> dict[str, str]:
    """Experiment name -> its commit, over every sweep file (a later file's name wins)."""
    found = {}
    for path in sweeps:
        for name, e in json.loads(path.read_text())["experiments"].items():
            if e.get("commit"):
                found[name] = e["commit"]
    return found


def stage_metrics(commit: str) -> dict:
    """The experiment's own ``reports/evaluate/metrics.json`` (git-tracked, so read from its commit)."""
    text = project.git("show", f"{commit}:{METRICS}")
    if text is None:
        sys.exit(f"error: no {METRICS} at {commit}: is the experiment's commit in this repository?")
    return json.loads(text)


def predictors(commit: str, scratch: Path, test: torch.Tensor) -> tuple[FullPredictor, SkippingPredictor, torch.Tensor]:
    """The full (pretrained) backbone and BlockDrop of one experiment, as ``evaluate`` times them, and how often
    BlockDrop keeps each block on the normalised ``test`` images (K,)."""
    folder = scratch / commit
    folder.mkdir()
    for path in MODELS:
        with dvc.api.open(path, rev=commit, mode="rb") as f:
            (folder / Path(path).name).write_bytes(f.read())
    backbone, policy = load_blockdrop(folder / "blockdrop.pt")
    batched = BatchedSkippingPredictor(backbone, policy)
    usage = torch.cat([batched(x)[1] for x in test.split(500)]).double().mean(0)
    return FullPredictor(load_backbone(folder / "backbone.pt")), SkippingPredictor(backbone, policy), usage


@torch.inference_mode()
def block_times(fast: FastResNet, image: torch.Tensor, rounds: int) -> torch.Tensor:
    """Median seconds of each residual block at batch 1 as the engine runs it (folded, channels_last, its
    ``branch(x) + shortcut`` then ReLU), every block once per round on its real input."""
    times: list[list[float]] = [[] for _ in fast.branches]
    for _ in range(rounds):
        x = fast._stem(image.contiguous(memory_format=torch.channels_last))
        for t, (branch, shortcut) in enumerate(zip(fast.branches, fast.shortcuts, strict=True)):
            residual = x if shortcut is None else shortcut(x)
            start = time.perf_counter()
            x = branch(x).add_(residual).relu_()
            times[t].append(time.perf_counter() - start)
    return torch.tensor([statistics.median(ts) for ts in times], dtype=torch.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, action="append", help="a sweep.json (repeatable; default "
                        "reports/sweep/sweep.json)")
    parser.add_argument("--data-dir", type=Path, default=Path("data/prepared"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=300, help="timed images per experiment and round "
                        "(evaluate.latency_images)")
    parser.add_argument("--warmup", type=int, default=30, help="untimed images first (evaluate.latency_warmup)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (evaluate.latency_threads)")
    parser.add_argument("--block-rounds", type=int, default=1000, help="rounds of the per-block timing")
    args = parser.parse_args()
    found = experiments(args.sweep or [Path("reports/sweep/sweep.json")])
    if not found:
        sys.exit("error: no finished experiment in the sweep files")

    meta = load_meta(args.data_dir)
    test = load_split(args.data_dir, "test", meta)
    normalized = Normalize(meta.mean, meta.std, torch.device("cpu"))(test.images)
    images = normalized[: args.warmup + args.images]
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; load average {os.getloadavg()[0]:.2f} at start")
    print(f"torch {torch.__version__}, {args.threads} thread(s), fp32, batch 1; {len(found)} experiments x "
          f"{args.rounds} rounds x {args.images} images (+{args.warmup} warm-up), the first test images")

    with tempfile.TemporaryDirectory() as scratch:
        loaded = {name: predictors(commit, Path(scratch), normalized) for name, commit in found.items()}
        speedups: dict[str, list[float]] = {name: [] for name in found}
        for _ in range(args.rounds):
            for name, (full, blockdrop, _) in loaded.items():
                speedups[name].append(measure_latency(full, blockdrop, images, args.warmup, args.threads)["speedup"])
        first = next(iter(loaded.values()))[0]
        table = block_times(first.fast, images[:1], args.block_rounds)

    stages = first.backbone.blocks_per_stage
    bounds = [sum(stages[:i]) for i in range(len(stages) + 1)]
    print(f"each block alone at batch 1, ms (median of {args.block_rounds} rounds), by stage: " + " | ".join(
        " ".join(f"{1e3 * v:.3f}" for v in table[a:b].tolist()) for a, b in itertools.pairwise(bounds)))

    width = max(len(name) for name in found)
    print(f"\n{'experiment':<{width}}  {'stage':>6}  {'this run, per round':<22} {'median':>7}  {'FLOPs':>6}  "
          f"{'median/FLOPs':>12}  {'blocks alone':>12}  {'blocks per stage':<16}")
    for name, commit in found.items():
        speedup = stage_metrics(commit)["speedup"]
        median = statistics.median(speedups[name])
        rounds = " ".join(f"{s:.3f}" for s in speedups[name])
        usage = loaded[name][2]
        per_stage = "/".join(f"{usage[a:b].sum().item():.2f}" for a, b in itertools.pairwise(bounds))
        alone = table.sum().item() / (usage * table).sum().item()
        print(f"{name:<{width}}  {speedup['measured_batch1']:5.3f}x  {rounds:<22} {median:6.3f}x  "
              f"{speedup['flops_ratio']:5.3f}x  {median / speedup['flops_ratio']:12.3f}  {alone:11.3f}x  {per_stage}")


if __name__ == "__main__":
    main()
