"""The on-disk layout of a cache: names, the manifest, per-shard records, checksums.

    CACHE/
      manifest.json                 written last, atomically; its presence means "complete"
      build.json                    the fingerprint of the build in progress (refuses other configs)
      .lock                         flock held by the one builder (object stores: a lock object, see below)
      shards/shard-00000.arrow      Arrow IPC file: one record batch per chunk of sequences
      shards/shard-00000.zarr/      Zarr v3 group: layer_<i> [n, T, d] (+ layer_<i>_scale) per layer
      shards/shard-00000.json       shard record: sequences, tokens, bytes, per-file and shard checksums;
                                    written after the data files, so a shard counts only once it exists

CACHE is a local folder or any fsspec URL (storage.py); names are relative to it, the bytes are the same.
On a local folder data files are written as `*.tmp` and renamed, JSON files replaced atomically. Object
stores have no rename: data files are written at their final names, and only the order of writes (data,
then the shard record, then the manifest) keeps an unfinished build invisible: a shard counts when its
record exists and every checksum in it matches, files without a record are leftovers that the next
attempt deletes, and without manifest.json there is no cache. There `.lock` is an object created
exclusively (If-None-Match: *) with the builder's host, pid and token, deleted at the end; a lock left by
a dead process on the same host is taken over, one from another host must be deleted by hand
(directory.ObjectLock lists the limits).

Arrow columns per sequence row: input_ids [T], length (padded mode only), lse_<j> for temperatures[j]
([T] float32 as byte planes, codecs.encode_lse): the normaliser of the stored top-k logits, so that
1 - sum_I exp(z_i / T - lse) is the true full-vocabulary tail (teacher/capture.py, stored_lse; the
full-vocabulary lse when there is no top-k). The teacher targets are one blob per chunk, in the chunk's
first row (null in the others): the columns of each kind cache.logits stores (pipeline/targets.py): topk_ids and topk_logits ([n, T, k]),
sample_ids, sample_counts and sample_logits ([n, T, K]), byte
planes of frequency ranks / logit keys / counts compressed with cache.side_compressor (see codecs.py).
The ranks' id table (order[rank] = id, codecs.frequency_order of the corpus) is stored once, in the
manifest: `id_order` {packed (base64 of codecs.pack_order), bytes, checksum}; readers check the checksum.

Exact full-distribution targets (cache.logits exact | topk+exact) add teacher_head.safetensors: the teacher's
final norm and LM head, stored once, and the manifest's `exact` {file, checksum, bytes, layer, norm, eps,
scale, softcap} (head.TeacherHead); the last block's output, layer n, is a hidden layer like any other, at
its own codec: `layer_codecs` {"n": codec} names the layers stored at another codec than hidden_codec.
Both keys are absent from caches without exact targets.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

from pipeline.cache.storage import Storage
from pipeline.errors import PipelineError

# what this code reads and writes: the exact-tail lse, ids as frequency ranks, one side-data blob per chunk, the
# id table in the manifest (docs/architecture.md, sections 4-7); a cache of another format is refused
FORMAT_VERSION = 3
MANIFEST = "manifest.json"
BUILD = "build.json"
LOCK = ".lock"
SHARDS = "shards"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def shard_paths(index: int) -> tuple[str, str, str]:
    """(arrow file, zarr folder, record json) of shard `index`, relative to the cache root."""
    base = f"{SHARDS}/{shard_name(index)}"
    return f"{base}.arrow", f"{base}.zarr", f"{base}.json"




def id_table_record(packed: bytes) -> dict:
    """The manifest's `id_order` entry for a packed id table (codecs.pack_order)."""
    return {"packed": base64.b64encode(packed).decode("ascii"), "bytes": len(packed),
            "checksum": hashlib.blake2b(packed, digest_size=16).hexdigest()}


def id_table_bytes(m: dict, where: str | Path) -> bytes:
    """The packed id table of manifest `m`, checked against its checksum."""
    entry = m["id_order"]
    try:
        packed = base64.b64decode(entry["packed"], validate=True)
    except (ValueError, TypeError, KeyError):
        packed = None
    if packed is None or hashlib.blake2b(packed, digest_size=16).hexdigest() != entry.get("checksum"):
        raise PipelineError(f"{where}: the id table (id_order) is damaged; rebuild the cache with "
                            "`distill cache build CONFIG --overwrite`")
    return packed


