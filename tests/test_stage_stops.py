"""A stage stopped by SIGTERM or Ctrl-C ends its MLflow run KILLED before it exits (143 or 130), so no run stays
RUNNING when DVC later finds the stage up to date and never starts it again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from blockdrop import supervision
from blockdrop.tracking.stops import StageStopped, exit_code, sigterm_raises

pytestmark = pytest.mark.e2e  # runs stages, servers or other processes: `make test`, not `make test-fast`

REPO = Path(__file__).resolve().parents[1]

# A stage in miniature: opens its run, says so, then works until it is stopped. The signals get the disposition
# a stage started from a terminal has (a test runner started in the background may ignore SIGINT).
STAGE = """
import signal, sys, time
from pathlib import Path
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
from blockdrop import supervision, tracking
from blockdrop.config import Params
supervision.watch_supervisor("pretrain")
with tracking.stage_run("pretrain", Params()) as run:
    Path("run_id.tmp").write_text(run.run_id)
    Path("run_id.tmp").rename("run_id")
    while True:
        time.sleep(0.05)
"""


def start_stage(root: Path, extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """The stage running in ``root``, once its run is open; and the run's id."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(extra_env or {})}
    proc = subprocess.Popen([sys.executable, "-c", STAGE], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (root / "run_id").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the stage did not open its run (exit {proc.returncode}):\n{out[-2000:]}\n{err[-2000:]}")
        time.sleep(0.05)
    return proc, (root / "run_id").read_text()


def finished(proc: subprocess.Popen, started: float) -> tuple[int, str, float]:
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err, time.monotonic() - started


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stopped_stage_ends_its_run_killed_and_exits_with_the_signal_code(
        mlflow_project: str, tmp_path: Path, signum: int, code: int) -> None:
    proc, run_id = start_stage(tmp_path)
    assert MlflowClient(mlflow_project).get_run(run_id).info.status == "RUNNING"
    t0 = time.monotonic()
    proc.send_signal(signum)
    returncode, err, took = finished(proc, t0)

    assert returncode == code, err[-2000:]
    run = MlflowClient(mlflow_project).get_run(run_id)
    assert run.info.status == "KILLED" and run.info.end_time is not None
    stopped = [line for line in err.splitlines() if "stopped by" in line]
    assert len(stopped) == 1 and signal.Signals(signum).name in stopped[0] and run_id in stopped[0], err[-2000:]
    assert "Traceback" not in err
    # The lease stays: the rerun that resumes names this run as the one it continues.
    assert (tmp_path / "checkpoints" / "pretrain.run.json").exists()
    # Within the time the supervision thread gives a stage before ending it outright.
    assert took < supervision.GRACE_S


def test_a_stage_whose_flow_is_gone_ends_its_run_killed(mlflow_project: str, tmp_path: Path) -> None:
    # The flow's process dies (here: a stand-in, killed): the stage's supervision thread sends it SIGTERM.
    flow = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        proc, run_id = start_stage(tmp_path, {supervision.SUPERVISOR_ENV: str(flow.pid)})
    finally:
        flow.kill()
        flow.wait()
    returncode, err, _ = finished(proc, time.monotonic())
    assert returncode == 143, err[-2000:]  # not 1: the stage ended itself before the grace ran out
    assert "is gone: stopping" in err
    assert MlflowClient(mlflow_project).get_run(run_id).info.status == "KILLED"


def test_sigterm_raises_only_within_the_block_then_the_old_handler_is_back() -> None:
    def mine(signum, frame):
        raise AssertionError("the previous handler must not run inside the block")

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with pytest.raises(StageStopped) as stop, sigterm_raises():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted: the handler raises in the main thread
        assert exit_code(stop.value) == 143 and exit_code(KeyboardInterrupt()) == 130
        assert signal.getsignal(signal.SIGTERM) is mine

        seen = []  # outside the main thread nothing is installed (Python runs handlers in the main thread only)
        thread = threading.Thread(target=lambda: seen.append(_handler_within_block()))
        thread.start()
        thread.join()
        assert seen == [mine]
    finally:
        signal.signal(signal.SIGTERM, previous)


def _handler_within_block() -> object:
    with sigterm_raises():
        return signal.getsignal(signal.SIGTERM)
