"""Small tmpfs mounts for the disk-full tests (root only: a test skips, with the reason, where none can be
mounted)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from pathlib import Path

import pytest

PAGE = 4096


def _kib(size: int) -> int:
    """`size` bytes rounded up to whole pages, in KiB (what mount's size= takes)."""
    return -(-size // PAGE) * PAGE // 1024


@contextlib.contextmanager
def tmpfs(path: Path, size: int):
    """A tmpfs of `size` bytes (whole pages) mounted at `path` for the block's duration."""
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command: the disk-full tests need a small tmpfs")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={_kib(size)}k", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({r.stderr.strip() or r.returncode}): the disk-full tests need root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def resize(path: Path, size: int) -> None:
    """Grow (or shrink) the tmpfs at `path` to `size` bytes, its files kept."""
    subprocess.run(["mount", "-o", f"remount,size={_kib(size)}k", str(path)], check=True, capture_output=True)
