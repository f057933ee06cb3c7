"""How long a paper profile takes on this machine: a time-boxed slice of each training stage, projected.

For a profile (default: the fast CIFAR-10 ResNet-110 one) this builds the profile's networks, fills the device
with synthetic uint8 images of the profile's shape, and runs each stage's own library loop
(``pretrain_backbone``, ``train_curriculum``, ``finetune_jointly``) and evaluation pass (``run_policy``) with
the profile's batch sizes, precision, channels_last layout and ``compile`` setting. Each loop runs three
times: a warm-up (compilation, cuDNN autotuning; its time is printed), a short run and a long one; the rate is
the extra images of the long run over its extra seconds, so per-epoch costs (validation, checkpoint writes)
cancel out. The projection multiplies the profile's epochs x images by these rates. For ImageNet it also
measures JPEG decoding (``decode_rgb_batch``: nvJPEG on CUDA) with resizing and cropping, a separate limit,
and projects each stage at the slower of the model and the decoder.

Run: ``python bench/gpu_paper.py [--profile profiles/imagenet-resnet101-fast.yaml] [--seconds 25]`` (under
8 minutes on a GPU: every slice is time-boxed and a watchdog ends the run at ``--budget`` seconds with what was
measured), or ``--smoke`` for tiny sizes on any machine. Policies are whatever the networks decide during the
slice (random at first: about half the blocks), so the sparse forwards' rates are of that block count.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the stages' progress bars would interleave with the figures (read
# when tqdm is first imported)

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from blockdrop.config import Params, parse_params  # noqa: E402
from blockdrop.data import Normalize, Split  # noqa: E402
from blockdrop.models import cifar_resnet, policy_resnet8  # noqa: E402
from blockdrop.predict import run_policy  # noqa: E402
from blockdrop.runtime import bf16_is_fast, resolve_precision, select_device  # noqa: E402
from blockdrop.train.context import TrainContext  # noqa: E402
from blockdrop.train.curriculum import train_curriculum  # noqa: E402
from blockdrop.train.finetune import finetune_jointly  # noqa: E402
from blockdrop.train.pretrain import pretrain_backbone  # noqa: E402
from ops.profile import merge  # noqa: E402

# Split sizes of the real datasets (train before our val split is carved out of it, test).
DATASETS = {"cifar10": (50_000, 10_000, 10), "cifar100": (50_000, 10_000, 100), "imagenet": (1_281_167, 50_000, 1000)}
STAGES = ("pretrain", "curriculum", "finetune", "evaluate")
EVAL_PASSES = 4  # evaluate scores full, BlockDrop, FirstK and RandomK over the test split


@dataclass
class Measured:
    rate: float = 0.0  # images per second of the stage's loop, fixed costs excluded
    warmup_s: float = 0.0  # first call: compilation, autotuning, allocation
    steps: int = 0
    note: str = ""
    batch1_s: float = 0.0  # evaluate: one batch-1 forward of the full backbone (the latency measurement's unit)


@dataclass
class Bench:
    params: Params
    device: torch.device
    precision: str
    compile_model: bool
    size: int  # image side
    classes: int
    smoke: bool
    seconds: float
    max_steps: int
    pool: Split = field(init=False)
    val: Split = field(init=False)
    results: dict[str, Measured] = field(default_factory=dict)
    decode_rate: float = 0.0  # JPEGs per second, decoded + resized + cropped (ImageNet only)

    def loop(self, state: Path) -> TrainContext:
        """A training loop's context for one timed call: a fresh seeded generator, resume state at ``state``."""
        return TrainContext(torch.Generator().manual_seed(0), self.precision, state, "bench",
                            compile_model=self.compile_model)


