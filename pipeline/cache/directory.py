"""The cache directory's life cycle: lock, claim (new / resume / refuse / overwrite), finalize."""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from pipeline.cache.manifest import (
    BUILD, FORMAT_VERSION, LOCK, MANIFEST, SHARDS, combine_checksums, file_checksum, fingerprint_digest, read_json,
    shard_files, shard_paths, validate_manifest, write_json_atomic,
)
from pipeline.errors import PipelineError


class BuildLock:
    """An exclusive, non-blocking flock on CACHE/.lock: one builder per cache."""

    def __init__(self, root: Path):
        self.path = root / LOCK
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


def _is_cache_dir(root: Path) -> bool:
    return any((root / n).exists() for n in (MANIFEST, BUILD, SHARDS))


def _wipe(root: Path) -> None:
    for p in root.iterdir():
        if p.name == LOCK:
            continue
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def claim(root: Path, fingerprint: dict, overwrite: bool) -> str:
    """Prepare `root` for a build of `fingerprint` (caller holds the lock).

    Returns "complete" when a finished cache with this fingerprint is already there, "resume"
    when an unfinished build of it is, "new" otherwise. A different fingerprint is refused unless
    `overwrite`; a non-empty folder that is not a cache is never overwritten.
    """
    want = fingerprint_digest(fingerprint)
    entries = [p for p in root.iterdir() if p.name != LOCK] if root.is_dir() else []
    if entries:
        if not _is_cache_dir(root):
            raise PipelineError(f"{root} is not empty and is not a cache; choose another cache.dir")
        existing = root / MANIFEST if (root / MANIFEST).is_file() else root / BUILD
        have = read_json(existing).get("fingerprint") if existing.is_file() else None
        if have is not None and fingerprint_digest(have) == want:
            return "complete" if existing.name == MANIFEST else "resume"
        if not overwrite:
            version = (have or {}).get("format_version", FORMAT_VERSION)
            if version != FORMAT_VERSION:
                raise PipelineError(f"{root} holds a format-{version} cache (this code writes format {FORMAT_VERSION}); "
                                    "pass --overwrite to rebuild it")
            what = "a different config" if have is not None else "an unknown config"
            raise PipelineError(f"{root} holds a cache built with {what}; pass --overwrite to replace it")
        _wipe(root)
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / BUILD, {"fingerprint": fingerprint})
    return "new"


def finished_record(root: Path, index: int, start: int, n_rows: int) -> dict | None:
    """The record of a shard that is completely and correctly on disk, else None."""
    record_path = shard_paths(root, index)[2]
    if not record_path.is_file():
        return None
    try:
        record = read_json(record_path)
    except PipelineError:
        return None
    if record.get("start") != start or record.get("sequences") != n_rows:
        return None
    files = shard_files(root, index)
    names = {str(p.relative_to(root)) for p in files}
    if names != set(record.get("files", {})):
        return None
    if any(file_checksum(root / n) != record["files"][n] for n in names):
        return None
    if combine_checksums(record["files"]) != record.get("checksum"):
        return None
    return record


def finalize(root: Path, header: dict, n_shards: int) -> dict:
    """Gather the shard records into manifest.json (written last, atomically)."""
    shards, records = [], []
    for index in range(n_shards):
        record = read_json(shard_paths(root, index)[2])
        records.append(record)
        shards.append({k: record[k] for k in ("name", "index", "start", "sequences", "tokens", "bytes", "checksum")})
    manifest = dict(header, shards=shards)
    mean_square = train_mean_square(records, int(header["teacher"]["hidden_size"]))
    if mean_square:
        manifest["hidden_mean_square"] = mean_square
    validate_manifest(manifest, root / MANIFEST)
    write_json_atomic(root / MANIFEST, manifest)
    (root / BUILD).unlink(missing_ok=True)
    for tmp in (root / SHARDS).glob("*.tmp"):
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    return manifest


def train_mean_square(records: list[dict], hidden_size: int) -> dict[str, float]:
    """{layer: the teacher's mean square over the train split} from the shard records; {} when a record
    lacks the sums (a shard written before they were recorded) or the train split is empty."""
    if not records or any("hidden_square_sums" not in r for r in records):
        return {}
    tokens = sum(r["hidden_square_sums"]["train"]["tokens"] for r in records)
    if not tokens:
        return {}
    sums: dict[str, float] = {}
    for r in records:
        for layer, value in r["hidden_square_sums"]["train"]["layers"].items():
            sums[layer] = sums.get(layer, 0.0) + value
    return {layer: sums[layer] / (tokens * hidden_size) for layer in sorted(sums, key=int)}


def remove_if_empty_claim(root: Path, created: bool) -> None:
    """Undo a claim that wrote nothing but build.json (keeps bad input from leaving debris)."""
    if created and root.is_dir() and not (root / SHARDS).exists():
        (root / BUILD).unlink(missing_ok=True)
        (root / LOCK).unlink(missing_ok=True)
        try:
            os.rmdir(root)
        except OSError:
            pass
