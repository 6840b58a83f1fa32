"""Read a cache: `open_cache(dir)` validates the manifest; `c[i]` decodes sequence i.

`open_cache(dir, layers=[...])` decodes only those cached hidden layers (a consumer that maps 4 of 10
cached layers does not pay for the other 6); `c.layers` still lists every cached layer.

`dir` is a folder or an fsspec URL (`open_cache(url, storage_options={...})`): Arrow files are memory
mapped locally and read through a buffered remote file otherwise; Zarr goes through zarr's FsspecStore
remotely, while a local cache's hidden chunk files are opened and Blosc-decoded here (`_HiddenArray`).

The only module (with writer.py) that knows where arrays live. Reads go by chunk (one Arrow record
batch + one Zarr chunk per layer) and keep the last few decoded chunks, so sequential and
chunk-shuffled access decompress each chunk once.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import zarr

from pipeline import targets
from pipeline.cache.codecs import (
    HIDDEN_CODECS,
    decode_lse,
    decode_topk_ids,
    decode_topk_logits,
    decompress_chunk,
    from_planes,
    logits_from_numpy,
    unpack_order,
)
from pipeline.cache.manifest import (
    BUILD,
    MANIFEST,
    SHARDS,
    combine_checksums,
    hidden_array,
    id_table_bytes,
    layer_codec,
    lse_column,
    shard_files,
    shard_paths,
    validate_manifest,
)
from pipeline.cache.storage import Storage, as_storage
from pipeline.dtypes import STORED_LOGIT_DTYPES
from pipeline.errors import PipelineError


class Cache:
    def __init__(self, root: str | Path | Storage, chunk_cache: int = 4, layers: list[int] | None = None,
                 logits: bool = True, storage_options: dict | None = None, exact: bool = False):
        self.storage = as_storage(root, storage_options)
        # a local cache's folder as a Path; an fsspec URL as given
        self.root = self.storage.path if self.storage.local else self.storage.display()
        self.with_logits = bool(logits)  # False: top-k ids, logits and lse are neither read nor decoded
        if not self.storage.isdir():
            raise PipelineError(f"cache directory not found: {self.root}")
        if not self.storage.isfile(MANIFEST):
            hint = " (an unfinished build: rerun `distill cache build` with its config)" if (
                self.storage.isfile(BUILD)) else ""
            raise PipelineError(f"{self.root} is not a finished cache: no {MANIFEST}{hint}")
        self.manifest = self.storage.read_json(MANIFEST)
        validate_manifest(self.manifest, self.storage.display(MANIFEST))
        m = self.manifest
        self.seq_len: int = m["seq_len"]
        self.topk: int = m["topk"]  # 0: no top-k targets (cache.logits sampled)
        self.sampling: dict | None = m.get("sampling")  # {samples, proposal_temperature, seed, count_dtype}
        self.samples: int = int(self.sampling["samples"]) if self.sampling else 0
        self.temperatures: list[float] = [float(t) for t in m["temperatures"]]
        self.layers: list[int] = [int(x) for x in m["layers"]]
        self.chunk_sequences: int = m["chunk_sequences"]
        if layers is None:
            self.decoded_layers = list(self.layers)
        else:
            self.decoded_layers = sorted({int(x) for x in layers})
            missing = [x for x in self.decoded_layers if x not in self.layers]
            if missing:
                raise PipelineError(f"teacher layer {missing[0]} is not in the cache (cached: {self.layers})")
        if exact and self.exact_layer is not None and self.exact_layer not in self.decoded_layers:
            self.decoded_layers = sorted(self.decoded_layers + [self.exact_layer])
        self.padded: bool = not m.get("packing", True)
        self._codecs = {layer: HIDDEN_CODECS.get(layer_codec(m, layer)) for layer in self.layers}
        self._starts = np.array([s["start"] for s in m["shards"]], dtype=np.int64)
        self._chunks: OrderedDict = OrderedDict()
        self._chunk_cache = chunk_cache
        self._files: dict[int, tuple[pa.ipc.RecordBatchFileReader, dict[int, dict[str, _HiddenArray]]]] = {}
        # the id table of the ranks (order[rank] = id), checked against its checksum
        self._order = unpack_order(id_table_bytes(m, self.storage.display(MANIFEST)), int(m["teacher"]["vocab_size"]),
                                   np.dtype(m["id_dtype"]))
        present = set(self.storage.listdir(SHARDS))  # one listing, not two requests per shard
        for s in m["shards"]:
            arrow, zdir, _ = shard_paths(s["index"])
            if arrow.rsplit("/", 1)[-1] not in present or zdir.rsplit("/", 1)[-1] not in present:
                raise PipelineError(f"{self.root}: files of {s['name']} are missing")

    # ------------------------------------------------------------------ exact targets
    @property
    def exact_layer(self) -> int | None:
        """The teacher layer (n, its last block's output) that exact targets rebuild the logits from; None
        when the cache holds no exact targets."""
        exact = self.manifest.get("exact")
        return int(exact["layer"]) if exact else None

    def teacher_head(self):
        """The teacher's final norm and head (head.TeacherHead) from the cache's head file, checked against the
        manifest's checksum; a one-line error when the cache holds no exact targets or the file is damaged."""
        import safetensors.torch

        from pipeline.cache.checksum import digest_bytes
        from pipeline.head import TeacherHead

        exact = self.manifest.get("exact")
        if not exact:
            raise PipelineError(f"{self.root} holds no exact targets (cache.logits {targets.manifest_logits(self.manifest)}): "
                                "set loss.logits_source=topk or rebuild with cache.logits=topk+exact")
        if not self.storage.isfile(exact["file"]):
            raise PipelineError(f"{self.root}: {exact['file']} (the teacher's head for exact targets) is missing")
        with self.storage.open(exact["file"], "rb") as f:
            data = f.read()
        if digest_bytes(data) != exact["checksum"]:
            raise PipelineError(f"{self.root}: {exact['file']} does not match its checksum in the manifest; rebuild "
                                "the cache with `distill cache build CONFIG --overwrite`")
        return TeacherHead.from_stored(safetensors.torch.load(data), exact)

    # ------------------------------------------------------------------ structure
    def __len__(self) -> int:
        return int(self.manifest["num_sequences"])

    @property
    def split(self) -> dict[str, list[int]]:
        """{"train": [start, stop), "heldout": [start, stop)}."""
        return self.manifest["split"]

    def indices(self, split: str) -> range:
        if split not in self.split:
            raise PipelineError(f"unknown split {split!r}; valid: {', '.join(self.split)}")
        a, b = self.split[split]
        return range(a, b)

    def locate(self, i: int) -> tuple[int, int, int]:
        """Sequence i -> (shard position in the manifest, chunk index in the shard, row in the chunk)."""
        if not 0 <= i < len(self):
            raise IndexError(f"sequence {i} out of range 0..{len(self) - 1}")
        pos = int(np.searchsorted(self._starts, i, side="right") - 1)
        local = i - int(self._starts[pos])
        return pos, local // self.chunk_sequences, local % self.chunk_sequences

    # ------------------------------------------------------------------ reading
    def _open(self, pos: int):
        if pos not in self._files:
            index = self.manifest["shards"][pos]["index"]
            arrow, zdir, _ = shard_paths(index)
            source = self.storage.arrow_source(arrow)  # a memory map locally
            options = None
            if not self.with_logits:  # the top-k and lse columns are not even decompressed
                schema = pa.ipc.open_file(source).schema
                keep = [i for i, name in enumerate(schema.names) if name in ("input_ids", "length")]
                options = pa.ipc.IpcReadOptions(included_fields=keep)
            reader = pa.ipc.open_file(source, options=options)
            group = zarr.open_group(store=self.storage.zarr_store(zdir, read_only=True), mode="r", zarr_format=3)
            self._files[pos] = (reader, self._hidden_arrays(group, zdir))
        return self._files[pos]

    def _hidden_arrays(self, group: zarr.Group, zdir: str) -> dict[int, dict[str, "_HiddenArray"]]:
        """{layer: {suffix: array}} of the decoded layers in one shard's group, looked up once per shard."""
        names = list(group.array_keys())
        arrays = {}
        for layer in self.decoded_layers:
            base = hidden_array(layer)
            arrays[layer] = {name[len(base) + 1:] if name != base else "":
                             _HiddenArray(group[name], self.storage, f"{zdir}/{name}")
                             for name in names if name == base or name.startswith(base + "_")}
        return arrays

    def read_chunk(self, pos: int, chunk: int) -> dict:
        """Decoded arrays of every sequence of one chunk (leading dim = rows in the chunk); hidden holds
        the selected layers only."""
        key = (pos, chunk)
        if key in self._chunks:
            self._chunks.move_to_end(key)
            return self._chunks[key]
        m = self.manifest
        reader, arrays = self._open(pos)
        batch = reader.get_batch(chunk)
        n, t, k = batch.num_rows, self.seq_len, self.topk

        def col(name: str, dtype) -> np.ndarray:
            values = batch.column(name).flatten().to_numpy(zero_copy_only=False)
            return values.astype(dtype, copy=False).reshape(n, -1)

        out = {"input_ids": col("input_ids", np.int64)}
        if self.with_logits:
            dtype, id_type = STORED_LOGIT_DTYPES[m["logit_dtype"]], np.dtype(m["id_dtype"])
            order, side = self._order, m["side_compressor"]

            def planes(name: str, width: int) -> np.ndarray:
                """The chunk's blob (in its first row) -> its n * T * (k | K) * width bytes."""
                slots = k if name.startswith("topk") else self.samples
                return decompress_chunk(batch.column(name)[0], n * t * slots * width, side)

            if k:  # a cache of sampled targets only has no top-k columns
                stored = decode_topk_logits(planes("topk_logits", dtype.itemsize), dtype, n, t, k)
                out.update(
                    topk_ids=decode_topk_ids(planes("topk_ids", id_type.itemsize), order, n, t, k).astype(np.int64),
                    topk_logits=logits_from_numpy(stored, m["logit_dtype"]),
                )
            out["lse"] = {temp: decode_lse(col(lse_column(j), np.uint8)) for j, temp in enumerate(self.temperatures)}
            if self.samples:
                out.update(self._read_samples(planes, order, dtype, id_type, n))
        if self.padded:
            out["length"] = batch.column("length").to_numpy().astype(np.int64)
        r0 = chunk * self.chunk_sequences
        out["hidden"] = {layer: self._codecs[layer].decode({suffix: a.read(chunk, r0, n)
                                                    for suffix, a in arrays[layer].items()})
                         for layer in self.decoded_layers}
        self._chunks[key] = out
        while len(self._chunks) > self._chunk_cache:
            self._chunks.popitem(last=False)
        return out

    def _read_samples(self, planes, order: np.ndarray, dtype: np.dtype, id_type: np.dtype, n: int) -> dict:
        """sample_ids [n, T, K] int64, sample_counts [n, T, K] int64 (0 = empty slot), sample_logits [n, T, K] fp32."""
        m, t, K = self.manifest, self.seq_len, self.samples
        counts = np.dtype(self.sampling["count_dtype"])
        stored = decode_topk_logits(planes("sample_logits", dtype.itemsize), dtype, n, t, K, slot_major=False)
        return {
            "sample_ids": decode_topk_ids(planes("sample_ids", id_type.itemsize), order, n, t, K).astype(np.int64),
            "sample_counts": from_planes(planes("sample_counts", counts.itemsize)[None], counts.itemsize)
            .reshape(n, t, K).astype(np.int64),
            "sample_logits": logits_from_numpy(stored, m["logit_dtype"]),
        }

    def __getitem__(self, i: int) -> dict:
        pos, chunk, row = self.locate(int(i))
        c = self.read_chunk(pos, chunk)
        s = {"input_ids": c["input_ids"][row], "hidden": {layer: h[row] for layer, h in c["hidden"].items()}}
        if self.with_logits:
            s.update({key: c[key][row] for key in targets.COLUMNS if key in c},
                     lse={temp: v[row] for temp, v in c["lse"].items()})
        if "length" in c:
            s["length"] = int(c["length"][row])
        return s

    def hidden_mean_square(self, layers: list[int], progress: bool = False) -> dict[int, float]:
        """{layer: the teacher's mean square of that block's output over the train split's valid tokens}, from
        the manifest (gathered from the captured fp32 values at build time: every format-3 cache with hidden
        layers holds it for each of them). `progress` is accepted for the callers' symmetry and unused."""
        missing = [x for x in layers if x not in self.layers]
        if missing:
            raise PipelineError(f"teacher layer {missing[0]} is not in the cache (cached: {self.layers})")
        stored = self.manifest.get("hidden_mean_square", {})
        return {int(x): float(stored[str(x)]) for x in layers}

    def target_bytes(self) -> dict[str, int]:
        """{column: stored bytes} of each teacher-target column (top-k ids and logits, the draws' ids, counts and
        logits) over the whole cache: the compressed blobs, one per chunk, as the side compressor left them."""
        import pyarrow.compute as pc

        totals: dict[str, int] = {}
        for s in self.manifest["shards"]:
            reader = pa.ipc.open_file(self.storage.arrow_source(shard_paths(s["index"])[0]))
            for name in targets.COLUMNS:
                if name not in reader.schema.names:
                    continue
                for i in range(reader.num_record_batches):
                    lengths = pc.binary_length(reader.get_batch(i).column(name))
                    totals[name] = totals.get(name, 0) + int(pc.sum(lengths).as_py() or 0)
        return totals

    # ------------------------------------------------------------------ integrity
    def verify(self) -> list[str]:
        """Recompute every checksum; returns the bad files (relative paths), empty when sound."""
        bad: list[str] = []
        for s in self.manifest["shards"]:
            record_path = shard_paths(s["index"])[2]
            record = self.storage.read_json(record_path)
            names = set(shard_files(self.storage, s["index"]))
            for name in sorted(set(record["files"]) - names):
                bad.append(f"{name} (missing)")
            for name in sorted(names - set(record["files"])):
                bad.append(f"{name} (unexpected)")
            for name in sorted(names & set(record["files"])):
                if self.storage.checksum(name, like=record["files"][name]) != record["files"][name]:
                    bad.append(name)
            if combine_checksums(record["files"]) != s["checksum"]:
                bad.append(f"{record_path} (record differs from manifest)")
        exact = self.manifest.get("exact")
        if exact:
            if not self.storage.isfile(exact["file"]):
                bad.append(f"{exact['file']} (missing)")
            elif self.storage.checksum(exact["file"], like=exact["checksum"]) != exact["checksum"]:
                bad.append(exact["file"])
        return bad


class _HiddenArray:
    """One hidden-state Zarr array of a shard, read chunk by chunk.

    A local array laid out as writer.py writes it (one chunk along the rows per file, bytes then Blosc) is
    read by opening the chunk file and decoding it with numcodecs' Blosc: the bytes zarr would decode the
    same way, without its per-read machinery (an event-loop round trip and a metadata walk per call, several
    times the decompression itself). Any other layout, and remote stores, go through zarr."""

    def __init__(self, array: zarr.Array, storage: Storage, path: str):
        from zarr.codecs import BloscCodec, BytesCodec

        self.array = array
        codecs = array.metadata.codecs
        endian = getattr(codecs[0], "endian", None) if codecs else None
        direct = (storage.local and len(codecs) == 2 and isinstance(codecs[0], BytesCodec)
                  and isinstance(codecs[1], BloscCodec) and getattr(endian, "value", endian) in (None, sys.byteorder)
                  and tuple(array.chunks[1:]) == tuple(array.shape[1:]))
        self.folder = storage.path / path if direct else None  # the array's chunk files, when read directly

    def read(self, chunk: int, r0: int, n: int) -> np.ndarray:
        """Rows r0 .. r0 + n (chunk `chunk` of the rows)."""
        if self.folder is None:
            return self.array[r0 : r0 + n]
        from numcodecs import blosc

        key = self.array.metadata.encode_chunk_key((chunk,) + (0,) * (self.array.ndim - 1))
        try:
            data = (self.folder / key).read_bytes()
        except FileNotFoundError:  # a chunk never written holds the fill value: zarr knows it
            return self.array[r0 : r0 + n]
        rows = np.empty(self.array.chunks, dtype=self.array.dtype)
        blosc.decompress(data, rows)
        return rows[:n]


def open_cache(root: str | Path | Storage, layers: list[int] | None = None, logits: bool = True,
               storage_options: dict | None = None, exact: bool = False) -> Cache:
    """The cache at `root` (a folder or an fsspec URL, opened with `storage_options`); `layers` limits the
    hidden layers decoded per sequence (default: all cached); logits=False reads no top-k ids, logits or lse;
    exact=True also decodes layer n where the cache holds exact targets (the layer the teacher's logits are
    rebuilt from, `Cache.exact_layer`)."""
    return Cache(root, layers=layers, logits=logits, storage_options=storage_options, exact=exact)
