"""blockdrop.files: every output is written atomically and flushed, and what a killed writer left is swept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from blockdrop import files
from blockdrop.analysis import style


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


def test_the_temporary_is_flushed_before_the_rename_and_the_folder_after(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "metrics.json"
    files.write_json(target, {"a": 1})
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    tmp = events[1][1]
    assert events[0][1] == tmp and Path(tmp).name.startswith(f".metrics.json.{os.getpid()}.")  # the pid in the name
    assert events[2][1] == str(tmp_path)  # the folder, so the rename itself is durable
    assert target.read_text() == '{\n  "a": 1\n}\n' and temps(tmp_path) == []


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "history.csv"
    files.atomic_write_text(target, "old\n")

    def broken(tmp: str) -> None:
        Path(tmp).write_text("half a fi")
        raise KeyboardInterrupt  # a Ctrl-C mid-write

    with pytest.raises(KeyboardInterrupt):
        files._atomic(target, broken)
    assert target.read_text() == "old\n" and temps(tmp_path) == []


def test_a_killed_writers_temporary_is_removed_by_the_next_write(tmp_path: Path) -> None:
    target = tmp_path / "backbone.pt"
    dead = tmp_path / f".backbone.pt.{dead_pid()}.k3j2h1g0.tmp"  # SIGKILLed between mkstemp and os.replace
    unnamed = tmp_path / ".backbone.pt.x8f2_a9q.tmp"  # from before pids were put in the name
    live = tmp_path / f".backbone.pt.{os.getppid()}.abcdefgh.tmp"  # another process writing it right now
    other = tmp_path / f".policy_cl.pt.{dead_pid()}.abcdefgh.tmp"  # another file's: its own next write sweeps it
    longer = tmp_path / f".backbone.pt.bak.{os.getppid()}.abcdefgh.tmp"  # "backbone.pt.bak", live: not ours
    for p in (dead, unnamed, live, other, longer):
        p.write_bytes(b"partial")
    files.atomic_write_bytes(target, b"weights")
    assert target.read_bytes() == b"weights"
    assert temps(tmp_path) == sorted([live.name, other.name, longer.name])


def test_a_figure_is_rendered_in_memory_and_written_atomically(tmp_path: Path) -> None:
    fig = Figure(figsize=(2, 2))
    fig.add_subplot().plot([0, 1], [1, 0])
    stale = tmp_path / "figs" / f".curve.png.{dead_pid()}.zzzzzzzz.tmp"
    stale.parent.mkdir()
    stale.write_bytes(b"\x89PNG half")
    path = style.save_figure(fig, tmp_path / "figs" / "curve.png", dpi=50)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    assert temps(path.parent) == []
