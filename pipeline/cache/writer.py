"""Shard writing: many chunks in flight on a thread pool, committed in order by one writer thread.

The teacher thread only captures and enqueues rows. The writer thread cuts them into chunks
(`chunk_sequences` rows) and hands each chunk's independent pieces to the pool at once: the side data
(top-k / sampled blobs, lse planes, input ids) and each hidden layer (encode, Blosc-compress, write the
chunk's file, checksum its bytes). Nothing waits for a chunk to finish before the next one starts; the
writer thread takes no more rows while over `2 x threads` chunks are in flight. It commits finished
chunks in order: it appends the chunk's record batch to the shard's Arrow file and adds its sums of
squares. So the bytes written, the statistics and the records are the same for any number of threads
(tested).

Hidden layers are Zarr v3 arrays: the writer creates each array's metadata with zarr and writes the
chunk files itself, each the Blosc compression of the chunk's little-endian bytes, exactly what zarr
writes for `array[rows] = values` (tested against zarr's own writes), so that every byte is checksummed
as it is produced. A build never reads its shards back.

Crash safety: a shard's files go to `*.tmp` names and are renamed on `end_shard`, then the shard record
is written last. On an object store (no rename) the data files are written at their final names; the
record, written last, is still what makes a shard count, so files without one are leftovers the next
attempt replaces. An exception in the writer thread or a pool task is re-raised in the main thread at
its next `put`/`end_shard`/exit; leaving the `with` block on an exception stops the thread without
committing the open shards.

Crash-test hook: with DISTILL_CACHE_KILL_AFTER_SHARDS=N in the environment, the process SIGKILLs
itself once this writer has committed N shards and the first chunk of the next one, so a test can stop
a build at a fixed point with finished shards and one half-written shard on disk. Unset (the normal
case), it does nothing.
"""

from __future__ import annotations

import collections
import os
import queue
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import zarr

from pipeline.cache.checksum import Hasher, digest_bytes
from pipeline import targets
from pipeline.cache.codecs import (
    HIDDEN_CODECS, blosc_codec, compress_chunk, encode_lse, encode_topk_ids, encode_topk_logits, rank_table,
    to_planes, zarr_compressor,
)
from pipeline.cache.manifest import (
    SHARDS, combine_checksums, hidden_array, lse_column, shard_files, shard_name, shard_paths,
)
from pipeline.cache.stats import SquareSums, square_sums
from pipeline.cache.storage import Storage, as_storage


@dataclass(frozen=True)
class ShardLayout:
    """What every shard of one cache looks like (pipeline/cache/spec.py makes it from the config)."""

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
    layer_codecs: tuple[tuple[int, str], ...] = ()  # layers stored at another codec than hidden_codec

    def codec(self, layer: int) -> str:
        return dict(self.layer_codecs).get(layer, self.hidden_codec)

    def order(self) -> np.ndarray:
        return np.frombuffer(self.id_order, dtype=self.id_dtype)


def _fixed(values: np.ndarray) -> pa.FixedSizeListArray:
    """[R, n] -> FixedSizeList<n> column (one row per sequence)."""
    flat = np.ascontiguousarray(values).reshape(-1)
    flat = pa.array(flat, type=pa.from_numpy_dtype(flat.dtype))  # typed: no per-value type inference
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])


class _HashingFile:
    """The Arrow file's raw stream: every byte goes to the file and to its checksum."""

    def __init__(self, raw) -> None:
        self.raw, self.hasher, self.closed = raw, Hasher(), False

    def write(self, data) -> int:
        self.hasher.update(data)
        self.raw.write(data)
        return memoryview(data).nbytes

    def tell(self) -> int:
        return self.hasher.size

    def flush(self) -> None:
        self.raw.flush()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        if not self.closed:
            self.raw.close()  # on an object store the upload completes here
            self.closed = True


# ----------------------------------------------------------------------------- the pool's work per chunk


