"""Recovery from interruptions: a resume state that can never be stale, kills survived bit for bit, killed
MLflow runs marked.

The unit tests hold the pieces (the resume key follows dvc.yaml, a state that cannot be resumed is set aside,
the stage run's lease); the kill test SIGKILLs ``dvc repro`` in the middle of each training stage of a tiny
project and checks that the reruns end exactly where an unbroken run does.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from mlflow import MlflowClient

from blockdrop import lineage, tracking
from blockdrop.config import Params, select_params
from blockdrop.runtime import bf16_is_fast
from blockdrop.train.resume import resume_state, save_state

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- the key


def _project(root: Path) -> Path:
    """The repo's dvc.yaml with every dep of the training stages present (small stand-in files)."""
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    for dep in {d for s in ("pretrain", "curriculum", "finetune") for d in lineage.stage_deps(s, root / "dvc.yaml")}:
        path = root / dep
        path.parent.mkdir(parents=True, exist_ok=True)
        if "." in path.name:
            path.write_text(f"content of {dep}\n")
        else:  # a folder dep
            (path / "inside.bin").parent.mkdir(parents=True, exist_ok=True)
            (path / "inside.bin").write_bytes(b"\x00\x01")
    return root / "dvc.yaml"


def test_upstream_stages_follow_the_outs_into_the_deps() -> None:
    dvc_yaml = REPO / "dvc.yaml"
    assert lineage.upstream_stages("prepare", dvc_yaml) == []
    assert lineage.upstream_stages("curriculum", dvc_yaml) == ["prepare", "pretrain"]
    assert lineage.upstream_stages("evaluate", dvc_yaml) == ["prepare", "pretrain", "curriculum", "finetune",
                                                             "finetune-full"]
    # the fair full-network baseline: the backbone's budget from finetune's keys, nothing of the policy
    assert lineage.upstream_stages("finetune-full", dvc_yaml) == ["prepare", "pretrain"]
    assert "finetune.penalty" not in select_params(Params(), lineage.upstream_param_keys("finetune-full", dvc_yaml))
    keys = lineage.upstream_param_keys("curriculum", dvc_yaml)
    assert {"seed", "data", "model.depth", "model.weights", "model.policy_pool", "pretrain", "curriculum"} <= set(keys)
    assert "finetune" not in keys
    # the backbone depends on the backbone's model keys only: a policy sweep must not retrain it
    assert "model.policy_pool" not in lineage.upstream_param_keys("pretrain", dvc_yaml)
    assert lineage.upstream_param_keys("report", dvc_yaml) is None  # `params.yaml:` alone: every key


def test_resume_key_covers_upstream_params_and_the_md5_of_every_dep(tmp_path: Path) -> None:
    dvc_yaml = _project(tmp_path)
    base = Params()
    key = lineage.resume_key("curriculum", base, dvc_yaml)
    assert lineage.resume_key("curriculum", Params(), dvc_yaml) == key  # stable
    # An upstream-only key (curriculum reads no pretrain.*) and its own key change it; a downstream key does not.
    assert lineage.resume_key("curriculum", Params(pretrain={"lr": 0.1}), dvc_yaml) != key
    assert lineage.resume_key("curriculum", Params(data={"val_size": 100}), dvc_yaml) != key
    assert lineage.resume_key("curriculum", Params(curriculum={"lr": 0.01}), dvc_yaml) != key
    assert lineage.resume_key("curriculum", Params(finetune={"lr": 0.01}), dvc_yaml) == key
    # Every dep's bytes: the upstream model, the data folder, the code.
    for dep in ("models/backbone.pt", "data/prepared/inside.bin", "blockdrop/train/curriculum.py"):
        before = (tmp_path / dep).read_bytes()
        (tmp_path / dep).write_bytes(before + b"#")
        assert lineage.resume_key("curriculum", base, dvc_yaml) != key, dep
        (tmp_path / dep).write_bytes(before)
    assert lineage.resume_key("curriculum", base, dvc_yaml) == key
    # Byte-code written by a first import is not an input (DVC ignores it too, see .dvcignore).
    before = lineage.resume_key("pretrain", base, dvc_yaml)
    (tmp_path / "blockdrop" / "data" / "__pycache__").mkdir(parents=True)
    (tmp_path / "blockdrop" / "data" / "__pycache__" / "x.pyc").write_bytes(b"pyc")
    assert lineage.resume_key("pretrain", base, dvc_yaml) == before


def test_tracking_still_exports_dvc_md5() -> None:
    assert tracking.dvc_md5 is lineage.dvc_md5


# ------------------------------------------------------------------------------------- stale states


