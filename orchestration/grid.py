"""A sweep's grid: dotted params keys to lists of values, expanded into settings, one DVC experiment each.

No Prefect here: ``tests/test_sweep_grid.py`` checks the names and the ``-S`` spellings without loading it.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

import yaml

from blockdrop.config import ParamsError

__all__ = ["Setting", "expand", "parse_set"]


@dataclass(frozen=True)
class Setting:
    """One combination of the grid: its ``(dotted key, value)`` pairs and its DVC experiment's name."""

    values: tuple[tuple[str, Any], ...]
    name: str

    @property
    def overrides(self) -> list[str]:
        """``-S`` arguments of ``dvc exp run``: YAML spellings, so ``true`` stays a bool and ``2`` an int."""
        return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                for k, v in self.values]


def _slug(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value).lower()
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("._") or "x"


def expand(grid: dict[str, list[Any]], prefix: str = "sweep") -> list[Setting]:
    """Every combination of ``grid``, in its order, each named ``<prefix>-<key>-<value>_...`` by the last part of
    each dotted key (the whole key, dots as dashes, where two keys end alike)."""
    last = [k.rsplit(".", 1)[-1] for k in grid]
    short = [part if last.count(part) == 1 else key.replace(".", "-") for key, part in zip(grid, last, strict=True)]
    settings = []
    for combination in itertools.product(*grid.values()):
        name = "_".join(f"{s}-{_slug(v)}" for s, v in zip(short, combination, strict=True))
        settings.append(Setting(tuple(zip(grid, combination, strict=True)), f"{prefix}-{name}"))
    return settings


def parse_set(items: list[str]) -> dict[str, list[Any]]:
    """``["finetune.penalty=1,2", "seed=0,1"]`` -> ``{"finetune.penalty": [1, 2], "seed": [0, 1]}`` (YAML values)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ParamsError(f"--set {item!r}: expected key=value[,value...]")
        grid[key.strip()] = [yaml.safe_load(v) for v in values.split(",")]
    return grid
