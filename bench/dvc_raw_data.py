"""What versioning an ImageNet-sized raw folder with DVC costs, measured on a synthetic tree in one run.

ILSVRC2012's train and val folders are 1,331,167 JPEGs, about 147 GB (110 KB a file on average). Hashing all of
them on every ``dvc status`` would be hours, so DVC keeps a state database (inode, mtime, size -> md5) and
re-hashes only files that changed; the first ``dvc add`` pays the full hash, and, with the default cache type,
a full copy into ``.dvc/cache``. This bench builds ``--files`` files of ``--kb`` KB each (random bytes: JPEGs do
not compress either) in class folders, and times, in one temporary DVC repository:

1. md5 alone over the tree (hashlib, one core): the floor of any content hash;
2. ``dvc add`` with the default cache type (a copy: ext4 has no reflinks);
3. the same folder again in a fresh repository with ``cache.type hardlink``: no second copy of the bytes;
4. ``dvc status`` right after (the state database: no file re-hashed);
5. ``dvc status`` after one file changed.

It prints each (less DVC's own start-up, timed on an empty repository) as seconds per 10,000 files and as a ratio
to the md5 floor, and the extrapolation to ImageNet's 1.33 M files / 147 GB. The extrapolation is linear: the
first ``dvc add`` is bound by reading and hashing the bytes, the status passes by one ``stat`` per file.

    python bench/dvc_raw_data.py                 # 20,000 files of 110 KB (2.2 GB of disk, about 2-4 min)
    python bench/dvc_raw_data.py --files 5000    # quicker
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMAGENET_FILES, IMAGENET_GB = 1_331_167, 147.0
DVC = str(Path(sys.executable).parent / "dvc")


def timed(cmd: list[str], cwd: Path) -> float:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=False, stdout=subprocess.DEVNULL)  # status exits 1 on a change
    return time.perf_counter() - t0


def make_tree(root: Path, files: int, kb: int, classes: int = 100) -> None:
    rng = os.urandom  # incompressible, like JPEG bytes
    for i in range(files):
        folder = root / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img_{i:07d}.JPEG").write_bytes(rng(kb * 1024))


def md5_tree(root: Path) -> float:
    t0 = time.perf_counter()
    for path in sorted(root.rglob("*.JPEG")):
        with path.open("rb") as f:
            hashlib.file_digest(f, "md5")
    return time.perf_counter() - t0


def repo(base: Path, name: str, tree: Path, cache_type: str | None) -> Path:
    root = base / name
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([DVC, "init", "-q"], cwd=root, check=True)
    if cache_type:
        subprocess.run([DVC, "config", "cache.type", cache_type], cwd=root, check=True)
    (root / "data").mkdir()
    shutil.copytree(tree, root / "data" / "imagenet", copy_function=os.link)  # same inodes: no bytes copied
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--kb", type=int, default=110)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-dvc-raw-", dir=Path.cwd()) as tmp:
        base = Path(tmp)
        tree = base / "tree"
        make_tree(tree, args.files, args.kb)
        subprocess.run(["sync"], check=True)
        md5_tree(tree)  # once untimed: the page cache holds the tree for every pass below, as it would after a copy
        floor = md5_tree(tree)
        empty = base / "empty"
        empty.mkdir()
        subprocess.run(["git", "init", "-q"], cwd=empty, check=True)
        subprocess.run([DVC, "init", "-q"], cwd=empty, check=True)
        startup = min(timed([DVC, "status", "-q"], empty) for _ in range(3))  # DVC's own start, no data
        copy_repo = repo(base, "copy", tree, None)
        add_copy = timed([DVC, "add", "-q", "data/imagenet"], copy_repo)
        link_repo = repo(base, "hardlink", tree, "hardlink")
        add_link = timed([DVC, "add", "-q", "data/imagenet"], link_repo)
        status = timed([DVC, "status", "-q"], link_repo)
        victim = next((link_repo / "data" / "imagenet").rglob("*.JPEG"))
        victim.unlink()  # a hardlinked file is read-only in the cache: replace it, as an editor would
        victim.write_bytes(os.urandom(args.kb * 1024))
        status_changed = subprocess.run([DVC, "status", "-q"], cwd=link_repo, capture_output=True)  # warms it
        status_one = timed([DVC, "status", "-q"], link_repo)
        cache_copy = sum(p.stat().st_size for p in (copy_repo / ".dvc" / "cache").rglob("*") if p.is_file())
        data_bytes = args.files * args.kb * 1024
    per10k = 10_000 / args.files
    scale_files, scale_gb = IMAGENET_FILES / args.files, IMAGENET_GB / (data_bytes / 1e9)
    print(f"tree: {args.files} files of {args.kb} KB ({data_bytes / 1e9:.2f} GB), {os.cpu_count()} CPUs; "
          f"DVC's own start-up ({startup:.2f} s, an empty repository's status) is taken off each DVC pass")
    print(f"{'pass':<40} {'s / 10k files':>14} {'x md5 floor':>12} {'ImageNet (h)':>13}")
    for name, secs, scale in (("md5 of every file (hashlib, 1 core)", floor, scale_gb),
                              ("dvc add, cache.type copy", add_copy - startup, scale_gb),
                              ("dvc add, cache.type hardlink", add_link - startup, scale_gb),
                              ("dvc status, nothing changed", status - startup, scale_files),
                              ("dvc status, one file changed", status_one - startup, scale_files)):
        print(f"{name:<40} {secs * per10k:>14.2f} {secs / floor:>12.2f} {secs * scale / 3600:>13.2f}")
    print(f"cache size, copy: {cache_copy / data_bytes:.2f} x the data; hardlink: no second copy "
          f"(status after one change exit {status_changed.returncode}, the change reported)")


if __name__ == "__main__":
    main()
