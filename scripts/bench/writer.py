"""The cache writer alone against its physical limit: tokens/s per core next to the raw codecs on the same bytes.

Rows are captured once from a teacher, then replayed through the real writer (pipeline.cache.writer.
CacheWriter) with no forward, as a GPU build hands them over: hidden states encoded where the teacher ran
(`cache.encode_on: device`, the writer compresses, writes and checksums) or, the CPU path, as float32 that the
writer encodes too. Each timed write puts the rows `--replay` times into shards of `--shard` sequences (every
chunk one copy of captured rows, so it compresses as the original).

Per setting (hidden compressor and level, side compressor) and shape it prints, as each finishes:
- raw codecs: the same chunks through the same compressors on one thread with nothing else (Blosc on every
  hidden array, the side compressor on the top-k planes): the ceiling of one core;
- the writer with 1 pool thread: tokens/s of wall time and tokens per CPU-second of the whole process (the
  per-core rate: the writer's dispatching thread is counted too), and its ratio to the raw codecs;
- the writer with every core (`cache.writer_threads: 0`): tokens/s and its speed-up over 1 thread;
- bytes per token (hidden + side data).

Shapes: `smollm2`, the packaged SmolLM2-135M teacher (trained, float32 on this CPU) on the packaged Wikipedia
leads, 8 cached layers (bf16), k = 64, ids uint16; `llama1b`, a Llama-3.2-1B-shaped teacher with random weights
(d = 2048, vocabulary 128,256, so ids are uint32), 8 int8 layers, k = 64. Random block outputs compress
unlike a trained model's (near-Gaussian); the rates are what matter here.

    python -m scripts.bench.writer [--shapes smollm2,llama1b] [--sequences 16] [--replay 4] [--out FILE.jsonl]
    python -m scripts.bench.writer --smoke     # tiny shapes: checks the script end to end in seconds
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from scripts import harness  # first: its environment comes before transformers

import numpy as np
import torch

from pipeline.cache.codecs import (
    HIDDEN_CODECS, blosc_codec, compress_chunk, encode_topk_ids, encode_topk_logits, frequency_order, id_dtype,
    rank_table,
)
from pipeline.cache.spec import LOGITS_LEVEL
from pipeline.cache.writer import ShardLayout, writer_threads
from pipeline.config import load_config
from pipeline.data.sequences import sequences_from_config
from pipeline.sources.models import load_model, load_tokenizer
from scripts.harness import Results, table_header, table_row
from scripts.replay import capture, encoded_upstream, timed_write

TEMPERATURES = [1.0, 2.0]
TOPK = 64
CHUNK = 8
# (hidden compressor, level, side compressor): the defaults first (side_compressor auto = zstd with layers cached)
SETTINGS = [("zstd", 1, "zstd"), ("zstd", 3, "zstd"), ("lz4", 1, "zstd"), ("zstd", 1, "brotli")]
# --smoke's Llama: the same vocabulary, 2 blocks of d = 256
SMOKE = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def shapes(smoke: bool) -> dict:
    seq_len = 64 if smoke else 256
    return {
        "smollm2": {"layers": [4, 8, 12, 15, 19, 23, 26, 30], "codec": "bf16", "seq_len": seq_len},
        "llama1b": {"layers": [1, 2] if smoke else [2, 4, 6, 8, 10, 12, 14, 16], "codec": "int8",
                    "seq_len": seq_len, "config": SMOKE if smoke else {}},
    }


def capture_rows(name: str, shape: dict, n: int, batch: int) -> tuple[list[dict], np.ndarray]:
    """The rows of n packaged sequences through the shape's teacher (CPU path: float32 hidden states), and
    the id table of those sequences."""
    cfg = load_config(harness.DEMO_CONFIG, [f"data.num_sequences={n}", f"data.seq_len={shape['seq_len']}",
                                            "data.heldout_fraction=0"])
    if name == "smollm2":
        model, tok = load_model(cfg.teacher.model)
    else:
        model = harness.random_model(harness.llama1b_config(**shape["config"]))
        tok = load_tokenizer(cfg.teacher.model)
    ids = sequences_from_config(cfg.data, tok).input_ids
    rows, _ = capture(model, ids, shape["layers"], TOPK, TEMPERATURES, batch)
    vocab = model.get_output_embeddings().weight.shape[0]
    del model
    return rows, frequency_order(ids, vocab, id_dtype(vocab))


def layout(shape: dict, order: np.ndarray, setting: tuple, n_rows: int) -> ShardLayout:
    compressor, level, side = setting
    return ShardLayout(seq_len=shape["seq_len"], topk=TOPK, layers=tuple(shape["layers"]), n_temps=len(TEMPERATURES),
                       hidden_codec=shape["codec"], id_dtype=order.dtype.name, padded=False, chunk_sequences=CHUNK,
                       hidden_level=level, logits_level=LOGITS_LEVEL, train_sequences=n_rows,
                       hidden_compressor=compressor, id_order=order.tobytes(), side_compressor=side)


def raw_codecs(rows: list[dict], lay: ShardLayout) -> tuple[float, float]:
    """(tokens per second, bytes per token) of the raw compressors alone on the writer's bytes, one thread."""
    rank_of = rank_table(lay.order())
    codec = HIDDEN_CODECS.get(lay.hidden_codec)
    hidden = {i: np.concatenate([r["hidden"][i] for r in rows]) for i in lay.layers}
    ids, logits = (np.concatenate([r[k] for r in rows]) for k in ("topk_ids", "topk_logits"))
    work = []  # what the writer compresses, chunk by chunk, prepared untimed
    for c in range(0, len(ids), CHUNK):
        for i in lay.layers:
            for arr in codec.encode(hidden[i][c : c + CHUNK]).values():
                work.append((blosc_codec(lay.hidden_level, arr.dtype.itemsize, lay.hidden_compressor),
                             np.ascontiguousarray(arr).view(np.uint8).reshape(-1)))
        work.append((lay.side_compressor, encode_topk_ids(ids[c : c + CHUNK], rank_of)))
        work.append((lay.side_compressor, encode_topk_logits(logits[c : c + CHUNK])))
    tokens = ids.shape[0] * ids.shape[1]
    best, size = float("inf"), 0
    for _ in range(2):
        t0 = time.thread_time()
        size = sum(len(compress_chunk(data, how) if isinstance(how, str) else how.encode(data)) for how, data in work)
        best = min(best, time.thread_time() - t0)
    return tokens / best, size / tokens


