"""Does compiling make batch-1 inference follow its FLOPs? Eager and compiled, measured in one run.

At batch size 1 BlockDrop's engine is the policy network, then the backbone with each dropped block simply
not called (``blockdrop.inference``). A compiled model is a static graph, and which blocks run is data: so
the compiled BlockDrop here is the policy network compiled once, then one backbone graph per distinct
policy, its dropped blocks left out (the graph a policy *is*). Every graph is compiled before timing starts,
and the compile time is printed: it is what a server would pay once per new policy.

Four predictors take turns on the same single images (``measure_latency``, one thread by default, median):
the full backbone and BlockDrop, eager and compiled, all from the same folded channels_last networks. The
eager pair is the committed engine, what ``evaluate`` times.

    python bench/compiled_inference.py                  # torch.export + AOTInductor: a compiled library per
                                                        # graph, called from C++ without guards
    python bench/compiled_inference.py --mode jit       # torch.compile (its guards are checked at every call)
    python bench/compiled_inference.py --freezing       # inductor's freezing: weights as constants, oneDNN
                                                        # weight prepacking and conv + ReLU/add fusion
    python bench/compiled_inference.py --mode jit --cpp-wrapper   # the graph's calls from C++, guards kept

Needs the pipeline's ``models/`` (the policy network decides the graphs). AOTInductor takes about 10 s per
graph on 2 cores, so the default 200 images (a few dozen policies) compile for several minutes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch._dynamo
import torch._inductor
import torch._inductor.config
from inference import load_images
from inference_models import cpu_model, load_models
from torch import nn

from blockdrop.flops import count_flops
from blockdrop.inference import FullPredictor, SkippingPredictor, measure_latency

Predictor = Callable[[torch.Tensor], object]


class _Function(nn.Module):
    """A function as a module, for ``torch.export``."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def compiled(fn: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor, mode: str, folder: Path
             ) -> Predictor:
    """``fn`` as one static graph for inputs shaped like ``example``, compiled now. ``jit``: ``torch.compile``
    (each call checks the guards of every graph compiled from the same code, so per-policy graphs pay for
    each other); ``aot``: ``torch.export`` then AOTInductor, a compiled library called without guards."""
    if mode == "jit":
        graph = torch.compile(fn, dynamic=False)
    else:
        with torch.inference_mode():
            program = torch.export.export(_Function(fn).eval(), (example,))
        path = torch._inductor.aoti_compile_and_package(program, package_path=str(folder / f"{id(fn)}.pt2"))
        graph = torch._inductor.aoti_load_package(path)
    with torch.inference_mode():
        graph(example)  # jit compiles at the first call
    return torch.inference_mode()(graph)