def resolve_profile(profile: Path) -> Params:
    """params.yaml merged with ``profile``, as ``python -m ops.profile`` would write it."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    merge(raw, yaml.safe_load(profile.read_text()) or {})
    return parse_params(raw)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device: torch.device, fn: Callable[[], object]) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def build_models(b: Bench) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The profile's backbone and policy (random init), or small ones of the same family for --smoke."""
    imagenet = b.params.model.imagenet
    if imagenet:
        try:  # written beside this bench; the CIFAR bench must not depend on it
            from blockdrop.models import ImageNetResNet, policy_resnet10
        except ImportError as e:
            raise SystemExit(f"the ImageNet networks are not importable yet ({e})") from None
        backbone = ImageNetResNet(b.classes, layers=(1, 1, 1, 1)) if b.smoke else ImageNetResNet(b.classes)
        policy = policy_resnet10(backbone.num_blocks, weights="")
    else:
        backbone = cifar_resnet(20 if b.smoke else b.params.model.depth, b.classes, 3)
        policy = policy_resnet8(backbone.num_blocks, 3)
    fmt = torch.channels_last
    return backbone.to(b.device, memory_format=fmt), policy.to(b.device, memory_format=fmt)


def measure_loop(b: Bench, name: str, batch: int, run: Callable[[int], object]) -> Measured:
    """Warm up, then a short and a long call of ``run(steps)``; rate from their difference."""
    short = 2 if b.smoke else 5
    cap = len(b.pool) // batch
    warm = timed(b.device, lambda: run(short))
    probe = timed(b.device, lambda: run(short))
    per_step = probe / short  # an upper bound: includes the call's fixed costs
    extra = max(1, min(b.max_steps, cap - short, int(b.seconds / per_step)))
    long = timed(b.device, lambda: run(short + extra))
    # the extra steps over their extra seconds; if noise outweighs them (tiny smoke sizes), the whole call's rate
    rate = extra * batch / (long - probe) if long > probe else (short + extra) * batch / long
    m = Measured(rate=rate, warmup_s=warm, steps=short + extra)
    print(f"  {name}: warm-up {warm:.1f} s, {short} + {extra} steps of batch {batch}", flush=True)
    return m


def bench_pretrain(b: Bench, backbone: torch.nn.Module, normalize: Normalize, tmp: Path) -> Measured:
    cfg = b.params.pretrain
    if cfg.epochs == 0:
        return Measured(note="imported weights (pretrain.epochs 0): scored only")
    bs = _batch(b, cfg.batch_size)
    one = cfg.model_copy(update={"epochs": 1, "warmup_epochs": 0.0, "batch_size": bs})

    def run(steps: int) -> None:
        n = steps * bs  # one epoch over exactly this many images
        train = Split(b.pool.images[:n], b.pool.labels[:n])
        pretrain_backbone(backbone, train, b.val, normalize, one, b.loop(tmp / "pretrain.pt"))
        (tmp / "pretrain.pt").unlink()

    return measure_loop(b, "pretrain", bs, run)


def bench_curriculum(b: Bench, backbone: torch.nn.Module, policy: torch.nn.Module, normalize: Normalize,
                     tmp: Path) -> Measured:
    bs = _batch(b, b.params.curriculum.batch_size)

    def run(steps: int) -> None:
        # unlock_every 1: every block is learnable after K steps, as in the bulk of the stage
        cfg = b.params.curriculum.model_copy(update={"epochs": 1, "images_per_epoch": steps * bs, "batch_size": bs,
                                                     "val_images": 0, "unlock_every": 1})
        train_curriculum(backbone, policy, b.pool, b.val, normalize, cfg, b.loop(tmp / "curriculum.pt"))
        (tmp / "curriculum.pt").unlink()

    return measure_loop(b, "curriculum", bs, run)


def bench_finetune(b: Bench, backbone: torch.nn.Module, policy: torch.nn.Module, normalize: Normalize,
                   tmp: Path) -> Measured:
    bs = _batch(b, b.params.finetune.batch_size)

    def run(steps: int) -> None:
        cfg = b.params.finetune.model_copy(update={"epochs": 1, "images_per_epoch": steps * bs, "batch_size": bs,
                                                   "lr_decay_epoch": 0})
        finetune_jointly(backbone, policy, b.pool, b.val, normalize, cfg, b.loop(tmp / "finetune.pt"))
        (tmp / "finetune.pt").unlink()

    return measure_loop(b, "finetune", bs, run)


