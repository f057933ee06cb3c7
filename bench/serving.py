"""The served model against the engine, for both input formats, measured in one run.

First the engine: ``BatchedSkippingPredictor`` (``blockdrop.inference``, the code the served model runs) on
normalised images at batch 64. Then the same weights logged as the registered model is
(``blockdrop.tracking.log_blockdrop_model``, into a temporary MLflow store), served by ``mlflow models serve``
(``--workers``, ``--threads``), and called over HTTP with the standard library:

* ``lists``: ``dataframe_split`` with each image as nested lists of integers 0-255;
* ``png``: ``dataframe_split`` with each image as its PNG file, base64-encoded.

For each format: ``--clients`` concurrent clients sending ``--per-request`` images per request (images/s over
the whole run, p50/p99 latency of a request), then one request of ``--large`` images (the median of
``--repeats``). Requests are encoded before the clock starts: the time is the server's and the network's.
The concurrent clients are measured twice, on the server as ``make serve`` runs it (concurrent requests share
forwards of up to ``--max-batch`` images: ``serving.RequestBatcher``) and on a second server that runs each
request alone (max batch 1), and the ratio of the two is printed.
Every served rate is printed as a ratio to the engine's on the whole machine (all its CPUs' torch threads,
whatever ``--workers`` and ``--threads`` give each worker), measured before and after the servers (the mean of
both), so a busy machine shows as a drift between the two, not as a wrong ratio, and servers of any layout are
compared with the same rate. The engine is timed from the main thread and from another one (where the server
runs ``predict``) and the faster counts. The engine is also timed at batch ``--per-request`` on one worker's
threads: the column ``/same batch`` divides the small requests' rate by that rate times the workers, the most
servers that run each request alone could reach, however small their overheads. The column ``server cores`` is
the CPU time the server's processes used during the concurrent load divided by its wall time, and each busy
process's share when there are several: the clients run on the same machine and use the rest, and the kept-alive
connections of the clients stay with the worker that accepted them, so workers can be unevenly loaded.

    python bench/serving.py                    # models/blockdrop.pt and data/prepared when present
    python bench/serving.py --workers 2        # 2 processes, CPUs / 2 torch threads each (as make serve)
    python bench/serving.py --models-dir /other/models --data-dir /other/data/prepared

Without ``models/blockdrop.pt`` the model is a seeded random ResNet-32 with its ResNet-8 policy (the time is
the same architecture's; say so in any number you quote); without ``data/prepared``, the Fashion-MNIST test
images of Debian's package, else random pixels. About two minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import base64
import gc
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]  # run as a script from anywhere; bench/ is not a package
from inference import cpu_model  # noqa: E402

from blockdrop import serving, tracking  # noqa: E402
from blockdrop.data import Normalize, load_meta, load_split  # noqa: E402
from blockdrop.inference import BatchedSkippingPredictor  # noqa: E402
from blockdrop.models import cifar_resnet, load_blockdrop, policy_resnet8, save_blockdrop  # noqa: E402
from ops.serve import worker_threads  # noqa: E402

ENGINE_BATCH = 64
FORMATS = ("lists", "png")
FASHION = (["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
           [0.286], [0.353])  # classes, mean, std of Fashion-MNIST: what a model without data/prepared is told


def load_images(data_dir: Path, n: int) -> tuple[np.ndarray, dict, str]:
    """(n uint8 images (N, C, H, W), the spec's data fields, a note on where they came from)."""
    if (data_dir / "meta.json").exists():
        meta = load_meta(data_dir)
        images = load_split(data_dir, "test", meta).images[:n].numpy()
        fields = {"source": meta.source, "classes": meta.classes, "shape": meta.shape, "mean": meta.mean,
                  "std": meta.std}
        return images, fields, f"the first {len(images)} test images of {data_dir} ({meta.source})"
    classes, mean, std = FASHION
    fields = {"source": "fashion-mnist", "classes": classes, "shape": [1, 28, 28], "mean": mean, "std": std}
    try:
        from blockdrop.data.sources import load_source

        with tempfile.TemporaryDirectory() as raw:
            images = load_source("fashion-mnist", raw).test_images[:n].numpy()
        return images, fields, f"the first {n} Fashion-MNIST test images (Debian's package; {data_dir} missing)"
    except Exception as error:  # no Debian package and no internet: the time does not depend on the pixels
        rng = np.random.default_rng(0)
        return (rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8), fields,
                f"RANDOM pixels ({data_dir} missing, Fashion-MNIST unreadable: {type(error).__name__})")


