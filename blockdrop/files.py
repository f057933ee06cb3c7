"""Files a stage writes: checkpoints, JSON and CSV, written atomically; checkpoints read safely.

An interrupted write never leaves a half file under the real name (write to a temporary name in the
same folder, fsync it, then ``os.replace``), and a missing or corrupted file is reported by its path. The
temporary name carries the writer's pid, so the next write of the same file removes what a killed writer left.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch

__all__ = [
    "CheckpointError", "atomic_write_bytes", "atomic_write_text", "fsync_dir", "load_checkpoint",
    "remove_stale_temps", "save_atomic", "write_csv", "write_json",
]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or not what the stage expects."""


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (a rename, a new file) to disk; a no-op where folders cannot be opened."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temporary siblings of ``path`` (``.<name>.<pid>.<random>.tmp``) whose writer is dead.

    A SIGKILL between ``mkstemp`` and ``os.replace`` leaves such a file behind; a live writer's (another
    process writing the same target right now) is left alone. Returns what was removed.
    """
    # mkstemp's random part has no dot, so a temporary of another target ("a.json" beside "a") never matches.
    # No pid: a name from before pids were recorded, nobody will finish it either.
    ours = re.compile(rf"\.{re.escape(path.name)}\.(?:(\d+)\.)?[^.]+\.tmp")
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        match = ours.fullmatch(tmp.name)
        if match and (match[1] is None or not psutil.pid_exists(int(match[1]))):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _atomic(path: Path, write: Callable[[str], Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private (0600); outputs are ordinary files
    try:
        write(tmp)
        # The bytes must be on disk before the new name points at them: after a power loss, a renamed but
        # unflushed file can come back empty under the real name, and then pass as present.
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # and the rename itself


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` without ever exposing a partial file there.

    The bytes depend on ``obj`` only. ``torch.save`` to a file names the records inside its zip after that
    file, so saving to the random temporary name would give the same weights a new DVC hash on every run.
    """
    buf = io.BytesIO()
    torch.save(obj, buf)  # records are then named "archive/...", whatever the destination
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (figures rendered to memory, copied raw files)."""
    _atomic(Path(path), lambda tmp: Path(tmp).write_bytes(data))


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