def bench_evaluate(b: Bench, backbone: torch.nn.Module, policy: torch.nn.Module, normalize: Normalize) -> Measured:
    """Batched greedy BlockDrop over a split (what evaluate and every stage's validation run), and the
    batch-1 forward the latency measurement times."""
    bs = _batch(b, b.params.evaluate.batch_size)
    n = min(len(b.pool), max(bs, int(bs * (4 if b.smoke else 20))))
    split = Split(b.pool.images[:n], b.pool.labels[:n])
    warm = timed(b.device, lambda: run_policy(backbone, policy, split.head(bs), normalize, bs, b.precision))
    seconds = timed(b.device, lambda: run_policy(backbone, policy, split, normalize, bs, b.precision))
    x1 = normalize(b.pool.images[:1])
    with torch.no_grad():
        backbone.eval()
        for _ in range(3):
            backbone(x1)
        times = [timed(b.device, lambda: backbone(x1)) for _ in range(10 if b.smoke else 30)]
    m = Measured(rate=n / seconds, warmup_s=warm, steps=math.ceil(n / bs))
    m.batch1_s = statistics.median(times)
    m.note = f"batch-1 full forward {m.batch1_s * 1e3:.2f} ms"
    print(f"  evaluate: {n} images in batches of {bs}, batch 1 x {len(times)}", flush=True)
    return m


def bench_decode(b: Bench) -> float:
    """JPEGs per second through the ImageNet data path's decode + resize + crop, on the device (nvJPEG on
    CUDA). On a CPU the rate of one process is multiplied by ``workers`` (a projection: one core each)."""
    from torchvision.io import encode_jpeg

    try:
        from blockdrop.data.folder import decode_rgb_batch, resize_crop
    except ImportError as e:
        print(f"  decode: not measured ({e})")
        return 0.0
    d, size = b.params.data, b.size
    g = torch.Generator().manual_seed(0)
    # Natural photographs compress far better than noise: smooth gradients plus mild noise give ImageNet-like
    # files (~100 KB at 500x375, quality 90) rather than worst-case ones.
    h, w = (int(size * 1.7), int(size * 2.2)) if not b.smoke else (size + 16, size + 32)
    files = []
    for i in range(16 if b.smoke else 64):
        yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        base = torch.stack([yy * (i % 7 + 1), xx * (i % 5 + 1), (yy + xx) * 0.5]).sin() * 100 + 128
        img = (base + torch.randn(3, h, w, generator=g) * 8).clamp(0, 255).to(torch.uint8)
        files.append(encode_jpeg(img, quality=90))
    resize = d.resize if not b.smoke else size + 8
    batch = 64 if not b.smoke else 8

    def one_batch(k: int) -> None:
        datas = [files[(k * batch + j) % len(files)] for j in range(batch)]
        images = decode_rgb_batch(datas, b.device)
        torch.stack([resize_crop(im, resize, size, (0.5, 0.5), True) for im in images])

    one_batch(0)  # warm-up: nvJPEG handles, kernels
    budget, done, t0 = (2.0 if b.smoke else 15.0), 0, time.perf_counter()
    while time.perf_counter() - t0 < budget:
        one_batch(done)
        done += 1
    sync(b.device)
    rate = done * batch / (time.perf_counter() - t0)
    kb = sum(len(f) for f in files) / len(files) / 1024
    if b.device.type == "cpu":
        workers = max(1, b.params.workers)
        print(f"  decode: {rate:.0f} JPEGs/s in one process ({kb:.0f} KB, {w}x{h}); x{workers} workers projected")
        rate *= workers
    else:
        print(f"  decode: {rate:.0f} JPEGs/s on {b.device} ({kb:.0f} KB, {w}x{h}, batches of {batch})")
    return rate


def _batch(b: Bench, batch: int) -> int:
    return min(batch, 16) if b.smoke else batch


