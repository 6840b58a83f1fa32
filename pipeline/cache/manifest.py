"""The on-disk layout of a cache: names, the manifest, per-shard records, checksums.

    CACHE/
      manifest.json                 written last, atomically; its presence means "complete"
      build.json                    the fingerprint of the build in progress (refuses other configs)
      .lock                         flock held by the one builder
      shards/shard-00000.arrow      Arrow IPC file: one record batch per chunk of sequences
      shards/shard-00000.zarr/      Zarr v3 group: layer_<i> [n, T, d] (+ layer_<i>_scale) per layer
      shards/shard-00000.json       shard record: sequences, tokens, bytes, per-file and shard checksums;
                                    written after the data files, so a shard counts only once it exists

Arrow columns per sequence row: input_ids [T], length (padded mode only), topk_ids and topk_logits
(byte planes, see codecs.py; cache.logits topk | topk+sampled), sample_ids, sample_counts and
sample_logits (the same byte planes, [T, K]; cache.logits sampled | topk+sampled), lse_<j> [T] float32
for temperatures[j].
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pipeline.errors import PipelineError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BUILD = "build.json"
LOCK = ".lock"
SHARDS = "shards"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def shard_paths(root: Path, index: int) -> tuple[Path, Path, Path]:
    """(arrow file, zarr dir, record json) of shard `index`."""
    base = root / SHARDS / shard_name(index)
    return base.with_suffix(".arrow"), base.with_suffix(".zarr"), base.with_suffix(".json")


def lse_column(j: int) -> str:
    return f"lse_{j}"


def hidden_array(layer: int, suffix: str = "") -> str:
    return f"layer_{layer}" + (f"_{suffix}" if suffix else "")


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing") from None
    except json.JSONDecodeError as e:
        raise PipelineError(f"{path} is not valid JSON ({e.msg})") from None


def file_checksum(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def shard_files(root: Path, index: int) -> list[Path]:
    """Every data file of a shard (the Arrow file and the Zarr store's files), in a fixed order."""
    arrow, zdir, _ = shard_paths(root, index)
    files = [arrow] + sorted(p for p in zdir.rglob("*") if p.is_file())
    return files


def checksum_files(root: Path, files: list[Path]) -> tuple[dict[str, str], str]:
    """({relative path: checksum}, shard checksum over the sorted per-file checksums)."""
    per_file = {str(p.relative_to(root)): file_checksum(p) for p in files}
    return per_file, combine_checksums(per_file)


def combine_checksums(per_file: dict[str, str]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, digest in sorted(per_file.items()):
        h.update(f"{name}:{digest}\n".encode())
    return h.hexdigest()


# Settings that change speed, never what a cache holds: never part of the digest (caches fingerprinted
# with them before they were dropped still match). cache.batch_size can move the fp32 forward's low-order
# bits (other matmul blocking), within the rounding the stored formats already carry; writer_threads changes
# nothing written.
SPEED_KEYS = (("capture", "batch_size"),)
# Keys added to the fingerprint later, with the value every cache fingerprinted before them has
FINGERPRINT_DEFAULTS = {("codecs", "hidden_compressor"): "zstd", ("capture", "logits"): "topk"}


def fingerprint_digest(fingerprint: dict) -> str:
    content = json.loads(json.dumps(fingerprint))
    for section, key in SPEED_KEYS:
        if isinstance(content.get(section), dict):
            content[section].pop(key, None)
    for (section, key), value in FINGERPRINT_DEFAULTS.items():
        if isinstance(content.get(section), dict):
            content[section].setdefault(key, value)
    return hashlib.blake2b(json.dumps(content, sort_keys=True).encode(), digest_size=16).hexdigest()


REQUIRED_KEYS = (
    "format_version", "fingerprint", "teacher", "seq_len", "num_sequences", "topk", "temperatures",
    "layers", "logit_dtype", "id_dtype", "hidden_codec", "split", "shard_sequences", "chunk_sequences",
    "shards",
)


def validate_manifest(m: dict, where: Path) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in m]
    if missing:
        raise PipelineError(f"{where}: manifest lacks {', '.join(missing)}")
    if m["format_version"] != FORMAT_VERSION:
        raise PipelineError(
            f"{where}: cache format_version {m['format_version']} is not supported (this code reads {FORMAT_VERSION}); "
            "rebuild it with `distill cache build CONFIG --overwrite`"
        )
    covered = 0
    for s in m["shards"]:
        if s["start"] != covered:
            raise PipelineError(f"{where}: shard {s['name']} starts at {s['start']}, expected {covered}")
        covered += s["sequences"]
    if covered != m["num_sequences"]:
        raise PipelineError(f"{where}: shards cover {covered} sequences, manifest says {m['num_sequences']}")
