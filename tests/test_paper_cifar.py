"""`dvc repro` of the CIFAR-10 ResNet-32 paper profile, shrunk only in sizes, on CIFAR-format files.

The copy of the project gets the profile exactly as a user applies it (``python -m ops.profile``), then
a second profile that changes only sizes: image counts, epochs, batch sizes, the finetune decay's epoch (a
position in a shorter run) and the latency sample. Every other key (the paper's loss, the dense masked
finetuning, the summed policy gradient, the step schedule, 32x32 crops with padding 4, fp32) is the
profile's. The raw data is a CIFAR-10 archive in the official pickled format, written here.

torchvision checks CIFAR's files against the md5s of the published archive, and the stages run in DVC's
subprocesses where a monkeypatch cannot reach: a ``sitecustomize`` on the subprocesses' PYTHONPATH points
torchvision's CIFAR10 at this archive's md5s (and nowhere on the network) when its module is first imported.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from fakedata import cifar_batch, cifar_meta, md5, tar_gz
from tinyrepo import make_tiny_repo

pytestmark = pytest.mark.e2e  # runs stages, servers or other processes: `make test`, not `make test-fast`

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TRAIN_FILES, PER_FILE, TEST = 5, 120, 200  # 600 training images (as five data_batch files), 200 test

# Only sizes differ from profiles/cifar10-resnet32.yaml.
SHRINK = {
    "data": {"val_size": 100},
    "pretrain": {"epochs": 6, "batch_size": 32},  # 90 steps, the last quarter at lr 0.001 (the step schedule)
    "curriculum": {"epochs": 3, "images_per_epoch": 256, "batch_size": 64},
    "finetune": {"epochs": 2, "images_per_epoch": 256, "batch_size": 64, "lr_decay_epoch": 1},
    "evaluate": {"batch_size": 100, "latency_images": 10, "latency_warmup": 2},
}

SITECUSTOMIZE = '''
"""Test shim: torchvision's CIFAR10 checks the fake archive's md5s (set in BLOCKDROP_FAKE_CIFAR) on import."""
import importlib.abc, importlib.machinery, json, os, sys

_SPEC = json.loads(os.environ["BLOCKDROP_FAKE_CIFAR"])


class _Patch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "torchvision.datasets.cifar":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            for key, value in _SPEC.items():
                setattr(module.CIFAR10, key, value)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Patch())
'''


def learnable_cifar(seed: int = 0) -> tuple[dict[str, bytes], dict]:
    """The archive's files and the md5 attributes torchvision's CIFAR10 should have for them. Images are
    a class colour under noise: a ResNet-32 learns it in an epoch or two."""
    rng = np.random.default_rng(seed)
    # ten colours far apart: the eight corners of the RGB cube (pulled in), mid grey, and one more
    colours = np.array([[r, g, b] for r in (40, 215) for g in (40, 215) for b in (40, 215)]
                       + [[128, 128, 128], [215, 128, 40]])

    def images(labels: np.ndarray) -> np.ndarray:
        noise = rng.normal(0, 15, (len(labels), 3, 32, 32))
        return np.clip(colours[labels][:, :, None, None] + noise, 0, 255).astype(np.uint8)

    files, train_list = {}, []
    for i in range(TRAIN_FILES):
        labels = rng.permutation(np.arange(PER_FILE) % 10)
        files[f"data_batch_{i + 1}"] = cifar_batch(images(labels), labels.tolist(), "labels")
        train_list.append([f"data_batch_{i + 1}", md5(files[f"data_batch_{i + 1}"])])
    test_labels = np.arange(TEST) % 10
    files["test_batch"] = cifar_batch(images(test_labels), test_labels.tolist(), "labels")
    files["batches.meta"] = cifar_meta(CLASSES, "label_names")
    archive = tar_gz({f"cifar-10-batches-py/{name}": blob for name, blob in files.items()})
    spec = {"train_list": train_list, "test_list": [["test_batch", md5(files["test_batch"])]],
            "meta": {"filename": "batches.meta", "key": "label_names", "md5": md5(files["batches.meta"])},
            "tgz_md5": md5(archive), "url": "http://127.0.0.1:9/cifar-10-python.tar.gz"}
    return {"cifar-10-python.tar.gz": archive}, spec


def run(root: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def repro(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("paper_cifar")
    root = make_tiny_repo(base / "repo")
    shim = base / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SITECUSTOMIZE)
    files, spec = learnable_cifar()
    raw = root / "data" / "raw" / "cifar10"  # the profile's data.raw
    raw.mkdir(parents=True, exist_ok=True)
    for name, blob in files.items():
        (raw / name).write_bytes(blob)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "DVC_NO_ANALYTICS": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true", "BLOCKDROP_FAKE_CIFAR": json.dumps(spec),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")]))}
    env.pop("BLOCKDROP_PARENT_RUN_ID", None)
    (base / "shrink.yaml").write_text(yaml.safe_dump(SHRINK))
    run(root, env, sys.executable, "-m", "ops.profile", "profiles/cifar10-resnet32.yaml")
    run(root, env, sys.executable, "-m", "ops.profile", str(base / "shrink.yaml"))
    run(root, env, "dvc", "repro")
    return root


def test_the_profile_is_applied_and_only_sizes_shrunk(repro: Path) -> None:
    params = yaml.safe_load((repro / "params.yaml").read_text())
    profile = yaml.safe_load((repro / "profiles/cifar10-resnet32.yaml").read_text())
    for section, keys in profile.items():
        if not isinstance(keys, dict):
            assert params[section] == keys, section
            continue
        for key, value in keys.items():
            assert params[section][key] == SHRINK.get(section, {}).get(key, value), f"{section}.{key}"


def test_every_stage_ran_on_cifar10(repro: Path) -> None:
    lock = yaml.safe_load((repro / "dvc.lock").read_text())["stages"]
    stages = yaml.safe_load((repro / "dvc.yaml").read_text())["stages"]
    assert set(lock) == set(stages)
    meta = json.loads((repro / "data/prepared/meta.json").read_text())
    assert meta["source"] == "cifar10" and meta["shape"] == [3, 32, 32]
    assert meta["sizes"] == {"train": TRAIN_FILES * PER_FILE - 100, "val": 100, "test": TEST}
    evaluate = json.loads((repro / "reports/evaluate/metrics.json").read_text())
    assert evaluate["num_blocks"] == 15  # ResNet-32
    assert evaluate["full"]["blocks_mean"] == 15
    pretrain = json.loads((repro / "reports/pretrain/metrics.json").read_text())
    assert pretrain["train"]["epochs"] == 6 and pretrain["test"]["accuracy"] > 0.6  # colour-coded: far above 0.1
    assert "cifar10" in (repro / "reports/report.md").read_text()


def test_mlflow_logged_the_paper_loss_for_finetune(repro: Path) -> None:
    with sqlite3.connect(repro / "mlflow.db") as db:
        rows = db.execute(
            "SELECT p.key, p.value FROM params p JOIN tags t ON t.run_uuid = p.run_uuid "
            "WHERE t.key = 'stage' AND t.value = 'finetune'").fetchall()
    logged = dict(rows)
    assert logged["finetune.pg_reduction"] == "sum"
    assert logged["finetune.execution"] == "masked"
    assert logged["finetune.greedy_ce"] == "0.0" and logged["finetune.lr_decay_epoch"] == "1"
