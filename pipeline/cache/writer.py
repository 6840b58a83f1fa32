"""Shard writing: encode + compress + write on a background thread behind a bounded queue.

The teacher thread only captures and enqueues; a `ShardWriter` streams each shard's chunks into
`*.tmp` files, and on `end_shard` renames them into place and writes the shard record last. On an
object store (no rename) the data files are written at their final names; the record, written last,
is still what makes a shard count, so files without one are leftovers the next attempt replaces. An
exception in the writer thread is re-raised in the main thread at its next `put`/`end_shard`/exit;
leaving the `with` block on an exception stops the thread without committing the open shard.

Crash-test hook: with DISTILL_CACHE_KILL_AFTER_SHARDS=N in the environment, the process SIGKILLs
itself once this writer has committed N shards and written the first chunk of the next one, so a
test can stop a build at a fixed point with finished shards and one half-written shard on disk.
Unset (the normal case), it does nothing.
"""

from __future__ import annotations

import functools
import os
import queue
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import zarr

from pipeline.cache.codecs import (
    HIDDEN_CODECS, compress_chunk, encode_lse, encode_topk_ids, encode_topk_logits, rank_table, to_planes,
    zarr_compressor,
)
from pipeline.cache.stats import SquareSums, token_squares
from pipeline.cache.manifest import (
    SHARDS, TARGET_COLUMNS, checksum_files, hidden_array, lse_column, shard_files, shard_name, shard_paths,
)
from pipeline.cache.storage import Storage, as_storage


@dataclass(frozen=True)
class ShardLayout:
    """What every shard of one cache looks like (read from the manifest header)."""

    seq_len: int
    topk: int
    layers: tuple[int, ...]
    n_temps: int
    hidden_codec: str
    id_dtype: str  # numpy dtype name of ids (uint16 | uint32)
    padded: bool
    chunk_sequences: int
    hidden_level: int
    logits_level: int
    train_sequences: int  # sequences [0, train_sequences) are the train split (for the per-split statistics)
    hidden_compressor: str = "zstd"  # Blosc compressor of the hidden arrays (cache.hidden_compressor)
    id_order: bytes = b""  # the cache's id table, order[rank] = id (codecs.frequency_order), as raw bytes
    side_compressor: str = "brotli"  # cache.side_compressor: top-k ids and logits, one blob per chunk
    samples: int = 0  # K draws per position (sample_* columns); 0 = none. topk 0 = no top-k columns

    def order(self) -> np.ndarray:
        return np.frombuffer(self.id_order, dtype=self.id_dtype)


def _fixed(values: np.ndarray) -> pa.FixedSizeListArray:
    """[R, n] -> FixedSizeList<n> column (one row per sequence)."""
    flat = pa.array(np.ascontiguousarray(values).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])