def _parts(out_features: int = 2) -> dict:
    torch.manual_seed(0)
    first, second = torch.nn.Linear(4, 2), torch.nn.Linear(3, out_features)
    return {"first": first, "second": second, "optimizer": torch.optim.Adam([*first.parameters(),
                                                                             *second.parameters()])}


def _snapshot(parts: dict) -> dict:
    return {k: {n: t.clone() for n, t in v.state_dict().items()} for k, v in parts.items() if k != "optimizer"}


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """A state after 2 epochs, and an older ``.stale`` beside it that a new one must replace."""
    path = tmp_path / "checkpoints" / "curriculum.pt"
    parts = _parts()
    for p in parts["first"].parameters():
        p.data += 1  # so that a resumed part differs from a fresh one
    save_state(path, "key", 2, parts, torch.Generator().manual_seed(5), [{"epoch": 1.0}, {"epoch": 2.0}])
    (tmp_path / "checkpoints" / "curriculum.pt.stale").write_bytes(b"older")
    return path


def _assert_set_aside(path: Path, parts: dict, fresh: dict, gen: torch.Generator, result, caplog) -> None:
    assert result == (0, [])
    assert not path.exists()
    stale = path.with_name("curriculum.pt.stale")
    assert stale.read_bytes() != b"older"  # the new one replaced the older .stale
    assert all(torch.equal(t, parts[k].state_dict()[n]) for k, d in fresh.items() for n, t in d.items())
    assert parts["optimizer"].state_dict()["state"] == {}
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(9).get_state())
    lines = [r.getMessage() for r in caplog.records if "not resuming" in r.getMessage()]
    assert len(lines) == 1 and str(stale) in lines[0]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(("key", "parts_kwargs", "damage", "said"), [
    pytest.param("other key", {}, None, ["other params or inputs"], id="another-key"),
    # "first" fits and loads, then "second" has another shape: "first" must be back to its fresh weights.
    pytest.param("key", {"out_features": 5}, None, ["does not fit", "size mismatch"], id="does-not-fit"),
    pytest.param("key", {}, _truncate, ["unreadable"], id="truncated"),
])
def test_a_state_that_cannot_be_resumed_is_set_aside_untouched(saved: Path, caplog, key, parts_kwargs, damage,
                                                               said) -> None:
    if damage:
        damage(saved)
    parts, gen = _parts(**parts_kwargs), torch.Generator().manual_seed(9)
    fresh = _snapshot(parts)
    with caplog.at_level(logging.INFO):
        result = resume_state(saved, key, parts, gen)
    _assert_set_aside(saved, parts, fresh, gen, result, caplog)
    assert all(text in caplog.text for text in said), caplog.text


def test_state_that_fits_is_resumed(saved: Path) -> None:
    parts, gen = _parts(), torch.Generator().manual_seed(9)
    assert resume_state(saved, "key", parts, gen) == (2, [{"epoch": 1.0}, {"epoch": 2.0}])
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(5).get_state())
    assert saved.exists()


# ---------------------------------------------------------------------------------- leases and tags


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _lease(stage: str, run_id: str, pid: int) -> None:
    path = Path("checkpoints") / f"{stage}.run.json"
    path.parent.mkdir(exist_ok=True)
    started = psutil.Process(pid).create_time() if psutil.pid_exists(pid) else time.time() - 60
    path.write_text(json.dumps({"run_id": run_id, "pid": pid, "host": socket.gethostname(), "started": started}))


def _orphan_run(client: MlflowClient, stage: str) -> str:
    """A RUNNING run, as a process killed inside its stage leaves it."""
    exp = client.get_experiment_by_name("blockdrop") or client.get_experiment(client.create_experiment("blockdrop"))
    return client.create_run(exp.experiment_id, run_name=stage).info.run_id


def test_run_of_a_killed_stage_is_marked_killed_and_named_by_the_rerun(mlflow_project: str) -> None:
    client = MlflowClient(mlflow_project)
    killed = _orphan_run(client, "pretrain")
    _lease("pretrain", killed, _dead_pid())
    with tracking.stage_run("pretrain", Params()) as run:
        assert client.get_run(killed).info.status == "KILLED"
        assert run.previous_run_id == killed
        lease = json.loads(Path("checkpoints/pretrain.run.json").read_text())
        assert lease["run_id"] == run.run_id and lease["pid"] == os.getpid()
        run.mark_resumed(3)
    tags = client.get_run(run.run_id).data.tags
    assert (tags["resumed"], tags["resumed_from_epoch"], tags["resumed_from_run"]) == ("true", "3", killed)
    assert not Path("checkpoints/pretrain.run.json").exists()  # a finished run leaves no lease


