"""The writer's own bytes: hidden chunk files as zarr itself writes them, checksums as the bytes go out, and
caches whose records carry the older blake2b digests still verify and resume."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import zarr

from pipeline.cache import open_cache
from pipeline.cache.checksum import PREFIX, digest_bytes
from pipeline.cache.codecs import HIDDEN_CODECS, frequency_order, zarr_compressor
from pipeline.cache.directory import finished_record
from pipeline.cache.manifest import combine_checksums, shard_paths
from pipeline.cache.writer import CHUNK_KEY_ENCODING, CacheWriter, ShardLayout, chunk_file
from tests.cache.test_build import run_cli


def _rows(n: int, t: int, d: int, k: int, layers: list[int], seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    logits = -np.sort(-rng.standard_normal((n, t, k)).astype(np.float16), axis=-1)
    return {"input_ids": rng.integers(0, 500, (n, t)).astype(np.int32),
            "topk_ids": rng.integers(0, 500, (n, t, k)).astype(np.uint16), "topk_logits": logits,
            "lse": rng.standard_normal((2, n, t)).astype(np.float32) + 5,
            "hidden": {i: (rng.standard_t(3, (n, t, d)) * (i + 1)).astype(np.float32) for i in layers}}


@pytest.mark.parametrize("codec,compressor", [("bf16", "zstd"), ("int8", "lz4")])
def test_hidden_chunk_files_are_what_zarr_writes(tmp_path, codec, compressor):
    """Every chunk file the writer writes itself equals the file zarr writes for `array[:] = values` with the
    same metadata (an independent encoder of the same format), the partial last chunk included; and every
    digest in the record is the xxh3 of the file's bytes on disk."""
    n, t, d, k, layers = 13, 16, 24, 4, [0, 3]
    rows = _rows(n, t, d, k, layers)
    order = frequency_order(rows["input_ids"], 500, np.uint16)
    lay = ShardLayout(seq_len=t, topk=k, layers=tuple(layers), n_temps=2, hidden_codec=codec, id_dtype="uint16",
                      padded=False, chunk_sequences=8, hidden_level=3, logits_level=9, train_sequences=n,
                      hidden_compressor=compressor, id_order=order.tobytes(), side_compressor="zstd")
    root = tmp_path / "cache"
    (root / "shards").mkdir(parents=True)
    with CacheWriter(root, lay, threads=2) as w:
        w.open_shard(0, 0, n)
        w.put_rows(0, {key: (v if key != "hidden" else dict(v)) for key, v in rows.items()})
        w.end_shard(0)
    record = w.records[0]
    zdir = root / shard_paths(0)[1]
    ref = zarr.open_group(store=str(tmp_path / "ref.zarr"), mode="w", zarr_format=3)
    checked = 0
    for layer in layers:
        for suffix, arr in HIDDEN_CODECS.get(codec).encode(rows["hidden"][layer]).items():
            name = f"layer_{layer}" + (f"_{suffix}" if suffix else "")
            a = ref.create_array(name, shape=arr.shape, chunks=(8,) + arr.shape[1:], dtype=arr.dtype, fill_value=0,
                                 chunk_key_encoding=CHUNK_KEY_ENCODING,
                                 compressors=[zarr_compressor(3, arr.dtype.itemsize, compressor)])
            a[:] = arr
            for c in range(2):  # rows 0..7 and the partial chunk 8..12
                mine = (zdir / chunk_file(name, c, arr.ndim)).read_bytes()
                assert mine == (tmp_path / "ref.zarr" / chunk_file(name, c, arr.ndim)).read_bytes(), (name, c)
                checked += 1
            assert np.array_equal(zarr.open_group(str(zdir), mode="r")[name][:], arr)
    assert checked == 2 * len(layers) * (2 if codec == "int8" else 1)
    for rel, digest in record["files"].items():
        assert digest.startswith(PREFIX) and digest == digest_bytes((root / rel).read_bytes()), rel


def _as_blake2b(cache_dir) -> None:
    """Rewrite a cache's records and manifest with blake2b digests (no prefix), as older builds wrote them."""
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    for s in manifest["shards"]:
        path = cache_dir / shard_paths(s["index"])[2]
        record = json.loads(path.read_text())
        record["files"] = {rel: hashlib.blake2b((cache_dir / rel).read_bytes(), digest_size=16).hexdigest()
                           for rel in record["files"]}
        record["checksum"] = s["checksum"] = combine_checksums(record["files"])
        path.write_text(json.dumps(record))
    (cache_dir / "manifest.json").write_text(json.dumps(manifest))


def test_blake2b_records_still_verify_and_resume(tiny_config):
    cfg_path, cache_dir = tiny_config(data__num_sequences=8, cache__shard_sequences=4, cache__chunk_sequences=2)
    assert run_cli("cache", "build", cfg_path).exit_code == 0
    _as_blake2b(cache_dir)
    assert run_cli("cache", "verify", cache_dir).exit_code == 0
    record = json.loads((cache_dir / shard_paths(1)[2]).read_text())
    assert finished_record(cache_dir, 1, 4, 4) == record  # a resumed build keeps the shard
    arrow = cache_dir / shard_paths(1)[0]
    data = bytearray(arrow.read_bytes())
    data[len(data) // 2] ^= 1
    arrow.write_bytes(bytes(data))
    r = run_cli("cache", "verify", cache_dir)
    assert r.exit_code != 0 and "shard-00001.arrow" in r.output
    assert finished_record(cache_dir, 1, 4, 4) is None
    assert len(open_cache(cache_dir)) == 8


def _small_layout(rows: dict, n: int) -> ShardLayout:
    order = frequency_order(rows["input_ids"], 500, np.uint16)
    return ShardLayout(seq_len=rows["input_ids"].shape[1], topk=rows["topk_ids"].shape[-1], layers=tuple(rows["hidden"]),
                       n_temps=2, hidden_codec="bf16", id_dtype="uint16", padded=False, chunk_sequences=2,
                       hidden_level=1, logits_level=9, train_sequences=n, id_order=order.tobytes(), side_compressor="zstd")


def test_a_failure_mid_shard_stops_the_writer_at_once_and_commits_nothing(tmp_path):
    """The caller fails with a shard open and chunks in flight: the writer stops without waiting out its
    join timeout, the open shard gets no record, and the caller's exception is the one raised."""
    import time

    rows = _rows(6, 8, 16, 4, [1, 2])
    root = tmp_path / "cache"
    (root / "shards").mkdir(parents=True)
    t0 = time.perf_counter()
    with pytest.raises(KeyError, match="the teacher failed"):
        with CacheWriter(root, _small_layout(rows, 6), threads=2) as w:
            w.open_shard(0, 0, 6)
            w.put_rows(0, rows)
            raise KeyError("the teacher failed")
    assert time.perf_counter() - t0 < 10
    assert not (root / shard_paths(0)[2]).exists() and not (root / shard_paths(0)[0]).exists()


def test_a_shard_never_ended_is_an_error_not_a_hang(tmp_path):
    rows = _rows(4, 8, 16, 4, [1])
    root = tmp_path / "cache"
    (root / "shards").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="shard-00000 was opened but never ended"):
        with CacheWriter(root, _small_layout(rows, 4), threads=2) as w:
            w.open_shard(0, 0, 4)
            w.put_rows(0, rows)
    assert not (root / shard_paths(0)[2]).exists()
