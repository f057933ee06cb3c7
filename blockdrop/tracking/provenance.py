"""What a stage run records about where its numbers came from: the params that decided them, tags (stage, git
commit, DVC experiment, host and torch build, precision, hashes of the params and data) and its dataset input.

A run logs exactly the params ``dvc.yaml`` lists for its stage and for every stage upstream of it (dotted names,
as in params.yaml), so ``dvc exp show`` and the MLflow comparison view have the same columns.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any

import mlflow

from blockdrop.config import Params, params_sha256, select_params
from blockdrop.lineage import dvc_md5, stage_deps, upstream_param_keys, upstream_stages
from blockdrop.project import find_up, git
from blockdrop.tracking.store import repo_root

__all__ = ["PREPARED", "SWEEP_ENV", "TRAINING_STAGES", "base_tags", "dvc_yaml", "host_tags", "log_prepared_input",
           "stage_params", "stage_tags"]

SWEEP_ENV = "BLOCKDROP_SWEEP"  # set by the sweep flow: the stage runs of its experiments are tagged `sweep`
PREPARED = "data/prepared"  # the prepared splits, a DVC out: logged as the dataset input of each stage reading it
# their dataset context is "training"
TRAINING_STAGES = frozenset({"pretrain", "curriculum", "finetune", "finetune-full"})


def dvc_yaml() -> Path:
    """The dvc.yaml of the code being run (a temp copy may differ from the workspace), else the root's."""
    return (find_up(Path.cwd(), "dvc.yaml") or repo_root()) / "dvc.yaml"


def stage_params(stage: str, params: Params) -> tuple[dict[str, Any], list[str] | None, list[str]]:
    """The params that decided the stage's result: its own dvc.yaml keys and those of every stage upstream of
    it (evaluate's run carries finetune.penalty, pretrain.epochs, seed...), so one MLflow row holds a setting
    and its numbers; also those keys (None: all params), and the upstream stages' names."""
    spec = dvc_yaml()
    keys = upstream_param_keys(stage, spec)
    return select_params(params, keys), keys, upstream_stages(stage, spec)


def base_tags(name: str) -> dict[str, str]:
    """Tags of every run, a flow's too: ``stage`` (the run's name), ``git_commit``, and ``dvc_exp`` and
    ``sweep`` when a DVC experiment or a sweep runs it."""
    tags = {"stage": name, "git_commit": git("rev-parse", "HEAD") or "unknown"}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get(SWEEP_ENV):
        tags["sweep"] = os.environ[SWEEP_ENV]
    return tags


@functools.cache
def host_tags() -> dict[str, str]:
    """What the numbers were measured on: the CPU model and the torch build (BLAS, oneDNN, OpenMP, CUDA)."""
    import platform

    import torch

    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    except OSError:
        cpu = ""
    onednn = re.search(r"MKL-DNN v([\d.]+)", torch.__config__.show())
    build = {
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "mkl": torch.backends.mkl.is_available(),
        "onednn": (onednn.group(1) if onednn else True) if torch.backends.mkldnn.is_available() else False,
        "openmp": torch.backends.openmp.is_available(),
        "cuda": torch.version.cuda or False,
    }
    return {
        "host.cpu": cpu or platform.processor() or platform.machine() or "unknown",
        "host.cores": str(os.cpu_count()),
        "host.gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "torch.version": torch.__version__,
        "torch.cpu_capability": build["cpu"],
        "torch.build": " ".join(f"{k}={'yes' if v is True else 'no' if v is False else v}" for k, v in build.items()),
    }


def _precision(params: Params) -> str:
    """The precision ``precision: auto`` resolves to where this stage runs (bf16 only where it is native):
    the same params give other numbers in bf16 than in fp32, so the run says which it trained in."""
    from blockdrop.runtime import resolve_precision, select_device

    return resolve_precision(params.precision, select_device(params.device))  # the device the stage picked


def stage_tags(stage: str, params: Params, keys: list[str] | None, upstream: list[str],
               data_sha256: str | None = None) -> dict[str, str]:
    """The tags a stage run opens with: :func:`base_tags`, :func:`host_tags`, the precision, the hash of the
    params ``keys`` and the stages they come from, and ``data_sha256`` when given."""
    tags = (base_tags(stage) | host_tags() | {"precision": _precision(params)}
            | {"params_sha256": params_sha256(params, keys), "params_from": ",".join([*upstream, stage])})
    if data_sha256:
        tags["data_sha256"] = data_sha256
    return tags


def log_prepared_input(stage: str, params: Params) -> None:
    """Log the prepared splits as the active run's dataset input, if the stage reads them (a dvc.yaml dep),
    with the md5 DVC records for them as the digest: the runs table's Datasets column names the data a run
    saw. The md5 is of the files as they are now (~0.2 s for 55 MB), not dvc.lock's, which may be stale."""
    folder = Path(PREPARED)  # where the stage reads them: relative to its working folder, as in blockdrop.stage
    if PREPARED not in stage_deps(stage, dvc_yaml()) or not folder.is_dir():
        return
    from mlflow.data.meta_dataset import MetaDataset  # mlflow.data is imported with mlflow: nothing more to load
    from mlflow.data.sources import LocalArtifactDatasetSource

    source = LocalArtifactDatasetSource(str(repo_root() / PREPARED))  # the workspace's, not a temp copy's
    dataset = MetaDataset(source, name=f"{params.data.dataset} prepared", digest=dvc_md5(folder))
    mlflow.log_input(dataset, context="training" if stage in TRAINING_STAGES else "eval")
