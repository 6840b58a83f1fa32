"""Read a cache: `open_cache(dir)` validates the manifest; `c[i]` decodes sequence i.

`open_cache(dir, layers=[...])` decodes only those cached hidden layers (a consumer that maps 4 of 10
cached layers does not pay for the other 6); `c.layers` still lists every cached layer.

`dir` is a folder or an fsspec URL (`open_cache(url, storage_options={...})`): Arrow files are memory
mapped locally; remotely each is fetched whole once (one GET) and read from memory. The hidden chunk files
are read here, as bytes, and Blosc-decoded (`_HiddenArray`); zarr itself only reads a layout this project's
writer never writes.

The only module (with writer.py) that knows where arrays live. Reads go by chunk (one Arrow record
batch + one Zarr chunk per layer) and keep the last few decoded chunks, so sequential and
chunk-shuffled access decompress each chunk once.

Integrity: a cache is copied and synced for months, so every file is checked against its checksum the first
time this reader reads it, on the bytes it reads anyway (xxh3 outruns the decompressors many times over): the
shard record against the manifest's shard checksum when the shard is first opened, then from the record's
per-file checksums the Arrow file whole (memory mapped locally: the hash pulls in the pages the record batches
are decoded from), the Zarr metadata, and each hidden chunk file when that chunk is first read. A missing,
damaged or undecodable file is a one-line PipelineError that names the file and the way to a sound cache
(`Cache.remedy`); a missing hidden chunk is never read as zarr's fill value. `check=False`, or the
environment variable DISTILL_CACHE_CHECKS=0, skips the checksums (not the decode errors) for a cache that
was just verified (docs/training.md measures what they cost).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline import targets
from pipeline.cache.checksum import hasher_like
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
    HEAD_FILE,
    MANIFEST,
    SHARDS,
    check_format,
    combine_checksums,
    fingerprint_digest,
    hidden_array,
    id_table_bytes,
    layer_codec,
    lse_column,
    shard_files,
    shard_name,
    shard_paths,
    validate_manifest,
)
from pipeline.cache.storage import Storage, as_storage
from pipeline.dtypes import STORED_LOGIT_DTYPES
from pipeline.errors import PipelineError

CHECKS_ENV = "DISTILL_CACHE_CHECKS"  # "0" skips the checksums of every reader in the process (open_cache's check)
# the fields of a shard record that the manifest copies (directory.finalize)
RECORD_KEYS = ("name", "index", "start", "sequences", "tokens", "bytes")


def checks_on(check: bool | None = None) -> bool:
    """Whether readers check checksums: `check` when given, else on unless DISTILL_CACHE_CHECKS is 0/false/no/off."""
    if check is not None:
        return bool(check)
    return os.environ.get(CHECKS_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _why(e: BaseException) -> str:
    """An exception as a few words on one line: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _shard_of(rel: str) -> int | None:
    """The index of the shard whose file (record, Arrow file, Zarr file) `rel` is; None for other files."""
    m = re.match(rf"{SHARDS}/shard-(\d+)[./]", rel)
    return int(m.group(1)) if m else None


def _record_mismatch(record: dict, s: dict) -> str | None:
    """What a shard record and its manifest entry `s` disagree on (None: the manifest vouches for the record)."""
    if combine_checksums(record["files"]) != s.get("checksum"):
        return f"does not match its checksum in {MANIFEST}"
    for key in RECORD_KEYS:
        if record.get(key) != s.get(key):
            return f"differs from {MANIFEST} in {key}"
    return None


