"""The flows as deployments on a Prefect work pool, and a worker that runs them: ``make deploy``, ``make worker``.

``prefect.yaml`` (the repository root) declares the deployments ``blockdrop-pipeline/pool``,
``blockdrop-retrain/pool`` (on ``flow.cron``, UTC, one run at a time) and ``blockdrop-sweep/pool`` on one
``process`` work pool, ``blockdrop``. ``deploy`` creates that pool if it is missing, then runs
``prefect deploy --all`` with the two values prefect.yaml reads from the environment: ``BLOCKDROP_CRON``, the
params' ``flow.cron`` (the schedule is written once, in params.yaml), and ``BLOCKDROP_PROJECT``, this checkout's
root, where flow runs start. ``worker`` runs ``prefect worker start --pool blockdrop`` (extra arguments, such as
``--limit 1`` or ``--run-once``, are passed on).

Both need a Prefect API: ``PREFECT_API_URL`` when set (a shared server; its host runs the schedules), else the
server on 127.0.0.1:4200 that ``make schedule`` uses, started for the command's duration if none answers there
(``orchestration.prefect_server``). This module runs the ``prefect`` command and never imports Prefect; only
``deploy`` loads it, through ``orchestration.cron``, to check ``flow.cron`` with Prefect's own schedule model
before anything is created (one line naming ``flow.cron``, exit 2).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from blockdrop.config import Params, load_params
from blockdrop.project import project_root
from orchestration.prefect_server import LOCAL_PORT, api_url, healthy, local_server

__all__ = ["checked_params", "deploy", "pool_name", "prefect_env", "worker"]

PREFECT_FILE = "prefect.yaml"
PORT = LOCAL_PORT  # make schedule's server
POOL_TYPE = "process"
STOP_GRACE_S = 30.0  # after SIGTERM, how long the worker gets to hand back its flow runs


def pool_root() -> Path:
    """The project this pool serves: the nearest folder at or above the working one holding ``prefect.yaml``,
    which must sit beside the project's ``dvc.yaml``."""
    try:
        root = project_root(Path.cwd(), marker=PREFECT_FILE)
    except FileNotFoundError as error:
        raise SystemExit(f"error: {error}") from None
    if not (root / "dvc.yaml").is_file():
        raise SystemExit(f"error: {root / PREFECT_FILE} has no dvc.yaml beside it: run from the project")
    return root


def pool_name(root: Path) -> str:
    """The one work pool that prefect.yaml's deployments name (so the name is written in one place)."""
    spec = yaml.safe_load((root / PREFECT_FILE).read_text())
    pools = {(d.get("work_pool") or {}).get("name") for d in spec.get("deployments") or []}
    if len(pools) != 1 or None in pools:
        raise SystemExit(f"error: {PREFECT_FILE}: every deployment must name the same work pool, not {pools}")
    return pools.pop()


def _prefect(*args: str) -> list[str]:
    exe = Path(sys.executable).parent / "prefect"  # the venv's, beside this interpreter
    return [str(exe) if exe.exists() else "prefect", *args]