class CompiledBlockDrop:
    """The policy network compiled once; the backbone compiled once per policy (its dropped blocks left out),
    up front by :meth:`compile_all`, so that no timed call compiles."""

    def __init__(self, eager: SkippingPredictor, example: torch.Tensor, mode: str, folder: Path) -> None:
        self.fast, self.mode, self.folder, self.example = eager.fast, mode, folder, example
        self.policy = compiled(eager.policy, example, mode, folder)
        self.graphs: dict[tuple[bool, ...], Predictor] = {}

    def _backbone(self, counts: list[int]) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: self.fast.net.head(self.fast._blocks(self.fast._stem(x), counts, None))

    @torch.inference_mode()
    def _actions(self, image: torch.Tensor) -> tuple[bool, ...]:
        """The policy of one channels_last image (logit >= 0: p >= 0.5), from the compiled policy network."""
        return tuple((self.policy(image) >= 0)[0].tolist())

    @torch.inference_mode()
    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, tuple[bool, ...]]:
        image = image.contiguous(memory_format=torch.channels_last)
        actions = self._actions(image)
        return self.graphs[actions](image), actions

    def compile_all(self, images: torch.Tensor) -> tuple[float, list[tuple[bool, ...]]]:
        """Compile the graph of every distinct policy among ``images``: the seconds it took, and each image's
        policy."""
        t0 = time.perf_counter()
        policies = [self._actions(images[i : i + 1].contiguous(memory_format=torch.channels_last))
                    for i in range(len(images))]
        for actions in dict.fromkeys(policies):  # the counts are a constant of the traced function
            self.graphs[actions] = compiled(self._backbone([int(a) for a in actions]), self.example, self.mode,
                                            self.folder)
        return time.perf_counter() - t0, policies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", default="models", type=Path)
    parser.add_argument("--data-dir", default="data/prepared", type=Path)
    parser.add_argument("--random", action="store_true", help="random images instead of the test split")
    parser.add_argument("--size", type=int, default=28, help="side of the random images")
    parser.add_argument("--images", type=int, default=200, help="images timed, one at a time")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch threads while timing (evaluate's default: 1)")
    parser.add_argument("--mode", choices=("jit", "aot"), default="aot",
                        help="jit: torch.compile; aot: torch.export + AOTInductor (no guards at call time)")
    parser.add_argument("--freezing", action="store_true", help="torch._inductor.config.freezing = True")
    parser.add_argument("--cpp-wrapper", action="store_true",
                        help="torch._inductor.config.cpp_wrapper = True: the graph's calls from C++, not Python "
                             "(what AOTInductor's compiled library does)")
    args = parser.parse_args()
    torch._inductor.config.freezing = args.freezing
    torch._inductor.config.cpp_wrapper = args.cpp_wrapper
    torch._dynamo.config.recompile_limit = 10_000  # one graph per policy: the same code, traced once for each
    torch._dynamo.config.accumulated_recompile_limit = 10_000

    full_net, backbone, policy_net, synthetic, models_note = load_models(args.models_dir, args.size)
    if synthetic:
        raise SystemExit("error: this bench needs the pipeline's models/ (the policy network decides the graphs)")
    x, _, images_note = load_images(args, backbone.in_channels, args.images)
    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; load average {os.getloadavg()[0]:.2f} at start")
    print(f"torch {torch.__version__}; timed on {args.threads} thread(s), fp32, batch 1; "
          f"{args.mode}; inductor freezing {args.freezing}, cpp_wrapper {args.cpp_wrapper}")
    print(f"models: {models_note}\nimages: {images_note}")

    full, bd = FullPredictor(full_net), SkippingPredictor(backbone, policy_net)
    torch.set_num_threads(args.threads)  # compile, check and time on the same threads
    folder = Path(tempfile.mkdtemp(prefix="blockdrop-aoti-"))
    example = x[:1].contiguous(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    full_c = compiled(full.fast, example, args.mode, folder)
    full_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    bd_c = CompiledBlockDrop(bd, example, args.mode, folder)
    compile_seconds, policies = bd_c.compile_all(x)
    bd_seconds = time.perf_counter() - t0 + compile_seconds
    print(f"compile: full backbone {full_seconds:.1f} s; BlockDrop {bd_seconds:.1f} s for the policy network and "
          f"{len(bd_c.graphs)} policy graphs ({bd_seconds / (len(bd_c.graphs) + 1):.1f} s each)")

    # The compiled graphs compute what the eager engine computes (same folded weights), up to float rounding.
    diffs = []
    for i in range(0, len(x), max(1, len(x) // 20)):
        (a, keep), (b, actions) = bd(x[i : i + 1]), bd_c(x[i : i + 1])
        assert tuple(keep) == actions, "the compiled policy network chose other blocks"
        diffs += [(a - b).abs().max().item(), (full(x[i : i + 1]) - full_c(x[i : i + 1])).abs().max().item()]
    print(f"check: compiled vs eager logits, 20 images, max |diff| {max(diffs):.1e}")

    flops = count_flops(backbone, tuple(x.shape[1:]), policy_net)
    keep = torch.tensor(policies, dtype=torch.float)  # the compiled policy network's (checked against eager above)
    flops_ratio = count_flops(full_net, tuple(x.shape[1:])).full / flops.per_image(keep).mean().item()

    timed = measure_latency(full, bd, x, args.warmup, threads=args.threads,
                            others={"full_compiled": full_c, "blockdrop_compiled": bd_c})
    ms = {k[:-3]: v for k, v in timed.items() if k.endswith("_ms")}
    print(f"\n{'':>10} {'full ms':>8} {'BlockDrop ms':>13} {'speedup':>8} {'/ FLOPs ratio':>14}   (FLOPs ratio "
          f"{flops_ratio:.3f}, median of {timed['images']} images)")
    for mode, f, b in (("eager", "full", "blockdrop"), ("compiled", "full_compiled", "blockdrop_compiled")):
        speedup = ms[f] / ms[b]
        print(f"{mode:>10} {ms[f]:>8.3f} {ms[b]:>13.3f} {speedup:>8.3f} {speedup / flops_ratio:>14.2f}")
    print(f"\ncompiled / eager time: full {ms['full_compiled'] / ms['full']:.2f}, "
          f"BlockDrop {ms['blockdrop_compiled'] / ms['blockdrop']:.2f}; "
          f"load average {os.getloadavg()[0]:.2f} at end")
    shutil.rmtree(folder, ignore_errors=True)  # the AOTInductor packages


if __name__ == "__main__":
    main()