class ShardWriter:
    """Writes one shard of `n_rows` sequences, chunk by chunk, into temporary files."""

    def __init__(self, root: Storage | Path, index: int, start: int, n_rows: int, layout: ShardLayout,
                 pool: ThreadPoolExecutor | None = None):
        self.store = as_storage(root)
        self.index, self.start, self.n_rows, self.layout = index, start, n_rows, layout
        self.pool = pool  # None: everything on the calling thread
        self.arrow, self.zdir, self.record = shard_paths(index)
        tmp = ".tmp" if self.store.atomic_rename else ""  # object stores: no rename, the final names at once
        self.arrow_tmp, self.zdir_tmp = self.arrow + tmp, self.zdir + tmp
        for p in dict.fromkeys((self.record, self.arrow, self.arrow_tmp, self.zdir, self.zdir_tmp)):  # record first
            self.store.remove(p)
        self.store.makedirs(SHARDS)
        self._group = zarr.open_group(store=self.store.zarr_store(self.zdir_tmp), mode="w", zarr_format=3)
        self._arrays: dict[str, zarr.Array] = {}
        self._layer_arrays: dict[int, list[str]] = {layer: [] for layer in layout.layers}
        self._ipc: pa.ipc.RecordBatchFileWriter | None = None
        self._sink = None
        self._raw = None  # object stores: the file object behind the Arrow sink
        self._pending: list[dict] = []
        self._pending_rows = 0
        self._written = 0
        self._tokens = 0
        self._squares = {"train": SquareSums(), "heldout": SquareSums()}
        self._rank_of = rank_table(layout.order())

    def add(self, rows: dict) -> None:
        """rows: input_ids [r, T], length [r] (padded), topk_ids/topk_logits [r, T, k] (topk > 0),
        sample_ids/sample_counts/sample_logits [r, T, K] (samples > 0), lse [n_temps, r, T],
        and either hidden {layer: [r, T, d] float32} or, encoded where the teacher ran, encoded {layer:
        {suffix: array}} with token_squares {layer: [r, T] float64}."""
        self._pending.append(rows)
        self._pending_rows += len(rows["input_ids"])
        while self._pending_rows >= self.layout.chunk_sequences:
            self._flush(self.layout.chunk_sequences)

    def _take(self, n: int) -> dict:
        """Pop exactly n rows from the pending batches."""
        parts: list[dict] = []
        need = n
        while need:
            head = self._pending[0]
            r = len(head["input_ids"])
            if r <= need:
                parts.append(self._pending.pop(0))
                need -= r
            else:
                parts.append(_slice_rows(head, 0, need))
                self._pending[0] = _slice_rows(head, need, r)
                need = 0
        self._pending_rows -= n
        return _concat_rows(parts)

    def _flush(self, n: int) -> None:
        """Encode, compress and write one chunk of n rows. The independent parts (the Arrow record batch
        with its top-k planes, and each hidden layer's encode + compress + write) run on the writer's thread
        pool when it has one; numpy, torch, zstd and Blosc release the GIL, so they scale with cores.
        The bytes written do not depend on the number of threads."""
        rows = self._take(n)
        lay = self.layout
        r0, r1 = self._written, self._written + n
        codec = HIDDEN_CODECS.get(lay.hidden_codec)
        tasks = [lambda: self._write_logits(rows, n)]
        encoded: dict[int, dict[str, np.ndarray]] = {}

        def encode(layer: int) -> None:
            encoded[layer] = codec.encode(rows["hidden"][layer])

        side: dict[str, bytes] = {}

        def compress_side(name: str, planes) -> None:
            side[name] = compress_chunk(planes(), self.layout.side_compressor)

        encode_tasks = []
        if lay.topk:
            encode_tasks += [
                functools.partial(compress_side, "topk_ids", lambda: encode_topk_ids(rows["topk_ids"], self._rank_of)),
                functools.partial(compress_side, "topk_logits", lambda: encode_topk_logits(rows["topk_logits"])),
            ]
        if lay.samples:  # sorted by logit like the top-k: the same ranks and delta keys, position by position
            encode_tasks += [
                functools.partial(compress_side, "sample_ids",
                                  lambda: encode_topk_ids(rows["sample_ids"], self._rank_of)),
                functools.partial(compress_side, "sample_counts", lambda: to_planes(
                    rows["sample_counts"].reshape(1, -1))),
                functools.partial(compress_side, "sample_logits",
                                  lambda: encode_topk_logits(rows["sample_logits"], slot_major=False)),
            ]
        if "encoded" in rows:  # encoded where the teacher ran (TeacherCapture(hidden_codec=...))
            encoded.update(rows["encoded"])
        else:
            encode_tasks += [functools.partial(encode, layer) for layer in lay.layers]
        run_all(self.pool, encode_tasks)
        rows = dict(rows, side=side)
        for layer in lay.layers:  # array creation touches the group's metadata: one thread, first chunk only
            for suffix, arr in encoded[layer].items():
                name = hidden_array(layer, suffix)
                if name not in self._arrays:
                    self._arrays[name] = self._group.create_array(
                        name, shape=(self.n_rows,) + arr.shape[1:], chunks=(lay.chunk_sequences,) + arr.shape[1:],
                        dtype=arr.dtype, fill_value=0, compressors=[zarr_compressor(lay.hidden_level, arr.dtype.itemsize,
                                                                                      lay.hidden_compressor)],
                    )
                    self._layer_arrays[layer].append(name)
                tasks.append(functools.partial(self._arrays[name].__setitem__, slice(r0, r1), arr))
        run_all(self.pool, tasks)
        self._written = r1

    def _write_logits(self, rows: dict, n: int) -> None:
        """The Arrow part of a chunk (ids, top-k planes, lse, lengths) and the per-split sums of squares."""
        lay = self.layout
        valid = np.ones(rows["input_ids"].shape, dtype=bool)  # [n, T]
        if lay.padded:
            valid = np.arange(lay.seq_len)[None, :] < rows["length"][:, None]
        cut = min(max(lay.train_sequences - (self.start + self._written), 0), n)  # rows [0, cut) are train
        squares = rows["token_squares"] if "token_squares" in rows else token_squares(rows["hidden"])
        for split, (a, b) in (("train", (0, cut)), ("heldout", (cut, n))):
            if b > a:
                self._squares[split].add_token_squares({layer: t[a:b] for layer, t in squares.items()}, valid[a:b])
        cols = {"input_ids": _fixed(rows["input_ids"].astype(lay.id_dtype))}
        if lay.padded:
            cols["length"] = pa.array(rows["length"].astype(np.int32))
            self._tokens += int(rows["length"].sum())
        else:
            self._tokens += rows["input_ids"].size
        for name in TARGET_COLUMNS:  # the chunk's blob in its first row
            if name in rows["side"]:
                cols[name] = pa.array([rows["side"][name]] + [None] * (n - 1), type=pa.binary())
        for j in range(lay.n_temps):
            cols[lse_column(j)] = _fixed(encode_lse(rows["lse"][j]))
        batch = pa.RecordBatch.from_pydict(cols)
        if self._ipc is None:
            self._sink, self._raw = self.store.arrow_sink(self.arrow_tmp)
            opts = pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=lay.logits_level))
            self._ipc = pa.ipc.new_file(self._sink, batch.schema, options=opts)
        self._ipc.write_batch(batch)

    def finish(self) -> dict:
        """Commit: flush the tail, close, rename into place, write the shard record (last)."""
        if self._pending_rows:
            self._flush(self._pending_rows)
        if self._written != self.n_rows:
            raise RuntimeError(f"{shard_name(self.index)}: got {self._written} rows, expected {self.n_rows}")
        self._ipc.close()
        self._sink.close()
        if self._raw is not None:
            self._raw.close()  # the upload completes here
        if self.store.atomic_rename:
            self.store.rename(self.arrow_tmp, self.arrow)
            self.store.rename(self.zdir_tmp, self.zdir)
        files = shard_files(self.store, self.index)
        per_file, checksum = checksum_files(self.store, files)
        depth = self.zdir.count("/") + 1  # shards/shard-00000.zarr/<array>/...
        array_bytes: dict[str, int] = {}
        for f in files:
            if not f.startswith(self.zdir + "/"):
                continue
            array = f.split("/")[depth]
            array_bytes[array] = array_bytes.get(array, 0) + self.store.size(f)
        hidden_bytes = {
            str(layer): sum(array_bytes.get(name, 0) for name in names) for layer, names in self._layer_arrays.items()
        }
        record = {
            "name": shard_name(self.index),
            "index": self.index,
            "start": self.start,
            "sequences": self.n_rows,
            "tokens": self._tokens,
            "hidden_square_sums": {
                split: {"tokens": acc.tokens, "layers": {str(k): v for k, v in acc.sums.items()}}
                for split, acc in self._squares.items()
            },
            "bytes": {"arrow": self.store.size(self.arrow), "hidden": hidden_bytes},
            "files": per_file,
            "checksum": checksum,
        }
        self.store.write_json(self.record, record)
        return record

    def abort(self) -> None:
        """Close handles without committing; the .tmp files (on an object store: the files without a
        record) are removed by the next attempt."""
        try:
            if self._raw is not None:  # object store: closing would upload what is there; drop it instead
                if hasattr(self._raw, "discard"):
                    self._raw.discard()
                try:
                    self._raw.closed = True  # the buffered file's close (and __del__) must not commit now
                except AttributeError:
                    pass
                self._raw = self._sink = self._ipc = None
                return
            if self._ipc is not None:
                self._ipc.close()
            if self._sink is not None:
                self._sink.close()
        except Exception:
            pass