class Cache:
    def __init__(self, root: str | Path | Storage, chunk_cache: int = 4, layers: list[int] | None = None,
                 logits: bool = True, storage_options: dict | None = None, exact: bool = False,
                 check: bool | None = None, require_files: bool = True):
        self.storage = as_storage(root, storage_options)
        # a local cache's folder as a Path; an fsspec URL as given
        self.root = self.storage.path if self.storage.local else self.storage.display()
        self.with_logits = bool(logits)  # False: top-k ids, logits and lse are neither read nor decoded
        self.check = checks_on(check)  # False: no checksums computed (decode errors are still named)
        if not self.storage.isdir():
            raise PipelineError(f"cache directory not found: {self.root}")
        if not self.storage.isfile(MANIFEST):
            hint = ""
            if self.storage.isfile(BUILD):
                hint = " (an unfinished build: rerun `distill cache build` with its config)"
            elif self.storage.isdir(SHARDS):
                hint = f" ({self.remedy(MANIFEST)})"
            raise PipelineError(f"{self.root} is not a finished cache: no {MANIFEST}{hint}")
        where = self.storage.display(MANIFEST)
        try:
            self.manifest = self.storage.read_json(MANIFEST)
        except PipelineError as e:
            raise PipelineError(f"{e}; {self.remedy(MANIFEST)}") from None
        if not isinstance(self.manifest, dict):
            raise self.damaged(MANIFEST, "is damaged: not a JSON object")
        check_format(self.manifest, where, "rebuild it with `distill cache build CONFIG --overwrite`")  # no damage
        try:
            validate_manifest(self.manifest, where)
        except PipelineError as e:
            raise PipelineError(str(e) if "--overwrite" in str(e) else f"{e}; {self.remedy(MANIFEST)}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # a damaged value where a number or list belongs
            raise self.damaged(MANIFEST, f"cannot be read ({_why(e)})") from None
        m = self.manifest
        if "fingerprint_digest" in m and m["fingerprint_digest"] != fingerprint_digest(m["fingerprint"]):
            raise self.damaged(MANIFEST, "is damaged: its fingerprint does not match its fingerprint_digest")
        # the fields the arrays are decoded by are in the fingerprint too (the fingerprint_digest vouches for it)
        for key in ("seq_len", "topk", "temperatures", "layers"):
            if key in m["fingerprint"] and m[key] != m["fingerprint"][key]:
                raise self.damaged(MANIFEST, f"is damaged: its {key} differs from its fingerprint's")
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
        self._records: dict[int, dict] = {}  # shard position -> its record, checked against the manifest
        # the id table of the ranks (order[rank] = id), checked against its checksum
        self._order = unpack_order(id_table_bytes(m, self.storage.display(MANIFEST)), int(m["teacher"]["vocab_size"]),
                                   np.dtype(m["id_dtype"]))
        if require_files:  # verify() names every missing file itself
            present = set(self.storage.listdir(SHARDS))  # one listing, not three requests per shard
            for s in m["shards"]:
                for rel in shard_paths(s["index"]):
                    if rel.rsplit("/", 1)[-1] not in present:
                        raise self.damaged(rel, "is missing")

    # ------------------------------------------------------------------ damage
    def remedy(self, rel: str, verified: bool = False) -> str:
        """What to do about the missing, damaged or undecodable cache file `rel` (a relative path): verify (unless
        `verified`), then the cheapest rebuild that makes the cache sound. A build of the same config over a
        finished cache whose shard record (or head file) is gone resumes (directory.claim): it re-checks every
        shard, rewrites the ones without a sound record and keeps the others."""
        verify = "" if verified else (f"run `distill cache verify {self.storage.display()}` to list every damaged "
                                      "file, then ")
        again = "rerun `distill cache build CONFIG` with the config that built the cache"
        shard = _shard_of(rel)
        if shard is not None:
            record = self.storage.display(shard_paths(shard)[2])
            return (f"{verify}rebuild {shard_name(shard)}: delete its record {record} and {again} (it rewrites "
                    "every shard whose record is gone or whose files do not match it, and keeps the others)")
        if rel == HEAD_FILE:
            return f"{verify}delete {self.storage.display(HEAD_FILE)} and {again} (it writes the head file again)"
        return (f"restore {MANIFEST} from a sound copy of the cache, or rebuild the cache with "
                "`distill cache build CONFIG --overwrite`")

    def damaged(self, rel: str, why: str) -> PipelineError:
        """The one-line error of cache file `rel`: where it is, what is wrong (`why`), what to do."""
        return PipelineError(f"{self.storage.display(rel)} {why}; {self.remedy(rel)}")

    @staticmethod
    def _matches(data, expected: str | None) -> bool:
        """Whether the bytes `data` have the digest `expected` (None: a file no record lists)."""
        if expected is None:
            return False
        h = hasher_like(expected)
        h.update(data)
        return h.digest() == expected

    def _checked(self, rel: str, data, expected: str | None, record: str):
        """`data` (the bytes of `rel`, as read) when it matches its checksum in `record` or checks are off."""
        if self.check and not self._matches(data, expected):
            why = "does not match its checksum in" if expected is not None else "is not listed in"
            raise self.damaged(rel, f"is damaged: it {why} {record}")
        return data

    def _read(self, rel: str) -> bytes:
        try:
            return self.storage.read_bytes(rel)
        except FileNotFoundError:
            raise self.damaged(rel, "is missing") from None

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

        from pipeline.head import TeacherHead

        exact = self.manifest.get("exact")
        if not exact:
            raise PipelineError(f"{self.root} holds no exact targets (cache.logits {targets.manifest_logits(self.manifest)}): "
                                "set loss.logits_source=topk or rebuild with cache.logits=topk+exact")
        data = self._checked(exact["file"], self._read(exact["file"]), exact.get("checksum"), MANIFEST)
        try:
            return TeacherHead.from_stored(safetensors.torch.load(data), exact)
        except Exception as e:  # noqa: BLE001 - whatever the bytes break in safetensors or the head: named, one line
            raise self.damaged(exact["file"], f"cannot be decoded ({_why(e)})") from e

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
            arrow, zdir, record = shard_paths(self.manifest["shards"][pos]["index"])
            files = self._record(pos)["files"]
            # without logits the top-k and lse columns are not even decompressed
            reader = self._arrow(arrow, files, record, None if self.with_logits else ("input_ids", "length"))
            self._files[pos] = (reader, self._hidden_arrays(zdir, files, record))
        return self._files[pos]

    def _record(self, pos: int) -> dict:
        """Shard `pos`'s record, read once and checked against the manifest: its per-file checksums are what the
        manifest's shard checksum covers. When the two disagree, the shard's files are hashed (verify's check of
        one shard) so that the error names the file that changed, not a sound neighbour."""
        if pos not in self._records:
            s = self.manifest["shards"][pos]
            path = shard_paths(s["index"])[2]
            record, why = self._load_record(path)
            if why is None:
                why = _record_mismatch(record, s)
            if why is not None:
                found = self._shard_problems(s)[0] if self.check else []
                rel, what = found[0] if found else (path, why)
                raise self.damaged(rel, what)
            self._records[pos] = record
        return self._records[pos]

    def _load_record(self, path: str) -> tuple[dict | None, str | None]:
        """(the shard record at `path`, None), or (None, what is wrong with it)."""
        try:
            raw = self.storage.read_bytes(path)
        except FileNotFoundError:
            return None, "is missing"
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            return None, f"is damaged: not UTF-8 text at byte {e.start}"
        except json.JSONDecodeError as e:
            return None, f"is damaged: not valid JSON ({e.msg}, line {e.lineno})"
        files = record.get("files") if isinstance(record, dict) else None
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            return None, "is damaged: not a shard record (no file checksums)"
        return record, None

    def _arrow(self, rel: str, files: dict, record: str, columns: tuple[str, ...] | None = None):
        """The Arrow file `rel` as a record-batch reader (of `columns` only, when given), checked whole against its
        checksum in `record` first. Locally the hash reads the memory map, whose pages the record batches are then
        decoded from; remotely the file is fetched whole, once, and read from memory."""
        try:
            if self.storage.local:
                source = self.storage.arrow_source(rel)  # a memory map
                if self.check:
                    self._checked(rel, source.read_buffer(), files.get(rel), record)
                    source.seek(0)
            elif self.check:
                source = pa.BufferReader(self._checked(rel, self._read(rel), files.get(rel), record))
            else:
                source = self.storage.arrow_source(rel)
            options = None
            if columns is not None:
                names = pa.ipc.open_file(source).schema.names
                options = pa.ipc.IpcReadOptions(included_fields=[i for i, n in enumerate(names) if n in columns])
            return pa.ipc.open_file(source, options=options)
        except PipelineError:
            raise
        except FileNotFoundError:
            raise self.damaged(rel, "is missing") from None
        except Exception as e:  # noqa: BLE001 - pyarrow's errors on damaged bytes: named, one line
            raise self.damaged(rel, f"cannot be decoded ({_why(e)})") from e

    def _hidden_arrays(self, zdir: str, files: dict, record: str) -> dict[int, dict[str, "_HiddenArray"]]:
        """{layer: {suffix: array}} of the decoded layers in one shard's Zarr group, from the record's file list.
        Every metadata file of the group (its own, each array's) is read and checked once, as the shard opens."""
        meta = {}
        for name in sorted(files):
            if name.startswith(zdir + "/") and name.endswith("/zarr.json"):
                data = self._checked(name, self._read(name), files[name], record)
                try:
                    doc = json.loads(data.decode("utf-8"))
                except ValueError as e:  # UnicodeDecodeError and JSONDecodeError alike
                    raise self.damaged(name, f"cannot be decoded ({_why(e)})") from None
                array = name[len(zdir) + 1 : -len("/zarr.json")]
                if array:  # "" is the group's own metadata: it only has to be sound
                    meta[array] = (name, doc)
        arrays = {}
        for layer in self.decoded_layers:
            base = hidden_array(layer)
            names = [a for a in meta if a == base or a.startswith(base + "_")]
            if base not in names:
                raise self.damaged(f"{zdir}/{base}/zarr.json", f"is missing (not in {record})")
            arrays[layer] = {a[len(base) + 1:]: _HiddenArray(self, f"{zdir}/{a}", *meta[a], files, record)
                             for a in names}
        return arrays

    def read_chunk(self, pos: int, chunk: int) -> dict:
        """Decoded arrays of every sequence of one chunk (leading dim = rows in the chunk); hidden holds
        the selected layers only."""
        key = (pos, chunk)
        if key in self._chunks:
            self._chunks.move_to_end(key)
            return self._chunks[key]
        reader, arrays = self._open(pos)
        arrow = shard_paths(self.manifest["shards"][pos]["index"])[0]
        try:
            out = self._decode_batch(reader.get_batch(chunk))
        except PipelineError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever damaged bytes break in pyarrow or the codecs: named, one line
            raise self.damaged(arrow, f"cannot be decoded ({_why(e)})") from e
        r0, n = chunk * self.chunk_sequences, len(out["input_ids"])
        out["hidden"] = {layer: self._decode_hidden(layer, arrays[layer], chunk, r0, n)
                         for layer in self.decoded_layers}
        self._chunks[key] = out
        while len(self._chunks) > self._chunk_cache:
            self._chunks.popitem(last=False)
        return out

    def _decode_hidden(self, layer: int, arrays: dict[str, "_HiddenArray"], chunk: int, r0: int, n: int) -> np.ndarray:
        parts = {suffix: a.read(chunk, r0, n) for suffix, a in arrays.items()}
        try:
            return self._codecs[layer].decode(parts)
        except Exception as e:  # noqa: BLE001 - e.g. a damaged shape in the array's metadata
            raise self.damaged(arrays[""].chunk_path(chunk), f"cannot be decoded ({_why(e)})") from e

    def _decode_batch(self, batch: pa.RecordBatch) -> dict:
        """The side data of one chunk's record batch: input ids, and the teacher targets and lse unless logits=False."""
        m = self.manifest
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
        for pos, s in enumerate(self.manifest["shards"]):
            arrow, _, record = shard_paths(s["index"])
            reader = self._arrow(arrow, self._record(pos)["files"], record)
            for name in targets.COLUMNS:
                if name not in reader.schema.names:
                    continue
                try:
                    for i in range(reader.num_record_batches):
                        lengths = pc.binary_length(reader.get_batch(i).column(name))
                        totals[name] = totals.get(name, 0) + int(pc.sum(lengths).as_py() or 0)
                except Exception as e:  # noqa: BLE001 - damaged bytes (checks off): named, one line
                    raise self.damaged(arrow, f"cannot be decoded ({_why(e)})") from e
        return totals

    # ------------------------------------------------------------------ integrity
    def verify(self) -> list[str]:
        """Recompute every checksum; returns the findings, each "relative path what is wrong" (e.g.
        "shards/shard-00000.arrow is missing"), empty when sound (`problems()`: the same as (path, what) pairs)."""
        return [f"{rel} {what}" for rel, what in self.problems()]

    def problems(self) -> list[tuple[str, str]]:
        """verify()'s findings as (relative path, what is wrong). Each finding names the file that changed, never
        a sound neighbour: a shard's files are checked against its record once the manifest vouches for the record
        (its shard checksum covers the record's per-file checksums); when it does not, the files' own digests tell
        a damaged record (the files match the manifest) from a damaged manifest entry (the files match the record).
        A shard record or JSON file that is not even UTF-8 or JSON is a finding like any other."""
        bad: list[tuple[str, str]] = []
        records = []
        for s in self.manifest["shards"]:
            problems, record = self._shard_problems(s)
            bad += problems
            records.append(record)
        if all(r is not None for r in records):
            bad += self._mean_square_problems(records)
        exact = self.manifest.get("exact")
        if exact:
            try:
                data = self.storage.read_bytes(exact["file"])
            except FileNotFoundError:
                bad.append((exact["file"], "is missing"))
            else:
                if not self._matches(data, exact.get("checksum")):
                    bad.append((exact["file"], f"is damaged: it does not match its checksum in {MANIFEST}"))
        return bad

    def _digest(self, rel: str, like: str | None) -> tuple[str, int]:
        """(digest in the algorithm of the digest `like`, size in bytes) of file `rel`, streamed."""
        h = hasher_like(like)
        with self.storage.open(rel, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        return h.digest(), h.size

    def _shard_problems(self, s: dict) -> tuple[list[tuple[str, str]], dict | None]:
        """(findings, the record or None) of manifest shard entry `s`: verify's check of one shard (the module's
        rule for naming the file that changed)."""
        index = s["index"]
        arrow, zdir, path = shard_paths(index)
        record, why = self._load_record(path)
        if why is not None:
            return [(path, why)], None  # without its record the shard's files cannot be checked
        files = record["files"]
        like = next(iter(files.values()), None)
        actual = {name: self._digest(name, files.get(name, like)) for name in shard_files(self.storage, index)}
        found = [(n, "is missing") for n in sorted(set(files) - set(actual))]
        found += [(n, f"is unexpected: not listed in {path}") for n in sorted(set(actual) - set(files))]
        found += [(n, f"is damaged: it does not match its checksum in {path}")
                  for n, (digest, _) in actual.items() if n in files and digest != files[n]]
        if combine_checksums(files) != s.get("checksum"):
            if not found:  # the files are what the record says: the manifest's entry is what changed
                return [(MANIFEST, f"is damaged: its checksum of {s['name']} differs from {path}, whose files are "
                                   "sound")], record
            if combine_checksums({n: d for n, (d, _) in actual.items()}) == s.get("checksum"):
                return [(path, f"is damaged: its checksums differ from the files, which match {MANIFEST}")], record
            found.append((path, f"does not match its checksum in {MANIFEST}"))
        return found + self._field_problems(record, s, actual, path, sound=not found), record

    def _field_problems(self, record: dict, s: dict, actual: dict[str, tuple[str, int]], path: str,
                        sound: bool) -> list:
        """The fields a shard record shares with its manifest entry (RECORD_KEYS), against what decides them: the
        entry's position (name, index, start, sequences: the manifest is validated to cover its sequences in
        order), the files' sizes when they are `sound` (bytes) and, packed, sequences x seq_len (tokens)."""
        found = []
        for key in ("name", "index", "start", "sequences"):
            if record.get(key) != s.get(key):
                found.append((path, f"is damaged: its {key} is {record.get(key)!r}, {MANIFEST} says {s.get(key)!r}"))
        arrow, zdir, _ = shard_paths(s["index"])
        if sound:  # the files match their checksums, so their sizes are the ones the build recorded
            hidden: dict[str, int] = {}
            for name, (_, size) in actual.items():
                parts = name[len(zdir) + 1:].split("/")
                if name.startswith(zdir + "/") and len(parts) > 1:  # an array's file: "layer_<i>[_<suffix>]/..."
                    layer = parts[0].split("_")[1]
                    hidden[layer] = hidden.get(layer, 0) + size
            sizes = {"arrow": actual[arrow][1] if arrow in actual else None, "hidden": hidden}
            for where, value in ((path, record.get("bytes")), (MANIFEST, s.get("bytes"))):
                if value is not None and value != sizes:
                    found.append((where, f"is damaged: its bytes of {s['name']} are not the files' sizes"))
        tokens = s.get("sequences", 0) * self.seq_len if not self.padded else None
        if record.get("tokens") != s.get("tokens"):
            if tokens is None:
                found.append((path, f"differs from {MANIFEST} in the tokens of {s['name']} (one of the two is "
                                    "damaged)"))
            for where, value in ((path, record.get("tokens")), (MANIFEST, s.get("tokens"))):
                if tokens is not None and value != tokens:
                    found.append((where, f"is damaged: its tokens of {s['name']} are {value!r}, not {tokens}"))
        return found

    def _mean_square_problems(self, records: list[dict]) -> list[tuple[str, str]]:
        """The manifest's hidden_mean_square against the one the build gathered from the shard records' sums."""
        from pipeline.cache.directory import train_mean_square

        try:
            gathered = train_mean_square(records, int(self.manifest["teacher"]["hidden_size"]))
        except (KeyError, TypeError, ValueError, AttributeError):
            return [("shards/*.json", "are damaged: their hidden_square_sums cannot be summed")]
        stored = self.manifest.get("hidden_mean_square", {})
        for layer, value in gathered.items():
            if stored.get(layer) != value:
                return [(MANIFEST, f"is damaged: its hidden_mean_square of layer {layer} is {stored.get(layer)!r}, "
                                   f"the shard records' sums give {value!r} (unless a record's sums are the damage)")]
        return []


class _HiddenArray:
    """One hidden-state Zarr array of a shard, read chunk by chunk.

    Its metadata is the array's zarr.json as the Cache read and checked it. A chunk laid out as writer.py writes
    it (one chunk along the rows per file, bytes then Blosc) is read here as bytes (a local file or one GET),
    checked against its checksum in the shard record the first time, and decoded with numcodecs' Blosc: the
    bytes zarr would decode the same way, without its per-read machinery (an event-loop round trip and a
    metadata walk per call, several times the decompression itself). A chunk file that is not there is an
    error, never zarr's fill value. Any other layout (this project's writer never writes one) goes through
    zarr, once the chunk file has been read here to check it."""

    def __init__(self, cache: Cache, path: str, meta_path: str, meta: dict, files: dict, record: str):
        from zarr.codecs import BloscCodec, BytesCodec
        from zarr.core.metadata.v3 import ArrayV3Metadata

        self.cache, self.path, self.files, self.record = cache, path, files, record
        try:
            self.meta = ArrayV3Metadata.from_dict(meta)
            dtype = self.meta.dtype
            self.dtype = np.dtype(dtype.to_native_dtype() if hasattr(dtype, "to_native_dtype") else dtype)
            self.chunks = tuple(int(c) for c in self.meta.chunks)
            n_chunks = -(-int(self.meta.shape[0]) // self.chunks[0])
        except Exception as e:  # noqa: BLE001 - whatever damaged metadata breaks in zarr: named, one line
            raise cache.damaged(meta_path, f"cannot be decoded ({_why(e)})") from e
        codecs = self.meta.codecs
        endian = getattr(codecs[0], "endian", None) if codecs else None
        self.direct = (len(codecs) == 2 and isinstance(codecs[0], BytesCodec) and isinstance(codecs[1], BloscCodec)
                       and getattr(endian, "value", endian) in (None, sys.byteorder)
                       and self.chunks[1:] == tuple(self.meta.shape[1:]))
        self.checked = np.zeros(n_chunks, dtype=bool)  # chunks whose file matched its checksum once
        self._array = None

    @property
    def array(self):
        """The array as zarr reads it (the path of other layouts), opened on first use."""
        if self._array is None:
            import zarr

            store = self.cache.storage.zarr_store(self.path, read_only=True)
            self._array = zarr.open_array(store=store, mode="r", zarr_format=3)
        return self._array

    def chunk_path(self, chunk: int) -> str:
        return f"{self.path}/{self.meta.encode_chunk_key((chunk,) + (0,) * (self.meta.ndim - 1))}"

    def _bytes(self, chunk: int, rel: str) -> bytes:
        data = self.cache._read(rel)
        if not self.checked[chunk]:
            self.cache._checked(rel, data, self.files.get(rel), self.record)
            self.checked[chunk] = True
        return data

    def read(self, chunk: int, r0: int, n: int) -> np.ndarray:
        """Rows r0 .. r0 + n (chunk `chunk` of the rows)."""
        from numcodecs import blosc

        rel = self.chunk_path(chunk)
        if not self.direct:
            if not self.checked[chunk]:
                self._bytes(chunk, rel)
            try:
                return self.array[r0 : r0 + n]
            except Exception as e:  # noqa: BLE001 - named, one line
                raise self.cache.damaged(rel, f"cannot be decoded ({_why(e)})") from e
        data = self._bytes(chunk, rel)
        rows = np.empty(self.chunks, dtype=self.dtype)
        try:
            blosc.decompress(data, rows)
        except Exception as e:  # noqa: BLE001 - numcodecs' errors on damaged bytes: named, one line
            raise self.cache.damaged(rel, f"cannot be decoded ({_why(e)})") from e
        return rows[:n]


def open_cache(root: str | Path | Storage, layers: list[int] | None = None, logits: bool = True,
               storage_options: dict | None = None, exact: bool = False, check: bool | None = None) -> Cache:
    """The cache at `root` (a folder or an fsspec URL, opened with `storage_options`); `layers` limits the
    hidden layers decoded per sequence (default: all cached); logits=False reads no top-k ids, logits or lse;
    exact=True also decodes layer n where the cache holds exact targets (the layer the teacher's logits are
    rebuilt from, `Cache.exact_layer`). Every file is checked against its checksum the first time it is read;
    check=False skips that for a cache just verified (None: on unless DISTILL_CACHE_CHECKS=0)."""
    return Cache(root, layers=layers, logits=logits, storage_options=storage_options, exact=exact, check=check)
