"""A DVC remote carries a reproduced project to a fresh clone (docs/scale-out.md, the team flow).

A run ends with ``dvc push``; a teammate's ``git clone`` has dvc.lock and the raw data's .dvc file but no data
and no DVC cache, runs ``dvc pull`` (the raw files come back too), and then ``dvc status`` is clean and
``dvc repro`` runs nothing, with the same model bytes.
Two transports: a folder (what the project's default remote is) and SSH, to a throwaway ``sshd`` on
127.0.0.1 (what a team's server would be), through the ``dvc-ssh`` plugin.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from configobj import ConfigObj
from tinyrepo import copy_reproduced

from blockdrop import tracking

pytestmark = pytest.mark.e2e  # runs stages, servers or other processes: `make test`, not `make test-fast`

SSHD = Path("/usr/sbin/sshd")
GIT_ID = ["-c", "user.name=remote-test", "-c", "user.email=remote-test@localhost"]


def _env() -> dict[str, str]:
    """The environment of a user's shell in the project: the venv first on PATH, and nothing from this test
    session (an MLflow store, a parent run, a DVC experiment) that a stage run could pick up."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", tracking.PARENT_ENV, "DVC_EXP_NAME", "DVC_ROOT", "BLOCKDROP_ROOT")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def sh(root: Path, *cmd: str, timeout: float = 120, stdout_only: bool = False) -> str:
    """Run ``cmd`` in ``root``; its stdout and stderr together (DVC writes progress to either), or stdout."""
    proc = subprocess.run(cmd, cwd=root, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-3000:]}"
    return proc.stdout if stdout_only else proc.stdout + proc.stderr


def model_md5s(root: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted((root / "models").glob("*.pt"))}


def raw_files(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def stage_names(root: Path) -> list[str]:
    return list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])


def publish(reproduced: Path, dst: Path, url: str, local: dict[str, str]) -> Path:
    """A copy of the reproduced project with ``url`` as its default remote, committed in git, then pushed.

    The remote's URL goes into the committed .dvc/config (every clone gets it from git); ``local`` settings
    (a key file, a timeout) into .dvc/config.local, which git ignores: credentials stay on each machine."""
    root = copy_reproduced(reproduced, dst)
    assert not [s for s in ConfigObj(str(root / ".dvc" / "config")) if s.startswith("remote ")], \
        "make_tiny_repo left the project's own DVC remote in a test copy"
    sh(root, "dvc", "remote", "add", "-d", "storage", url)
    for key, value in local.items():
        sh(root, "dvc", "remote", "modify", "--local", "storage", key, value)
    sh(root, "git", "add", "-A")
    sh(root, "git", *GIT_ID, "commit", "-q", "-m", "a reproduced tiny project")
    assert "config.local" not in sh(root, "git", "ls-files", ".dvc")
    sh(root, "dvc", "push")
    return root


def check_fresh_clone(project: Path, clone: Path, local: dict[str, str]) -> None:
    """``git clone`` of ``project``, ``dvc pull``: DVC reports nothing to do and the models are the same bytes."""
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True, timeout=60)
    # What a teammate starts from: dvc.lock and the code (models/ holds only DVC's .gitignore), no DVC cache.
    assert not (clone / ".dvc" / "cache").exists() and model_md5s(clone) == {}
    assert not (clone / "data" / "prepared").exists()
    raw = yaml.safe_load((clone / "params.yaml").read_text())["data"]["raw"]
    assert (clone / f"{raw}.dvc").is_file() and not (clone / raw).exists()  # the raw data: its hash, not its bytes
    for key, value in local.items():
        sh(clone, "dvc", "remote", "modify", "--local", "storage", key, value)
    sh(clone, "dvc", "pull")
    assert raw_files(clone / raw) == raw_files(project / raw) != {}

    # `dvc status` compares the workspace with dvc.lock (deps, params and outs' md5s): `{}` is "up to date".
    assert sh(clone, "dvc", "status", "--json", stdout_only=True).strip() == "{}"
    out = sh(clone, "dvc", "repro")
    for stage in stage_names(clone):
        assert f"Stage '{stage}' didn't change, skipping" in out, out
    assert "Running stage" not in out, out
    assert "Data and pipelines are up to date." in out, out
    # A stage that ran would have opened an MLflow store in the clone: none did.
    assert not (clone / "mlflow.db").exists()
    assert model_md5s(clone) == model_md5s(project) != {}


