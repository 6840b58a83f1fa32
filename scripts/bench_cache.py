"""Phase-one benchmark, measured side by side in one run on the packaged SmolLM2 teacher.

1. Time: a plain teacher forward over N sequences (the physical limit) vs the whole cache build of
   the same sequences (loading the teacher, digests, capture hooks, top-k, lse, encoding, compression,
   writing, manifest), with the build's own step times. The writer alone against its raw codecs is
   scripts/bench_writer.py; a GPU's run of both is scripts/bench_gpu.py.
2. Size: bytes/token of the logit side data, and of one hidden layer under each codec (the same
   captured block outputs written through each codec's real Zarr path).

    python scripts/bench_cache.py [--sequences 32] [--layers 8] [--batch-size 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cache import open_cache  # noqa: E402
from pipeline.cache.codecs import HIDDEN_CODECS, zarr_compressor  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.sequences import sequences_from_config  # noqa: E402
from pipeline.cache.info import summarize  # noqa: E402
from pipeline.phase_one import build_cache  # noqa: E402
from pipeline.sources.models import load_model  # noqa: E402
from pipeline.teacher.capture import TeacherCapture  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--layers", type=int, default=8, help="hidden layers cached (evenly spaced up to 30)")
    ap.add_argument("--repeats", type=int, default=2, help="forward and build each timed this often (the best counts)")
    args = ap.parse_args()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    layers = sorted({round(30 * (i + 1) / args.layers) for i in range(args.layers)})
    work = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    overrides = [
        f"data.num_sequences={args.sequences}", f"data.seq_len={args.seq_len}", "data.heldout_fraction=0",
        f"cache.batch_size={args.batch_size}", f"cache.layers={layers}", f"cache.dir={work / 'cache'}",
        f"cache.shard_sequences={max(args.batch_size, 32)}",
    ]
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml", overrides)
    model, tok = load_model(cfg.teacher.model)
    seqs = sequences_from_config(cfg.data, tok)
    ids = torch.from_numpy(seqs.input_ids).long()
    n_tok = ids.numel()
    print(f"torch threads: {torch.get_num_threads()}, sequences: {args.sequences} x {args.seq_len}, "
          f"batch {args.batch_size}, layers {layers}")

    def forward_only() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for b in range(0, len(ids), args.batch_size):
                model(input_ids=ids[b : b + args.batch_size], use_cache=False)
        return time.perf_counter() - t0

    def full_build() -> tuple[float, dict]:
        shutil.rmtree(work / "cache", ignore_errors=True)
        steps: dict = {}
        t0 = time.perf_counter()
        build_cache(cfg, progress=False, timings=steps)
        return time.perf_counter() - t0, steps

    forward_only()  # warm-up: allocator, kernels
    # alternate to spread drift over both
    t_fwd, t_build = [], []
    for _ in range(args.repeats):
        t_fwd.append(forward_only())
        t_build.append(full_build())
    f = min(t_fwd)
    b, steps = min(t_build, key=lambda x: x[0])
    print("\n| pass | seconds | tokens/s | ratio |\n|---|---:|---:|---:|", flush=True)
    print(f"| teacher forward only | {f:.1f} | {n_tok / f:.0f} | 1.00 |")
    print(f"| whole cache build ({len(layers)} layers, {cfg.cache.hidden_codec}; hidden {cfg.cache.hidden_compressor} "
          f"{cfg.cache.compression_level}) | {b:.1f} | {n_tok / b:.0f} | {b / f:.2f} |")
    print(f"| of it: setup (teacher, digest, corpus, spec, claim) | {steps['setup']:.1f} | | {steps['setup'] / f:.2f} |")
    print(f"| of it: capture loop (teacher waiting on the writer {steps['writer_wait']:.2f} s) | {steps['loop']:.1f} "
          f"| {n_tok / steps['loop']:.0f} | {steps['loop'] / f:.2f} |")
    print(f"| of it: writer drain + manifest | {steps['drain'] + steps['manifest']:.1f} | | "
          f"{(steps['drain'] + steps['manifest']) / f:.2f} |", flush=True)

    manifest = open_cache(work / "cache").manifest
    info = summarize(manifest)
    side = info["bytes_per_token"]["side_data"]
    print(f"\nlogit side data (k={cfg.cache.topk}, {cfg.cache.logit_dtype}, {len(cfg.cache.temperatures)} "
          f"temperatures, ids uint16, input ids included): {side:.1f} B/token "
          f"(raw {cfg.cache.topk * 4 + 8 + 2} B/token, ratio {info['compression_ratio']['side_data_vs_raw']:.2f})")

    # one hidden layer through every codec's real zarr path
    import zarr

    probe = [15]
    cap = TeacherCapture(model, probe, 8, [1.0], "fp16")
    hidden = np.concatenate([cap(ids[b : b + args.batch_size]).hidden[15] for b in range(0, len(ids), args.batch_size)])
    cap.close()
    d = hidden.shape[-1]
    print(f"\nhidden layer 15 (d={d}), per codec:\n| codec | B/token | vs raw bf16 | vs fp32 | max rel err | min cosine |")
    print("|---|---:|---:|---:|---:|---:|")
    bf16_raw = 2 * d
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
        print(f"| {name} | {per_tok:.0f} | {per_tok / bf16_raw:.2f} | {per_tok / (4 * d):.3f} | {err:.1e} | {cos.min():.5f} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
