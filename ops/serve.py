"""``make serve``: the registered BlockDrop model over HTTP, with MLflow's own server.

    python -m ops.serve [--alias champion] [--port 5001] [--env-manager local]

Finds the registered model this project's params name (``blockdrop-<dataset>-resnet<depth>``), checks that
the alias points at a version, then replaces itself with
``mlflow models serve -m models:/<name>@<alias> -h 127.0.0.1 -p <port> -w 1``. ``local`` serves from this
project's ``.venv``, which holds the versions the model pins; on another machine ``--env-manager virtualenv``
builds that environment from the model's ``requirements.txt`` first.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from blockdrop import config, tracking


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alias", default="champion")
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument("--env-manager", default="local", choices=("local", "virtualenv", "uv", "conda"))
    args = parser.parse_args(argv)
    p = config.load_params()
    name = tracking.registry_name(p.data.dataset, p.model.depth)
    version = tracking.get_alias_version(name, args.alias)
    if version is None:
        raise SystemExit(f"registered model {name} has no version with alias {args.alias!r}: run `make retrain` "
                         "(it promotes a champion), or pass --alias challenger")
    uri = f"models:/{name}@{args.alias}"
    print(f"serving {uri} (version {version}) on http://127.0.0.1:{args.port}/invocations", flush=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(),
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
           # the scoring server is started as `uvicorn ...` by name: it must be this venv's
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    mlflow = str(Path(sys.executable).parent / "mlflow")
    os.execve(mlflow, [mlflow, "models", "serve", "-m", uri, "-h", "127.0.0.1", "-p", str(args.port), "-w", "1",
                       "--env-manager", args.env_manager], env)


if __name__ == "__main__":
    main()
