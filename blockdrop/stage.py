"""What every stage entry point does before and around its real work.

``pipelines/<stage>.py`` stays a page long: it calls :func:`start` (logging, validated params, device,
seeds), loads what it needs with :func:`load_data`, and runs its body inside :func:`failures_reported`,
which turns the failures a user can fix into one line on stderr and exit code 1 (2 for data that breaks its
layout's rules, which like a bad setting no retry can fix), not a traceback.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from blockdrop import dist
from blockdrop.config import Params, ParamsError, check_data_fit, load_params, refuse
from blockdrop.data import BadDataError, DataSourceError, FolderSplit, Meta, Normalize, Split, load_meta, load_split
from blockdrop.files import CheckpointError, write_csv, write_json
from blockdrop.lineage import resume_key
from blockdrop.runtime import resolve_precision, seed_everything, select_device
from blockdrop.supervision import watch_launcher, watch_supervisor
from blockdrop.train.guard import NonFiniteError

if TYPE_CHECKING:
    from blockdrop.tracking import StageRun

__all__ = ["DATA_DIR", "DISTRIBUTED", "StageContext", "UnrecordedRun", "check_fit", "failures_reported", "load_data",
           "publish", "start", "tracked_run"]

DATA_DIR = Path("data/prepared")
# the stages that train data-parallel when dist.nproc > 1
DISTRIBUTED = ("pretrain", "curriculum", "finetune", "finetune-full")
log = logging.getLogger("blockdrop")


@dataclass
class StageContext:
    name: str
    params: Params
    device: torch.device
    generator: torch.Generator  # CPU generator for data order, augmentation and sampling
    precision: str
    run_key: str  # hash of the params and inputs deciding the result: a resume checkpoint must carry the same
    dist: dist.Dist = dist.SINGLE  # this process's rank in a torchrun job (blockdrop.dist)

    @property
    def state_path(self) -> Path:
        """Where the stage keeps its per-epoch resume state (not a DVC out: DVC deletes outs on rerun)."""
        return Path("checkpoints") / f"{self.name}.pt"

    def clear_state(self) -> None:
        """Forget the resume state once the outputs are written, so a forced rerun trains again."""
        self.state_path.unlink(missing_ok=True)


def start(name: str, params_path: str = "params.yaml") -> StageContext:
    """Configure logging, validate params (exit 2 on a mistake), pick the device and seed everything."""
    # The log goes to stdout, so stderr holds only what went wrong: one line for a mistake a user can fix.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    watch_supervisor(name)  # started by the flow: stop if the flow process dies
    params = load_params(params_path)
    try:
        device = select_device(params.device, params.threads)
    except ParamsError as e:
        raise refuse(e, params_path) from None
    if name in DISTRIBUTED and params.dist.nproc > 1 and not dist.launched():
        _check_fit_before_launch(name, params)
        _relaunch_under_torchrun(name, params.dist.nproc)
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if name in DISTRIBUTED and dist.launched() and per_machine != params.dist.nproc:
        # params.yaml (and so dvc.lock and the MLflow run) must say how the model was trained.
        raise refuse(ParamsError(f"dist.nproc: {params.dist.nproc}, but torchrun started {per_machine} processes "
                                 f"per machine: set dist.nproc: {per_machine}"), params_path)
    me, device = dist.init(device)
    if me.enabled:
        watch_launcher(name)
        atexit.register(dist.shutdown)
        if not me.is_main:  # rank 0 tells what the job does; the others speak only when something goes wrong
            logging.getLogger().setLevel(logging.WARNING)
    precision = resolve_precision(params.precision, device)
    generator = seed_everything(params.seed)  # the same on every rank: they draw in step (blockdrop.dist)
    key = resume_key(name, params)  # own + upstream params, md5 of every dvc.yaml dep (~0.2 s for 60 MB)
    log.info("stage %s on %s (%s, %d threads%s)", name, device, precision, torch.get_num_threads(),
             f", rank 0 of {me.world} processes" if me.enabled else "")
    return StageContext(name, params, device, generator, precision, key, me)


def _check_fit_before_launch(name: str, params: Params) -> None:
    """Refuse params that cannot run on the prepared data here, with exit 2 and one line: once relaunched,
    the ranks' refusals reach the user through torchrun, which exits 1 with its own report."""
    try:
        meta = load_meta(DATA_DIR)
    except (DataSourceError, FileNotFoundError):
        return  # no prepared data: the ranks say so, as one process would
    try:
        check_data_fit(params, name, meta.shape, meta.sizes)
    except ParamsError as e:
        raise refuse(e) from None


