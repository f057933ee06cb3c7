"""One validated model of ``params.yaml``.

Every stage starts with :func:`load_params`: an unknown key, a wrong type, an out-of-range or non-finite
value, or settings that cannot work together stop the stage before it touches anything, with the key's
dotted name (the same name DVC, MLflow and ``dvc exp run -S`` use) in a one-line message and exit code 2.
What can only be checked against the data (a crop larger than the image, more latency images than test
images) is checked by :func:`check_data_fit` as soon as the stage knows the data's shape.

Why this module is long: it is the whole schema, one pydantic model per section of params.yaml with each
field's type, range and meaning, so that every knob is read in one place next to the checks that join them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "Params",
    "ParamsError",
    "check_data_fit",
    "dataset_name",
    "flatten",
    "load_params",
    "params_sha256",
    "parse_params",
    "refuse",
    "select_params",
]

_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _yaml11_float(value: Any) -> Any:
    # YAML 1.1 (PyYAML) reads `1e-4` as the *string* "1e-4"; YAML 1.2 (and DVC's `-S`) reads a number.
    # Accept exactly that spelling of a number; anything else ("fast", "5 epochs") stays a type error.
    return float(value) if isinstance(value, str) and _NUMBER.fullmatch(value.strip()) else value


Float = Annotated[float, BeforeValidator(_yaml11_float)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
# What running a block costs in the reward's usage term: the paper's 1/K each, or the block's share of the FLOPs
# or of the measured time (curriculum.cost, finetune.cost)
Cost = Literal["blocks", "flops", "latency"]
Fraction = Annotated[Float, Field(ge=0.0, le=1.0)]
PositiveFloat = Annotated[Float, Field(gt=0.0)]
NonNegFloat = Annotated[Float, Field(ge=0.0)]


class Section(BaseModel):
    # strict: "5" is not an int and 1 is not a bool; extra="forbid": a misspelt key is an error, not a no-op;
    # allow_inf_nan=False: `lr: .inf` or `.nan` is refused here, not found as non-finite weights later.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class Conflict(ValueError):
    """Settings that are each valid but cannot work together. ``keys`` are dotted names relative to the
    section that raised it; :func:`_describe` prefixes the section, since pydantic reports a model-level
    error at the section itself (``loc`` ends before the key)."""

    def __init__(self, keys: tuple[str, ...], why: str) -> None:
        super().__init__(why)
        self.keys = keys


def dataset_name(source: str, raw: str) -> str:
    """The dataset's name in model names and titles: ``source``, or for ``folder`` the name of the raw folder
    (``data/raw/flowers``: ``flowers``), as the user named their data."""
    return (Path(raw).name or "folder") if source == "folder" else source


class Data(Section):
    source: Literal["fashion-mnist", "cifar10", "cifar100", "imagenet", "folder"] = "fashion-mnist"
    # The folder of this source's raw files, prepare's DVC dependency (tracked by <raw>.dvc: `make data`)
    raw: Annotated[str, Field(min_length=1)] = "data/raw/fashion-mnist"
    # How images are read: cifar (decoded once into memory at one size, random crops of the whole image) or
    # imagenet (kept on disk: shorter side resized to `resize`, `image_size` crops). auto: the source's own
    # (Fashion-MNIST and CIFAR cifar, ImageNet imagenet, a folder cifar); only a folder may choose.
    transforms: Literal["auto", "cifar", "imagenet"] = "auto"
    val_size: NonNegInt = 5000  # images carved from train, deterministically from `seed`
    train_limit: NonNegInt = 0  # keep only this many training images (0: all); for tests and quick looks
    test_limit: NonNegInt = 0  # keep only the first this many test images (0: all)
    # Refuse raw Fashion-MNIST idx files whose md5 is not the published data's (false only for data of your own)
    verify_checksums: bool = True
    # ImageNet only (decoded from JPEG on the fly, as the authors did): the shorter side is resized to `resize`,
    # then a random (train) or centred (val, test) image_size x image_size crop is taken.
    resize: PositiveInt = 256
    image_size: PositiveInt = 224

    @property
    def dataset(self) -> str:
        """The dataset's name (:func:`dataset_name`): the source, or a folder source's folder name."""
        return dataset_name(self.source, self.raw)

    @property
    def streamed(self) -> bool:
        """Whether the images stay on disk and are decoded per batch (ImageNet-style) instead of in memory."""
        return self.transforms == "imagenet" or (self.transforms == "auto" and self.source == "imagenet")

    @model_validator(mode="after")
    def _transforms_of_the_source(self) -> Data:
        own = {"fashion-mnist": "cifar", "cifar10": "cifar", "cifar100": "cifar", "imagenet": "imagenet"}
        if self.source in own and self.transforms not in ("auto", own[self.source]):
            raise Conflict(("transforms", "source"), f"{self.source} is read with {own[self.source]}-style "
                           f"transforms; `transforms` chooses only for data.source: folder")
        return self

    @model_validator(mode="after")
    def _crop_within_resize(self) -> Data:
        if self.image_size > self.resize:
            raise Conflict(("image_size", "resize"), f"a {self.image_size}px crop does not fit images resized to "
                           f"{self.resize}px")
        return self

    @field_validator("val_size")
    @classmethod
    def _at_least_one(cls, size: int) -> int:
        if size < 1:
            raise ValueError("must be at least 1: curriculum and finetune score the policy on it")
        return size


IMAGENET_DEPTH = 101  # the one ImageNet backbone: torchvision's ResNet-101 (33 bottleneck blocks)


class Model(Section):
    # 6n+2 (20, 32, 56, 110): a CIFAR ResNet with 3n basic blocks; 101: torchvision's ResNet-101 (ImageNet)
    depth: Annotated[int, Field(ge=8, le=1202)] = 32
    # ImageNet only: torchvision weights files, read locally, never downloaded. The hash in a torchvision
    # file name (resnet101-63fe2227.pth) is the start of its sha256 and is checked, so the name pins the
    # content and this param alone is the dependency DVC needs.
    weights: str = ""  # the backbone ResNet-101's (required for depth 101)
    policy_weights: str = ""  # ResNet-18's, to initialise the ResNet-10 policy as the authors did ("": random)
    # The policy network sees the image average-pooled by this factor (the authors: 1 on CIFAR, 2 for their
    # ImageNet policy, 224 -> 112). At 2 the CIFAR ResNet-8 costs a quarter of its FLOPs, which on small images
    # is a large share of what BlockDrop saves (the ResNet-8 is 17% of ResNet-32's FLOPs at 28x28).
    policy_pool: Annotated[int, Field(ge=0, le=8)] = 0  # 0: the authors' factor, 1 on CIFAR and 2 on ImageNet

    @field_validator("depth")
    @classmethod
    def _six_n_plus_two(cls, depth: int) -> int:
        if depth != IMAGENET_DEPTH and (depth - 2) % 6:
            raise ValueError(f"must be 6n+2 (20, 32, 56, 110) or {IMAGENET_DEPTH} (ImageNet), got {depth}")
        return depth

    @property
    def imagenet(self) -> bool:
        return self.depth == IMAGENET_DEPTH

    @model_validator(mode="after")
    def _weights_for_imagenet(self) -> Model:
        if self.imagenet and not self.weights:
            raise Conflict(("weights", "depth"), "ResNet-101 starts from torchvision's ImageNet weights: name the "
                           "local file (e.g. models/pretrained/resnet101-63fe2227.pth)")
        if not self.imagenet and (self.weights or self.policy_weights):
            key = "weights" if self.weights else "policy_weights"
            raise Conflict((key, "depth"), f"weights files are for the ImageNet ResNet-101, not depth {self.depth}")
        return self


class Pretrain(Section):
    epochs: NonNegInt = 5  # 0: no training, the backbone is model.weights as they are (ImageNet, as the authors)
    batch_size: PositiveInt = 128
    lr: PositiveFloat = 0.2  # peak learning rate, reached after the warm-up
    # cosine: to 0 after the warm-up | step: x0.1 at 50% and 75% of training (He et al.'s CIFAR schedule)
    lr_schedule: Literal["cosine", "step"] = "cosine"
    warmup_epochs: NonNegFloat = 1.0
    momentum: Fraction = 0.9
    weight_decay: NonNegFloat = 5e-4
    label_smoothing: Annotated[Float, Field(ge=0.0, lt=1.0)] = 0.1
    drop_path: Annotated[Float, Field(ge=0.0, lt=1.0)] = 0.0  # stochastic depth at the last block
    drop_path_unit: Literal["image", "batch"] = "image"  # per image, dense | per batch, skipped (Huang et al.)
    crop_padding: NonNegInt = 4
    # Train on random crop_size x crop_size windows (0: full size) and test on whole images. Smaller
    # crops are cheaper: a 20x20 window has half the pixels of a 28x28 Fashion-MNIST image.
    crop_size: NonNegInt = 0
    # The last full_size_epochs of them see whole images instead of crop_size windows (crop_padding and flip
    # still apply): a network trained on small windows and tested on whole images meets objects at a scale it
    # never saw, and a last epoch at the test's size, at the schedule's low lr, fixes it (FixRes, Touvron et al.).
    full_size_epochs: NonNegInt = 0
    flip: bool = True

    @model_validator(mode="after")
    def _warmup_within_training(self) -> Pretrain:
        if self.warmup_epochs > self.epochs:
            raise Conflict(("warmup_epochs", "epochs"), f"warm-up of {self.warmup_epochs:g} epochs is longer "
                           f"than the {self.epochs} epochs of training")
        if self.full_size_epochs > self.epochs:
            raise Conflict(("full_size_epochs", "epochs"), f"{self.full_size_epochs} full-size epochs of "
                           f"{self.epochs} epochs of training")
        return self

    @field_validator("crop_size")
    @classmethod
    def _multiple_of_four(cls, size: int) -> int:
        # Two stride-2 stages halve the map twice; the shortcut's 2x2 pooling needs an even size each time.
        if size % 4:
            raise ValueError(f"must be 0 or a multiple of 4 (two stride-2 stages), got {size}")
        return size


class Curriculum(Section):
    epochs: PositiveInt = 20
    images_per_epoch: PositiveInt = 10000
    batch_size: PositiveInt = 256
    lr: PositiveFloat = 1e-3
    alpha: Annotated[Float, Field(gt=0.5, le=1.0)] = 0.8  # probability bound p' = a p + (1-a)(1-p)
    beta: NonNegFloat = 0.1  # entropy bonus
    penalty: NonNegFloat = 1.0  # gamma: reward of a wrong prediction is -penalty
    crop_padding: NonNegInt = 4
    flip: bool = True
    val_images: NonNegInt = 0  # validation images scored after each epoch (0 = all); training ignores them
    # Training steps per newly unlocked block (0: one block per epoch, the authors' schedule). With many
    # images per epoch (the fast GPU profiles) unlocking by steps reaches all K blocks in a fraction of the time.
    unlock_every: NonNegInt = 0
    # bernoulli: the Bernoulli entropy of the learnable blocks | authors: cl_training.py's -p' log p' over all
    # K blocks, forced-on ones included (peaks at p' = 1/e: it pulls every block toward being dropped)
    entropy: Literal["bernoulli", "authors"] = "bernoulli"
    # The epoch (1-based) whose policy models/policy_cl.pt keeps, and finetuning starts from; 0: the last.
    # The later epochs still run (their rows stay in the history), as the authors' run went on past the
    # checkpoint their README finetunes from.
    keep_epoch: NonNegInt = 0
    # What a block costs in the reward's usage term (blockdrop/train/block_costs.py): blocks: 1/K each (the
    # paper's) | flops: its share of the blocks' FLOPs | latency: its share of their times, measured at the start
    cost: Cost = "blocks"

    @model_validator(mode="after")
    def _kept_epoch_runs(self) -> Curriculum:
        if self.keep_epoch > self.epochs:
            raise Conflict(("keep_epoch", "epochs"), f"epoch {self.keep_epoch} is never reached in {self.epochs} "
                           "epochs (0 keeps the last)")
        return self


class Finetune(Section):
    epochs: PositiveInt = 2
    images_per_epoch: PositiveInt = 55000
    batch_size: PositiveInt = 256
    lr: PositiveFloat = 1e-4
    backbone_lr: NonNegFloat = 0.0  # Adam's lr for the backbone (0: lr, as in the paper)
    alpha: Annotated[Float, Field(gt=0.5, le=1.0)] = 0.8
    penalty: NonNegFloat = 5.0
    pg_reduction: Literal["mean", "sum"] = "mean"  # authors' code sums over the batch here
    execution: Literal["sparse", "masked"] = "sparse"  # blocks on the images that keep them | paper's dense form
    greedy_ce: NonNegFloat = 0.0  # weight of the cross-entropy under the greedy actions (0: the paper's loss)
    distill: NonNegFloat = 0.0  # >0: every block also runs, learns the labels and teaches the paths (KL, this weight)
    # The authors' step decay: from epoch lr_decay_epoch on (counted from 0) both rates are multiplied by
    # lr_decay (their CIFAR run: 1600 of 2000 epochs). 0: never.
    lr_decay_epoch: NonNegInt = 0
    lr_decay: Annotated[Float, Field(gt=0.0, le=1.0)] = 0.1
    crop_padding: NonNegInt = 4
    flip: bool = True
    cost: Cost = "blocks"  # what a block costs in the reward: blocks (the paper's) | flops | latency (as curriculum's)

    @model_validator(mode="after")
    def _decay_within_training(self) -> Finetune:
        if self.lr_decay_epoch >= self.epochs:
            raise Conflict(("lr_decay_epoch", "epochs"), f"a decay from epoch {self.lr_decay_epoch} never happens in "
                           f"{self.epochs} epochs (0 turns it off)")
        return self


class Evaluate(Section):
    batch_size: PositiveInt = 500
    latency_images: PositiveInt = 300  # images timed one at a time, after the warm-up
    latency_warmup: NonNegInt = 30
    latency_threads: NonNegInt = 1  # CPU threads while timing (0 = every core); ignored on CUDA

    @property
    def latency_needs(self) -> int:
        """Test images the latency measurement runs (warm-up, then timed)."""
        return self.latency_warmup + self.latency_images


class Heuristics(Section):
    # FirstK / RandomK curves at k = 1, 1 + step, 1 + 2 step, ... and K: each k costs about k / K of two passes
    # over the test set, so a deep network's K = 54 pays for a step above 1
    k_step: PositiveInt = 1


class Analyze(Section):
    samples_per_policy: Annotated[int, Field(ge=1, le=32)] = 8  # images shown with each policy
    top_policies: Annotated[int, Field(ge=1, le=32)] = 8  # most frequent policies over the whole test set
    policies_per_class: Annotated[int, Field(ge=1, le=8)] = 3  # most frequent policies shown per class
    extreme_images: Annotated[int, Field(ge=1, le=32)] = 12  # images with the fewest / most blocks shown
    embedding: Literal["pca", "tsne"] = "pca"  # 2-D map of the policy vectors
    embedding_points: PositiveInt = 2000  # images drawn in the map (t-SNE runs on this subsample)
    dpi: Annotated[int, Field(ge=50, le=600)] = 150


class Distributed(Section):
    # Data-parallel training (pretrain, curriculum, finetune): above 1, a stage relaunches itself under
    # `torchrun --nproc_per_node <nproc>` (gloo on CPU, NCCL on GPUs); batch sizes stay the global batch
    nproc: PositiveInt = 1
    sync_bn: bool = True  # GPUs: synchronise BatchNorm across ranks in the networks every rank runs whole


class Report(Section):
    title: str = "BlockDrop reproduction"


class Tracking(Section):
    experiment: Annotated[str, Field(min_length=1)] = "blockdrop"  # MLflow experiment of every run
    log_model: bool = True  # finetune logs and registers the BlockDrop model (alias "challenger")


class Flow(Section):
    retries: NonNegInt = 2  # Prefect retries of a stage that fails (never for exit code 2: bad params)
    retry_delay_s: NonNegFloat = 10.0  # wait between retries
    task_timeout_s: NonNegFloat = 14400.0  # a stage running longer is killed (its process tree) and fails; 0: no limit
    # `make schedule`: when the retrain flow runs (here Mondays 03:00, local time). Checked where it is read,
    # with Prefect's own schedule model (orchestration/cron.py), not here: a valid cron is Prefect's to say.
    cron: str = "0 3 * * 1"
    accuracy_tolerance: Fraction = 0.002  # challenger may be this much (a fraction) less accurate than champion
    require_flops_not_higher: bool = True  # ... and, when true, must not use more FLOPs per image


GridValue = bool | int | float | str
SWEEP_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"  # a prefix of DVC experiment names (git refs): no dots, no slashes
MAX_SETTINGS = 256
# What a sweep cannot vary: its own and the flow's settings, where runs are logged, and the speed-only keys
# (threads, workers) that no stage depends on, which would give identical experiments.
NOT_SWEPT = ("sweep", "flow", "tracking", "report", "threads", "workers")


class Sweep(Section):
    # `make sweep` (orchestration/sweep.py): every combination of the grid's values is one DVC experiment
    name: Annotated[str, Field(pattern=SWEEP_NAME, max_length=40)] = "sweep"  # experiments are <name>-<values>
    grid: dict[str, Annotated[list[GridValue], Field(min_length=1)]] = {}  # dotted params key -> its values
    workers: Annotated[int, Field(ge=1, le=32)] = 1  # DVC queue workers running experiments at once
    retries: NonNegInt = 1  # a failed experiment is queued again this many times


def _swept(params: Params) -> None:
    """Every key of ``sweep.grid`` names a param a stage reads, and every combination validates."""
    grid = params.sweep.grid
    if not grid:
        return
    base = params.model_dump()
    base["sweep"] = Sweep().model_dump()
    flat = flatten(base)
    for key, values in grid.items():
        if key not in flat or isinstance(flat[key], dict):
            raise Conflict((f"sweep.grid.{key}",), "not a params key (a dotted name such as finetune.penalty)")
        if key.split(".")[0] in NOT_SWEPT:
            raise Conflict((f"sweep.grid.{key}",), f"cannot be swept ({', '.join(NOT_SWEPT)} are not)")
        if len(set(map(repr, values))) < len(values):
            raise Conflict((f"sweep.grid.{key}",), f"values repeat: {values}")
    if math.prod(len(v) for v in grid.values()) > MAX_SETTINGS:
        raise Conflict(("sweep.grid",), f"more than {MAX_SETTINGS} combinations")
    for combination in itertools.product(*grid.values()):
        raw = json.loads(json.dumps(base))
        for key, value in zip(grid, combination, strict=True):
            *path, last = key.split(".")
            node = raw
            for part in path:
                node = node[part]
            node[last] = value
        try:
            Params.model_validate(raw)
        except ValidationError as e:
            setting = ", ".join(f"{k}={v}" for k, v in zip(grid, combination, strict=True))
            raise Conflict(tuple(f"sweep.grid.{k}" for k in grid), f"the setting {setting} is invalid: "
                           f"{_describe(e)}") from None


class Params(Section):
    seed: NonNegInt = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: NonNegInt = 0  # CPU threads for torch; 0 = every core
    workers: NonNegInt = 6  # ImageNet: DataLoader processes decoding JPEGs (0: in the stage's own process)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 where the hardware runs it natively
    # torch.compile the networks of the training steps (pays on a GPU with execution: masked; on a CPU it gave
    # nothing, and the sparse forward's data-dependent shapes break its graphs)
    compile: bool = False
    data: Data = Data()
    model: Model = Model()
    pretrain: Pretrain = Pretrain()
    curriculum: Curriculum = Curriculum()
    finetune: Finetune = Finetune()
    dist: Distributed = Distributed()
    heuristics: Heuristics = Heuristics()
    evaluate: Evaluate = Evaluate()
    analyze: Analyze = Analyze()
    report: Report = Report()
    tracking: Tracking = Tracking()
    flow: Flow = Flow()
    sweep: Sweep = Sweep()

    @model_validator(mode="after")
    def _sections_agree(self) -> Params:
        # Only what params.yaml alone decides; checks against the data's shape are in check_data_fit.
        # A folder of your own goes with either family; the published datasets with their own.
        if self.data.source != "folder" and (self.data.source == "imagenet") != self.model.imagenet:
            raise Conflict(("data.source", "model.depth"), f"ImageNet goes with the ResNet-{IMAGENET_DEPTH} and the "
                           f"CIFAR ResNets with 32x32 data; got {self.data.source} with depth {self.model.depth}")
        if self.data.streamed:  # images are cropped by data.resize/image_size: a second crop would be ignored
            flat = flatten(self.model_dump())
            crops = [key for key in ("pretrain.crop_padding", "pretrain.crop_size", "curriculum.crop_padding",
                                     "finetune.crop_padding") if flat[key]]
            if crops:
                raise Conflict((*crops, "data.transforms"), "imagenet-style images are cropped by "
                               "data.resize and data.image_size; set these to 0")
        if self.pretrain.epochs == 0 and not self.model.weights:
            raise Conflict(("pretrain.epochs", "model.weights"), "0 epochs trains nothing: it needs a backbone "
                           "weights file to start from")
        if self.data.test_limit and self.evaluate.latency_needs > self.data.test_limit:
            raise Conflict(("evaluate.latency_warmup", "evaluate.latency_images", "data.test_limit"),
                           f"{self.evaluate.latency_warmup} warm-up + {self.evaluate.latency_images} timed images "
                           f"exceed the {self.data.test_limit} test images kept")
        uneven = [f"{stage}.batch_size" for stage in ("pretrain", "curriculum", "finetune")
                  if getattr(self, stage).batch_size % self.dist.nproc]
        if uneven:
            raise Conflict((*uneven, "dist.nproc"), f"a global batch must split evenly over the "
                           f"{self.dist.nproc} processes")
        _swept(self)
        return self


# The training stages and the params section whose budget each trains on: finetune-full, the fair full-network
# baseline, trains on finetune's.
TRAINING_SECTION = {"pretrain": "pretrain", "curriculum": "curriculum", "finetune": "finetune",
                    "finetune-full": "finetune"}


class ParamsError(ValueError):
    """params.yaml is unreadable or invalid; the message is one line that names the dotted key."""


def _describe(error: ValidationError) -> str:
    parts = []
    for e in error.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        conflict = (e.get("ctx") or {}).get("error")
        if isinstance(conflict, Conflict):  # a model-level check: name every key, dotted from the root
            section = [str(p) for p in e["loc"]]
            keys = ", ".join(".".join([*section, k]) for k in conflict.keys)
            parts.append(f"{keys}: {conflict}")
            continue
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        got = "" if e["type"] == "extra_forbidden" else f" (got {e.get('input')!r})"
        parts.append(f"{key}: {msg}{got}")
    return "; ".join(parts)


def check_data_fit(params: Params, stage: str, shape: list[int] | tuple[int, ...], sizes: dict[str, int]) -> None:
    """Raise :class:`ParamsError` if ``stage``'s params cannot run on data of ``shape`` (C, H, W) with
    ``sizes`` images per split (prepared splits, or the raw ``train``/``test`` for ``prepare``).

    Called right after the stage learns the data's shape and before it loads a model or opens its MLflow
    run, so a setting that could only fail mid-training is refused with exit code 2 and nothing written.
    """
    problems: list[str] = []
    d, side = params.data, min(shape[1:]) if len(shape) >= 3 else 0
    if stage == "prepare":
        train, test = sizes.get("train", 0), sizes.get("test", 0)
        if d.val_size >= train:
            problems.append(f"data.val_size: {d.val_size} leaves no training images (the raw train split has {train})")
        elif d.train_limit > train - d.val_size:
            problems.append(f"data.train_limit: {d.train_limit} exceeds the {train - d.val_size} training images "
                            f"left after data.val_size {d.val_size}")
        if d.test_limit > test:
            problems.append(f"data.test_limit: {d.test_limit} exceeds the {test} raw test images")
    if stage == "pretrain" and params.model.imagenet and shape and shape[0] != 3:
        problems.append(f"model.depth: the ResNet-{IMAGENET_DEPTH} takes RGB images, the prepared data has "
                        f"{shape[0]} channel(s) (greyscale folder: use a CIFAR ResNet, depth 6n+2)")
    if stage == "pretrain":
        p = params.pretrain
        if p.crop_size > side + 2 * p.crop_padding:
            problems.append(f"pretrain.crop_size, pretrain.crop_padding: a {p.crop_size}x{p.crop_size} crop does "
                            f"not fit {side}x{side} images padded by {p.crop_padding}")
    if stage in TRAINING_SECTION and params.dist.nproc > 1:
        # Distributed epochs drop their last incomplete global batch: fewer images than one batch train nothing.
        name = TRAINING_SECTION[stage]
        section = getattr(params, name)
        images = min(sizes.get("train", 0), getattr(section, "images_per_epoch", sizes.get("train", 0)))
        if images < section.batch_size:
            problems.append(f"{name}.batch_size, dist.nproc: with several processes an epoch needs at least one "
                            f"whole batch of {section.batch_size}, the training split gives {images} images")
    if stage in ("curriculum", "finetune") and sizes.get("val", 0) < 1:
        problems.append(f"data.val_size: stage {stage} needs validation images, the prepared val split is empty")
    if stage == "evaluate":
        e, test = params.evaluate, sizes.get("test", 0)
        if e.latency_needs > test:
            problems.append(f"evaluate.latency_warmup, evaluate.latency_images: {e.latency_warmup} warm-up + "
                            f"{e.latency_images} timed images exceed the {test} test images")
    if problems:
        raise ParamsError("; ".join(problems))


def refuse(error: ParamsError, path: str | Path = "params.yaml") -> SystemExit:
    """Print the one-line message of an invalid setting; return the exit-2 ``SystemExit`` to raise.

    The one place that turns bad params into exit code 2, the code the Prefect flow does not retry.
    """
    print(f"error: invalid params in {path}: {error}", file=sys.stderr)
    return SystemExit(2)


def parse_params(raw: dict[str, Any]) -> Params:
    """Validate a params mapping, raising :class:`ParamsError` with dotted key names."""
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ParamsError(_describe(e)) from None


def load_params(path: str | Path = "params.yaml", *, exit_on_error: bool = True) -> Params:
    """Read and validate ``path``. On a mistake, print one line and exit 2 (or raise, for library use)."""
    try:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ParamsError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise ParamsError(f"{path}: top level must be a mapping")
        return parse_params(raw)
    except ParamsError as e:
        if not exit_on_error:
            raise
        raise refuse(e, path) from None


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: the dotted names DVC, MLflow and ``-S`` overrides share."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def params_sha256(params: Params, keys: list[str] | None = None) -> str:
    """Stable hash of the params (or of the dotted ``keys`` a stage depends on)."""
    return hashlib.sha256(json.dumps(select_params(params, keys), sort_keys=True).encode()).hexdigest()


def select_params(params: Params, keys: list[str] | None) -> dict[str, Any]:
    """Dotted params restricted to ``keys`` (a key may name a whole section); all of them if None."""
    flat = {k: v for k, v in flatten(params.model_dump()).items() if v != {}}  # drop empty sections
    if keys is None:
        return flat
    return {k: v for k, v in flat.items() if any(k == p or k.startswith(p + ".") for p in keys)}
