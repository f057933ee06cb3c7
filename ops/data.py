"""``make data``: the configured source's raw files in ``data.raw``, versioned by DVC.

    python -m ops.data [--no-apt]

``prepare`` depends on the folder ``data.raw`` (dvc.yaml), so the raw data is versioned like every other input:
``<data.raw>.dvc`` records its hash, the DVC cache and remote hold its bytes, a queued experiment's workspace
checks it out, and a changed raw file makes ``dvc status`` name ``prepare``. This command puts it in place:

1. tracked already (``<data.raw>.dvc`` exists): ``dvc checkout`` from the local cache, else ``dvc pull`` from
   the remote;
2. still missing: fetched (:func:`blockdrop.data.fetch.fetch`): Fashion-MNIST from Debian's
   ``dataset-fashion-mnist`` (installed with apt-get when run as root) or torchvision's mirrors, CIFAR from
   torchvision's mirror, each file checked against its published md5;
3. ``dvc add``: the folder cached and ``<data.raw>.dvc`` (re)written. Published data hashes the same on every
   machine, so the project's committed ``data/raw/fashion-mnist.dvc`` is left as it is.

A folder of your own (``data.source: folder``, ImageNet) is never fetched: put it in ``data.raw`` and run this
to track it. Exit 1 when the data cannot be put in place, with what to do.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from blockdrop import config, project
from blockdrop.data.fetch import DEBIAN_FASHION_MNIST, fetch, has_raw
from blockdrop.data.sources import DataSourceError


def dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    """Run this venv's ``dvc`` in ``root``; its output goes to ours."""
    return subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=root, check=False)


def apt_install_fashion_mnist() -> None:
    """Debian's package, when this is a Debian machine and we are root (as on CI); silent otherwise."""
    if DEBIAN_FASHION_MNIST.is_dir() or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return
    print("installing Debian's dataset-fashion-mnist (apt-get)", flush=True)
    quiet = {"stdout": subprocess.DEVNULL, "check": False}
    subprocess.run(["apt-get", "update", "-qq"], **quiet)
    subprocess.run(["apt-get", "install", "-y", "-qq", "dataset-fashion-mnist"], **quiet)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-apt", action="store_true", help="never run apt-get")
    args = parser.parse_args(argv)
    root = project.project_root()
    data = config.load_params(root / "params.yaml").data
    raw = Path(data.raw)
    folder = raw if raw.is_absolute() else root / raw
    inside = folder.resolve().is_relative_to(root.resolve())
    tracker = folder.with_name(folder.name + ".dvc")
    if tracker.exists() and not has_raw(data.source, folder):
        dvc(root, "checkout", "--quiet", str(tracker.relative_to(root)))
        if not has_raw(data.source, folder):
            dvc(root, "pull", "--quiet", str(tracker.relative_to(root)))  # may fail: no remote, not pushed
    if not has_raw(data.source, folder):
        if data.source == "fashion-mnist" and not args.no_apt:
            apt_install_fashion_mnist()
        try:
            origin = fetch(data.source, folder)
        except DataSourceError as e:
            print(f"make data: {e}", file=sys.stderr)
            return 1
        print(f"{data.source}: copied from {origin} into {data.raw}", flush=True)
    if not inside:  # DVC hashes it as prepare's dependency, but can neither cache nor push it
        print(f"{data.raw} is outside the project: `dvc repro` records its hash, but `dvc push` cannot carry it; "
              "copy it under data/raw/ to version it", flush=True)
        return 0
    if dvc(root, "add", "--quiet", str(folder.relative_to(root))).returncode != 0:
        return 1
    print(f"{data.raw}: tracked by DVC ({tracker.relative_to(root)}); `git add` it if it is new", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
