"""`dvc repro` of a tiny ImageNet profile end to end, in a throwaway copy of the repository.

The data is a generated ILSVRC2012-style folder (a few classes of small JPEGs, `train/<wnid>/*.JPEG` and
`val/<wnid>/*.JPEG`); the ResNet-101 and ResNet-18 weights are randomly initialised files in torchvision's own
format, named with the hash torchvision puts in its file names. Nothing is downloaded. What must hold: every stage
runs on the folder source (decoded in DataLoader workers), the registry gets the model, the report names the
dataset, and the FLOPs the evaluate stage reports equal the closed form of ResNet-101 at the tiny image size.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import yaml
from fakedata import write_imagefolder
from fakeweights import write_torchvision_weights
from test_pipeline_e2e import dvc
from tinyrepo import make_tiny_repo

pytestmark = pytest.mark.e2e  # runs stages, servers or other processes: `make test`, not `make test-fast`

IMAGE_SIZE, RESIZE, CLASSES = 64, 72, 4


def conv(cin: int, cout: int, k: int, side: int) -> int:
    """FLOPs of a k x k convolution producing a side x side map (the paper's convention: 2 per multiply-add)."""
    return 2 * cin * cout * k * k * side * side


def resnet_flops(side: int, block: str, layers: tuple[int, ...], outputs: int) -> int:
    """Closed-form FLOPs of a torchvision ResNet on a side x side image: the stem's 7x7 stride-2 conv, a stride-2
    max pool, four stages (widths 64..512, strides 1, 2, 2, 2), the classifier. ``block``: basic | bottleneck."""
    side = (side + 6 - 7) // 2 + 1  # conv1: 7x7, stride 2, padding 3
    total = conv(3, 64, 7, side)
    side = (side + 2 - 3) // 2 + 1  # max pool 3x3, stride 2, padding 1
    channels = 64
    for stage, n in enumerate(layers):
        width = 64 * 2**stage
        out = width * (4 if block == "bottleneck" else 1)
        for b in range(n):
            stride = 2 if stage > 0 and b == 0 else 1
            after = (side + 2 - 3) // stride + 1
            if block == "bottleneck":  # 1x1 reduce, 3x3 (carries the stride), 1x1 expand
                total += conv(channels, width, 1, side) + conv(width, width, 3, after) + conv(width, out, 1, after)
            else:  # two 3x3 convolutions, the first with the stride
                total += conv(channels, width, 3, after) + conv(width, width, 3, after)
            if stride != 1 or channels != out:  # the 1x1 downsampling shortcut: always counted
                total += conv(channels, out, 1, after)
            channels, side = out, after
    return total + 2 * channels * outputs


def test_closed_form_matches_the_published_totals() -> None:
    # docs/paper.md, FLOPs convention: ResNet-101 at 224 px 1.560e10; the ResNet-10 policy on the image
    # pooled to 112 px 4.72e8.
    assert resnet_flops(224, "bottleneck", (3, 4, 23, 3), 1000) == pytest.approx(1.560e10, rel=0.01)
    assert resnet_flops(112, "basic", (1, 1, 1, 1), 33) == pytest.approx(4.72e8, rel=0.01)


@pytest.fixture(scope="module")
def repro(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("imagenet")
    weights = base / "weights"
    backbone = write_torchvision_weights(weights, "resnet101", seed=0)
    policy = write_torchvision_weights(weights, "resnet18", seed=1)
    crops = {"crop_padding": 0}
    overrides = {
        "workers": 2,
        "data": {"source": "imagenet", "raw": "data/raw/imagenet", "transforms": "imagenet", "resize": RESIZE,
                 "image_size": IMAGE_SIZE, "train_limit": 0, "val_size": 8, "test_limit": 0},
        "model": {"depth": 101, "weights": str(backbone), "policy_weights": str(policy)},
        # One epoch trains the new 4-class classifier (the 1000-class one cannot score 4 wnids).
        "pretrain": {"epochs": 1, "batch_size": 8, "lr": 0.01, "warmup_epochs": 0.0, "crop_size": 0, "drop_path": 0.0,
                     **crops},
        "curriculum": {"epochs": 2, "images_per_epoch": 32, "batch_size": 16, "val_images": 0, **crops},
        "finetune": {"epochs": 1, "images_per_epoch": 32, "batch_size": 16, **crops},
        "evaluate": {"batch_size": 16, "latency_images": 4, "latency_warmup": 1},
    }
    root = make_tiny_repo(base / "repo", overrides,
                          write_raw=lambda raw: write_imagefolder(raw, classes=CLASSES))  # tracked by DVC
    dvc(root, "repro")
    return root


def read(root: Path, path: str) -> dict:
    return json.loads((root / path).read_text())


def test_every_stage_ran_on_the_folder_source(repro: Path) -> None:
    lock = yaml.safe_load((repro / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"prepare", "pretrain", "heuristics", "curriculum", "finetune", "finetune-full",
                                  "evaluate", "analyze", "report"}
    meta = read(repro, "data/prepared/meta.json")
    assert meta["source"] == "imagenet" and meta["shape"] == [3, IMAGE_SIZE, IMAGE_SIZE]
    assert len(meta["classes"]) == CLASSES
    metrics = read(repro, "reports/evaluate/metrics.json")
    assert metrics["num_blocks"] == 33
    assert 0 <= metrics["blockdrop"]["blocks_mean"] <= 33
    assert read(repro, "reports/pretrain/metrics.json")["train"]["epochs"] == 1


def test_flops_match_the_closed_form_at_the_tiny_size(repro: Path) -> None:
    metrics = read(repro, "reports/evaluate/metrics.json")
    full = resnet_flops(IMAGE_SIZE, "bottleneck", (3, 4, 23, 3), CLASSES)
    assert metrics["full"]["flops_mean"] == full
    # BlockDrop adds the policy (a ResNet-10 on the image pooled to half size) and drops blocks: with every
    # block dropped it would cost base + policy, with none full + policy.
    policy = resnet_flops(IMAGE_SIZE // 2, "basic", (1, 1, 1, 1), 33)
    assert metrics["blockdrop"]["flops_mean"] <= full + policy
    if metrics["blockdrop"]["blocks_mean"] == 33:
        assert metrics["blockdrop"]["flops_mean"] == full + policy


def test_the_report_names_the_dataset_and_the_model_is_registered(repro: Path) -> None:
    report = (repro / "reports" / "report.md").read_text()
    assert "imagenet" in report and "ResNet-101" in report
    with sqlite3.connect(repro / "mlflow.db") as db:
        names = {row[0] for row in db.execute("select name from registered_models")}
        params = dict(db.execute("select key, value from params"))
    assert any("imagenet" in name for name in names), names
    assert params["model.depth"] == "101"
