"""`distill cache build | verify | info`: the build is pipeline/cache/build.py; verify and info read a cache."""

from __future__ import annotations

import json

import click
import numpy as np

from pipeline.cache.build import build_cache
from pipeline.cache.codecs import STORED_LOGIT_DTYPES
from pipeline.cache.manifest import TARGET_KIND_COLUMNS, layer_codec
from pipeline.cache.reader import open_cache
from pipeline.errors import PipelineError

__all__ = ["build_cache", "cache_facts", "cache_info", "summarize", "verify_cache"]


# ----------------------------------------------------------------------------- verify / info


def verify_cache(cache_dir: str, storage_options: dict | None = None) -> None:
    c = open_cache(cache_dir, storage_options=storage_options)
    bad = c.verify()
    if bad:
        raise PipelineError(f"{cache_dir}: {len(bad)} bad file(s), first: {bad[0]}")
    click.echo(f"{cache_dir}: OK (format {c.manifest['format_version']}, {len(c.manifest['shards'])} shards, "
               f"{len(c)} sequences)")


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
        "logits": m.get("logits", "topk"), "sampling": sampling, "exact": m.get("exact"),
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
    if kind == "exact":
        return per_token["hidden_per_layer"][str(info["exact"]["layer"])]
    return sum(per_token["targets"].get(c, 0.0) for c in TARGET_KIND_COLUMNS[kind])


def cache_info(cache_dir: str, as_json: bool = False, storage_options: dict | None = None) -> dict:
    info = cache_facts(cache_dir, storage_options)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return info
    t, b, r = info["teacher"], info["bytes_per_token"], info["compression_ratio"]
    per_layer = b["hidden_per_layer"]
    lines = [
        f"cache        {cache_dir}",
        f"teacher      {t['model']} ({t['model_type']}, {t['num_layers']} blocks, d={t['hidden_size']}, V={t['vocab_size']}, {t['dtype']})",
        f"format       {info['format_version']}; fingerprint {info['fingerprint_digest']}",
        f"sequences    {info['sequences']} x {info['seq_len']} ({info['tokens']} tokens) in {info['shards']} shards; "
        f"train {info['split']['train']}, held-out {info['split']['heldout']}",
        f"top-k        k={info['topk']}, logits {info['logit_dtype']}, temperatures {info['temperatures']}; "
        f"ids as frequency ranks, {info['side_compressor']} per chunk",
    ]
    targets = b["targets"]
    if info["topk"]:
        lines[-1] += f"; {targets.get('topk_ids', 0) + targets.get('topk_logits', 0):.1f} B/token"
    if info["sampling"]:
        sp = info["sampling"]
        draws = sum(targets.get(k, 0) for k in ("sample_ids", "sample_counts", "sample_logits"))
        lines.append(f"sampled      K={sp['samples']} draws per position at T={sp['proposal_temperature']:g} "
                     f"(seed {sp['seed']}), logits {info['logit_dtype']}; {draws:.1f} B/token")
    if info["exact"]:
        ex = info["exact"]
        codec = info["layer_codecs"].get(str(ex["layer"]), info["hidden_codec"])
        lines.append(f"exact        layer {ex['layer']} ({codec}, {per_layer[str(ex['layer'])]:.0f} B/token) + the "
                     f"teacher's {ex['norm']} norm and head ({ex['bytes'] / 2**20:.1f} MiB, {ex['file']}, stored once)")
    others = "".join(f", layer {k} {v}" for k, v in info["layer_codecs"].items())
    lines += [
        f"layers       {info['layers']} ({info['hidden_codec']}{others}, Blosc {info['hidden_compressor']})",
        f"side data    {b['side_data']:.1f} B/token ({r['side_data_vs_raw']:.2f} of raw)",
        f"hidden       {b['hidden_all_layers']:.0f} B/token for {len(per_layer)} layers "
        f"({r['hidden_vs_raw_codec']:.2f} of raw {info['hidden_codec']}, {r['hidden_vs_fp32']:.3f} of fp32)",
    ]
    if per_layer:
        vals = list(per_layer.values())
        lines.append(f"  per layer  {min(vals):.0f}..{max(vals):.0f} B/token")
    lines.append(f"total        {info['bytes']['total'] / 2**20:.1f} MiB")
    click.echo("\n".join(lines))
    return info