def encode_side(rows: dict, lay: ShardLayout, rank_of: np.ndarray) -> dict[str, pa.Array]:
    """A chunk's Arrow columns: input ids, lengths (padded), the teacher-target blobs (in the chunk's first
    row, null in the others) and the lse planes."""
    n = len(rows["input_ids"])
    cols = {"input_ids": _fixed(rows["input_ids"].astype(lay.id_dtype))}
    if lay.padded:
        cols["length"] = pa.array(rows["length"].astype(np.int32), type=pa.int32())
    planes = {}
    if lay.topk:
        planes["topk_ids"] = lambda: encode_topk_ids(rows["topk_ids"], rank_of)
        planes["topk_logits"] = lambda: encode_topk_logits(rows["topk_logits"])
    if lay.samples:  # sorted by logit like the top-k: the same ranks and delta keys, position by position
        planes["sample_ids"] = lambda: encode_topk_ids(rows["sample_ids"], rank_of)
        planes["sample_counts"] = lambda: to_planes(rows["sample_counts"].reshape(1, -1))
        planes["sample_logits"] = lambda: encode_topk_logits(rows["sample_logits"], slot_major=False)
    for name in targets.COLUMNS:
        if name in planes:
            blob = compress_chunk(planes[name](), lay.side_compressor)
            cols[name] = pa.array([blob] + [None] * (n - 1), type=pa.binary())
    for j in range(lay.n_temps):
        cols[lse_column(j)] = _fixed(encode_lse(rows["lse"][j]))
    return cols


@dataclass
class LayerChunk:
    """One layer of one chunk, written: {file name under the Zarr folder: (bytes, digest)} and each token's
    sum of squares [n, T] float64 (before encoding)."""

    files: dict[str, tuple[int, str]]
    squares: np.ndarray


def write_layer(store: Storage, zdir: str, layer: int, rows: dict, lay: ShardLayout, chunk: int) -> LayerChunk:
    """Encode (unless the teacher's device did), compress and write one layer of one chunk."""
    if "encoded" in rows:
        encoded, squares = rows["encoded"][layer], rows["token_squares"][layer]
    else:
        h = rows["hidden"][layer]
        encoded = HIDDEN_CODECS.get(lay.codec(layer)).encode(h)
        squares = square_sums(h)
    files = {}
    for suffix, arr in encoded.items():
        if len(arr) < lay.chunk_sequences:  # an edge chunk: stored at the full chunk shape, zero-filled
            arr = np.concatenate([arr, np.zeros((lay.chunk_sequences - len(arr),) + arr.shape[1:], arr.dtype)])
        data = blosc_codec(lay.hidden_level, arr.dtype.itemsize, lay.hidden_compressor).encode(
            np.ascontiguousarray(arr).view(np.uint8).reshape(-1))
        name = chunk_file(hidden_array(layer, suffix), chunk, arr.ndim)
        store.write_bytes(f"{zdir}/{name}", data)
        files[name] = (len(data), digest_bytes(data))
    return LayerChunk(files, squares)


# zarr v3's default chunk keys with "." separators: one flat folder of chunk files per array ("c.i.0.0"), no
# folder to create per chunk (the arrays' metadata names the encoding; readers follow it)
CHUNK_KEY_ENCODING = {"name": "default", "separator": "."}


def chunk_file(array: str, chunk: int, ndim: int) -> str:
    """A chunk's file inside the Zarr group ("layer_4/c.i.0.0", CHUNK_KEY_ENCODING)."""
    return array + "/" + ".".join(["c", str(chunk)] + ["0"] * (ndim - 1))


@dataclass
class _Chunk:
    rows: int
    start: int  # first row in the shard
    side: Future
    layers: dict[int, Future]
    valid: np.ndarray  # [n, T] bool

    def done(self) -> bool:
        return self.side.done() and all(f.done() for f in self.layers.values())


def _now(fn, *args) -> Future:
    f: Future = Future()
    try:
        f.set_result(fn(*args))
    except BaseException as e:
        f.set_exception(e)
    return f


