"""What every stage entry point does before and around its real work.

``pipelines/<stage>.py`` stays a page long: it calls :func:`start` (logging, validated params, device,
seeds), loads what it needs with :func:`load_data`, and runs its body inside :func:`failures_reported`,
which turns the failures a user can fix into one line on stderr and exit code 1, not a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from blockdrop.config import Params, load_params, params_sha256, stage_param_keys
from blockdrop.data import DataSourceError, Meta, Normalize, Split, load_meta, load_split
from blockdrop.files import CheckpointError, write_csv, write_json
from blockdrop.runtime import resolve_precision, seed_everything, select_device

if TYPE_CHECKING:
    from blockdrop.tracking import StageRun

__all__ = ["DATA_DIR", "StageContext", "failures_reported", "load_data", "publish", "start"]

DATA_DIR = Path("data/prepared")
log = logging.getLogger("blockdrop")


@dataclass
class StageContext:
    name: str
    params: Params
    device: torch.device
    generator: torch.Generator  # CPU generator for data order, augmentation and sampling
    precision: str
    run_key: str  # hash of the stage's params: a resume checkpoint must carry the same

    @property
    def state_path(self) -> Path:
        """Where the stage keeps its per-epoch resume state (not a DVC out: DVC deletes outs on rerun)."""
        return Path("checkpoints") / f"{self.name}.pt"

    def clear_state(self) -> None:
        """Forget the resume state once the outputs are written, so a forced rerun trains again."""
        self.state_path.unlink(missing_ok=True)


def start(name: str, params_path: str = "params.yaml") -> StageContext:
    """Configure logging, validate params (exit 2 on a mistake), pick the device and seed everything."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    params = load_params(params_path)
    device = select_device(params.device, params.threads)
    precision = resolve_precision(params.precision, device)
    generator = seed_everything(params.seed)
    key = params_sha256(params, stage_param_keys(name))
    log.info("stage %s on %s (%s, %d threads)", name, device, precision, torch.get_num_threads())
    return StageContext(name, params, device, generator, precision, key)


def load_data(ctx: StageContext, *splits: str) -> tuple[Meta, dict[str, Split], Normalize]:
    """Prepared meta, the named splits moved to the stage's device, and their normalisation."""
    meta = load_meta(DATA_DIR)
    loaded = {s: load_split(DATA_DIR, s).to(ctx.device) for s in splits}
    return meta, loaded, Normalize(meta.mean, meta.std, ctx.device)


def publish(run: StageRun, reports: Path, history: list[dict], metrics: dict, models: list[Path]) -> None:
    """A training stage's last step: write ``history.csv`` (a DVC plot) and ``metrics.json`` (a DVC metric)
    under ``reports``, and log both to the stage's MLflow run with the DVC md5 of its ``models``."""
    write_csv(reports / "history.csv", history)
    write_json(reports / "metrics.json", metrics)
    run.log_metrics(metrics)
    run.log_artifacts([reports / "history.csv", reports / "metrics.json"])
    run.tag_outputs(models)


@contextlib.contextmanager
def failures_reported(name: str) -> Iterator[None]:
    """Exit 1 with one line for the failures a user can act on (missing data, bad checkpoint, ...)."""
    from blockdrop.tracking import TrackingUnavailable  # the one MLflow-aware module

    try:
        yield
    except (DataSourceError, CheckpointError, TrackingUnavailable, FileNotFoundError) as e:
        print(f"error: stage {name}: {e}", file=sys.stderr)
        raise SystemExit(1) from None