def _run(cmd: list[str], env: dict[str, str], cwd: Path, quiet: bool = False) -> subprocess.CompletedProcess:
    if not quiet:
        print("+ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, env=env, cwd=cwd, text=True, capture_output=quiet)


@contextmanager
def prefect_env(port: int = PORT, startup_timeout_s: float = 120.0, server_log: Path | None = None
                ) -> Iterator[dict[str, str]]:
    """This process's environment with ``PREFECT_API_URL`` naming a Prefect API that answers, for the block.

    A ``PREFECT_API_URL`` already set is used as it is (it must answer: a deployment or a worker against
    Prefect's temporary per-process server would vanish with it). Otherwise the server on 127.0.0.1:``port``,
    started if none answers and stopped when the block ends (deployments stay in its database, in
    ``PREFECT_HOME``, for the next server to serve).
    """
    env = dict(os.environ)
    if env.get("PREFECT_API_URL"):
        if not healthy(env["PREFECT_API_URL"]):
            raise SystemExit(f"error: no Prefect API answers at PREFECT_API_URL={env['PREFECT_API_URL']}")
        yield env
        return
    log = server_log.open("w") if server_log else None
    try:
        with local_server(port, env, stdout=log, startup_timeout_s=startup_timeout_s):
            env["PREFECT_API_URL"] = api_url(port)
            yield env
    finally:
        if log:
            log.close()


def ensure_pool(pool: str, env: dict[str, str], root: Path) -> bool:
    """Create the ``process`` work pool ``pool`` unless it exists; whether it was created. An existing pool is
    left as it is (its concurrency limit or base job template may have been set on purpose)."""
    if _run(_prefect("work-pool", "inspect", pool), env, root, quiet=True).returncode == 0:
        print(f"work pool {pool!r} exists", flush=True)
        return False
    proc = _run(_prefect("work-pool", "create", pool, "--type", POOL_TYPE), env, root)
    if proc.returncode:
        raise SystemExit(f"error: could not create the work pool {pool!r} (exit {proc.returncode})")
    return True


def checked_params(root: Path) -> Params:
    """The project's params with a ``flow.cron`` Prefect accepts; else one line naming the key, exit 2."""
    from orchestration.cron import checked_cron  # the one import of Prefect, for its schedule model

    params = load_params(root / "params.yaml")
    checked_cron(params)
    return params


def deploy(root: Path, env: dict[str, str], params: Params) -> None:
    """Create the pool if missing, then ``prefect deploy --all`` with the cron (``params.flow.cron``, checked by
    :func:`checked_params`) and the project's root."""
    pool = pool_name(root)
    ensure_pool(pool, env, root)
    env = {**env, "BLOCKDROP_CRON": params.flow.cron, "BLOCKDROP_PROJECT": str(root)}
    proc = _run(_prefect("--no-prompt", "deploy", "--all", "--prefect-file", str(root / PREFECT_FILE)), env, root)
    if proc.returncode:
        raise SystemExit(f"error: prefect deploy failed (exit {proc.returncode})")
    print(f"deployed to work pool {pool!r} at {env['PREFECT_API_URL']}: blockdrop-retrain/pool on cron "
          f"{params.flow.cron!r} (UTC, flow.cron); flow runs start in {root}\n"
          f"  run one now: prefect deployment run blockdrop-pipeline/pool   (a worker runs it: make worker)",
          flush=True)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be: the same clean-up (the server we started is stopped)."""


def _terminate(signum: int, frame: Any) -> None:
    raise _Terminated


def worker(root: Path, env: dict[str, str], extra: list[str]) -> int:
    """``prefect worker start --pool <pool> [extra]`` until it exits (or Ctrl-C / SIGTERM); its exit code."""
    # The worker stops on SIGINT (and turns SIGTERM into one); started in the background (`make worker &`,
    # nohup) it would inherit SIGINT ignored and never stop. Give it the default disposition back.
    proc = subprocess.Popen(_prefect("worker", "start", "--pool", pool_name(root), *extra), env=env, cwd=root,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        return proc.wait()
    except KeyboardInterrupt as stop:
        # Ctrl-C reached the worker too (same process group): it is already stopping, and a second signal would
        # make it SIGKILL itself. SIGTERM reached only us: pass it on. Either way it may finish cleanly first.
        if isinstance(stop, _Terminated):
            proc.terminate()
        try:
            return proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ops.pool", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)  # --p... belongs to the worker, not to --port
    parser.add_argument("command", choices=("deploy", "worker"),
                        help="deploy: create the work pool if missing and deploy prefect.yaml's flows to it; "
                             "worker: run `prefect worker start --pool <pool>` (other arguments are passed on)")
    parser.add_argument("--port", type=int, default=PORT,
                        help="the local Prefect server's port when PREFECT_API_URL is not set (default %(default)s)")
    args, extra = parser.parse_known_args(argv)
    if args.command == "deploy" and extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    root = pool_root()
    # Invalid params or a cron Prefect refuses: one line, exit 2, before any server starts or anything is deployed.
    params = checked_params(root) if args.command == "deploy" else None
    signal.signal(signal.SIGTERM, _terminate)  # `kill` stops a server this command started, too
    # deploy: the server (if we start one) lives for seconds, and its banner would bury prefect deploy's output.
    server_log = Path(os.devnull) if args.command == "deploy" else None
    try:
        with prefect_env(args.port, server_log=server_log) as env:
            if args.command == "deploy":
                deploy(root, env, params)
            else:
                code = worker(root, env, extra)
                if code:
                    raise SystemExit(code)
    except KeyboardInterrupt:
        print("\ninterrupted", flush=True)


if __name__ == "__main__":
    main()
