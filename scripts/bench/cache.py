"""Phase-one benchmark, measured side by side in one run on the packaged SmolLM2 teacher.

1. Time: a plain teacher forward over N sequences (the physical limit) vs the whole cache build of
   the same sequences (loading the teacher, digests, capture hooks, top-k, lse, encoding, compression,
   writing, manifest), with the build's own step times. The writer alone against its raw codecs is
   scripts/bench/writer.py; a GPU's run of both is scripts/bench/gpu.py.
2. Size: bytes/token of the logit side data, and of one hidden layer under each codec (the same
   captured block outputs written through each codec's real Zarr path).

    python -m scripts.bench.cache [--sequences 32] [--layers 8] [--batch-size 8] [--repeats 2] [--out FILE.jsonl]
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

from pipeline.cache import open_cache
from pipeline.cache.codecs import HIDDEN_CODECS, zarr_compressor
from pipeline.cache.info import summarize
from pipeline.config import load_config
from pipeline.data.sequences import sequences_from_config
from pipeline.phase_one import build_cache
from pipeline.sources.models import load_model
from pipeline.teacher.capture import TeacherCapture
from scripts.harness import Results, table_header, table_row

PROBE_LAYER = 15  # the hidden layer written through every codec


def forward_only(model, ids: torch.Tensor, batch: int) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(ids), batch):
            model(input_ids=ids[b : b + batch], use_cache=False)
    return time.perf_counter() - t0


def full_build(cfg, cache_dir: Path) -> tuple[float, dict]:
    shutil.rmtree(cache_dir, ignore_errors=True)
    steps: dict = {}
    t0 = time.perf_counter()
    build_cache(cfg, progress=False, timings=steps)
    return time.perf_counter() - t0, steps


def time_table(cfg, layers: list[int], n_tok: int, f: float, b: float, steps: dict, results: Results) -> None:
    """The forward and the build side by side, with the build's steps."""
    c = cfg.cache
    build = (f"whole cache build ({len(layers)} layers, {c.hidden_codec}; hidden {c.hidden_compressor} "
             f"{c.compression_level})")
    results.add({"case": "teacher forward only", "seconds": f, "tok_per_s": n_tok / f,
                 "headline": {"tok/s": n_tok / f}})
    results.add({"case": build, "seconds": b, "tok_per_s": n_tok / b, "vs_forward": b / f, "steps": steps,
                 "headline": {"tok/s": n_tok / b, "x forward": b / f}})
    print("\n" + table_header("pass", ">seconds", ">tokens/s", ">ratio"), flush=True)
    print(table_row("teacher forward only", f"{f:.1f}", f"{n_tok / f:.0f}", "1.00"))
    print(table_row(build, f"{b:.1f}", f"{n_tok / b:.0f}", f"{b / f:.2f}"))
    print(table_row("of it: setup (teacher, digest, corpus, spec, claim)", f"{steps['setup']:.1f}", "",
                    f"{steps['setup'] / f:.2f}"))
    print(table_row(f"of it: capture loop (teacher waiting on the writer {steps['writer_wait']:.2f} s)",
                    f"{steps['loop']:.1f}", f"{n_tok / steps['loop']:.0f}", f"{steps['loop'] / f:.2f}"))
    drain = steps["drain"] + steps["manifest"]
    print(table_row("of it: writer drain + manifest", f"{drain:.1f}", "", f"{drain / f:.2f}"), flush=True)


def side_data(cfg, cache_dir: Path, results: Results) -> None:
    info = summarize(open_cache(cache_dir).manifest)
    side = info["bytes_per_token"]["side_data"]
    c = cfg.cache
    raw = c.topk * 4 + 8 + 2
    ratio = info["compression_ratio"]["side_data_vs_raw"]
    results.add({"case": f"logit side data (k={c.topk})", "bytes_per_token": side, "vs_raw": ratio,
                 "headline": {"B/token": side, "vs raw": ratio}})
    print(f"\nlogit side data (k={c.topk}, {c.logit_dtype}, {len(c.temperatures)} temperatures, ids uint16, input ids "
          f"included): {side:.1f} B/token (raw {raw} B/token, ratio {ratio:.2f})")