class ShardWriter:
    """Writes one shard of `n_rows` sequences, chunk by chunk (locally into `*.tmp` names, renamed by
    `finish`; on an object store at the final names)."""

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
        self._layer_arrays: dict[int, list[str]] = {layer: [] for layer in layout.layers}
        self._ipc: pa.ipc.RecordBatchFileWriter | None = None
        self._file: _HashingFile | None = None
        self._pending: list[dict] = []
        self._pending_rows = 0
        self._submitted = 0  # rows handed to the pool
        self._written = 0  # rows committed
        self._inflight: collections.deque[_Chunk] = collections.deque()
        self._tokens = 0
        self._squares = {"train": SquareSums(), "heldout": SquareSums()}
        self._files: dict[str, tuple[int, str]] = {}  # chunk files under the Zarr folder: (bytes, digest)
        self._rank_of = rank_table(layout.order())
        self.ended = False

    # ------------------------------------------------------------------ rows in, chunks out
    def add(self, rows: dict) -> None:
        """rows: input_ids [r, T], length [r] (padded), topk_ids/topk_logits [r, T, k] (topk > 0),
        sample_ids/sample_counts/sample_logits [r, T, K] (samples > 0), lse [n_temps, r, T],
        and either hidden {layer: [r, T, d] float32} or, encoded where the teacher ran, encoded {layer:
        {suffix: array}} with token_squares {layer: [r, T] float64}."""
        self._pending.append(rows)
        self._pending_rows += len(rows["input_ids"])
        while self._pending_rows >= self.layout.chunk_sequences:
            self._submit(self._take(self.layout.chunk_sequences))

    def end(self) -> None:
        """No more rows: the tail becomes the last (shorter) chunk."""
        if self._pending_rows:
            self._submit(self._take(self._pending_rows))
        self.ended = True

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
                parts.append(slice_rows(head, 0, need))
                self._pending[0] = slice_rows(head, need, r)
                need = 0
        self._pending_rows -= n
        return _concat_rows(parts)

    def _submit(self, rows: dict) -> None:
        lay = self.layout
        n = len(rows["input_ids"])
        if self._submitted == 0:
            self._create_arrays(rows)
        chunk = self._submitted // lay.chunk_sequences
        run = self.pool.submit if self.pool is not None else _now
        valid = np.ones(rows["input_ids"].shape, dtype=bool)
        if lay.padded:
            valid = np.arange(lay.seq_len)[None, :] < rows["length"][:, None]
        self._inflight.append(_Chunk(
            rows=n, start=self._submitted, valid=valid,
            side=run(encode_side, rows, lay, self._rank_of),
            layers={layer: run(write_layer, self.store, self.zdir_tmp, layer, rows, lay, chunk) for layer in lay.layers},
        ))
        self._submitted += n

    def _create_arrays(self, rows: dict) -> None:
        """Each layer's Zarr arrays (metadata only; the chunk files are written by write_layer). Their dtypes
        and shapes come from encoding one token of the first chunk."""
        lay = self.layout
        for layer in lay.layers:
            if "encoded" in rows:
                parts = {s: a[:1] for s, a in rows["encoded"][layer].items()}
            else:
                parts = HIDDEN_CODECS.get(lay.codec(layer)).encode(rows["hidden"][layer][:1])
            for suffix, arr in parts.items():
                name = hidden_array(layer, suffix)
                self._group.create_array(
                    name, shape=(self.n_rows,) + arr.shape[1:], chunks=(lay.chunk_sequences,) + arr.shape[1:],
                    dtype=arr.dtype, fill_value=0, chunk_key_encoding=CHUNK_KEY_ENCODING,
                    compressors=[zarr_compressor(lay.hidden_level, arr.dtype.itemsize, lay.hidden_compressor)])
                self._layer_arrays[layer].append(name)

    # ------------------------------------------------------------------ committing, in order
    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def commit(self, block: bool) -> int:
        """Commit finished chunks in order (with `block`, at least the oldest one); returns how many."""
        done = 0
        while self._inflight and (self._inflight[0].done() or (block and done == 0)):
            self._commit(self._inflight.popleft())
            done += 1
        return done

    def _commit(self, c: _Chunk) -> None:
        lay = self.layout
        cols = c.side.result()
        layers = {layer: f.result() for layer, f in c.layers.items()}
        cut = min(max(lay.train_sequences - (self.start + c.start), 0), c.rows)  # rows [0, cut) are train
        for split, (a, b) in (("train", (0, cut)), ("heldout", (cut, c.rows))):
            if b > a:
                self._squares[split].add_token_squares({layer: r.squares[a:b] for layer, r in layers.items()},
                                                       c.valid[a:b])
        for r in layers.values():
            self._files.update(r.files)
        self._tokens += int(c.valid.sum()) if lay.padded else c.valid.size
        batch = pa.RecordBatch.from_pydict(cols)
        if self._ipc is None:
            self._file = _HashingFile(self.store.open_write(self.arrow_tmp))
            opts = pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=lay.logits_level))
            self._ipc = pa.ipc.new_file(pa.PythonFile(self._file, mode="w"), batch.schema, options=opts)
        self._ipc.write_batch(batch)
        self._written += c.rows

    @property
    def complete(self) -> bool:
        return self.ended and not self._inflight

    def finish(self) -> dict:
        """Commit: close, rename into place, write the shard record (last)."""
        self.end()
        while self._inflight:
            self.commit(block=True)
        if self._written != self.n_rows:
            raise RuntimeError(f"{shard_name(self.index)}: got {self._written} rows, expected {self.n_rows}")
        self._ipc.close()
        self._file.close()
        if self.store.atomic_rename:
            self.store.rename(self.arrow_tmp, self.arrow)
            self.store.rename(self.zdir_tmp, self.zdir)
        written = {self.arrow: (self._file.hasher.size, self._file.hasher.digest())}  # path: (bytes, digest)
        written.update({f"{self.zdir}/{name}": entry for name, entry in self._files.items()})
        for name in shard_files(self.store, self.index):  # what zarr wrote: the group's and arrays' metadata
            if name not in written:
                written[name] = (self.store.size(name), self.store.checksum(name))
        depth = self.zdir.count("/") + 1  # shards/shard-00000.zarr/<array>/...
        array_bytes: dict[str, int] = {}
        for f, (size, _) in written.items():
            if f.startswith(self.zdir + "/"):
                array = f.split("/")[depth]
                array_bytes[array] = array_bytes.get(array, 0) + size
        hidden_bytes = {
            str(layer): sum(array_bytes.get(name, 0) for name in names) for layer, names in self._layer_arrays.items()
        }
        per_file = {name: digest for name, (_, digest) in sorted(written.items())}
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
            "bytes": {"arrow": written[self.arrow][0], "hidden": hidden_bytes},
            "files": per_file,
            "checksum": combine_checksums(per_file),
        }
        self.store.write_json(self.record, record)
        return record

    def abort(self) -> None:
        """Stop without committing: pending work is cancelled, handles are closed; the .tmp files (on an
        object store: the files without a record) are removed by the next attempt."""
        for c in self._inflight:
            for f in [c.side, *c.layers.values()]:
                f.cancel()
        self._inflight.clear()
        try:
            raw = self._file.raw if self._file is not None else None
            if raw is not None and not self.store.local:  # closing would upload what is there; drop it instead
                if hasattr(raw, "discard"):
                    raw.discard()
                try:
                    raw.closed = True  # the buffered file's close (and __del__) must not commit now
                except AttributeError:
                    pass
                self._file = self._ipc = None
                return
            if self._ipc is not None:
                self._ipc.close()
            if self._file is not None:
                self._file.close()
        except Exception:
            pass


