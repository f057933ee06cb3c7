"""``make serve``: the registered BlockDrop model over HTTP, with MLflow's own server.

    python -m ops.serve [--alias champion] [--port 5001] [--workers 1] [--threads N] [--max-batch 256]
                        [--env-manager local]

Finds the registered model this project's params name (``blockdrop-<dataset>-resnet<depth>``), checks that
the alias points at a version, then replaces itself with
``mlflow models serve -m models:/<name>@<alias> -h 127.0.0.1 -p <port> -w <workers>``. ``local`` serves from
this project's ``.venv``, which holds the versions the model pins; on another machine ``--env-manager
virtualenv`` builds that environment from the model's ``requirements.txt`` first.

Each worker is a process with its own copy of the model and its own torch thread pool, so ``--threads`` (torch's
threads per worker, as ``OMP_NUM_THREADS``) defaults to the CPUs divided among the workers: N workers with
every CPU each would fight over the cores. An ``OMP_NUM_THREADS`` already set is kept unless ``--threads``
is given.

Within a worker, requests that arrive while the network is busy share its next forward, up to ``--max-batch``
images (``blockdrop.serving.RequestBatcher``; the model reads ``BLOCKDROP_MAX_BATCH`` when it loads); 1 runs
each request alone.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from blockdrop import config, serving, tracking


def worker_threads(workers: int, threads: int = 0, omp_env: str | None = None) -> int:
    """Torch threads per worker: ``threads`` if given, else a valid ``OMP_NUM_THREADS`` already set, else this
    machine's CPUs divided among ``workers`` (at least 1)."""
    if threads:
        return threads
    if omp_env and omp_env.strip().isdigit() and int(omp_env) > 0:
        return int(omp_env)
    return max(1, (os.cpu_count() or 1) // workers)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alias", default="champion")
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument("--workers", type=int, default=1, help="server processes, each with its own model")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (default: CPUs / workers)")
    parser.add_argument("--max-batch", type=int, default=serving.CHUNK,
                        help="images concurrent requests may share a forward with (1: each request alone)")
    parser.add_argument("--env-manager", default="local", choices=("local", "virtualenv", "uv", "conda"))
    args = parser.parse_args(argv)
    if args.workers < 1 or args.threads < 0 or args.max_batch < 1:
        parser.error("--workers and --max-batch must be at least 1, --threads at least 0")
    p = config.load_params()
    name = tracking.registry_name(p.data.dataset, p.model.depth)
    version = tracking.get_alias_version(name, args.alias)
    if version is None:
        raise SystemExit(f"registered model {name} has no version with alias {args.alias!r}: run `make retrain` "
                         "(it promotes a champion), or pass --alias challenger")
    uri = f"models:/{name}@{args.alias}"
    threads = worker_threads(args.workers, args.threads, os.environ.get("OMP_NUM_THREADS"))
    print(f"serving {uri} (version {version}) on http://127.0.0.1:{args.port}/invocations, {args.workers} "
          f"worker(s) x {threads} torch thread(s), requests sharing forwards of up to {args.max_batch} images",
          flush=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(), "OMP_NUM_THREADS": str(threads),
           serving.MAX_BATCH_ENV: str(args.max_batch),
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
           # the scoring server is started as `uvicorn ...` by name: it must be this venv's
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    mlflow = str(Path(sys.executable).parent / "mlflow")
    os.execve(mlflow, [mlflow, "models", "serve", "-m", uri, "-h", "127.0.0.1", "-p", str(args.port),
                       "-w", str(args.workers), "--env-manager", args.env_manager], env)


if __name__ == "__main__":
    main()