def codec_sizes(model, ids: torch.Tensor, cfg, work: Path, batch: int, results: Results) -> None:
    """One hidden layer's captured block outputs through every codec's real zarr path."""
    import zarr

    cap = TeacherCapture(model, [PROBE_LAYER], 8, [1.0], "fp16")
    hidden = np.concatenate([cap(ids[b : b + batch]).hidden[PROBE_LAYER] for b in range(0, len(ids), batch)])
    cap.close()
    d = hidden.shape[-1]
    print(f"\nhidden layer {PROBE_LAYER} (d={d}), per codec:\n"
          + table_header("codec", ">B/token", ">vs raw bf16", ">vs fp32", ">max rel err", ">min cosine"))
    for name in HIDDEN_CODECS.names():
        codec = HIDDEN_CODECS.get(name)
        store = work / f"codec-{name}.zarr"
        g = zarr.open_group(store=str(store), mode="w", zarr_format=3)
        for suffix, arr in codec.encode(hidden).items():
            a = g.create_array(suffix or "data", shape=arr.shape, chunks=(cfg.cache.chunk_sequences,) + arr.shape[1:],
                               dtype=arr.dtype, compressors=[zarr_compressor(cfg.cache.compression_level, arr.dtype.itemsize)])
            a[:] = arr
        nbytes = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
        back = codec.decode({("" if k == "data" else k): g[k][:] for k in g.array_keys()})
        err = np.abs(back - hidden).max() / np.abs(hidden).max()
        cos = (back * hidden).sum(-1) / (np.linalg.norm(back, axis=-1) * np.linalg.norm(hidden, axis=-1))
        per_tok = nbytes / hidden.shape[0] / hidden.shape[1]
        results.add({"case": f"hidden layer {PROBE_LAYER}, {name}", "bytes_per_token": per_tok,
                     "max_rel_err": float(err), "min_cosine": float(cos.min()), "headline": {"B/token": per_tok, "max rel err": float(err)}})
        print(table_row(name, f"{per_tok:.0f}", f"{per_tok / (2 * d):.2f}", f"{per_tok / (4 * d):.3f}", f"{err:.1e}",
                        f"{cos.min():.5f}"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--layers", type=int, default=8, help="hidden layers cached (evenly spaced up to 30)")
    ap.add_argument("--repeats", type=int, default=2, help="forward and build each timed this often (the best counts)")
    ap.add_argument("--out", metavar="FILE.jsonl", help="append one JSON line per result as it finishes")
    args = ap.parse_args(argv)
    harness.quiet_transformers()
    results = Results("cache", args.out)
    layers = sorted({round(30 * (i + 1) / args.layers) for i in range(args.layers)})
    work = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    cfg = load_config(harness.DEMO_CONFIG, [
        f"data.num_sequences={args.sequences}", f"data.seq_len={args.seq_len}", "data.heldout_fraction=0",
        f"cache.batch_size={args.batch_size}", f"cache.layers={layers}", f"cache.dir={work / 'cache'}",
        f"cache.shard_sequences={max(args.batch_size, 32)}",
    ])
    model, tok = load_model(cfg.teacher.model)
    ids = torch.from_numpy(sequences_from_config(cfg.data, tok).input_ids).long()
    print(f"torch threads: {torch.get_num_threads()}, sequences: {args.sequences} x {args.seq_len}, "
          f"batch {args.batch_size}, layers {layers}")
    forward_only(model, ids, args.batch_size)  # warm-up: allocator, kernels
    t_fwd, t_build = [], []
    for _ in range(args.repeats):  # alternated, to spread drift over both
        t_fwd.append(forward_only(model, ids, args.batch_size))
        t_build.append(full_build(cfg, work / "cache"))
    b, steps = min(t_build, key=lambda x: x[0])
    time_table(cfg, layers, ids.numel(), min(t_fwd), b, steps, results)
    side_data(cfg, work / "cache", results)
    codec_sizes(model, ids, cfg, work, args.batch_size, results)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
