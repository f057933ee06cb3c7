"""Run a stage once per case, each in a fork of one interpreter that has already imported what every stage
imports: ``python -m pipelines.<stage>`` as DVC runs it, without paying torch's and mlflow's 3-4 s of imports
once per case. Each case gets a fresh process (a fork), its own ``params.yaml`` and its own stderr.

``python tests/stagefork.py CASES.json OUT.json`` in a project folder; CASES is ``[{"stage", "params"}]``
(``params``: the text of params.yaml for that case); OUT gets ``[{"returncode", "stderr", "changed"}]``, where
``changed`` lists the files under ``WATCHED`` (and the MLflow store) the case wrote or changed. params.yaml is
put back after each case. Used by ``test_bad_settings.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import runpy
import sys
import traceback
from pathlib import Path

WATCHED = ("data", "models", "reports", "checkpoints", "mlartifacts")


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file a stage could write: path -> (size, mtime_ns, sha256)."""
    files = [p for top in WATCHED for p in (root / top).rglob("*") if p.is_file()]
    files += list(root.glob("mlflow.db*"))
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns,
                                       hashlib.sha256(p.read_bytes()).hexdigest()) for p in files}


def run_in_fork(stage: str, err: Path) -> int:
    """``python -m pipelines.<stage>`` in a forked child, its stderr to ``err``, its stdout dropped; its exit code."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        code = 1
        sys.argv = sys.argv[:1]  # the stage sees no arguments, as under DVC
        try:
            runpy.run_module(f"pipelines.{stage}", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as stop:  # what `python -m` turns into the exit status
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            if stop.code is not None and not isinstance(stop.code, int):
                print(stop.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def main(cases_path: str, out_path: str) -> None:
    # `python -m` puts the working directory first on sys.path, so the stage imports the project it runs in;
    # run as a script, this file's folder is first instead, and an installed (editable) blockdrop would win.
    sys.path.insert(0, os.getcwd())
    # What every stage imports (torch, the library, mlflow): paid once, before the forks.
    import blockdrop.stage
    import blockdrop.tracking  # noqa: F401

    root, params = Path.cwd(), Path("params.yaml")
    original = params.read_text()
    results = []
    for i, case in enumerate(json.loads(Path(cases_path).read_text())):
        before = snapshot(root)
        params.write_text(case["params"])
        err = Path(f"{out_path}.{i}.err")
        try:
            code = run_in_fork(case["stage"], err)
        finally:
            params.write_text(original)
        after = snapshot(root)
        changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
        results.append({"returncode": code, "stderr": err.read_text(), "changed": changed})
    Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])
