"""Local files and folders that appear whole or not at all: the one way the project replaces a file in place.

A file is written to `NAME.tmp` beside it, flushed to disk (fsync), then renamed over NAME (atomic on POSIX),
and the folder's entry is synced too, so a crash or a kill leaves the old file or the new one, never a
truncated one. A folder is written as `DIR.tmp`, then swapped in. Object stores need none of this: one PUT
makes an object appear whole (pipeline/cache/storage.py).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable


def _sync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (where the platform lets a folder be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_file_atomically(path: Path, write: Callable[[Path], None], keep_suffix: bool = False) -> None:
    """write(PATH.tmp), fsync it, rename it over PATH; an exception leaves PATH as it was and no PATH.tmp.
    `keep_suffix`: the temporary name ends in PATH's suffix (NAME.tmp.png), for writers that take the format
    from the file name (matplotlib)."""
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix}" if keep_suffix else path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    _sync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    write_file_atomically(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: Path, data: dict) -> None:
    """A JSON file (indented, sorted keys, trailing newline) replaced atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_folder_atomically(out: Path, write: Callable[[Path], None]) -> None:
    """write(DIR.tmp), then swap it in; an exception leaves the old DIR (or none) and no DIR.tmp."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    _sync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)
