"""What a cache holds and what it costs, from its manifest: sizes and bytes per token by component and by
kind of teacher target, and the compression against the raw arrays (`distill cache info`, the benchmarks)."""

from __future__ import annotations

import numpy as np

from pipeline import targets
from pipeline.cache.manifest import layer_codec
from pipeline.cache.reader import open_cache
from pipeline.dtypes import STORED_LOGIT_DTYPES


def summarize(manifest: dict) -> dict:
    """Sizes and bytes/token per component, with the raw (uncompressed) sizes they compare to."""
    m = manifest
    tokens = sum(s["tokens"] for s in m["shards"])
    positions = m["num_sequences"] * m["seq_len"]
    side = sum(s["bytes"]["arrow"] for s in m["shards"]) + m["id_order"]["bytes"]  # + the id table, stored once
    id_bytes = np.dtype(m["id_dtype"]).itemsize
    logit_bytes = STORED_LOGIT_DTYPES[m["logit_dtype"]].itemsize
    sampling = m.get("sampling")  # sampled targets: K slots of id, logit and count per position
    sample_bytes = sampling["samples"] * (id_bytes + logit_bytes + np.dtype(sampling["count_dtype"]).itemsize) if sampling else 0
    raw_side = m["topk"] * (id_bytes + logit_bytes) + sample_bytes + 4 * len(m["temperatures"]) + id_bytes
    d = m["teacher"]["hidden_size"]
    raw_width = {"fp32": 4 * d, "bf16": 2 * d, "fp16": 2 * d, "int8": d + 2}  # raw bytes per token of a layer
    raw_hidden = sum(raw_width[layer_codec(m, layer)] for layer in m["layers"])
    per_layer = {
        str(layer): sum(s["bytes"]["hidden"][str(layer)] for s in m["shards"]) for layer in m["layers"]
    }
    hidden_total = sum(per_layer.values())
    head = (m.get("exact") or {}).get("bytes", 0)  # exact targets' teacher head, stored once
    return {
        "format_version": m["format_version"],
        "teacher": m["teacher"],
        "fingerprint_digest": m.get("fingerprint_digest"),
        "hidden_compressor": m["fingerprint"]["codecs"]["hidden_compressor"],
        "side_compressor": m["side_compressor"],
        "layers": m["layers"], "topk": m["topk"], "temperatures": m["temperatures"],
        "logits": targets.manifest_logits(m), "sampling": sampling, "exact": m.get("exact"),
        "layer_codecs": m.get("layer_codecs") or {},
        "logit_dtype": m["logit_dtype"], "hidden_codec": m["hidden_codec"],
        "sequences": m["num_sequences"], "tokens": tokens, "seq_len": m["seq_len"],
        "split": m["split"], "shards": len(m["shards"]),
        "bytes": {"side_data": side, "hidden": hidden_total, "head": head, "total": side + hidden_total + head},
        "bytes_per_token": {
            "side_data": side / positions,
            "hidden_per_layer": {k: v / positions for k, v in per_layer.items()},
            "hidden_all_layers": hidden_total / positions,
        },
        "compression_ratio": {
            "side_data_vs_raw": side / positions / raw_side,
            "hidden_vs_raw_codec": hidden_total / positions / max(1, raw_hidden),
            "hidden_vs_fp32": hidden_total / positions / max(1, 4 * d * len(m["layers"])),
        },
    }


def cache_facts(cache_dir: str, storage_options: dict | None = None) -> dict:
    """What `distill cache info --json` prints: the manifest's summary and what each kind of teacher target
    costs per token (its columns' blobs; for exact targets, layer n among the hidden layers)."""
    cache = open_cache(cache_dir, layers=[], storage_options=storage_options)
    info = summarize(cache.manifest)
    positions = info["sequences"] * info["seq_len"]
    info["bytes_per_token"]["targets"] = {k: v / positions for k, v in cache.target_bytes().items()}
    return info


def target_kind_bytes(info: dict, kind: str) -> float:
    """Bytes per token that one kind of teacher target (topk | sampled | exact) costs in a cache, from
    `cache_facts`' dict: its columns, or for exact targets layer n among the hidden layers (the head is
    stored once per cache, not per token)."""
    per_token = info["bytes_per_token"]
    if targets.kind(kind) is targets.EXACT:
        return per_token["hidden_per_layer"][str(info["exact"]["layer"])]
    return sum(per_token["targets"].get(c, 0.0) for c in targets.kind(kind).columns)