def project(b: Bench) -> dict[str, float]:
    """Seconds of each stage for the profile's epochs x images at the measured rates."""
    p = b.params
    train_raw, test, _ = DATASETS[p.data.source]
    train = (p.data.train_limit or train_raw - p.data.val_size)
    test = p.data.test_limit or test
    val = p.data.val_size
    r = {name: m.rate for name, m in b.results.items()}
    limit = b.decode_rate if p.data.source == "imagenet" else math.inf

    def at(rate: float) -> float:  # images/s of a stage: the model or the decoder, whichever is slower
        return min(rate, limit) if rate else 0.0

    evaluate_rate = at(r["evaluate"])
    c, f, e = p.curriculum, p.finetune, p.evaluate
    out = {}
    if p.pretrain.epochs:
        out["pretrain"] = p.pretrain.epochs * (train / at(r["pretrain"]) + val / evaluate_rate)
    else:  # the imported backbone is scored on val and test
        out["pretrain"] = (val + test) / evaluate_rate
    scored = min(c.val_images, val) if c.val_images else val
    out["curriculum"] = c.epochs * (min(c.images_per_epoch, train) / at(r["curriculum"]) + scored / evaluate_rate)
    out["finetune"] = f.epochs * (min(f.images_per_epoch, train) / at(r["finetune"]) + val / evaluate_rate)
    batch1 = b.results["evaluate"].batch1_s  # full and BlockDrop timed alternately, BlockDrop at most as slow
    out["evaluate"] = EVAL_PASSES * test / evaluate_rate + 2 * e.latency_needs * batch1
    return out


