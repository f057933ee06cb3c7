"""Files a stage writes: checkpoints, JSON and CSV, written atomically; checkpoints read safely.

An interrupted write never leaves a half file under the real name (write to a temporary name in the
same folder, then ``os.replace``), and a missing or corrupted file is reported by its path.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "atomic_write_text", "load_checkpoint", "save_atomic", "write_csv", "write_json"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or not what the stage expects."""


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private (0600); outputs are ordinary files
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` without ever exposing a partial file there.

    The bytes depend on ``obj`` only. ``torch.save`` to a file names the records inside its zip after that
    file, so saving to the random temporary name would give the same weights a new DVC hash on every run.
    """
    buf = io.BytesIO()
    torch.save(obj, buf)  # records are then named "archive/...", whatever the destination
    _atomic(Path(path), lambda tmp: Path(tmp).write_bytes(buf.getvalue()))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file (metrics JSON, CSV) atomically."""
    _atomic(Path(path), lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | Path, obj: Any) -> None:
    """Pretty JSON with a trailing newline, written atomically (metrics files are read by git and DVC)."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Rows of dicts as CSV (the header is the first row's keys), written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else [])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def load_checkpoint(path: str | Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load a checkpoint dict safely; name the file in any failure, and check ``required`` keys."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} is missing: run the stage that writes it first")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is corrupted or unreadable ({type(e).__name__})") from None
    if not isinstance(blob, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(blob).__name__}, not a state dict")
    missing = [k for k in required if k not in blob]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    return blob
