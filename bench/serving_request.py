"""Where one small served request's time goes, in one process: MLflow's scoring work against the network's.

``mlflow models serve`` hands each request's body to ``mlflow.pyfunc.scoring_server.invocations``: parse the
JSON, build a DataFrame, enforce the logged signature, call the model's ``predict`` (which checks and decodes
the images and waits for the network on ``RequestBatcher``'s thread), then write the answer's JSON. This bench
calls that function directly, without HTTP or other clients, on the model logged as ``finetune`` logs it
(``bench/serving.py: log_model``), for requests of ``--per-request`` images as nested lists and as PNG, and
times the network alone on the same images through the same batcher. Both run in turns, one torch thread by
default (each of two 1-thread workers runs like this), and it prints the network's share of a request.

Then the same requests under cProfile, which splits the rest into MLflow's and the model's parts. The
profiler slows Python more than the network, so those are shares of a profiled request, a guide to where the
Python time goes, not times.

    python bench/serving_request.py                 # models/blockdrop.pt and data/prepared when present
    python bench/serving_request.py --threads 2 --per-request 32
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]  # run as a script from anywhere; bench/ is not a package
import serving as served  # noqa: E402  (bench/serving.py: the model is logged and the requests built as there)
from inference import cpu_model  # noqa: E402

from blockdrop import serving  # noqa: E402
from blockdrop.models import load_blockdrop  # noqa: E402

# (label, file ending, function): the parts of a request, by the function that does each
PARTS = [("parse the JSON, build the DataFrame", "scoring_server/__init__.py", "_parse_json_data"),
         ("enforce the signature", "mlflow/models/utils.py", "_enforce_schema"),
         ("check and decode the images (as_images)", "blockdrop/serving.py", "as_images"),
         ("wait for the network (RequestBatcher)", "blockdrop/serving.py", "__call__"),
         ("write the answer's JSON (to_dict, json)", "scoring_server/__init__.py", "predictions_to_json")]


def seconds_per_call(call, items: list) -> float:
    """Seconds per call of ``call`` over one pass of ``items``."""
    t0 = time.perf_counter()
    for item in items:
        call(item)
    return (time.perf_counter() - t0) / len(items)


def cumulative(stats: pstats.Stats, ending: str, name: str) -> float:
    """Cumulative seconds of the function ``name`` defined in a file ending with ``ending``."""
    return sum(entry[3] for (path, _, func), entry in stats.stats.items()  # type: ignore[attr-defined]
               if func == name and path.endswith(ending))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--data-dir", type=Path, default=Path("data/prepared"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: as each of two workers)")
    parser.add_argument("--per-request", type=int, default=8, help="images per request")
    parser.add_argument("--requests", type=int, default=128, help="distinct requests per format and pass")
    parser.add_argument("--rounds", type=int, default=5, help="timed passes (the median counts)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import mlflow.pyfunc
    from mlflow.pyfunc.scoring_server import invocations

    n, k = args.per_request, args.requests
    images, fields, images_note = served.load_images(args.data_dir, n * k)
    checkpoint, models_note = served.load_networks(args.models_dir, fields["shape"], len(fields["classes"]))
    spec = serving.model_spec(fields["source"], fields["classes"], fields["shape"], fields["mean"], fields["std"],
                              *load_blockdrop(checkpoint))
    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; load average {os.getloadavg()[0]:.2f} at start")
    print(f"torch {torch.__version__}, {args.threads} thread(s); {k} requests of {n} images per format, "
          f"median of {args.rounds} passes\nmodels: {models_note}\nimages: {images_note}")

    with tempfile.TemporaryDirectory(prefix="bench-serving-request-") as tmp:
        model = mlflow.pyfunc.load_model(served.log_model(Path(tmp), checkpoint, spec, images))
        schema, batcher = model.metadata.get_input_schema(), model.unwrap_python_model().batcher
        pixels = [torch.from_numpy(images[i * n:(i + 1) * n]) for i in range(k)]
        rows = []
        for fmt in served.FORMATS:
            bodies = [served.request_body(images[i * n:(i + 1) * n], fmt) for i in range(k)]

            def request(body: bytes) -> None:
                response = invocations(body, "application/json", model, schema)
                assert response.status == 200, response.response

            for body in bodies[:8]:  # warm-up: oneDNN primitives, the decoders, pandas' first calls
                request(body)
            whole, network = [], []
            for _ in range(args.rounds):  # in turns, so a drift of the machine moves both
                whole.append(seconds_per_call(request, bodies))
                network.append(seconds_per_call(batcher, pixels))
            whole_s, network_s = statistics.median(whole), statistics.median(network)

            profile = cProfile.Profile()
            profile.runcall(seconds_per_call, request, bodies)
            stats = pstats.Stats(profile)
            total = cumulative(stats, "scoring_server/__init__.py", "invocations")
            shares = [(label, cumulative(stats, ending, name) / total) for label, ending, name in PARTS]
            rows.append((fmt, whole_s, network_s, shares))

    print(f"\n{'format':<6} {'ms/request':>10} {'network ms':>10} {'network share':>13} {'images/s':>9}")
    for fmt, whole_s, network_s, _ in rows:
        print(f"{fmt:<6} {whole_s * 1e3:>10.2f} {network_s * 1e3:>10.2f} {network_s / whole_s:>13.2f} "
              f"{n / whole_s:>9.0f}")
    print("\nshares of a profiled request (cProfile; the network's wait is not slowed by it, the rest is):")
    print(f"{'part':<44} " + " ".join(f"{fmt:>6}" for fmt, *_ in rows))
    for i, (label, *_) in enumerate(PARTS):
        print(f"{label:<44} " + " ".join(f"{r[3][i][1]:>6.2f}" for r in rows))
    rest = "the rest (the answer's DataFrame, MLflow)"
    print(f"{rest:<44} " +
          " ".join(f"{1 - sum(s for _, s in r[3]):>6.2f}" for r in rows))
    print(f"\n(load average {os.getloadavg()[0]:.2f} at end)")


if __name__ == "__main__":
    main()
