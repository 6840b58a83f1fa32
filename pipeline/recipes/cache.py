"""`distill cache build | verify | info`: the build is pipeline/phase_one.py; verify and info read a cache
(pipeline/cache/info.py says what it holds)."""

from __future__ import annotations

import json

import click

from pipeline.cache.info import cache_facts, target_kind_bytes
from pipeline.cache.reader import Cache
from pipeline.errors import PipelineError
from pipeline.phase_one import build_cache

__all__ = ["build_cache", "cache_info", "verify_cache"]


# ----------------------------------------------------------------------------- verify / info


def verify_cache(cache_dir: str, storage_options: dict | None = None) -> None:
    c = Cache(cache_dir, storage_options=storage_options, require_files=False)  # a missing file is a finding
    bad = c.problems()
    if bad:
        rel, what = bad[0]
        raise PipelineError(f"{cache_dir}: {len(bad)} bad file(s), first: {rel} {what}; {c.remedy(rel, verified=True)}")
    click.echo(f"{cache_dir}: OK (format {c.manifest['format_version']}, {len(c.manifest['shards'])} shards, "
               f"{len(c)} sequences)")


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
    if info["topk"]:
        lines[-1] += f"; {target_kind_bytes(info, 'topk'):.1f} B/token"
    if info["sampling"]:
        sp = info["sampling"]
        draws = target_kind_bytes(info, "sampled")
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
