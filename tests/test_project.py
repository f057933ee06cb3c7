"""blockdrop.project: the project's folder and git, as every module finds them."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from blockdrop.project import ROOT_ENV, find_up, git, git_commit, project_root


def test_project_root_walks_up_to_the_marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ROOT_ENV, raising=False)
    root = tmp_path.resolve() / "ws"
    (root / "a" / "b").mkdir(parents=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "a" / "prefect.yaml").write_text("{}\n")
    monkeypatch.chdir(root / "a" / "b")
    assert project_root() == root and find_up(Path.cwd(), "dvc.yaml") == root
    assert project_root(marker="prefect.yaml") == root / "a"
    with pytest.raises(FileNotFoundError, match=r"no absent\.yaml in"):
        project_root(marker="absent.yaml")
    assert find_up(Path.cwd(), "absent.yaml") is None

    monkeypatch.setenv(ROOT_ENV, str(tmp_path))  # names the project outright, unless a start is given
    assert project_root() == tmp_path.resolve()
    assert project_root(root / "a") == root


def test_git_commit_short_dirty_or_unknown(tmp_path: Path) -> None:
    assert git_commit(tmp_path) == "unknown" and git("rev-parse", "HEAD", cwd=tmp_path) is None
    cmd = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    (tmp_path / "f.txt").write_text("one\n")
    for args in (["init", "-q"], ["add", "f.txt"], ["commit", "-qm", "one"]):
        subprocess.run([*cmd, *args], cwd=tmp_path, check=True)
    head = git("rev-parse", "HEAD", cwd=tmp_path)
    assert head and len(head) == 40
    assert head.startswith(git_commit(tmp_path)) and "dirty" not in git_commit(tmp_path)
    (tmp_path / "new.txt").write_text("untracked files do not count\n")
    assert "dirty" not in git_commit(tmp_path)
    (tmp_path / "f.txt").write_text("two\n")
    assert git_commit(tmp_path).endswith(" (dirty)")
