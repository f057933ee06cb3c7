"""``python -m orchestration run|retrain|serve|sweep``: the flows from the command line.

* ``run`` / ``retrain``: ``blockdrop-pipeline`` / ``blockdrop-retrain`` once (``make flow``, ``make retrain``)
* ``serve``: ``blockdrop-retrain`` on ``flow.cron``, starting a local Prefect server if none answers
  (``make schedule``, ``orchestration.schedule``)
* ``sweep``: ``blockdrop-sweep`` over ``sweep.grid`` or ``--set key=v1,v2`` (``make sweep``)

Invalid params fail before any server or run starts (one line, exit 2); a second flow in the same project
fails at once (exit 1, pipeline busy).
"""

from __future__ import annotations

import argparse
import sys

from blockdrop import tracking
from blockdrop.config import ParamsError, refuse
from blockdrop.project import project_root
from orchestration.api import on_local_server
from orchestration.flows import PIPELINE, RETRAIN, pipeline_flow, retrain_flow
from orchestration.grid import parse_set
from orchestration.prefect_server import LOCAL_PORT
from orchestration.stages import PipelineBusyError, flow_lock


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the chosen flow; exit 1 if it failed, 2 on invalid params."""
    parser = argparse.ArgumentParser(prog="python -m orchestration", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", f"run {PIPELINE} once"), ("retrain", f"run {RETRAIN} once")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--force", action="store_true", help="run every stage, even those DVC finds up to date")
    p = sub.add_parser("serve", help=f"serve {RETRAIN} on flow.cron (starts a Prefect server if needed)")
    p.add_argument("--port", type=int, default=LOCAL_PORT)
    p = sub.add_parser("sweep", help="run every setting of sweep.grid as a DVC experiment")
    p.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2",
                   help="sweep these values of a dotted params key instead of sweep.grid (repeatable)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        from orchestration.schedule import serve

        serve(args.port)
        return
    if args.command == "sweep":
        from orchestration import sweep

        try:
            grid = parse_set(args.set)
        except ParamsError as error:
            raise refuse(error) from None
        raise SystemExit(sweep.main(grid or None))
    chosen = pipeline_flow if args.command == "run" else retrain_flow
    try:
        with flow_lock(project_root()):  # a second flow fails here at once, before any server or run starts
            result = on_local_server(lambda: chosen(force=args.force))
    except PipelineBusyError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    stages = result["stages"] if args.command == "run" else result["pipeline"]["stages"]
    print("stages: " + ", ".join(f"{s['stage']} {s['status']}" for s in stages))
    if args.command == "retrain":
        d = result["decision"]
        print(f"{result['model']}: challenger v{result['challenger_version']} "
              f"{'promoted to champion' if d['promote'] else 'not promoted'} ({d['reason']})")
    print(f"MLflow parent run {result['parent_run_id']} in {tracking.tracking_uri()} (make ui to browse)")


if __name__ == "__main__":
    main()
