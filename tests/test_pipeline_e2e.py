"""`dvc repro` of the whole pipeline on the tiny profile, in a throwaway copy of the repository (the session's
``tiny_reproduced``, copied)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from tinyrepo import copy_reproduced

from blockdrop.config import load_params

pytestmark = pytest.mark.e2e  # runs stages, servers or other processes: `make test`, not `make test-fast`

VARIANT_KEYS = {"accuracy", "blocks_mean", "blocks_std", "block_fraction", "flops_mean", "flops_std"}


def dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "DVC_NO_ANALYTICS": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("BLOCKDROP_PARENT_RUN_ID", None)
    proc = subprocess.run(["dvc", *args], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def repro(tiny_reproduced: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's tiny project after its ``dvc repro``, copied: these tests rerun DVC and write plots in it."""
    return copy_reproduced(tiny_reproduced, tmp_path_factory.mktemp("e2e") / "repo")


def read(root: Path, path: str) -> dict:
    return json.loads((root / path).read_text())


def test_every_stage_writes_its_outputs(repro: Path) -> None:
    for path in ("data/prepared/train.pt", "data/prepared/val.pt", "data/prepared/test.pt",
                 "data/prepared/meta.json", "models/backbone.pt", "models/policy_cl.pt", "models/blockdrop.pt",
                 "models/backbone_finetuned.pt", "reports/finetune-full/metrics.json",
                 "reports/finetune-full/history.csv", "data/evaluate/per_image.csv", "reports/report.md",
                 "reports/report.html"):
        assert (repro / path).stat().st_size > 0, path
    meta = read(repro, "data/prepared/meta.json")
    assert meta["sizes"] == {"train": 512, "val": 256, "test": 256}
    for name, digest in meta["sha256"].items():  # meta records the digest of every file it describes
        assert hashlib.sha256((repro / "data/prepared" / name).read_bytes()).hexdigest() == digest


def test_metrics_have_the_shapes_design_md_gives(repro: Path) -> None:
    params = load_params(repro / "params.yaml")
    pretrain = read(repro, "reports/pretrain/metrics.json")
    assert set(pretrain) == {"test", "val", "train"}
    assert set(pretrain["train"]) == {"images_per_s", "epochs"}
    assert pretrain["train"]["epochs"] == params.pretrain.epochs
    assert 0.5 < pretrain["test"]["accuracy"] <= 1.0  # brightness-coded classes: far above chance (0.1)

    evaluate = read(repro, "reports/evaluate/metrics.json")
    k = params.model.depth // 6 * 3
    assert set(evaluate) == {"num_blocks", "full", "full_finetuned", "blockdrop", "firstk", "randomk", "speedup"}
    assert evaluate["num_blocks"] == k
    for variant in ("full", "full_finetuned", "firstk", "randomk"):
        assert set(evaluate[variant]) == VARIANT_KEYS
    assert set(evaluate["blockdrop"]) == VARIANT_KEYS | {"unique_policies", "flops_saved"}
    saved = evaluate["blockdrop"]["flops_saved"]
    assert set(saved) == {"mean", "median", "p5", "p95", "min", "max"}
    assert saved["min"] <= saved["p5"] <= saved["median"] <= saved["p95"] <= saved["max"] < 1
    full = evaluate["full"]["flops_mean"]  # the mean saving is the mean FLOPs' saving
    assert saved["mean"] == pytest.approx(1 - evaluate["blockdrop"]["flops_mean"] / full, rel=1e-9)
    assert set(evaluate["speedup"]) == {"flops_ratio", "measured_batch1", "flops_ratio_vs_full_finetuned",
                                        "measured_batch1_vs_full_finetuned"}
    assert evaluate["speedup"]["flops_ratio_vs_full_finetuned"] == evaluate["speedup"]["flops_ratio"]
    for variant in ("full", "full_finetuned"):  # one architecture: every block, the same FLOPs
        assert evaluate[variant]["blocks_mean"] == k and evaluate[variant]["block_fraction"] == 1.0
        assert evaluate[variant]["flops_mean"] == full
    latency = read(repro, "reports/evaluate/latency.json")
    assert latency["speedup_vs_full_finetuned"] == pytest.approx(latency["full_finetuned_ms"] / latency["blockdrop_ms"])
    # FirstK and RandomK run BlockDrop's budget, rounded
    assert evaluate["firstk"]["blocks_mean"] == round(evaluate["blockdrop"]["blocks_mean"])
    assert evaluate["randomk"]["blocks_mean"] == round(evaluate["blockdrop"]["blocks_mean"])


def test_the_fair_baseline_saw_finetunes_images(repro: Path) -> None:
    params = load_params(repro / "params.yaml")
    fair = read(repro, "reports/finetune-full/metrics.json")
    train_images = read(repro, "data/prepared/meta.json")["sizes"]["train"]
    assert fair["train"]["epochs"] == params.finetune.epochs
    assert fair["train"]["images"] == params.finetune.epochs * min(params.finetune.images_per_epoch, train_images)
    assert 0.5 < fair["val"]["accuracy"] <= 1.0
    report = (repro / "reports/report.md").read_text()
    assert "| Full ResNet, trained as BlockDrop's backbone |" in report and "| Full ResNet, pretrained |" in report
    assert "the full network trained as BlockDrop's backbone (" in report