def writer_threads(requested: int) -> int:
    """cache.writer_threads: 0 = every core this process may use."""
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def slice_rows(rows, a: int, b: int, key: str = ""):
    """Rows [a, b) of a batch: arrays along axis 0 (lse, [n_temps, r, T], along axis 1), nested dicts
    (hidden, encoded, token_squares) recursively."""
    if isinstance(rows, dict):
        return {k: slice_rows(v, a, b, k) for k, v in rows.items()}
    return rows[:, a:b] if key == "lse" else rows[a:b]


def _concat_rows(parts: list, key: str = ""):
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], dict):
        return {k: _concat_rows([p[k] for p in parts], k) for k in parts[0]}
    return np.concatenate(parts, axis=1 if key == "lse" else 0)


_STOP = object()


class CacheWriter:
    """Background writer. Use as a context manager: open shards, put rows, end shards; errors surface here.

    `threads` pool workers encode, compress and write; the writer thread cuts chunks, dispatches them and
    commits them in order. Shards finish in the order they were opened; a shard's end does not stop the next
    one's chunks from being encoded meanwhile."""

    def __init__(self, root: Storage | Path, layout: ShardLayout, queue_size: int = 2, threads: int = 1):
        self.root, self.layout = as_storage(root), layout
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="cache-encode")
        self._max_inflight = 2 * max(1, threads)
        self._q: queue.Queue = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._abort = threading.Event()
        self._shards: dict[int, ShardWriter] = {}  # open shards, in index order
        self.records: list[dict] = []
        self.waited = 0.0  # seconds the caller spent blocked on a full queue
        self._thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
        kill_after = os.environ.get("DISTILL_CACHE_KILL_AFTER_SHARDS")  # crash-test hook, see the docstring
        self._kill_after = int(kill_after) if kill_after else None

    def __enter__(self) -> "CacheWriter":
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while True:
                try:
                    item = self._q.get(timeout=0.01 if self._busy() else None)
                except queue.Empty:
                    self._progress(block=False)
                    continue
                if self._abort.is_set():  # the caller failed: stop here, its __exit__ aborts the open shards
                    return
                if item is _STOP:
                    open_ = [shard_name(i) for i, s in self._shards.items() if not s.ended]
                    if open_:
                        raise RuntimeError(f"{open_[0]} was opened but never ended")
                    while self._shards:
                        self._progress(block=True)
                    return
                op, index, payload = item
                if op == "open":
                    start, n_rows = payload
                    self._shards[index] = ShardWriter(self.root, index, start, n_rows, self.layout, self._pool)
                elif op == "rows":
                    self._shards[index].add(payload)
                else:  # "end"
                    self._shards[index].end()
                self._progress(block=False)
                while sum(s.inflight for s in self._shards.values()) > self._max_inflight:
                    self._progress(block=True)
        except BaseException as e:  # surfaced in the main thread
            self._error = e
            for w in list(self._shards.values()):
                w.abort()

    def _busy(self) -> bool:
        return any(s.inflight or s.ended for s in self._shards.values())

    def _progress(self, block: bool) -> None:
        """Commit finished chunks in order, shard after shard (with `block`: wait for at least one), and
        finish each shard once complete. Rows arrive shard after shard, so only the first open shard can
        have chunks in flight until it is ended; committing strictly in order keeps the crash-test hook's
        point exact."""
        while self._shards:
            index = next(iter(self._shards))
            shard = self._shards[index]
            if shard.commit(block=block and shard.inflight > 0):
                block = False
                if self._kill_after == len(self.records):
                    os.kill(os.getpid(), signal.SIGKILL)  # crash-test hook, see the docstring
            if not shard.complete:
                return
            self.records.append(self._shards.pop(index).finish())
            block = False

    def _put(self, item) -> None:
        t0 = time.perf_counter()
        try:
            while True:
                self._raise_if_failed()
                if not self._thread.is_alive():
                    raise RuntimeError("cache writer thread stopped unexpectedly")
                try:
                    self._q.put(item, timeout=0.2)
                    return
                except queue.Full:
                    continue
        finally:
            self.waited += time.perf_counter() - t0

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
                if not self._thread.is_alive():  # else it is still using them (it stops at its next item)
                    for w in list(self._shards.values()):
                        w.abort()
                return
            self._put(_STOP)
            self._thread.join()
            self._raise_if_failed()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)  # no task writes after this returns