def test_a_folder_remote_brings_a_fresh_clone_to_a_no_op_repro(tiny_reproduced: Path, tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    project = publish(tiny_reproduced, tmp_path / "project", str(remote), {})
    assert any(remote.rglob("*")), "dvc push wrote nothing to the folder remote"
    check_fresh_clone(project, tmp_path / "clone", {})


def free_port() -> int:
    # The kernel picks a free port; sshd binds it a moment later (nothing else here is racing for ports).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A throwaway OpenSSH server on 127.0.0.1 that accepts one fresh key: (``user@127.0.0.1:port``, key file).

    Every setting is on the command line (``-f /dev/null``), so the system's sshd_config, host keys and
    ``~/.ssh`` are neither read nor changed; it serves SFTP in-process, which is what dvc-ssh speaks."""
    try:
        import dvc_ssh  # noqa: F401  (DVC's ssh:// support is this plugin)
    except ImportError:
        pytest.skip("dvc-ssh is not installed in this venv (pip install -e '.[dev]' installs it)")
    if not SSHD.exists() or shutil.which("ssh-keygen") is None:
        pytest.skip("no OpenSSH server (/usr/sbin/sshd) or ssh-keygen: `make sshd` installs them (root + apt)")
    etc = tmp_path / "sshd"
    etc.mkdir()
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(etc / name)],
                       check=True, timeout=30)
    shutil.copy(etc / "client_key.pub", etc / "authorized_keys")
    if os.geteuid() == 0:
        # sshd refuses to start as root without its privilege-separation directory (the ssh service makes it).
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    port = free_port()
    log = etc / "sshd.log"
    cmd = [str(SSHD), "-D", "-e", "-f", "/dev/null", "-p", str(port),
           "-o", "ListenAddress=127.0.0.1", "-o", f"HostKey={etc / 'host_key'}",
           "-o", f"AuthorizedKeysFile={etc / 'authorized_keys'}", "-o", f"PidFile={etc / 'sshd.pid'}",
           "-o", "StrictModes=no",  # pytest's tmp dirs are not laid out the way sshd wants ~/.ssh to be
           "-o", "PasswordAuthentication=no", "-o", "KbdInteractiveAuthentication=no", "-o", "UsePAM=no",
           "-o", "PermitRootLogin=prohibit-password", "-o", "Subsystem=sftp internal-sftp"]
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                pytest.fail(f"sshd exited with {proc.returncode}:\n{log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"sshd did not listen on 127.0.0.1:{port} in 15 s:\n{log.read_text()}")
                time.sleep(0.1)
        yield f"{getpass.getuser()}@127.0.0.1:{port}", etc / "client_key"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_an_ssh_remote_brings_a_fresh_clone_to_a_no_op_repro(tiny_reproduced: Path, tmp_path: Path,
                                                             sshd: tuple[str, Path]) -> None:
    address, key = sshd
    remote = tmp_path / "ssh-remote"  # on "the server": the same machine, reached only through sshd
    # The key is a credential: it goes into config.local, set again in the clone. dvc-ssh waits 30 min for
    # a connection by default; a broken server should fail this test in seconds.
    local = {"keyfile": str(key), "timeout": "20"}
    project = publish(tiny_reproduced, tmp_path / "project", f"ssh://{address}{remote}", local)
    assert any(remote.rglob("*")), "dvc push wrote nothing through sshd"
    check_fresh_clone(project, tmp_path / "clone", local)
