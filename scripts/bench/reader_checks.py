"""The reader's checksums against none: the training loader's tokens/s with every cache file checked the first
time it is read (the default) and with the checks off (DISTILL_CACHE_CHECKS=0), side by side in one run.

The cache: the packaged SmolLM2-135M teacher over the packaged Wikipedia leads (configs/demo.yaml's data, seq_len
256), hidden layers 10 and 30 at bf16, `cache.logits: topk+sampled+exact` (k = 64, K = 64 draws; layer 30 is then
stored at `cache.exact_codec`, fp32), built once in a temporary folder.

Per target kind the loader reads, one pass is what training does for an epoch, without workers (as on a CPU):
a fresh CacheDataset of the train split (so every file is checked again: the shard record and the whole Arrow
file when a shard opens, each hidden chunk file when its chunk is first read) through a DataLoader with the
chunk-shuffling sampler and the collate function, batch 4. The cases:
- `topk` + layers 10, 30: logits KD with the hidden-state term (top-k ids and logits, lse, two layers);
- `sampled` + layers 10, 30: the same on the sampled targets;
- `exact`: exact targets (layer 30 at fp32 stands in for the logits), no other layer;
- `reader, every file`: open_cache's read_chunk over every train chunk, every column and cached layer.
Checks on and off alternate, best of `--rounds` samples each (a sample: as many whole passes as take about
`--sample-s`; the machine only ever adds time), timed twice: wall time
(tokens/s) and this process's CPU time over all its threads, Blosc's included (tokens per CPU-second: what the
checks cost, and less disturbed by other processes on a shared machine). The files are in the page cache (the
build just wrote them), so the numbers are the CPU cost of the checks; a cold read pays the disk either way.

    python -m scripts.bench.reader_checks [--sequences 128] [--rounds 7] [--cache DIR] [--out FILE.jsonl]
    python -m scripts.bench.reader_checks --smoke     # 16 sequences of 64 tokens: the script end to end
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from scripts import harness  # first: its environment comes before transformers
from scripts.harness import Results, table_header, table_row

LAYERS = [10, 30]
BATCH = 4


def build(cache_dir: Path, sequences: int, seq_len: int) -> str:
    """The cache at `cache_dir` (built there unless a finished build of the same config is)."""
    from pipeline.config import load_config
    from pipeline.phase_one import build_cache

    cfg = load_config(harness.DEMO_CONFIG, [
        f"cache.dir={cache_dir}", f"data.num_sequences={sequences}", f"data.seq_len={seq_len}",
        f"cache.layers={LAYERS}", "cache.logits=topk+sampled+exact", "cache.samples=64", "cache.topk=64"])
    build_cache(cfg, progress=False)
    return str(cache_dir)


def loader_pass(cache_dir: str, source: str, layers: list[int]) -> int:
    """One epoch of the train split through the training loader; returns its tokens."""
    from torch.utils.data import DataLoader

    from pipeline.train.dataset import CacheDataset, ChunkShuffleSampler, collate

    ds = CacheDataset(cache_dir, "train", layers, 2.0, source=source)
    batches = DataLoader(ds, batch_size=BATCH, sampler=ChunkShuffleSampler(ds.groups, seed=0), collate_fn=collate)
    return sum(batch["input_ids"].numel() for batch in batches)


def reader_pass(cache_dir: str) -> int:
    """read_chunk over every train chunk of a fresh reader (every column and layer); returns its tokens."""
    from pipeline.cache import open_cache

    cache = open_cache(cache_dir)
    chunks = sorted({cache.locate(i)[:2] for i in cache.indices("train")})
    return sum(cache.read_chunk(pos, c)["input_ids"].shape[0] for pos, c in chunks) * cache.seq_len


def timed(fn, checks: bool, passes: int = 1) -> tuple[float, float, int]:
    """(wall s, CPU s of this process, tokens) of `passes` calls of fn() (each a fresh reader: every file checked
    again) with the reader's checks on or off."""
    from pipeline.cache.reader import CHECKS_ENV

    os.environ[CHECKS_ENV] = "1" if checks else "0"
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        tokens = sum(fn() for _ in range(passes))
        return time.perf_counter() - wall, time.process_time() - cpu, tokens
    finally:
        os.environ.pop(CHECKS_ENV, None)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=128, help="cached sequences (15/16 of them train)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7, help="timed samples per case and mode; the best counts")
    ap.add_argument("--sample-s", type=float, default=2.0, help="seconds of one timed sample (whole passes)")
    ap.add_argument("--smoke", action="store_true",
                    help="16 sequences of 64 tokens, 1 round (the numbers mean nothing)")
    ap.add_argument("--cache", metavar="DIR", help="where the cache is built and kept (default: a temporary folder, "
                    "removed at the end); a finished build of the same settings there is reused")
    ap.add_argument("--out", metavar="FILE.jsonl", help="append one JSON line per row as it finishes")
    args = ap.parse_args(argv)
    if args.smoke:
        args.sequences, args.seq_len, args.rounds, args.sample_s = 16, 64, 1, 0.0
    harness.quiet_transformers()
    import torch

    results = Results("reader_checks", args.out)
    work = Path(tempfile.mkdtemp(prefix="bench-reader-checks-"))
    try:
        t0 = time.perf_counter()
        cache_dir = build(Path(args.cache) if args.cache else work / "cache", args.sequences, args.seq_len)
        print(f"cache: {args.sequences} x {args.seq_len} tokens, layers {LAYERS}, topk+sampled+exact, built in "
              f"{time.perf_counter() - t0:.0f} s; torch threads {torch.get_num_threads()}; best of {args.rounds}\n",
              flush=True)
        cases = {
            f"loader: topk + layers {LAYERS}": lambda: loader_pass(cache_dir, "topk", LAYERS),
            f"loader: sampled + layers {LAYERS}": lambda: loader_pass(cache_dir, "sampled", LAYERS),
            "loader: exact (layer 30 fp32)": lambda: loader_pass(cache_dir, "exact", []),
            "reader, every file": lambda: reader_pass(cache_dir),
        }
        print(table_header("pass", ">checks on: tok/s", ">checks off: tok/s", ">on / off", ">on: tok/CPU-s",
                           ">off: tok/CPU-s", ">on / off (CPU)"), flush=True)
        for case, fn in cases.items():
            timed(fn, True)  # warm: imports, page cache
            passes = max(1, math.ceil(args.sample_s / timed(fn, True)[0]))  # a timed sample of about sample_s
            wall = {True: float("inf"), False: float("inf")}
            cpu = dict(wall)
            tokens = 0
            for r in range(args.rounds):
                for checks in ((True, False) if r % 2 == 0 else (False, True)):
                    w, c, tokens = timed(fn, checks, passes)
                    wall[checks], cpu[checks] = min(wall[checks], w), min(cpu[checks], c)
            on, off, on_cpu, off_cpu = (tokens / x for x in (wall[True], wall[False], cpu[True], cpu[False]))
            results.add({"case": case, "tokens": tokens, "on_tok_per_s": on, "off_tok_per_s": off, "ratio": on / off,
                         "on_tok_per_cpu_s": on_cpu, "off_tok_per_cpu_s": off_cpu, "cpu_ratio": on_cpu / off_cpu,
                         "rounds": args.rounds,
                         "headline": {"on tok/s": on, "off tok/s": off, "on/off": on / off,
                                      "on/off CPU": on_cpu / off_cpu}})
            print(table_row(case, f"{on:,.0f}", f"{off:,.0f}", f"{on / off:.3f}", f"{on_cpu:,.0f}", f"{off_cpu:,.0f}",
                            f"{on_cpu / off_cpu:.3f}"), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results.rows


if __name__ == "__main__":
    main()
