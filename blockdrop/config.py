"""One validated model of ``params.yaml``.

Every stage starts with :func:`load_params`: an unknown key, a wrong type or an out-of-range value stops
the stage before it touches anything, with the key's dotted name (the same name DVC, MLflow and
``dvc exp run -S`` use) in a one-line message and exit code 2.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "Params",
    "ParamsError",
    "flatten",
    "load_params",
    "params_sha256",
    "parse_params",
    "select_params",
    "stage_param_keys",
]

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
NonNegFloat = Annotated[float, Field(ge=0.0)]


class Section(BaseModel):
    # strict: "5" is not an int and 1 is not a bool; extra="forbid": a misspelt key is an error, not a no-op.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Data(Section):
    source: Literal["fashion-mnist", "cifar10", "cifar100"] = "fashion-mnist"
    raw_dir: str = "data/raw"  # where local copies of the raw datasets are looked for first
    val_size: NonNegInt = 5000  # images carved from train, deterministically from `seed`
    train_limit: NonNegInt = 0  # keep only this many training images (0: all); for tests and quick looks
    test_limit: NonNegInt = 0  # keep only the first this many test images (0: all)


class Model(Section):
    depth: Annotated[int, Field(ge=8, le=1202)] = 32

    @model_validator(mode="after")
    def _six_n_plus_two(self) -> Model:
        if (self.depth - 2) % 6:
            raise ValueError(f"must be 6n+2 (20, 32, 56, 110), got {self.depth}")
        return self


class Pretrain(Section):
    epochs: PositiveInt = 5
    batch_size: PositiveInt = 128
    lr: PositiveFloat = 0.2  # peak learning rate, reached after the warm-up
    warmup_epochs: NonNegFloat = 1.0
    momentum: Fraction = 0.9
    weight_decay: NonNegFloat = 5e-4
    label_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    drop_path: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0  # stochastic depth at the last block
    crop_padding: NonNegInt = 4
    flip: bool = True


class Curriculum(Section):
    epochs: PositiveInt = 20
    images_per_epoch: PositiveInt = 10000
    batch_size: PositiveInt = 256
    lr: PositiveFloat = 1e-3
    alpha: Annotated[float, Field(gt=0.5, le=1.0)] = 0.8  # probability bound p' = a p + (1-a)(1-p)
    beta: NonNegFloat = 0.1  # entropy bonus
    penalty: NonNegFloat = 1.0  # gamma: reward of a wrong prediction is -penalty
    crop_padding: NonNegInt = 4
    flip: bool = True


class Finetune(Section):
    epochs: PositiveInt = 2
    images_per_epoch: PositiveInt = 55000
    batch_size: PositiveInt = 256
    lr: PositiveFloat = 1e-4
    alpha: Annotated[float, Field(gt=0.5, le=1.0)] = 0.8
    penalty: NonNegFloat = 5.0
    pg_reduction: Literal["mean", "sum"] = "mean"  # authors' code sums over the batch here
    crop_padding: NonNegInt = 4
    flip: bool = True


class Evaluate(Section):
    batch_size: PositiveInt = 500
    latency_images: PositiveInt = 300  # images timed one at a time, after the warm-up
    latency_warmup: NonNegInt = 30


class Params(Section):
    seed: NonNegInt = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: NonNegInt = 0  # CPU threads for torch; 0 = every core
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 where the hardware runs it natively
    data: Data = Data()
    model: Model = Model()
    pretrain: Pretrain = Pretrain()
    curriculum: Curriculum = Curriculum()
    finetune: Finetune = Finetune()
    evaluate: Evaluate = Evaluate()
    # Sections owned by the tracking and orchestration layers; validated there, kept as plain data here.
    tracking: dict[str, Any] = Field(default_factory=dict)
    flow: dict[str, Any] = Field(default_factory=dict)
    analyze: dict[str, Any] = Field(default_factory=dict)


class ParamsError(ValueError):
    """params.yaml is unreadable or invalid; the message is one line that names the dotted key."""


def _describe(error: ValidationError) -> str:
    parts = []
    for e in error.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        got = "" if e["type"] == "extra_forbidden" else f" (got {e.get('input')!r})"
        parts.append(f"{key}: {msg}{got}")
    return "; ".join(parts)


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
        print(f"error: invalid params in {path}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


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


def stage_param_keys(stage: str, dvc_yaml: str | Path = "dvc.yaml") -> list[str] | None:
    """The params keys a DVC stage depends on, as written in its ``params:`` list (None if unknown).

    dvc.yaml is the one place that says which knobs a stage reads; the stage's MLflow params and its
    resume key are derived from the same list, so the three can never disagree.
    """
    try:
        stages = yaml.safe_load(Path(dvc_yaml).read_text())["stages"]
        entries = stages[stage].get("params", [])
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return None
    keys: list[str] = []
    for entry in entries:
        if isinstance(entry, str):
            keys.append(entry)
        elif isinstance(entry, dict):  # {params.yaml: [keys]} form
            for file, names in entry.items():
                if Path(file).name == "params.yaml":
                    keys.extend(names or [])
    return keys


def select_params(params: Params, keys: list[str] | None) -> dict[str, Any]:
    """Dotted params restricted to ``keys`` (a key may name a whole section); all of them if None."""
    flat = flatten(params.model_dump())
    if keys is None:
        return flat
    return {k: v for k, v in flat.items() if any(k == p or k.startswith(p + ".") for p in keys)}
