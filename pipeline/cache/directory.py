"""The cache directory's life cycle: lock, claim (new / resume / refuse / overwrite), finalize.

Everything goes through `Storage` (storage.py), so the same code serves a local folder and an object
store; only the build lock differs (`build_lock`): an flock locally, an exclusive-create lock object on
an object store.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import uuid
from pathlib import Path

from pipeline.cache.manifest import (
    BUILD, LOCK, MANIFEST, SHARDS, check_format, combine_checksums, fingerprint_digest, shard_files, shard_paths,
    validate_manifest,
)
from pipeline.cache.storage import Storage, as_storage
from pipeline.errors import PipelineError


class BuildLock:
    """An exclusive, non-blocking flock on CACHE/.lock: one builder per cache (local folders)."""

    def __init__(self, root: Path | Storage):
        self.path = as_storage(root).path / LOCK
        self._fh = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise PipelineError(f"{self.path.parent} is being built by another process (lock held on {self.path})") from None
        self._fh = fh

    @property
    def held(self) -> bool:
        return self._fh is not None

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


class ObjectLock:
    """One builder per cache on an object store: CACHE/.lock created exclusively (a conditional PUT,
    If-None-Match: *), holding the builder's host, pid and a random token; deleted at the end.

    Limits, unlike an flock: the lock is not released by the kernel when the builder dies. A lock left by a
    process that is no longer running on this host is taken over (with a note); one left by a dead builder
    on another host must be deleted by hand (the error names it). Taking over a stale lock and releasing
    one (read, compare the token, delete) are two requests each, not one atomic step. The store must honour
    exclusive creation (AWS S3 and S3-compatible servers that support conditional writes, fsspec's memory://);
    where a backend ignores mode "xb", two builders are not kept apart.
    """

    def __init__(self, store: Storage):
        self.store = store
        self.token: str | None = None

    def _holder(self) -> dict:
        try:
            return self.store.read_json(LOCK)
        except PipelineError:
            return {}

    def _stale(self, holder: dict) -> bool:
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def acquire(self) -> None:
        mine = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        for attempt in range(2):
            try:
                with self.store.open(LOCK, "xb") as f:
                    f.write((json.dumps(mine, sort_keys=True) + "\n").encode())
                self.token = mine["token"]
                return
            except FileExistsError:
                holder = self._holder()
                if attempt == 0 and self._stale(holder):
                    import click

                    click.echo(f"{self.store}: removing the lock left by pid {holder['pid']} (no longer running "
                               "on this host)", err=True)
                    self.store.remove(LOCK)
                    continue
                who = (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
                       if holder else "an unknown builder")
                raise PipelineError(f"{self.store} is being built by another process (lock {self.store.display(LOCK)} "
                                    f"held by {who}; delete it if no build is running)") from None

    @property
    def held(self) -> bool:
        return self.token is not None

    def release(self) -> None:
        if self.token is None:
            return
        if self._holder().get("token") == self.token:
            self.store.remove(LOCK)
        self.token = None


def build_lock(store: Storage) -> BuildLock | ObjectLock:
    return BuildLock(store) if store.local else ObjectLock(store)


def _is_cache_dir(store: Storage) -> bool:
    return any(store.exists(n) for n in (MANIFEST, BUILD, SHARDS))


def _wipe(store: Storage) -> None:
    for name in store.listdir():
        if name != LOCK:
            store.remove(name)


def stored_record(root: Storage | Path) -> dict:
    """The manifest (else build.json) of the cache, finished or not, at `root`; {} when there is none or it
    cannot be read."""
    store = as_storage(root)
    for name in (MANIFEST, BUILD):
        if store.isfile(name):
            try:
                return store.read_json(name)
            except PipelineError:
                return {}
    return {}


def claim(root: Storage | Path, fingerprint: dict, overwrite: bool) -> str:
    """Prepare `root` for a build of `fingerprint` (caller holds the lock).

    Returns "complete" when a finished cache with this fingerprint is already there, "resume"
    when an unfinished build of it is, "new" otherwise. A different fingerprint is refused unless
    `overwrite`; a non-empty folder that is not a cache is never overwritten.

    A finished cache with this fingerprint that lacks a shard's record or data files, or its head file, is
    being repaired (a reader's error says to delete the record of a damaged shard): it becomes an unfinished
    build again (build.json written first, then manifest.json removed, so a crash in between leaves a
    resumable build) and "resume" rewrites every shard without a sound record.
    """
    store = as_storage(root)
    want = fingerprint_digest(fingerprint)
    entries = [n for n in store.listdir() if n != LOCK]
    if entries:
        if not _is_cache_dir(store):
            raise PipelineError(f"{store} is not empty and is not a cache; choose another cache.dir")
        existing = MANIFEST if store.isfile(MANIFEST) else BUILD
        record = store.read_json(existing) if store.isfile(existing) else {}
        have = record.get("fingerprint")
        if have is not None and fingerprint_digest(have) == want:
            if existing == BUILD:
                return "resume"
            lacking = _lacking(store, record)
            if not lacking:
                return "complete"
            import click

            click.echo(f"{store}: {lacking[0]} is missing; rebuilding the shards without a sound record "
                       "(every shard is checked first)", err=True)
            store.write_json(BUILD, {"fingerprint": have})
            store.remove(MANIFEST)
            return "resume"
        if not overwrite:
            check_format(record, store, "pass --overwrite to rebuild it")
            what = "a different config" if have is not None else "an unknown config"
            raise PipelineError(f"{store} holds a cache built with {what}; pass --overwrite to replace it")
        import click

        click.echo(f"{store}: replacing the cache built with another config (--overwrite)", err=True)
        _wipe(store)
    store.makedirs()
    store.write_json(BUILD, {"fingerprint": fingerprint})
    return "new"


def _lacking(store: Storage, manifest: dict) -> list[str]:
    """The files a finished cache's manifest names that are not there: shard records and data files (one listing),
    and the head file of exact targets."""
    present = set(store.listdir(SHARDS))
    lacking = [rel for s in manifest.get("shards", []) if isinstance(s, dict) and isinstance(s.get("index"), int)
               for rel in shard_paths(s["index"]) if rel.rsplit("/", 1)[-1] not in present]
    exact = manifest.get("exact")
    if isinstance(exact, dict) and exact.get("file") and not store.isfile(exact["file"]):
        lacking.append(exact["file"])
    return lacking


def finished_record(root: Storage | Path, index: int, start: int, n_rows: int) -> dict | None:
    """The record of a shard that is completely and correctly stored, else None. On an object store,
    shard files without a record (a build stopped mid-shard) are leftovers: never counted."""
    store = as_storage(root)
    record_path = shard_paths(index)[2]
    if not store.isfile(record_path):
        return None
    try:
        record = store.read_json(record_path)
    except PipelineError:
        return None
    if record.get("start") != start or record.get("sequences") != n_rows:
        return None
    names = set(shard_files(store, index))
    if names != set(record.get("files", {})):
        return None
    try:
        if any(store.checksum(n, like=record["files"][n]) != record["files"][n] for n in names):
            return None
    except FileNotFoundError:
        return None
    if combine_checksums(record["files"]) != record.get("checksum"):
        return None
    return record


def finalize(root: Storage | Path, header: dict, n_shards: int) -> dict:
    """Gather the shard records into manifest.json (written last, atomically)."""
    store = as_storage(root)
    shards, records = [], []
    for index in range(n_shards):
        record = store.read_json(shard_paths(index)[2])
        records.append(record)
        shards.append({k: record[k] for k in ("name", "index", "start", "sequences", "tokens", "bytes", "checksum")})
    manifest = dict(header, shards=shards)
    mean_square = train_mean_square(records, int(header["teacher"]["hidden_size"]))
    if mean_square:
        manifest["hidden_mean_square"] = mean_square
    validate_manifest(manifest, store.display(MANIFEST))
    store.write_json(MANIFEST, manifest)
    store.remove(BUILD)
    for name in store.listdir(SHARDS):
        if name.endswith(".tmp"):
            store.remove(f"{SHARDS}/{name}")
    return manifest


def train_mean_square(records: list[dict], hidden_size: int) -> dict[str, float]:
    """{layer: the teacher's mean square over the train split} from the shard records; {} when the train split
    is empty."""
    if not records:
        return {}
    tokens = sum(r["hidden_square_sums"]["train"]["tokens"] for r in records)
    if not tokens:
        return {}
    sums: dict[str, float] = {}
    for r in records:
        for layer, value in r["hidden_square_sums"]["train"]["layers"].items():
            sums[layer] = sums.get(layer, 0.0) + value
    return {layer: sums[layer] / (tokens * hidden_size) for layer in sorted(sums, key=int)}


def remove_if_empty_claim(root: Storage | Path, created: bool) -> None:
    """Undo a claim that wrote nothing but build.json (keeps bad input from leaving debris)."""
    store = as_storage(root)
    if created and store.isdir() and not store.exists(SHARDS):
        store.remove(BUILD)
        if store.local:
            store.remove(LOCK)
            try:
                os.rmdir(store.path)
            except OSError:
                pass