def measure(work: Path, name: str, shape: dict, setting: tuple, path: str, rows: list[dict], raw: float,
            lay: ShardLayout, args, cores: int) -> dict:
    """One row: the writer on 1 thread and on every core, against the raw codecs."""
    one = timed_write(work / "w", lay, rows, 1, args.replay, args.shard)
    many = timed_write(work / "w", lay, rows, cores, args.replay, args.shard)
    r = {"shape": name, "hidden": f"{shape['codec']} {setting[0]} {setting[1]}", "side": setting[2], "path": path,
         "raw": raw, "one": one.tokens / one.wall, "one_cpu": one.tokens / one.cpu, "many": many.tokens / many.wall,
         "bytes": one.nbytes / one.tokens}
    r["case"] = f"{name}, hidden {r['hidden']}, side {r['side']}, {path}"
    r["headline"] = {"writer tok/CPU-s": r["one_cpu"], "vs raw codecs": r["one_cpu"] / raw,
                     f"{cores} threads tok/s": r["many"]}
    return r


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="smollm2,llama1b")
    ap.add_argument("--sequences", type=int, default=16, help="captured sequences per shape (8 per batch)")
    ap.add_argument("--replay", type=int, default=4, help="times the captured rows are written per timed write")
    ap.add_argument("--shard", type=int, default=64, help="sequences per shard (cache.shard_sequences)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and sizes (the numbers mean nothing)")
    ap.add_argument("--work", default=None, help="folder for the written shards (default: a temporary one)")
    ap.add_argument("--out", metavar="FILE.jsonl", help="append one JSON line per row as it finishes")
    args = ap.parse_args(argv)
    harness.quiet_transformers()
    cores = writer_threads(0)
    results = Results("writer", args.out)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-writer-"))
    print(f"cores: {cores}; torch threads: {torch.get_num_threads()}; rows replayed {args.replay}x into shards of "
          f"{args.shard} sequences\n")
    print(table_header("shape", "hidden", "side", "path", ">raw codecs tok/s", ">writer, 1 thread: tok/s (per CPU-s)",
                       ">vs raw", f">writer, {cores} threads: tok/s", ">vs 1 thread", ">B/token"), flush=True)
    for name in args.shapes.split(","):
        shape = shapes(args.smoke)[name]
        n = 2 if args.smoke else args.sequences
        rows, order = capture_rows(name, shape, n, batch=min(8, n))
        paths = {"device-encoded": encoded_upstream(rows, shape["codec"]), "writer-encoded": rows}
        for setting in SETTINGS:
            lay = layout(shape, order, setting, n)
            raw, _ = raw_codecs(rows, lay)
            for path, replayed in paths.items():
                if path == "writer-encoded" and setting != SETTINGS[0]:
                    continue  # the CPU path once, at the defaults
                r = results.add(measure(work, name, shape, setting, path, replayed, raw, lay, args, cores))
                print(table_row(name, r["hidden"], r["side"], path, f"{raw:,.0f}", f"{r['one']:,.0f} ({r['one_cpu']:,.0f})",
                                f"{r['one_cpu'] / raw:.2f}", f"{r['many']:,.0f}", f"{r['many'] / r['one']:.2f}x",
                                f"{r['bytes']:,.0f}"), flush=True)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return results.rows


if __name__ == "__main__":
    main()
