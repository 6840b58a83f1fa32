"""scripts/bench/gpu.py at its tiny size on the CPU: every stage yields a row with a positive rate for both
teacher shapes, and the bytes/token it reports are the manifest's."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHAPES = ("smollm2", "llama1b")
SETTINGS = ("default", "zstd-3", "lz4", "brotli-side")


def _load_script():
    return importlib.import_module("scripts.bench.gpu")


def test_tiny_cpu_run_reports_every_stage(tmp_path, capsys):
    bench = _load_script()
    out = tmp_path / "bench.jsonl"
    returned = bench.main(["--size", "tiny", "--device", "cpu", "--out", str(out), "--work", str(tmp_path / "work"),
                           "--keep"])
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == returned  # every row went to the file as it was emitted
    assert not [r for r in rows if "error" in r], [r["error"] for r in rows if "error" in r]
    assert "| shape | stage | tok/s |" in printed and "| teacher shape | forward tok/s |" in printed

    from pipeline.cache import open_cache
    from pipeline.cache.info import summarize

    by = {(r["shape"], r["stage"]): r for r in rows}
    for shape in SHAPES:
        prep = by[(shape, "prepare")]
        assert prep["tokens"] == 4 * 64 and prep["teacher_dtype"] == "float32"
        fwd, cap = by[(shape, "forward")], by[(shape, "capture")]
        assert fwd["tok_per_s"] > 0 and cap["tok_per_s"] > 0
        assert cap["ratio"] == pytest.approx(fwd["seconds"] / cap["seconds"])
        for setting in SETTINGS:
            b = by[(shape, f"build {setting}")]
            assert f"| {shape} | build {setting} " in printed
            assert b["tok_per_s"] > 0 and b["ratio"] > 0 and b["disk_mb_per_s"] > 0
            assert b["ratio"] == pytest.approx(max(b["forward_seconds"], b["disk_seconds"]) / b["seconds"])
            assert b["gpu_busy_pct"] is None  # the CPU: n/a
            phases = b["phases"]  # the build's own step times, inside the time measured around it
            assert phases["loop"] > 0 and all(v >= 0 for v in phases.values())
            assert phases["writer_wait"] <= phases["loop"]
            assert sum(phases[k] for k in ("setup", "loop", "drain", "manifest")) <= b["seconds"]
            # bytes/token: positive, and the manifest's own numbers
            assert b["side_bytes_per_token"] > 0 and b["hidden_bytes_per_token"] > 0
            manifest = open_cache(b["cache_dir"]).manifest
            info = summarize(manifest)
            assert b["side_bytes_per_token"] == pytest.approx(info["bytes_per_token"]["side_data"])
            assert b["hidden_bytes_per_token"] == pytest.approx(info["bytes_per_token"]["hidden_all_layers"])
            positions = manifest["num_sequences"] * manifest["seq_len"]
            assert positions == b["tokens"]
            assert (b["side_bytes_per_token"] + b["hidden_bytes_per_token"]) * positions == pytest.approx(b["manifest_bytes"])
            assert b["manifest_bytes"] <= b["cache_bytes"]  # the folder adds the manifest and shard records
            assert manifest["layers"] == [1, 2, 3, 4]
            assert manifest["hidden_codec"] == {"smollm2": "bf16", "llama1b": "int8"}[shape]
            assert manifest["id_dtype"] == {"smollm2": "uint16", "llama1b": "uint32"}[shape]  # 128,256-wide head
            expected = {"default": ("zstd", "zstd"), "zstd-3": ("zstd", "zstd"), "lz4": ("lz4", "zstd"),
                        "brotli-side": ("zstd", "brotli")}[setting]
            assert (b["hidden_compressor"], b["side_compressor"]) == expected
            assert manifest["fingerprint"]["codecs"]["hidden_level"] == (3 if setting == "zstd-3" else 1)