HEAD_FILE = "teacher_head.safetensors"  # exact targets: the teacher's final norm and head


def layer_codec(m: dict, layer: int) -> str:
    """The codec layer `layer` is stored at: its `layer_codecs` entry, else the cache's hidden_codec."""
    return (m.get("layer_codecs") or {}).get(str(layer), m["hidden_codec"])


def lse_column(j: int) -> str:
    return f"lse_{j}"


def hidden_array(layer: int, suffix: str = "") -> str:
    return f"layer_{layer}" + (f"_{suffix}" if suffix else "")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path} is missing") from None
    except json.JSONDecodeError as e:
        raise PipelineError(f"{path} is not valid JSON ({e.msg})") from None


def shard_files(store: Storage, index: int) -> list[str]:
    """Every data file of a shard that is there (the Arrow file and the Zarr store's files), relative to
    the cache root, in a fixed order."""
    arrow, zdir, _ = shard_paths(index)
    return ([arrow] if store.isfile(arrow) else []) + store.files(zdir)


def combine_checksums(per_file: dict[str, str]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, digest in sorted(per_file.items()):
        h.update(f"{name}:{digest}\n".encode())
    return h.hexdigest()


def fingerprint_digest(fingerprint: dict) -> str:
    """The digest two builds compare: equal means the same cache (spec.CacheSpec.fingerprint says what it covers)."""
    return hashlib.blake2b(json.dumps(fingerprint, sort_keys=True).encode(), digest_size=16).hexdigest()


REQUIRED_KEYS = (
    "format_version", "fingerprint", "teacher", "seq_len", "num_sequences", "topk", "temperatures",
    "layers", "logit_dtype", "id_dtype", "hidden_codec", "side_compressor", "split", "shard_sequences",
    "chunk_sequences", "id_order", "shards",
)


def record_format(record: dict) -> int | None:
    """The format version a manifest.json or build.json names (its own, else its fingerprint's); None if none."""
    version = record.get("format_version", (record.get("fingerprint") or {}).get("format_version"))
    return version if isinstance(version, int) else None


def check_format(record: dict, where: str | Path, remedy: str) -> None:
    """The one format check: a record naming another format than this code's is refused in one line that ends
    with `remedy` (what the caller's user should do). A record naming none passes (its keys are checked next)."""
    version = record_format(record)
    if version is not None and version != FORMAT_VERSION:
        raise PipelineError(f"{where} holds a format-{version} cache (this code reads and writes format "
                            f"{FORMAT_VERSION}); {remedy}")


def validate_manifest(m: dict, where: str | Path) -> None:
    check_format(m, where, "rebuild it with `distill cache build CONFIG --overwrite`")  # other formats have other keys
    missing = [k for k in REQUIRED_KEYS if k not in m]
    if missing:
        raise PipelineError(f"{where}: manifest lacks {', '.join(missing)}")
    covered = 0
    for pos, s in enumerate(m["shards"]):
        if s.get("index") != pos or s.get("name") != shard_name(pos):  # finalize lists shard i at position i
            raise PipelineError(f"{where}: shard {pos} is listed as {s.get('name')} (index {s.get('index')}); the "
                                "manifest is damaged")
        if s["start"] != covered:
            raise PipelineError(f"{where}: shard {s['name']} starts at {s['start']}, expected {covered}")
        covered += s["sequences"]
    if covered != m["num_sequences"]:
        raise PipelineError(f"{where}: shards cover {covered} sequences, manifest says {m['num_sequences']}")
    norms = m.get("hidden_mean_square", {})
    lacking = [layer for layer in m["layers"] if str(layer) not in norms]
    if lacking:  # the build writes it for every cached layer (the nmse loss's constants)
        raise PipelineError(f"{where}: manifest lacks hidden_mean_square of layer {lacking[0]}; rebuild it with "
                            "`distill cache build CONFIG --overwrite`")
    exact = m.get("exact")
    if exact is not None and int(exact.get("layer", -1)) not in m["layers"]:
        raise PipelineError(f"{where}: exact targets need teacher layer {exact.get('layer')}, which the cache lacks")
