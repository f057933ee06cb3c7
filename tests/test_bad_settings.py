"""Every bad setting is refused before any work: exit 2, one line naming the dotted key, nothing written.

One tiny repo copy is prepared once (so the checks against the data's shape have a ``meta.json``); each case
writes its params.yaml, runs the stage that reads the setting as DVC would (``python -m pipelines.<stage>``, in
a fork of one interpreter that has imported torch and mlflow once: ``stagefork.py``), restores params.yaml and
compares every file under data/, models/, reports/, checkpoints/ and the MLflow store with the snapshot taken
before. Settings a schema alone refuses also run in-process through ``load_params`` (the same code path,
without an interpreter each), so the table stays cheap. The cron cases start real processes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from stagefork import snapshot
from tinyrepo import REPO, make_tiny_repo, merge

from blockdrop import tracking
from blockdrop.config import ParamsError, load_params

PREFIX = "error: invalid params in params.yaml: "
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a visible GPU")

# (stage that reads it, YAML merged over the tiny profile's params.yaml, a dotted key the line must name).
# The fake raw data has 800 train and 256 test images of 1x28x28; the tiny profile keeps val 256, train 512,
# test 256 and times 2 + 10 latency images.
STAGE_CASES = [
    ("prepare", "seed: -1", "seed"),
    pytest.param("pretrain", "device: cuda", "device", marks=no_gpu),  # was a traceback + exit 1 (retried)
    ("pretrain", "device: gpu", "device"),
    ("prepare", "data: {val_size: 0}", "data.val_size"),  # RL stages crashed after their first epoch
    ("prepare", "data: {val_size: 800}", "data.val_size"),  # vs the raw train size: no training images left
    ("prepare", "data: {train_limit: 600}", "data.train_limit"),  # 800 - 256 = 544 left
    ("prepare", "data: {test_limit: 300}", "data.test_limit"),  # 256 raw test images
    ("pretrain", "model: {depth: 21}", "model.depth"),
    ("pretrain", "pretrain: {warmup_epochs: 50}", "pretrain.warmup_epochs"),  # trained anyway
    ("pretrain", "pretrain: {lr: .inf}", "pretrain.lr"),
    ("pretrain", "pretrain: {crop_size: 40}", "pretrain.crop_size"),  # vs 28x28 images: crashed in batching
    ("curriculum", "curriculum: {lr: .nan}", "curriculum.lr"),
    ("curriculum", "curriculum: {alpha: null}", "curriculum.alpha"),
    ("finetune", "finetune: {lr: .inf}", "finetune.lr"),  # finished with exit 0 and a NaN model registered
    ("finetune", "finetune: {cost: energy}", "finetune.cost"),  # blocks | flops | latency
    ("evaluate", "evaluate: {latency_warmup: 250}", "evaluate.latency_warmup"),  # + 10 > data.test_limit 256
    # data.test_limit 0 passes the schema; the prepared test split (256) is what cannot hold 300 + 10.
    ("evaluate", "{data: {test_limit: 0}, evaluate: {latency_warmup: 300}}", "evaluate.latency_warmup"),
    ("analyze", "analyze: {dpi: 10}", "analyze.dpi"),
    ("report", "report: {title: null}", "report.title"),
    ("finetune", "tracking: {experiment: ''}", "tracking.experiment"),
    # Two processes drop an epoch's last incomplete batch: 32 images per epoch make no batch of 64.
    ("curriculum", "{dist: {nproc: 2}, curriculum: {images_per_epoch: 32}}", "curriculum.batch_size"),
]

# flow.cron is a plain string to the stages; the commands that read it check it with Prefect's own schedule
# model before they start a server or deploy anything: `make schedule` and `make deploy`.
CRON_COMMANDS = {"schedule": ["orchestration", "serve"], "deploy": ["ops.pool", "deploy"]}

# Refused by the schema alone: checked in-process through load_params, the code path every stage starts with
# (the subprocess cases above show that path exits 2 with one line for every stage).
SCHEMA_CASES = [
    ("dist: {nproc: 0}", "dist.nproc"),
    ("dist: {nproc: 3}", "pretrain.batch_size"),  # the tiny profile's global batches (32, 64) do not split in 3
    ("seed: 1.5", "seed"),
    ("threads: null", "threads"),
    ("workers: -1", "workers"),
    ("compile: yes please", "compile"),
    ("data: {image_size: 300}", "data.image_size"),  # larger than data.resize
    ("model: {depth: 101}", "model.weights"),  # ResNet-101 needs torchvision weights
    ("model: {weights: w.pth}", "model.weights"),  # weights are for ResNet-101 only
    ("model: {policy_pool: 9}", "model.policy_pool"),
    ("data: {source: imagenet}", "data.source"),  # ImageNet goes with depth 101
    ("{data: {source: imagenet}, model: {depth: 101, weights: w.pth}}", "curriculum.crop_padding"),
    ("pretrain: {epochs: 0, warmup_epochs: 0}", "pretrain.epochs"),  # nothing to start from
    ("pretrain: {lr_schedule: linear}", "pretrain.lr_schedule"),
    ("finetune: {lr_decay_epoch: 2}", "finetune.lr_decay_epoch"),  # never reached in 2 epochs (tiny: 1)
    ("finetune: {lr_decay: 0}", "finetune.lr_decay"),
    ("data: {raw: null}", "data.raw"),
    ("data: {val_size: .nan}", "data.val_size"),
    ("model: {depth: 2000}", "model.depth"),
    ("pretrain: {momentum: 1.5}", "pretrain.momentum"),
    ("pretrain: {weight_decay: .inf}", "pretrain.weight_decay"),
    ("pretrain: {drop_path_unit: block}", "pretrain.drop_path_unit"),
    ("pretrain: {warmup_epochs: 4.5}", "pretrain.warmup_epochs"),
    ("curriculum: {beta: -0.1}", "curriculum.beta"),
    ("curriculum: {penalty: .nan}", "curriculum.penalty"),
    ("curriculum: {entropy: shannon}", "curriculum.entropy"),
    ("curriculum: {cost: time}", "curriculum.cost"),
    ("curriculum: {keep_epoch: 9}", "curriculum.keep_epoch"),  # never reached in the tiny profile's 3 epochs
    ("finetune: {images_per_epoch: 0}", "finetune.images_per_epoch"),
    ("finetune: {alpha: .inf}", "finetune.alpha"),
    ("evaluate: {latency_threads: -1}", "evaluate.latency_threads"),
    ("heuristics: {k_step: 0}", "heuristics.k_step"),
    ("analyze: {top_policies: 33}", "analyze.top_policies"),
    ("report: {subtitle: x}", "report.subtitle"),
    ("tracking: null", "tracking"),
    ("flow: {accuracy_tolerance: 2}", "flow.accuracy_tolerance"),
    ("flow: {retries: -1}", "flow.retries"),
    ("threads: two", "threads"),
    ("precision: fp16", "precision"),
    ("colour: red", "colour"),  # unknown key
    ("data: {source: mnist}", "data.source"),
    ("model: {depth: null}", "model.depth"),
    ("pretrain: {epochz: 3}", "pretrain.epochz"),
    ("curriculum: {batch_size: 0}", "curriculum.batch_size"),
    ("finetune: {backbone_lr: -.inf}", "finetune.backbone_lr"),
    ("finetune: {execution: dense}", "finetune.execution"),
    ("evaluate: {batch_size: '128'}", "evaluate.batch_size"),
    ("analyze: {embedding: umap}", "analyze.embedding"),
    ("report: [a, b]", "report"),
    ("tracking: {log_model: 'yes'}", "tracking.log_model"),
    ("flow: {retry_delay_s: .inf}", "flow.retry_delay_s"),
    ("sweep: {grid: {finetune.penalty: [1, -1]}}", "sweep.grid.finetune.penalty"),  # each setting is validated
    ("sweep: {grid: {finetune.penalti: [1]}}", "sweep.grid.finetune.penalti"),  # not a params key
    ("sweep: {grid: {threads: [1, 2]}}", "sweep.grid.threads"),  # no stage reads it: identical experiments
    ("sweep: {grid: {seed: []}}", "sweep.grid.seed"),
    ("sweep: {workers: 0}", "sweep.workers"),
    ("sweep: {name: a/b}", "sweep.name"),
]


def stage_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", tracking.PARENT_ENV, "DVC_EXP_NAME", "DVC_ROOT")}
    return env | {"BLOCKDROP_ROOT": str(root), "MLFLOW_DISABLE_TELEMETRY": "true"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_tiny_repo(tmp_path_factory.mktemp("bad_settings"))
    proc = subprocess.run([sys.executable, "-m", "pipelines.prepare"], cwd=root, env=stage_env(root),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (root / "data/prepared/meta.json").exists() and (root / "mlflow.db").exists()
    return root


def named_keys(line: str) -> list[str]:
    """The dotted keys an error line names: ``<prefix><key>[, <key>...]: <why>`` (several for a conflict)."""
    assert line.startswith(PREFIX), line
    return line.removeprefix(PREFIX).split(": ")[0].split(", ")


def case_values(case) -> tuple[str, str, str]:
    return case.values if hasattr(case, "values") else case


def case_skipped(case) -> bool:
    return any(m.name == "skipif" and m.args and m.args[0] for m in getattr(case, "marks", ()))


@pytest.fixture(scope="module")
def refusals(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], dict]:
    """Every stage case run once, each in its own fork (``stagefork.py``): (stage, snippet) -> its result."""
    text = (repo / "params.yaml").read_text()
    cases = [case_values(c) for c in STAGE_CASES if not case_skipped(c)]
    work = tmp_path_factory.mktemp("refusals")
    (work / "cases.json").write_text(json.dumps([
        {"stage": name, "params": yaml.safe_dump(merge(yaml.safe_load(text), yaml.safe_load(snippet)))}
        for name, snippet, _ in cases]))
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("stagefork.py")), str(work / "cases.json"),
                           str(work / "out.json")], cwd=repo, env=stage_env(repo), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (repo / "params.yaml").read_text() == text
    results = json.loads((work / "out.json").read_text())
    return {(name, snippet): result for (name, snippet, _), result in zip(cases, results, strict=True)}


@pytest.mark.e2e
@pytest.mark.parametrize(("name", "snippet", "key"), STAGE_CASES)
def test_stage_refuses_bad_setting_before_any_work(refusals: dict, name: str, snippet: str, key: str) -> None:
    result = refusals[(name, snippet)]
    assert result["returncode"] == 2, result["stderr"][-2000:]
    assert "Traceback" not in result["stderr"]
    # One line on stderr says what is wrong (the stage's log goes to stdout).
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    assert len(lines) == 1, result["stderr"]
    assert key in named_keys(lines[0]), lines[0]
    assert result["changed"] == [], f"{name} wrote or changed files"


@pytest.mark.e2e
@pytest.mark.parametrize("cron", ["61 * * * *", "every monday"])
@pytest.mark.parametrize("command", CRON_COMMANDS)
def test_schedule_and_deploy_refuse_a_cron_prefect_refuses_before_any_work(repo: Path, tmp_path: Path, command: str,
                                                                            cron: str) -> None:
    text = (repo / "params.yaml").read_text()
    before = snapshot(repo)
    (repo / "params.yaml").write_text(yaml.safe_dump(merge(yaml.safe_load(text), {"flow": {"cron": cron}})))
    with socket.socket() as s:  # a port nothing listens on: a server, if one were started, would be ours
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in stage_env(repo).items() if k != "PREFECT_API_URL"}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    try:
        proc = subprocess.run([sys.executable, "-m", *CRON_COMMANDS[command], "--port", str(port)], cwd=repo,
                              env=env, capture_output=True, text=True, timeout=300)
    finally:
        (repo / "params.yaml").write_text(text)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert named_keys(lines[0]) == ["flow.cron"] and f'"{cron}"' in lines[0], lines[0]
    assert "Prefect server" not in proc.stdout and not proc.stdout.strip(), proc.stdout  # none started
    assert snapshot(repo) == before, f"make {command} wrote or changed files"


@pytest.mark.parametrize(("snippet", "key"), SCHEMA_CASES)
def test_schema_refuses_bad_setting(tmp_path: Path, snippet: str, key: str) -> None:
    tiny = merge(*(yaml.safe_load((REPO / name).read_text()) for name in ("params.yaml", "profiles/tiny.yaml")))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(merge(tiny, yaml.safe_load(snippet))))
    with pytest.raises(ParamsError) as info:
        load_params(params, exit_on_error=False)
    message = str(info.value)
    assert "\n" not in message
    assert key in named_keys(PREFIX + message), message


def test_table_covers_every_section_and_at_least_30_settings() -> None:
    keys = [c.values[2] if hasattr(c, "values") else c[2] for c in STAGE_CASES] + [k for _, k in SCHEMA_CASES]
    assert len(keys) >= 30
    sections = {k.split(".")[0] for k in keys}
    top = set(yaml.safe_load((REPO / "params.yaml").read_text()))
    assert top <= sections, top - sections