def run_all(pool: ThreadPoolExecutor | None, tasks: list) -> None:
    """Run the callables, on `pool` when given; the first exception is raised after all have finished."""
    if pool is None or len(tasks) < 2:
        for task in tasks:
            task()
        return
    futures = [pool.submit(task) for task in tasks]
    errors = [f.exception() for f in futures]
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first


def writer_threads(requested: int) -> int:
    """cache.writer_threads: 0 = every core this process may use."""
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _slice_rows(rows, a: int, b: int, key: str = ""):
    """Rows [a, b) of a batch: arrays along axis 0 (lse, [n_temps, r, T], along axis 1), nested dicts
    (hidden, encoded, token_squares) recursively."""
    if isinstance(rows, dict):
        return {k: _slice_rows(v, a, b, k) for k, v in rows.items()}
    return rows[:, a:b] if key == "lse" else rows[a:b]


def _concat_rows(parts: list, key: str = ""):
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], dict):
        return {k: _concat_rows([p[k] for p in parts], k) for k in parts[0]}
    return np.concatenate(parts, axis=1 if key == "lse" else 0)


_STOP = object()


class CacheWriter:
    """Background writer. Use as a context manager: put rows, end shards; errors surface here."""

    def __init__(self, root: Storage | Path, layout: ShardLayout, queue_size: int = 2, threads: int = 1):
        self.root, self.layout = as_storage(root), layout
        # encode/compress workers (threads > 1); the writer thread itself only dispatches and commits
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="cache-encode") if threads > 1 else None
        self._q: queue.Queue = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._abort = threading.Event()
        self._shards: dict[int, ShardWriter] = {}
        self.records: list[dict] = []
        self._thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
        kill_after = os.environ.get("DISTILL_CACHE_KILL_AFTER_SHARDS")  # crash-test hook, see the docstring
        self._kill_after = int(kill_after) if kill_after else None

    def __enter__(self) -> "CacheWriter":
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while True:
                item = self._q.get()
                if item is _STOP or self._abort.is_set():
                    return
                op, index, payload = item
                if op == "open":
                    start, n_rows = payload
                    self._shards[index] = ShardWriter(self.root, index, start, n_rows, self.layout, self._pool)
                elif op == "rows":
                    shard = self._shards[index]
                    shard.add(payload)
                    if self._kill_after == len(self.records) and shard._written:
                        os.kill(os.getpid(), signal.SIGKILL)  # crash-test hook, see the docstring
                else:  # "end"
                    self.records.append(self._shards.pop(index).finish())
        except BaseException as e:  # surfaced in the main thread
            self._error = e
            for w in self._shards.values():
                w.abort()

    def _put(self, item) -> None:
        while True:
            self._raise_if_failed()
            if not self._thread.is_alive():
                raise RuntimeError("cache writer thread stopped unexpectedly")
            try:
                self._q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"cache writer failed: {self._error!r}") from self._error

    def open_shard(self, index: int, start: int, n_rows: int) -> None:
        self._put(("open", index, (start, n_rows)))

    def put_rows(self, index: int, rows: dict) -> None:
        self._put(("rows", index, rows))

    def end_shard(self, index: int) -> None:
        self._put(("end", index, None))

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                self._abort.set()
                try:
                    self._q.put_nowait(_STOP)
                except queue.Full:
                    pass
                self._thread.join(timeout=30)
                for w in self._shards.values():
                    w.abort()
                return
            self._put(_STOP)
            self._thread.join()
            self._raise_if_failed()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=exc_type is None, cancel_futures=True)