def load_networks(models_dir: Path, shape: list[int], classes: int) -> tuple[Path, str]:
    """The BlockDrop checkpoint to serve and a note: ``models_dir/blockdrop.pt``, else a seeded random one."""
    path = models_dir / "blockdrop.pt"
    if path.exists():
        return path, str(path)
    torch.manual_seed(0)
    backbone, policy = cifar_resnet(32, classes, shape[0]).eval(), policy_resnet8(15, shape[0]).eval()
    path = Path(tempfile.mkdtemp(prefix="bench-serving-")) / "blockdrop.pt"
    save_blockdrop(backbone, policy, path)
    return path, f"RANDOM WEIGHTS ({models_dir / 'blockdrop.pt'} missing): ResNet-32 + ResNet-8"


def engine_rate(predictor: BatchedSkippingPredictor, x: torch.Tensor, rounds: int = 5,
                batch: int = ENGINE_BATCH) -> float:
    """Images/s of the predictor at ``batch`` on normalised images: the median over ``rounds`` passes."""
    batches = list(x.split(batch))
    predictor(batches[0])  # warm-up: oneDNN primitives for this shape
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for b in batches:
            predictor(b)
        times.append(time.perf_counter() - t0)
    return len(x) / statistics.median(times)


def engine_rates(predictor: BatchedSkippingPredictor, x: torch.Tensor, batch: int = ENGINE_BATCH) -> dict[str, float]:
    """:func:`engine_rate` called from the main thread and from another thread, as the scoring server calls
    ``predict`` (``asyncio.to_thread``). They are kept apart because they can differ: on a machine whose cores
    are busy with other processes, torch's threads from the main thread were several times slower here."""
    with ThreadPoolExecutor(max_workers=1) as other:  # its thread ends with the block, and its OpenMP helpers
        return {"main thread": engine_rate(predictor, x, batch=batch),
                "other thread": other.submit(engine_rate, predictor, x, batch=batch).result()}