def test_run_of_a_live_process_is_left_alone(mlflow_project: str) -> None:
    # Another process still running the stage (its lease names a live pid): its run must stay RUNNING.
    client = MlflowClient(mlflow_project)
    alive = _orphan_run(client, "curriculum")
    _lease("curriculum", alive, os.getppid())
    with tracking.stage_run("curriculum", Params()) as run:
        assert run.previous_run_id is None
    assert client.get_run(alive).info.status == "RUNNING"
    assert "resumed" not in client.get_run(run.run_id).data.tags


def test_a_failed_run_keeps_its_lease_for_the_rerun(mlflow_project: str) -> None:
    client = MlflowClient(mlflow_project)
    with pytest.raises(RuntimeError), tracking.stage_run("finetune", Params()) as failed:
        raise RuntimeError("boom")
    assert json.loads(Path("checkpoints/finetune.run.json").read_text())["run_id"] == failed.run_id
    assert client.get_run(failed.run_id).info.status == "FAILED"


def test_stage_runs_carry_cpu_torch_build_and_precision(mlflow_project: str) -> None:
    with tracking.stage_run("evaluate", Params()) as run:
        pass
    with tracking.stage_run("evaluate", Params(device="cpu", precision="fp32")) as fp32:
        pass
    client = MlflowClient(mlflow_project)
    tags = client.get_run(run.run_id).data.tags
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert tags["precision"] == ("bf16" if bf16_is_fast(device) else "fp32")  # what `auto` resolved to here
    assert client.get_run(fp32.run_id).data.tags["precision"] == "fp32"
    assert tags["host.cpu"] and tags["host.cpu"] != "unknown"
    assert tags["torch.version"] == torch.__version__
    assert tags["torch.cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    build = dict(item.split("=", 1) for item in tags["torch.build"].split(" "))
    assert build["cpu"] == torch.backends.cpu.get_cpu_capability()
    assert build["openmp"] == ("yes" if torch.backends.openmp.is_available() else "no")
    assert build["cuda"] == (torch.version.cuda or "no")
    assert set(build) == {"cpu", "mkl", "onednn", "openmp", "cuda"}
    assert tags["host.gpu"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")


# ----------------------------------------------------------------------------------------- kill test

sys.path.insert(0, str(Path(__file__).parent))
from tinyrepo import make_tiny_repo  # noqa: E402

# Three epochs per training stage, each a second or two: a kill after epoch 1 lands in epoch 2 or 3.
KILL_OVERRIDES = {
    "data": {"train_limit": 256, "val_size": 64, "test_limit": 64, "verify_checksums": False},
    "model": {"depth": 8},
    "pretrain": {"epochs": 3, "batch_size": 32},
    "curriculum": {"epochs": 3, "images_per_epoch": 128, "batch_size": 32},
    "finetune": {"epochs": 3, "images_per_epoch": 128, "batch_size": 32},
    "evaluate": {"latency_images": 4, "latency_warmup": 1},
    "tracking": {"log_model": False},
}
TRAINED = ("pretrain", "curriculum", "finetune")
MODELS = ("models/backbone.pt", "models/policy_cl.pt", "models/blockdrop.pt", "models/backbone_finetuned.pt")
KILL_WITHIN_S = 0.3  # after the first epoch's state appears
TIMING = ("images_per_s", "epoch_seconds", "latency", "measured")  # wall-clock numbers: differ run to run


def _env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in {tracking.PARENT_ENV, "DVC_EXP_NAME", "DVC_ROOT", "BLOCKDROP_ROOT"}}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # stages call `python`
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    return env


def _repro(root: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "dvc", "repro", "evaluate"], cwd=root, env=_env(root),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _numbers(tree: dict, prefix: str = "") -> dict:
    """Flattened metrics without the timing keys."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= _numbers(value, name + ".")
        elif not any(t in name for t in TIMING):
            out[name] = value
    return out


def _history(root: Path, stage: str) -> list[dict]:
    with (root / "reports" / stage / "history.csv").open() as f:
        return [{k: v for k, v in row.items() if not any(t in k for t in TIMING)} for row in csv.DictReader(f)]


def _repro_in_background(root: Path, log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "dvc", "repro", "evaluate"], cwd=root, env=_env(root),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_during(root: Path, stage: str, rng: random.Random, seed: int) -> int:
    """Run ``dvc repro evaluate`` and SIGKILL its process group at a random moment of ``stage``'s second
    epoch; return the epoch its state holds."""
    state = root / "checkpoints" / f"{stage}.pt"
    log = root / f"kill-{stage}.log"
    proc = _repro_in_background(root, log)
    deadline = time.monotonic() + 300
    while not state.exists():  # written after each epoch, removed once the stage's outs are written
        assert proc.poll() is None, f"dvc repro ended before {stage} saved an epoch: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{stage} saved no epoch in 300 s"
        time.sleep(0.02)
    # The state appears after epoch 1; what is left (two epochs, the outputs, their MLflow logging) takes well
    # over KILL_WITHIN_S even on an idle machine, so the kill lands in epoch 2, rarely 3 or the outputs.
    delay = rng.uniform(0.0, KILL_WITHIN_S)
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    epoch = torch.load(state, weights_only=True)["epoch"] if state.exists() else 0
    print(f"{stage}: SIGKILL {delay:.2f} s after its first epoch was saved; its state holds epoch {epoch}")
    assert epoch >= 1, f"the kill (seed {seed}, +{delay:.2f} s) came after {stage} finished"
    return epoch


def _runs(root: Path, stage: str) -> list:
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("blockdrop")
    return client.search_runs([exp.experiment_id], f"tags.mlflow.runName = '{stage}'",
                              order_by=["attributes.start_time ASC"])


@pytest.mark.e2e
def test_sigkill_in_each_training_stage_then_rerun_matches_an_unbroken_run(tmp_path: Path) -> None:
    seed = int(os.environ.get("BLOCKDROP_KILL_SEED", random.randrange(1 << 16)))
    print(f"kill seed {seed} (replay: BLOCKDROP_KILL_SEED={seed})")
    rng = random.Random(seed)
    unbroken = make_tiny_repo(tmp_path / "a", KILL_OVERRIDES)
    killed = make_tiny_repo(tmp_path / "b", KILL_OVERRIDES)
    # The unbroken run goes beside the killed copy's: much of a stage is imports, on one core of the two.
    reference = _repro_in_background(unbroken, tmp_path / "a.log")

    epochs = {}
    try:
        for stage in TRAINED:  # each rerun resumes the stage killed before, then is killed in the next one
            epochs[stage] = _kill_during(killed, stage, rng, seed)
            if stage == "curriculum":  # kept for the changed-upstream-param check below
                shutil.copy(killed / "checkpoints" / "curriculum.pt", tmp_path / "curriculum-state.pt")
        _repro(killed)
        assert reference.wait(timeout=600) == 0, (tmp_path / "a.log").read_text()[-3000:]
    finally:
        if reference.poll() is None:
            os.killpg(reference.pid, signal.SIGKILL)
            reference.wait()

    for model in MODELS:
        assert _md5(killed / model) == _md5(unbroken / model), f"{model} differs (kill seed {seed})"
    for stage in (*TRAINED, "finetune-full", "evaluate"):  # finetune-full runs once in each copy, unbroken
        a, b = (json.loads((r / "reports" / stage / "metrics.json").read_text()) for r in (unbroken, killed))
        assert _numbers(b) == _numbers(a), f"{stage} metrics differ (kill seed {seed})"
    for stage in TRAINED:
        assert _history(killed, stage) == _history(unbroken, stage), stage
        dead, rerun = _runs(killed, stage)  # exactly two runs: the killed one and the one that resumed it
        assert dead.info.status == "KILLED"
        assert rerun.info.status == "FINISHED"
        assert rerun.data.tags["resumed"] == "true"
        assert rerun.data.tags["resumed_from_epoch"] == str(epochs[stage])
        assert rerun.data.tags["resumed_from_run"] == dead.info.run_id
        assert rerun.data.tags["host.cpu"] and rerun.data.tags["torch.version"] == torch.__version__
    assert not list((killed / "checkpoints").glob("*.pt"))  # every finished stage cleared its state

    # A state left by a killed curriculum, then an upstream-only param changed (curriculum reads no pretrain.*
    # key, but its backbone came from them): the stage starts over and sets the state aside.
    params = yaml.safe_load((killed / "params.yaml").read_text())
    params["pretrain"]["lr"] = params["pretrain"]["lr"] / 2
    (killed / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(tmp_path / "curriculum-state.pt", killed / "checkpoints" / "curriculum.pt")
    done = subprocess.run([sys.executable, "-m", "pipelines.curriculum"], cwd=killed, env=_env(killed),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # The stage's log goes to stdout (stderr is for errors).
    assert "not resuming" in done.stdout and "other params or inputs" in done.stdout
    fresh = _runs(killed, "curriculum")[-1]
    assert fresh.info.status == "FINISHED" and "resumed" not in fresh.data.tags
    assert [int(r["epoch"]) for r in _history(killed, "curriculum")] == [1, 2, 3]
    stale = killed / "checkpoints" / "curriculum.pt.stale"
    assert stale.read_bytes() == (tmp_path / "curriculum-state.pt").read_bytes()  # the state, set aside whole
