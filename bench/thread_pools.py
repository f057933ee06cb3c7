"""Why a model server runs small batches slower than a script: torch's OpenMP threads and the calling thread.

A script calls the network from its main thread; MLflow's scoring server calls ``predict`` from request
threads, after loading the model in its main thread. With 2 torch threads on 2 cores the same forward at
batch 8 ran at about 0.6 of the speed from such a thread. This bench runs the engine (``BatchedSkippingPredictor``) in
fresh processes, each in one arrangement, and prints images/s at batch 8 and 64 as a ratio to the first:

* ``main thread only``: a script;
* ``one other thread only``: the main thread never runs a parallel region (it only imports torch);
* ``main thread, then another``: the main thread loads the model and runs it, then another thread runs it,
  as in a server.

    python bench/thread_pools.py                 # models/blockdrop.pt when present, else seeded random models
    python bench/thread_pools.py --threads 1     # one torch thread: no parallel regions, no difference

About half a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]  # run as a script from anywhere; bench/ is not a package
from inference_models import cpu_model, load_models  # noqa: E402

from blockdrop.inference import BatchedSkippingPredictor  # noqa: E402

ARRANGEMENTS = ("main thread only", "one other thread only", "main thread, then another")
BATCHES = (8, 64)
SHAPE = (1, 28, 28)  # the default profile's images (Fashion-MNIST), as normalised N(0, 1) noise: the time is the same


def rates(models_dir: Path, images: int = 1024, rounds: int = 3) -> dict[int, float]:
    """Images/s of a freshly built engine at each of ``BATCHES``, called from the current thread."""
    _, backbone, policy, _, _ = load_models(models_dir)
    predictor = BatchedSkippingPredictor(backbone, policy)
    x = torch.randn(images, *SHAPE, generator=torch.Generator().manual_seed(0))
    out = {}
    for batch in BATCHES:
        for i in range(0, 4 * batch, batch):  # warm-up: oneDNN primitives for this shape
            predictor(x[i:i + batch])
        t0 = time.perf_counter()
        for _ in range(rounds):
            for i in range(0, images, batch):
                predictor(x[i:i + batch])
        out[batch] = rounds * images / (time.perf_counter() - t0)
    return out


def in_thread(fn):
    """``fn()`` run in a new thread, which has ended when its result is returned."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn).result()


def child(arrangement: str, models_dir: Path, threads: int) -> None:
    """Run one arrangement in this (fresh) process and print its rates as JSON."""
    torch.set_num_threads(threads)
    if arrangement == "main thread only":
        result = rates(models_dir)
    elif arrangement == "one other thread only":
        result = in_thread(lambda: rates(models_dir))
    else:
        rates(models_dir)  # the main thread runs parallel regions first, as a server loading the model does
        result = in_thread(lambda: rates(models_dir))
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--child", choices=ARRANGEMENTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.models_dir, args.threads)
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, {args.threads} torch thread(s); models: "
          f"{args.models_dir / 'blockdrop.pt' if (args.models_dir / 'blockdrop.pt').exists() else 'seeded random'}")
    results = {}
    for arrangement in ARRANGEMENTS:  # each in a fresh process: no thread has run a parallel region before
        out = subprocess.run([sys.executable, __file__, "--child", arrangement, "--models-dir", str(args.models_dir),
                              "--threads", str(args.threads)], capture_output=True, text=True, check=True).stdout
        results[arrangement] = {int(k): v for k, v in json.loads(out.strip().splitlines()[-1]).items()}
    first = results[ARRANGEMENTS[0]]
    print(f"\n{'arrangement':<28}" + "".join(f"{f'batch {b} img/s':>16}{'ratio':>7}" for b in BATCHES))
    for arrangement, rate in results.items():
        print(f"{arrangement:<28}" + "".join(f"{rate[b]:>16.0f}{rate[b] / first[b]:>7.2f}" for b in BATCHES))


if __name__ == "__main__":
    main()