def log_model(store: Path, checkpoint: Path, spec: dict, images: np.ndarray) -> str:
    """Log and register ``checkpoint`` as finetune does, into a store under ``store``; its model URI."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    # an experiment's artifacts default to ./mlruns of the working directory: keep them in the temporary store
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("bench-serving", (store / "artifacts").as_uri()))
    example = pd.DataFrame({serving.IMAGE_COLUMN: [serving_layout(image).tolist() for image in images[:2]]})
    with mlflow.start_run():
        version = tracking.log_blockdrop_model(checkpoint, spec, example, "bench-blockdrop")
    return f"models:/bench-blockdrop/{version}"


def serving_layout(image: np.ndarray) -> np.ndarray:
    """(H, W) for one channel, else (C, H, W): what a client sends as pixels."""
    return image[0] if image.shape[0] == 1 else image


def png_base64(image: np.ndarray) -> str:
    """One (C, H, W) uint8 image as the base64 text of its PNG file."""
    from torchvision.io import encode_png

    return base64.b64encode(encode_png(torch.from_numpy(image)).numpy().tobytes()).decode("ascii")


def request_body(images: np.ndarray, fmt: str) -> bytes:
    """A ``dataframe_split`` request for ``images`` in format ``lists`` or ``png``."""
    cells = [serving_layout(i).tolist() for i in images] if fmt == "lists" else [png_base64(i) for i in images]
    return json.dumps({"dataframe_split": {"columns": [serving.IMAGE_COLUMN], "data": [[c] for c in cells]}}
                      ).encode()


class Server:
    """``mlflow models serve`` on a free port, in its own process group; its RSS is read from /proc."""

    def __init__(self, uri: str, store: Path, workers: int, threads: int, max_batch: int) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}",
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in each worker, as `make serve` sets them
        env[serving.MAX_BATCH_ENV] = str(max_batch)  # as `make serve --max-batch` sets it
        self.log_path = store / f"serve-{max_batch}.log"
        cmd = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", uri, "-h", "127.0.0.1",
               "-p", str(self.port), "-w", str(workers), "--env-manager", "local"]
        self.log = open(self.log_path, "w")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen(cmd, cwd=store, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                sys.exit(f"mlflow models serve exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ping", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit("mlflow models serve did not answer /ping in 300 s")
                time.sleep(0.5)

    def rss_mib(self) -> list[tuple[str, float]]:
        """(command, resident MiB) of each process in the server's process group."""
        rows = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[2]) != self.proc.pid:  # field 5: the process group
                    continue
                rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                           if line.startswith("VmRSS:"))
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, StopIteration, ValueError, IndexError):
                continue
            name = "uvicorn worker" if "multiprocessing" in cmd else "uvicorn" if "uvicorn" in cmd else \
                "mlflow models serve" if "models serve" in cmd else cmd.split(" ")[0].rsplit("/", 1)[-1]
            rows.append((name, rss / 1024))
        return sorted(rows)

    def cpu_seconds(self) -> dict[int, float]:
        """CPU time (user + system) each process of the server's process group has used so far, by pid."""
        seconds = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == self.proc.pid:  # field 5 is the process group; 14 and 15 user and system time
                seconds[int(pid)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return seconds

    def stop(self) -> None:
        os.killpg(self.proc.pid, 15)
        self.proc.wait(timeout=30)
        self.log.close()


def post(conn: http.client.HTTPConnection, body: bytes) -> tuple[float, dict]:
    """Seconds for one request on a kept-alive connection, and the decoded answer (an error stops the run)."""
    t0 = time.perf_counter()
    conn.request("POST", "/invocations", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    seconds = time.perf_counter() - t0
    if response.status != 200:
        sys.exit(f"HTTP {response.status}: {data[:500]!r}")
    return seconds, json.loads(data)


def concurrent(port: int, bodies: list[bytes], clients: int, per_client: int, per_request: int
               ) -> tuple[float, list[float]]:
    """(images/s over the run, each request's seconds): ``clients`` threads, each sending ``per_client``
    requests back to back on its own connection, after two unmeasured ones."""
    latencies: list[float] = []
    lock, start = threading.Lock(), threading.Barrier(clients + 1)

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        for j in range(2):
            post(conn, bodies[(k + j) % len(bodies)])
        start.wait()
        mine = [post(conn, bodies[(k * per_client + j) % len(bodies)])[0] for j in range(per_client)]
        conn.close()
        with lock:
            latencies.extend(mine)

    pool = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in pool:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in pool:
        t.join()
    return clients * per_client * per_request / (time.perf_counter() - t0), latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--data-dir", type=Path, default=Path("data/prepared"))
    parser.add_argument("--workers", type=int, default=1, help="mlflow models serve --workers")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per worker and for the engine here (default: CPUs / workers)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--per-request", type=int, default=8, help="images per request of the concurrent clients")
    parser.add_argument("--requests", type=int, default=40, help="measured requests per client and format")
    parser.add_argument("--large", type=int, default=1000, help="images in the one large request")
    parser.add_argument("--repeats", type=int, default=3, help="times the large request is sent per format")
    parser.add_argument("--max-batch", type=int, default=serving.CHUNK,
                        help="images concurrent requests may share a forward with (make serve --max-batch)")
    args = parser.parse_args()
    machine = torch.get_num_threads()  # torch's default: every CPU this process may use (or OMP_NUM_THREADS)
    threads = worker_threads(args.workers, args.threads, os.environ.get("OMP_NUM_THREADS"))

    images, fields, images_note = load_images(args.data_dir, max(args.large, 1024))
    checkpoint, models_note = load_networks(args.models_dir, fields["shape"], len(fields["classes"]))
    backbone, policy = load_blockdrop(checkpoint)
    spec = serving.model_spec(fields["source"], fields["classes"], fields["shape"], fields["mean"], fields["std"],
                              backbone, policy)
    # The engine on this process's main thread only. Not the pyfunc here: it runs its forwards on a thread of its
    # own, and a second thread running torch's parallel regions slows both (bench/thread_pools.py).
    predictor = BatchedSkippingPredictor(backbone, policy)
    x = Normalize(spec["mean"], spec["std"], torch.device("cpu"))(torch.from_numpy(images[:1024]))

    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; load average {os.getloadavg()[0]:.2f} at start")
    print(f"torch {torch.__version__}; server: {args.workers} worker(s) x {threads} torch thread(s); the engine "
          f"here: {machine} thread(s) at batch {ENGINE_BATCH}, {threads} at one request's size")
    print(f"models: {models_note}\nimages: {images_note}")
    engine = [engine_rates(predictor, x)]
    # The same engine on batches of one request's size, on one worker's threads, times the workers: what servers
    # that run each request on its own (as MLflow's does; it has no batching across requests) can reach at best.
    torch.set_num_threads(threads)
    small_rates = engine_rates(predictor, x, batch=args.per_request)
    torch.set_num_threads(machine)
    small = args.workers * max(small_rates.values())

    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        store = Path(tmp)
        t0 = time.perf_counter()
        uri = log_model(store, checkpoint, spec, images)
        gc.collect()  # the model MLflow loaded to check the input example: its network thread ends with it
        rows, answers = [], {}
        n, k = args.per_request, len(images) // args.per_request
        small_bodies = {fmt: [request_body(images[i * n:(i + 1) * n], fmt) for i in range(k)] for fmt in FORMATS}
        # First the server as `make serve` runs it, concurrent requests sharing forwards; then the same server with
        # each request alone (max batch 1), under the same small-request load: the ratio is what sharing gives.
        for max_batch in (args.max_batch, 1):
            server = Server(uri, store, args.workers, threads, max_batch)
            print(f"served {uri} on port {server.port}, max batch {max_batch} ({time.perf_counter() - t0:.0f} s to "
                  "log and start)")
            t0 = time.perf_counter()
            try:
                if max_batch == args.max_batch:
                    rss = server.rss_mib()
                    print("resident memory: " + ", ".join(f"{name} {mib:.0f} MiB" for name, mib in rss) +
                          f"; total {sum(m for _, m in rss):.0f} MiB")
                for fmt in FORMATS:
                    before, started = server.cpu_seconds(), time.perf_counter()
                    rate, lat = concurrent(server.port, small_bodies[fmt], args.clients, args.requests, n)
                    after, wall = server.cpu_seconds(), time.perf_counter() - started  # the clients use the rest
                    used = sorted((after[pid] - before.get(pid, 0.0)) / wall for pid in after)
                    cores = f"{sum(used):.2f}" + (f" ({' + '.join(f'{c:.2f}' for c in used if c >= 0.05)})"
                                                  if sum(c >= 0.05 for c in used) > 1 else "")
                    rows.append((fmt, f"{args.clients} clients x {n} images", max_batch, rate, lat,
                                 len(small_bodies[fmt][0]) / n, small, cores))
                if max_batch != args.max_batch:
                    continue
                for fmt in FORMATS:  # one request: nothing to share, measured once
                    body = request_body(images[:args.large], fmt)
                    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
                    lat = []
                    for _ in range(args.repeats):
                        seconds, answers[fmt] = post(conn, body)
                        lat.append(seconds)
                    conn.close()
                    rows.append((fmt, f"1 request x {args.large} images", max_batch,
                                 args.large / statistics.median(lat), lat, len(body) / args.large,
                                 None, None))  # bound: the batch-64 reference
                rss = server.rss_mib()
            finally:
                server.stop()
    engine.append(engine_rates(predictor, x))
    ref = statistics.mean(max(rates.values()) for rates in engine)  # the engine at its best, before and after

    same = answers["lists"] == answers["png"]
    print(f"check: the {args.large}-image answers of both formats are {'identical' if same else 'DIFFERENT'}")
    print(f"resident memory after the run: total {sum(m for _, m in rss):.0f} MiB over {len(rss)} processes")
    print(f"\nengine (BatchedSkippingPredictor, batch {ENGINE_BATCH}, {machine} threads), images/s: " + "; ".join(
        f"{when} the server: " + ", ".join(f"{rate:.0f} from the {where}" for where, rate in rates.items())
        for when, rates in zip(("before", "after"), engine, strict=True)) + f"; reference {ref:.0f}")
    print(f"engine at batch {args.per_request} (one small request's size) on {threads} thread(s), images/s: " +
          ", ".join(f"{rate:.0f} from the {where}" for where, rate in small_rates.items()) +
          f"; the faster x {args.workers} worker(s) is {small / ref:.2f}x the batch-{ENGINE_BATCH} reference: the "
          "most the concurrent clients' rows can reach without sharing forwards across requests")
    print(f"\n{'format':<6} {'load':<24} {'max batch':>9} {'bytes/img':>9} {'images/s':>9} {'p50 ms':>7} "
          f"{'p99 ms':>7} {'served/engine':>14} {'/same batch':>11} {'server cores':>12}")
    for fmt, load, max_batch, rate, lat, size, bound, cores in rows:
        q = np.percentile(np.array(lat) * 1e3, [50, 99])
        print(f"{fmt:<6} {load:<24} {max_batch:>9} {size:>9.0f} {rate:>9.0f} {q[0]:>7.0f} {q[1]:>7.0f} "
              f"{rate / ref:>14.3f} {rate / (bound or ref):>11.3f} {cores or '':>12}")
    rate = {(fmt, load, max_batch): r for fmt, load, max_batch, r, *_ in rows}
    for fmt, load, max_batch in rate:
        if fmt == "png":
            png_over_lists = rate["png", load, max_batch] / rate["lists", load, max_batch]
            print(f"png / lists, {load}, max batch {max_batch}: {png_over_lists:.2f}x the images/s")
    for fmt in FORMATS:
        load = f"{args.clients} clients x {n} images"
        print(f"{fmt}, {load}: requests sharing forwards (max batch {args.max_batch}) / each alone: "
              f"{rate[fmt, load, args.max_batch] / rate[fmt, load, 1]:.2f}x the images/s")
    print(f"\n(load average {os.getloadavg()[0]:.2f} at end; p99 of {args.clients * args.requests} requests per "
          f"format is a rough tail)")


if __name__ == "__main__":
    main()