def test_checkpoints_load_safely(repro: Path) -> None:
    blob = torch.load(repro / "models/blockdrop.pt", weights_only=True)
    assert {"arch", "model", "policy", "num_blocks"} <= set(blob)


def test_second_repro_is_a_no_op(repro: Path) -> None:
    t0 = time.perf_counter()
    out = dvc(repro, "repro").stdout
    assert "Running stage" not in out
    assert time.perf_counter() - t0 < 30
    assert "up to date" in dvc(repro, "status").stdout.lower()


def test_changing_one_param_reruns_only_what_depends_on_it(repro: Path) -> None:
    params = repro / "params.yaml"
    original = params.read_text()
    def changed(old: str, new: str) -> set[str]:
        assert old in original
        params.write_text(original.replace(old, new))
        return set(json.loads(dvc(repro, "status", "--json").stdout))

    # dvc status names the stages whose own params changed (report depends on the whole params.yaml); the stages
    # below them rerun only if their inputs then change
    try:
        assert changed("latency_images: 10", "latency_images: 12") == {"evaluate", "report"}
        assert changed("k_step: 1", "k_step: 4") == {"heuristics", "report"}
        # a policy key reruns finetune, not the fair full-network baseline (restored from DVC's cache in a sweep)
        assert changed("penalty: 3.4", "penalty: 5.0") == {"finetune", "report"}
        # a key of the backbone's budget reruns both
        assert changed("backbone_lr: 0.0003", "backbone_lr: 0.0005") == {"finetune", "finetune-full", "report"}
    finally:
        params.write_text(original)


def test_a_setting_run_before_is_restored_from_the_run_cache(repro: Path) -> None:
    """Back to a penalty already run, ``dvc repro`` restores finetune and evaluate from DVC's run cache instead of
    training again: their git-tracked reports are metrics and plots, as DVC requires of a run-cache entry."""
    params = repro / "params.yaml"
    original = params.read_text()
    other = original.replace("penalty: 3.4", "penalty: 5.0")
    assert other != original
    try:
        params.write_text(other)
        first = dvc(repro, "repro").stdout
        assert "Running stage 'finetune'" in first and "Running stage 'curriculum'" not in first
        params.write_text(original)
        dvc(repro, "repro")
        params.write_text(other)
        again = dvc(repro, "repro").stdout
        for stage in ("finetune", "evaluate"):
            assert f"Stage '{stage}' is cached - skipping run" in again, again[-3000:]
            assert f"Running stage '{stage}'" not in again
    finally:
        params.write_text(original)
        dvc(repro, "repro")
    assert "up to date" in dvc(repro, "status").stdout.lower()

def test_report_and_dvc_plots_render_offline(repro: Path) -> None:
    """What a person opens: the self-contained report and `make plots`, in headless Chromium."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("chromium/chromedriver missing: `make browser` installs them")
    from browser import render_check

    report = render_check(repro / "reports/report.html")
    figures = len(list((repro / "reports/analyze/figures").glob("*.png")))
    assert figures >= 9
    assert report["images_total"] >= figures and report["images_loaded"] == report["images_total"]
    assert report["external_requests"] == []

    # the `make plots` recipe, run in the copy
    plots = repro / "reports/plots"
    shutil.rmtree(plots, ignore_errors=True)
    (plots / "vendor").mkdir(parents=True)
    dvc(repro, "plots", "show", "--html-template", "dvc_plots/template.html", "-o", str(plots))
    for js in (repro / "dvc_plots/vendor").glob("*.js"):
        shutil.copy(js, plots / "vendor")
    page = render_check(plots / "index.html")
    charts = len(yaml.safe_load((repro / "dvc.yaml").read_text())["plots"]) - 1  # minus the figures dir entry
    assert page["nonempty_canvases"] + page["svgs"] >= charts  # every vega chart drew something
    assert page["images_loaded"] == page["images_total"] >= figures  # the PNG figures as image plots
    assert page["external_requests"] == []
    assert page["console_errors"] == []


def test_heuristics_stage_follows_its_k_step(repro: Path) -> None:
    # Last in this module: it leaves the copy's heuristics table stepped. K = 9 at step 4: k = 1, 5, 9.
    import pandas as pd

    params = repro / "params.yaml"
    full = pd.read_csv(repro / "reports/heuristics/by_k.csv")
    assert full["k"].tolist() == list(range(1, 10))  # the tiny profile's ResNet-20
    params.write_text(params.read_text().replace("k_step: 1", "k_step: 4"))
    dvc(repro, "repro", "--single-item", "heuristics")
    stepped = pd.read_csv(repro / "reports/heuristics/by_k.csv")
    assert stepped["k"].tolist() == [1, 5, 9]
    same = full.set_index("k").loc[[1, 5, 9], ["firstk_accuracy", "firstk_flops"]]  # FirstK draws nothing at random
    assert stepped.set_index("k")[["firstk_accuracy", "firstk_flops"]].equals(same)
