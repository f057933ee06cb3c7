"""A throw-away copy of the project on the tiny profile, with a small learnable fake Fashion-MNIST.

Imported by the flow tests and ``bench/overhead.py`` (``from tinyrepo import make_tiny_repo``); no fixtures
here. The copy holds the working tree as git sees it (tracked and untracked, not ignored files), minus
everything a run produces (data, models, DVC's cache, MLflow's store), so it runs exactly the code being
tested. It is its own git repository (no commits), as DVC expects, with no DVC remote (``drop_dvc_remotes``).
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml
from configobj import ConfigObj
from fakedata import write_fashion

REPO = Path(__file__).resolve().parents[1]
DVC = Path(sys.executable).parent / "dvc"
# Produced by runs or local to a machine: never copied.
SKIP_PREFIXES = ("data/", "models/", "checkpoints/", "mlartifacts/", "mlruns/", ".dvc/cache/", ".dvc/tmp/",
                 ".dvc/config.local", "tests/", "bench/", ".ci/")
SKIP_FILES = {"dvc.lock", "mlflow.db"}

# Used only if profiles/tiny.yaml is absent: a run of every stage in about a minute on two CPU cores.
FALLBACK_TINY = {
    "data": {"train_limit": 512, "val_size": 256, "test_limit": 256},
    "model": {"depth": 20},
    "pretrain": {"epochs": 1, "batch_size": 64},
    "curriculum": {"epochs": 2, "images_per_epoch": 256, "batch_size": 64},
    "finetune": {"epochs": 1, "images_per_epoch": 256, "batch_size": 64},
    "evaluate": {"latency_images": 10, "latency_warmup": 2},
}


# One epoch per training stage: for a test about orchestration (the retrain flow), where the model only has to
# beat a constant answer.
SHRUNK_TINY = {"pretrain": {"epochs": 1}, "curriculum": {"epochs": 1}, "evaluate": {"latency_images": 4}}


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def project_files(repo: Path = REPO) -> list[str]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=repo,
                            check=True, capture_output=True, text=True).stdout.split("\0")
    return [f for f in listed if f and not f.startswith(SKIP_PREFIXES) and f not in SKIP_FILES
            and not (f.startswith("reports/sweep/") and f != "reports/sweep/README.md")  # the project's own sweep
            and (repo / f).is_file()]


def learnable_fashion(n_train: int = 800, n_test: int = 256, seed: int = 0) -> dict[str, np.ndarray]:
    """28x28 images whose class is their brightness (10 levels) under noise: a tiny ResNet learns it in
    an epoch, so a trained model is clearly better than chance and a broken one clearly worse."""
    rng = np.random.default_rng(seed)

    def images(labels: np.ndarray) -> np.ndarray:
        level = 20 + 22 * labels.astype(np.float64)
        noise = rng.normal(0, 12, (len(labels), 28, 28))
        return np.clip(level[:, None, None] + noise, 0, 255).astype(np.uint8)

    train_labels = rng.permutation(np.arange(n_train) % 10).astype(np.uint8)
    test_labels = (np.arange(n_test) % 10).astype(np.uint8)
    return {"train_images": images(train_labels), "train_labels": train_labels,
            "test_images": images(test_labels), "test_labels": test_labels}


def drop_dvc_remotes(root: Path) -> None:
    """Remove every remote, and the default, from ``root/.dvc/config``.

    The project's config names a default remote (a folder beside the clone, or whatever a team pointed it at:
    a bucket, an SSH host). A copy made for a test must never push there, so it gets none; a test that wants
    a remote adds its own. configobj is the parser DVC itself reads and writes this file with."""
    path = root / ".dvc" / "config"
    if not path.is_file():
        return
    conf = ConfigObj(str(path))
    if "core" in conf:
        conf["core"].pop("remote", None)
    for section in [name for name in conf if name.startswith("remote ")]:
        del conf[section]
    conf.write()


def make_tiny_repo(dst: Path, overrides: dict | None = None, repo: Path = REPO, track_raw: bool = True,
                   write_raw: Callable[[Path], object] | None = None) -> Path:
    """Copy the project to ``dst`` (created), apply the tiny profile and ``overrides``, add fake data in
    ``data.raw`` (tracked by DVC unless ``track_raw`` is off, the layout before the raw data was versioned):
    a learnable Fashion-MNIST, or what ``write_raw(<data.raw>)`` writes (a folder of images, say)."""
    dst.mkdir(parents=True, exist_ok=True)
    for rel in project_files(repo):
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / rel, target)
    params = yaml.safe_load((dst / "params.yaml").read_text())
    profile = dst / "profiles" / "tiny.yaml"
    tiny = yaml.safe_load(profile.read_text()) if profile.exists() else FALLBACK_TINY
    params = merge(merge(params, tiny), overrides or {})
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    if write_raw is None:
        write_fashion(dst / params["data"]["raw"], learnable_fashion())
    else:
        write_raw(dst / params["data"]["raw"])
    drop_dvc_remotes(dst)
    git = ["git", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q"], cwd=dst, check=True)
    if track_raw:  # as `make data` leaves the project: the raw folder in DVC's cache, <raw>.dvc beside it
        subprocess.run([str(DVC), "add", "--quiet", params["data"]["raw"]], cwd=dst, check=True)
    return dst


def tiny_params(root: Path) -> dict:
    return yaml.safe_load((root / "params.yaml").read_text())


def copy_reproduced(src: Path, dst: Path) -> Path:
    """A copy of a reproduced project (DVC's cache included) without its MLflow store, whose artifact paths
    point into ``src``: runs in the copy start a store of their own."""
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("mlflow.db*", "mlartifacts"))
    return dst
