"""One process against ``torchrun`` with several: each training stage, one epoch, on the prepared data of this
checkout (``make repro`` first: the default profile's Fashion-MNIST), in a temporary copy of the project.

Every stage runs as DVC runs it, ``python -m pipelines.<stage>``, with ``dist.nproc`` 1 and then N (the stage
relaunches itself under ``torchrun --standalone``), from the same inputs: the backbone and policy of this
checkout's ``models/``. Printed per stage: wall time of the process (imports, data loading, MLflow included),
training images per second of pure training time (pretrain), the validation accuracy, and the ratios N : 1.

On a machine with C cores, N processes each get C/N threads: on the 2-core machines here, 2 ranks are a test of
correctness, not of speed (gloo exchanges the gradients through shared memory, and the work is the same).

    python bench/dist.py                  # pretrain, curriculum and finetune, 1 and 2 processes (~8 min here)
    python bench/dist.py --stages pretrain --nproc 4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from tinyrepo import project_files  # noqa: E402

# One epoch of each stage; the RL stages on 10,000 images (the default curriculum's epoch).
ONE_EPOCH = {"pretrain": {"epochs": 1}, "curriculum": {"epochs": 1, "images_per_epoch": 10000},
             "finetune": {"epochs": 1, "images_per_epoch": 10000}}
INPUTS = {"curriculum": ["models/backbone.pt"], "finetune": ["models/backbone.pt", "models/policy_cl.pt"]}


def copy_project(root: Path) -> None:
    for name in project_files():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, root / name)
    shutil.copytree(REPO / "data" / "prepared", root / "data" / "prepared")
    (root / "models").mkdir()
    for name in ("backbone.pt", "policy_cl.pt"):
        shutil.copy2(REPO / "models" / name, root / "models" / name)


def run_stage(root: Path, stage: str, nproc: int) -> dict[str, float]:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[stage].update(ONE_EPOCH[stage])
    params["dist"]["nproc"] = nproc
    params["tracking"]["log_model"] = False
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("BLOCKDROP_PARENT_RUN_ID", "DVC_EXP_NAME", "DVC_ROOT")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    shutil.rmtree(root / "checkpoints", ignore_errors=True)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", f"pipelines.{stage}"], cwd=root, env=env, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - t0
    if done.returncode:
        sys.exit(f"{stage} with {nproc} processes failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    metrics = json.loads((root / "reports" / stage / "metrics.json").read_text())
    for name in INPUTS.get(stage, []):  # the next stage starts from this checkout's models, not this run's
        shutil.copy2(REPO / name, root / name)
    return {"seconds": seconds, "val_accuracy": metrics["val"]["accuracy"],
            "images_per_s": metrics["train"].get("images_per_s", 0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--stages", nargs="+", default=list(ONE_EPOCH), choices=list(ONE_EPOCH))
    args = parser.parse_args()
    if not (REPO / "data" / "prepared" / "meta.json").exists() or not (REPO / "models" / "policy_cl.pt").exists():
        sys.exit("run `make repro` first: this compares runs on the prepared data, from the trained models")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    print(f"{os.cpu_count()} cores ({cpu}); 1 process against {args.nproc} under torchrun, one epoch per stage")
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        root = Path(tmp)
        copy_project(root)
        for stage in args.stages:
            one, many = run_stage(root, stage, 1), run_stage(root, stage, args.nproc)
            line = (f"{stage:10s} wall {one['seconds']:6.1f} s vs {many['seconds']:6.1f} s "
                    f"(ratio {many['seconds'] / one['seconds']:.2f})   val accuracy {one['val_accuracy']:.4f} vs "
                    f"{many['val_accuracy']:.4f}")
            if one["images_per_s"]:
                line += (f"   training {one['images_per_s']:.0f} vs {many['images_per_s']:.0f} images/s "
                         f"(ratio {many['images_per_s'] / one['images_per_s']:.2f})")
            print(line, flush=True)


if __name__ == "__main__":
    main()
