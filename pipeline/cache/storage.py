"""Where a cache lives: a local folder or any fsspec URL (s3://, gs://, az://, memory://, file://, ...).

`Storage(url, storage_options)` is the cache's root: every path below is relative to it, with "/"
separators ("manifest.json", "shards/shard-00000.arrow"). The manifest, directory, writer and reader
code go through it and never see the difference, except in two places where object stores differ:

- **Local folders** (a plain path or file://) keep the pathlib code paths: files are written as `*.tmp`
  and renamed into place, JSON files are fsynced and replaced atomically, the build lock is an flock.
  A local cache's bytes do not depend on this module.
- **Everything else** goes through the fsspec filesystem (`storage_options` and fsspec's own config,
  e.g. FSSPEC_S3_ENDPOINT_URL, or the backend's environment, e.g. AWS_ENDPOINT_URL). Object stores have
  no rename: `atomic_rename` is False and shard files are written straight to their final names. A
  single object appears whole or not at all (a PUT), so the order of writes alone keeps a half-written
  cache invisible: shard data first, then its record, then (at the end) the manifest. Listings are not
  cached between calls (another filesystem instance, zarr's, writes the arrays).

Bad URLs fail here with one line before anything is loaded or written: an unknown protocol, one whose
backend is not installed (gs:// without gcsfs), options the backend rejects, or (`check_bucket`) a
bucket or container that does not exist. Buckets are never created.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from pipeline.atomic import write_json_atomic
from pipeline.cache.checksum import hasher_like
from pipeline.errors import PipelineError

LOCAL_PROTOCOLS = ("file", "local")
# a storage option whose name contains one of these is a credential: never written to run summaries
_SECRET_WORDS = ("secret", "key", "token", "password", "credential", "sas")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def redact(options: dict[str, Any] | None) -> dict[str, Any]:
    """storage_options with credential values replaced by "***" (for run summaries and logs)."""
    out: dict[str, Any] = {}
    for k, v in (options or {}).items():
        if isinstance(v, dict):
            out[k] = redact(v)
        elif any(w in str(k).lower() for w in _SECRET_WORDS) and k != "endpoint_url":
            out[k] = "***"
        else:
            out[k] = v
    return out


class Storage:
    """A cache root (local folder or fsspec URL) and the few file operations the cache needs."""

    def __init__(self, url: str | Path, storage_options: dict[str, Any] | None = None, what: str | None = None):
        self.url = str(url)
        self.options = dict(storage_options or {})
        label = what or self.url
        import fsspec.utils

        protocol = fsspec.utils.get_protocol(self.url) if isinstance(url, str) else "file"
        self.protocol = protocol
        self.local = protocol in LOCAL_PROTOCOLS
        self.fs = None
        if self.local:
            plain = self.url[len(protocol) + 3:] if self.url.startswith(f"{protocol}://") else self.url
            self.path = Path(plain)
            self.root = str(self.path)
            return
        self.path = None
        try:
            fsspec.get_filesystem_class(protocol)
        except ImportError as e:
            raise PipelineError(f"{label}: no fsspec backend for {protocol}:// is installed ({e})") from None
        except ValueError:
            raise PipelineError(f"{label}: unknown storage protocol {protocol}:// (not an fsspec protocol)") from None
        try:
            self.fs, root = fsspec.core.url_to_fs(self.url, **self.options)
        except Exception as e:  # bad options, unparsable URL: the backend's own words, on one line
            raise PipelineError(f"{label}: cannot open {self.url} ({_first_line(e)})") from None
        self.root = root.rstrip("/")
        if not self.root or self.root == self.fs.root_marker:
            raise PipelineError(f"{label}: {self.url} names no folder (use {protocol}://BUCKET/PREFIX)")

    # ------------------------------------------------------------------ names
    @property
    def atomic_rename(self) -> bool:
        """Local folders: write *.tmp and rename. Object stores: no rename, final names at once."""
        return self.local

    @property
    def name(self) -> str:
        return self.root.rstrip("/").rsplit("/", 1)[-1]

    def full(self, rel: str = "") -> str:
        """The filesystem path of `rel` (no protocol for fsspec; an OS path locally)."""
        if self.local:
            return str(self.path / rel) if rel else str(self.path)
        return f"{self.root}/{rel}" if rel else self.root

    def display(self, rel: str = "") -> str:
        """`rel` as the user would write it: a local path, or the URL."""
        if self.local:
            return self.full(rel)
        base = self.url.rstrip("/")
        return f"{base}/{rel}" if rel else base

    def __str__(self) -> str:
        return self.display()

    def _fresh(self) -> None:
        # another instance (zarr's async one) may have written since this one cached a listing
        self.fs.invalidate_cache()

    # ------------------------------------------------------------------ checks
    def check_bucket(self, label: str | None = None) -> None:
        """Object stores: the bucket (container) must exist; it is never created. A no-op elsewhere."""
        if self.local or not hasattr(self.fs, "split_path"):
            return
        bucket = self.fs.split_path(self.root)[0]
        self._fresh()
        try:
            self.fs.info(bucket)  # not exists(): it reads every failure (credentials, bad options) as "missing"
        except FileNotFoundError:
            raise PipelineError(f"{label or self.url}: bucket {bucket} does not exist (create it first; "
                                "a build never creates buckets)") from None
        except Exception as e:
            raise PipelineError(f"{label or self.url}: cannot reach bucket {bucket} ({_first_line(e)})") from None

    # ------------------------------------------------------------------ queries
    def exists(self, rel: str = "") -> bool:
        if self.local:
            return (self.path / rel).exists()
        self._fresh()
        return self.fs.exists(self.full(rel))

    def isfile(self, rel: str) -> bool:
        if self.local:
            return (self.path / rel).is_file()
        self._fresh()
        return self.fs.isfile(self.full(rel))

    def isdir(self, rel: str = "") -> bool:
        if self.local:
            return (self.path / rel).is_dir()
        self._fresh()
        try:
            return self.fs.isdir(self.full(rel))
        except (FileNotFoundError, PermissionError):
            return False

    def listdir(self, rel: str = "") -> list[str]:
        """Names directly under `rel` (files and folders), [] when it does not exist."""
        if self.local:
            p = self.path / rel
            return sorted(os.listdir(p)) if p.is_dir() else []
        self._fresh()
        try:
            entries = self.fs.ls(self.full(rel), detail=False)
        except FileNotFoundError:
            return []
        base = self.full(rel).rstrip("/")
        names = {e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != base}
        return sorted(names)

    def files(self, rel: str) -> list[str]:
        """Every file under the folder `rel`, recursively, as sorted relative paths; [] when missing."""
        if self.local:
            p = self.path / rel
            return sorted(str(f.relative_to(self.path)) for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
        self._fresh()
        base = self.full(rel).rstrip("/") + "/"
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        n = len(self.root) + 1
        return sorted(f[n:] for f in found if f.startswith(base))

    def size(self, rel: str) -> int:
        if self.local:
            return (self.path / rel).stat().st_size
        return int(self.fs.size(self.full(rel)))

    def checksum(self, rel: str, like: str | None = None) -> str:
        """The file's digest (checksum.py), streamed, in the algorithm the digest `like` names (None: the one
        new files get)."""
        h = hasher_like(like)
        with self.open(rel, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        return h.digest()

    # ------------------------------------------------------------------ reading and writing
    def open(self, rel: str, mode: str = "rb"):
        if self.local:
            return open(self.path / rel, mode)
        return self.fs.open(self.full(rel), mode)

    def read_json(self, rel: str) -> dict:
        where = self.display(rel)
        try:
            with self.open(rel, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise PipelineError(f"{where} is missing") from None
        try:
            return json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:  # a damaged byte: named like any other damage, never a traceback
            raise PipelineError(f"{where} is not valid JSON (not UTF-8 text at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise PipelineError(f"{where} is not valid JSON ({e.msg})") from None

    def read_bytes(self, rel: str) -> bytes:
        """The whole file (an object store: one GET); FileNotFoundError when it is not there."""
        if self.local:
            return (self.path / rel).read_bytes()
        return self.fs.cat_file(self.full(rel))

    def write_json(self, rel: str, data: dict) -> None:
        """Locally: *.tmp, fsync, rename (atomic). Object stores: one PUT (an object appears whole)."""
        if self.local:
            write_json_atomic(self.path / rel, data)
            return
        text = json.dumps(data, indent=2, sort_keys=True) + "\n"
        self.fs.pipe_file(self.full(rel), text.encode())

    def remove(self, rel: str) -> None:
        """Delete a file or a folder tree; nothing when it does not exist."""
        if self.local:
            p = self.path / rel
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            return
        self._fresh()
        path = self.full(rel)
        try:
            if self.fs.isdir(path):
                # the folder's objects only (a sibling like shard-00000.zarr.tmp shares the prefix)
                targets = self.fs.find(path.rstrip("/") + "/")
                if targets:
                    self.fs.rm(targets)
                try:
                    self.fs.rm(path, recursive=True)  # a directory marker or a pseudo-folder, where there is one
                except (FileNotFoundError, OSError):
                    pass
            elif self.fs.isfile(path):
                self.fs.rm_file(path)
        except FileNotFoundError:
            pass
        self._fresh()

    def makedirs(self, rel: str = "") -> None:
        """Locally: create the folder. Object stores have no folders (and a bucket is never created)."""
        if self.local:
            (self.path / rel).mkdir(parents=True, exist_ok=True)

    def rename(self, src: str, dst: str) -> None:
        if not self.local:
            raise RuntimeError("object stores have no rename; write to the final name")
        (self.path / src).rename(self.path / dst)

    def write_bytes(self, rel: str, data) -> None:
        """One whole file (locally its folder is created; on an object store one PUT)."""
        if self.local:
            path = self.path / rel
            try:
                f = open(path, "wb")
            except FileNotFoundError:
                path.parent.mkdir(parents=True, exist_ok=True)
                f = open(path, "wb")
            with f:
                f.write(data)
            return
        self.fs.pipe_file(self.full(rel), bytes(data))

    def open_write(self, rel: str):
        """A file object to stream bytes into at `rel` (object stores: uploaded in parts, completed on close)."""
        if self.local:
            return open(self.path / rel, "wb")
        return self.fs.open(self.full(rel), "wb")

    def arrow_source(self, rel: str):
        """A random-access Arrow input at `rel`: a memory map locally, a buffered remote file otherwise."""
        import pyarrow as pa

        if self.local:
            return pa.memory_map(str(self.path / rel), "r")
        return pa.PythonFile(self.fs.open(self.full(rel), "rb"), mode="r")

    def zarr_store(self, rel: str, read_only: bool = False):
        """What zarr.open_group takes as `store` for the folder `rel`."""
        if self.local:
            return str(self.path / rel)
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(self.display(rel), storage_options=self.options or None, read_only=read_only)


def as_storage(root: "str | Path | Storage", storage_options: dict[str, Any] | None = None,
               what: str | None = None) -> Storage:
    return root if isinstance(root, Storage) else Storage(root, storage_options, what)
