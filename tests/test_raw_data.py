"""The raw data is a DVC-tracked input: queued experiments find it, a changed file reruns prepare, ``make data``
tracks it (docs/data.md). The remote's round trip is in test_remote.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tinyrepo import make_tiny_repo, tiny_params

pytestmark = pytest.mark.e2e  # runs DVC: `make test`, not `make test-fast`

STATES = ("Queued", "Running", "Success", "Failed")


def run(root: Path, *cmd: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "GIT_AUTHOR_NAME": "test",
           "GIT_AUTHOR_EMAIL": "test@example.com", "GIT_COMMITTER_NAME": "test",
           "GIT_COMMITTER_EMAIL": "test@example.com"}
    for var in ("MLFLOW_TRACKING_URI", "BLOCKDROP_PARENT_RUN_ID", "BLOCKDROP_ROOT", "DVC_ROOT", "DVC_EXP_NAME"):
        env.pop(var, None)
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert not check or proc.returncode == 0, f"{' '.join(cmd)}: {proc.returncode}\n{proc.stdout[-3000:]}\n" \
                                              f"{proc.stderr[-3000:]}"
    return proc


def queue_prepare_with_seed_1(root: Path) -> tuple[str, str]:
    """Commit the project, queue `prepare` at seed 1 as an experiment, run the queue; (status, its log)."""
    run(root, "git", "add", "-A")
    run(root, "git", "commit", "-q", "-m", "tiny project")
    run(root, "dvc", "exp", "run", "--queue", "--name", "seed-1", "-S", "seed=1", "prepare")
    run(root, "dvc", "queue", "start", "-j", "1")
    status, deadline = "?", time.monotonic() + 300
    while time.monotonic() < deadline:
        time.sleep(3)
        line = next((ln for ln in run(root, "dvc", "queue", "status").stdout.splitlines() if "seed-1" in ln), "")
        status = next((s for s in STATES if s in line.split()), "?")
        if status in ("Success", "Failed"):
            break
    return status, run(root, "dvc", "queue", "logs", "seed-1", check=False).stdout


def test_a_queued_seed_reruns_prepare_in_the_queue_workspace_from_the_tracked_raw_data(tmp_path: Path) -> None:
    root = make_tiny_repo(tmp_path / "repo")
    raw = tiny_params(root)["data"]["raw"]
    assert (root / f"{raw}.dvc").is_file() and "/fashion-mnist" in (root / "data/raw/.gitignore").read_text()
    status, log = queue_prepare_with_seed_1(root)
    assert status == "Success", log
    # The experiment's prepare read the tracked raw files (their md5 in its dvc.lock) at seed 1.
    refs = [r for r in run(root, "git", "for-each-ref", "--format=%(refname)", "refs/exps").stdout.split()
            if r.endswith("/seed-1")]
    lock = run(root, "git", "show", f"{refs[0]}:dvc.lock").stdout
    assert f"- path: {raw}\n" in lock and "seed: 1\n" in lock, lock


def test_with_raw_data_outside_dvc_the_queued_prepare_fails(tmp_path: Path) -> None:
    """The layout before the raw data was versioned: data/raw/ ignored by git and tracked by nothing, so the
    queue's workspace (a checkout of the commit plus DVC's cache) has no raw files."""
    root = make_tiny_repo(tmp_path / "repo", track_raw=False)
    (root / ".gitignore").write_text((root / ".gitignore").read_text() + "/data/raw/\n")
    status, log = queue_prepare_with_seed_1(root)
    assert status == "Failed", log
    assert "data/raw/fashion-mnist" in log, log


def test_a_changed_raw_file_makes_dvc_status_name_prepare(tmp_path: Path) -> None:
    root = make_tiny_repo(tmp_path / "repo")
    run(root, "dvc", "repro", "prepare")
    assert json.loads(run(root, "dvc", "status", "--json", "prepare").stdout or "{}") == {}
    raw = root / tiny_params(root)["data"]["raw"]
    with open(raw / "t10k-labels-idx1-ubyte", "ab") as f:
        f.write(b"\0")
    status = json.loads(run(root, "dvc", "status", "--json").stdout)
    changed = {k: v for entry in status["prepare"] for k, v in entry.get("changed deps", {}).items()}
    assert changed == {"data/raw/fashion-mnist": "modified"}, status
    assert "data/raw/fashion-mnist.dvc" in status  # and the tracked folder itself


def test_make_data_tracks_the_folder_and_restores_it_from_the_cache(tmp_path: Path) -> None:
    root = make_tiny_repo(tmp_path / "repo", track_raw=False)
    raw = tiny_params(root)["data"]["raw"]
    before = {p.name: p.read_bytes() for p in (root / raw).iterdir()}
    # Present but untracked (a folder of your own): make data tracks it.
    out = run(root, sys.executable, "-m", "ops.data", "--no-apt").stdout
    assert f"{raw}: tracked by DVC ({raw}.dvc)" in out and (root / f"{raw}.dvc").is_file()
    tracked = (root / f"{raw}.dvc").read_text()
    # Gone from the workspace (a fresh checkout, a `git clean`): back from DVC's cache, the .dvc file unchanged.
    for p in (root / raw).iterdir():
        p.unlink()
    run(root, sys.executable, "-m", "ops.data", "--no-apt")
    assert {p.name: p.read_bytes() for p in (root / raw).iterdir()} == before
    assert (root / f"{raw}.dvc").read_text() == tracked