def report(b: Bench, profile: Path) -> None:
    p = b.params
    print()
    for name in STAGES:
        m = b.results.get(name)
        if m is None:
            print(f"rate {name:<11} not measured (time box reached)")
        elif not m.rate:
            print(f"rate {name:<11} n/a ({m.note})")
        else:
            extra = f", {m.note}" if m.note else ""
            print(f"rate {name:<11} {m.rate:10.1f} images/s  (warm-up {m.warmup_s:.1f} s{extra})")
    if b.decode_rate:
        print(f"rate {'decode':<11} {b.decode_rate:10.1f} images/s  (JPEG decode + resize + crop)")
    r = {k: m.rate for k, m in b.results.items() if m.rate}
    if "pretrain" in r:  # ratios: figures of this run against each other, whatever the machine
        for name in ("curriculum", "finetune", "evaluate"):
            if name in r:
                print(f"ratio {name} / pretrain {'':<{10 - len(name)}} {r[name] / r['pretrain']:.3f}")
    if b.decode_rate:
        for name in ("curriculum", "finetune", "evaluate"):
            if name in r:
                print(f"ratio decode / {name:<10} {b.decode_rate / r[name]:.3f}  (< 1: decoding is the limit)")
    if set(STAGES) - set(b.results):
        print("projection incomplete: a stage was not measured")
        return
    seconds = project(b)
    train_raw, _, _ = DATASETS[p.data.source]
    print(f"\nprojection for {profile.name}: {p.data.source}, {train_raw - p.data.val_size} training images"
          + (" (smoke: tiny networks and images, not the profile's)" if b.smoke else ""))
    for name in STAGES:
        print(f"projected {name:<11} {seconds[name] / 60:8.1f} min")
    total = sum(seconds.values())
    warm = sum(m.warmup_s for m in b.results.values())
    print(f"projected {'total':<11} {total / 60:8.1f} min  (+ compile/warm-up {warm / 60:.1f} min measured here;"
          " prepare, analyze, report not included)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", type=Path, default=REPO / "profiles/cifar10-resnet110-fast.yaml")
    parser.add_argument("--seconds", type=float, default=25.0, help="timed seconds per stage slice (after warm-up)")
    parser.add_argument("--max-steps", type=int, default=300, help="most training steps in a stage's long run")
    parser.add_argument("--budget", type=float, default=450.0, help="watchdog: the run ends after this many seconds")
    parser.add_argument("--smoke", action="store_true", help="tiny networks and images: checks the bench on a CPU")
    parser.add_argument("--no-compile", action="store_true", help="eager even where the profile compiles (to compare)")
    args = parser.parse_args()

    t_start = time.perf_counter()
    params = resolve_profile(args.profile)
    device = select_device("auto")
    # The profile's precision where the hardware runs it; bf16 emulated on a CPU would only measure the emulation.
    precision = params.precision if params.precision != "auto" else "bf16"
    if precision == "bf16" and not bf16_is_fast(device):
        precision = "fp32"
    precision = resolve_precision(precision, device)  # fp32 on CUDA: TF32 off, as the stages run it
    # inductor on a CPU: minutes to compile, no gain (docs/benchmarks.md, training throughput)
    compile_model = params.compile and device.type == "cuda" and not args.no_compile
    imagenet = params.data.source == "imagenet"
    size = (64 if imagenet else 16) if args.smoke else (params.data.image_size if imagenet else 32)
    classes = DATASETS[params.data.source][2]
    b = Bench(params, device, precision, compile_model, size, classes if not args.smoke else 10, args.smoke,
              1.0 if args.smoke else args.seconds, 4 if args.smoke else args.max_steps)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{args.profile.name} on {name}: torch {torch.__version__}, {precision}, channels_last, "
          f"compile {'on' if compile_model else 'off'}{', SMOKE sizes' if args.smoke else ''}", flush=True)

    # Synthetic uint8 images of the profile's shape, on the device: enough for the longest slice.
    biggest = max(_batch(b, x) for x in (params.pretrain.batch_size, params.curriculum.batch_size,
                                         params.finetune.batch_size, params.evaluate.batch_size))
    pool_cap = 256 if args.smoke else (40_960 if imagenet else 262_144)  # 6.2 GB / 0.8 GB of uint8
    n = min(pool_cap, max(biggest * 20, (b.max_steps + 5) * _batch(b, params.pretrain.batch_size)))
    g = torch.Generator(device=device).manual_seed(0)
    b.pool = Split(torch.randint(0, 256, (n, 3, size, size), generator=g, device=device, dtype=torch.uint8),
                   torch.randint(0, b.classes, (n,), generator=g, device=device))
    b.val = Split(b.pool.images[:64], b.pool.labels[:64])
    normalize = Normalize([0.5] * 3, [0.25] * 3, device)
    torch.manual_seed(0)
    backbone, policy = build_models(b)

    def time_up() -> None:  # print what was measured, then end the run: the bench never overruns its budget
        print(f"\nwatchdog: {args.budget:.0f} s budget spent", flush=True)
        report(b, args.profile)
        sys.stdout.flush()
        os._exit(3)

    watchdog = threading.Timer(args.budget - (time.perf_counter() - t_start), time_up)
    watchdog.daemon = True
    watchdog.start()
    stage_guess = 2 * b.seconds + 90  # a stage's timed slices plus a generous compile
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            "pretrain": lambda: bench_pretrain(b, backbone, normalize, Path(tmp)),
            "curriculum": lambda: bench_curriculum(b, backbone, policy, normalize, Path(tmp)),
            "finetune": lambda: bench_finetune(b, backbone, policy, normalize, Path(tmp)),
            "evaluate": lambda: bench_evaluate(b, backbone, policy, normalize),
        }
        for stage, run in runs.items():
            if time.perf_counter() - t_start + stage_guess > args.budget and not args.smoke:
                print(f"  {stage}: skipped, the time box would be exceeded")
                continue
            b.results[stage] = run()
        if imagenet and (args.smoke or time.perf_counter() - t_start + 40 < args.budget):
            b.decode_rate = bench_decode(b)
    watchdog.cancel()
    report(b, args.profile)
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    print(f"\nbench wall time {time.perf_counter() - t_start:.0f} s of the {args.budget:.0f} s budget")


if __name__ == "__main__":
    main()