def _relaunch_under_torchrun(name: str, nproc: int) -> None:
    """Replace this process by ``torchrun --standalone --nproc_per_node <nproc> -m <this stage's module>``.

    The same pid goes on (DVC, the flow's supervision and a kill see the launcher, which stops its workers when
    it is stopped). Each worker gets an equal share of the cores (``OMP_NUM_THREADS``, unless set; torchrun
    would give each one thread), and ``params.threads``, if not 0, still decides.
    """
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    module = getattr(sys.modules["__main__"].__spec__, "name", None) or f"pipelines.{name.replace('-', '_')}"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", module]
    log.info("stage %s: %d processes, relaunching as %s", name, nproc, " ".join(argv[1:]))
    sys.stdout.flush()
    os.execv(sys.executable, argv)


def check_fit(ctx: StageContext, shape: tuple[int, ...] | list[int], sizes: dict[str, int]) -> None:
    """Exit 2 with one line if the stage's params cannot run on data of ``shape`` with ``sizes`` images."""
    try:
        check_data_fit(ctx.params, ctx.name, shape, sizes)
    except ParamsError as e:
        raise refuse(e) from None


def load_data(ctx: StageContext, *splits: str) -> tuple[Meta, dict[str, Split | FolderSplit], Normalize]:
    """Prepared meta, the named splits moved to the stage's device, and their normalisation.

    Params that cannot run on this data (a crop larger than the images, ...) exit 2 here, before the
    splits are read, a model is loaded or an MLflow run is opened. A folder split (ImageNet) stays on disk
    and is decoded by ``params.workers`` DataLoader processes as batches are drawn.
    """
    meta = load_meta(DATA_DIR)
    check_fit(ctx, meta.shape, meta.sizes)
    loaded = {s: load_split(DATA_DIR, s, meta, workers=ctx.params.workers).to(ctx.device) for s in splits}
    return meta, loaded, Normalize(meta.mean, meta.std, ctx.device)


class UnrecordedRun:
    """The stage run of ranks other than 0: they train, rank 0 alone records (the loops call neither method
    on them; this keeps the entry points free of rank checks around the ``with``)."""

    def log_epoch(self, row: dict[str, float], step: int) -> None:
        pass

    def mark_resumed(self, epoch: int) -> None:
        pass


def tracked_run(ctx: StageContext, data_sha256: str | None = None) -> contextlib.AbstractContextManager:
    """The stage's MLflow run (:func:`blockdrop.tracking.stage_run`) on rank 0; an :class:`UnrecordedRun` on
    the other ranks of a distributed job."""
    if not ctx.dist.is_main:
        return contextlib.nullcontext(UnrecordedRun())
    from blockdrop import tracking  # the MLflow-aware package, imported only when a run is opened

    return _with_world_size(tracking.stage_run(ctx.name, ctx.params, data_sha256=data_sha256), ctx.dist)


@contextlib.contextmanager
def _with_world_size(runs: contextlib.AbstractContextManager, me: dist.Dist) -> Iterator[StageRun]:
    with runs as run:
        if me.enabled:  # params say processes per machine; the tag says how many trained, over all machines
            run.set_tags({"dist.world_size": me.world})
        yield run


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
    """Exit 1 with one line for the failures a user can act on (missing data, bad checkpoint, ...); exit 2
    for data that breaks its layout's rules (:class:`~blockdrop.data.BadDataError`)."""
    from blockdrop.tracking import TrackingUnavailable  # the MLflow-aware package

    try:
        yield
    except BadDataError as e:
        # 2, not 1: the flow retries exit 1 (a lost server, a kill) and never 2, the code of invalid settings.
        # An empty class folder or a stray file fails the same way on every retry, until the user fixes the data.
        print(f"error: stage {name}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (DataSourceError, CheckpointError, TrackingUnavailable, FileNotFoundError, NonFiniteError) as e:
        print(f"error: stage {name}: {e}", file=sys.stderr)
        raise SystemExit(1) from None
