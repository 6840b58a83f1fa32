"""A teacher's captured rows replayed through the real cache writer, with no forward: what the writer
benchmark (scripts/bench/writer.py) and the capacity plan (scripts/plan/scale.py) both time.

Rows are dicts as `CacheWriter.put_rows` takes them: input_ids, topk_ids, topk_logits, lse, and either
`hidden` (float32 block outputs, which the writer encodes: the CPU path) or `encoded` + `token_squares`
(what a GPU capture hands over with `cache.encode_on: device`; the writer only compresses, writes and
checksums).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.cache.codecs import HIDDEN_CODECS, host_array
from pipeline.cache.writer import CacheWriter, ShardLayout, slice_rows
from pipeline.teacher.capture import TeacherCapture


def capture(model, ids: np.ndarray, layers: list[int], topk: int, temperatures: list[float], batch: int
            ) -> tuple[list[dict], float]:
    """Every batch of `ids` through TeacherCapture (fp16 logits, float32 hidden states) -> (writer rows per
    batch, seconds of capture)."""
    cap = TeacherCapture(model, layers, topk, temperatures, "fp16")
    rows, seconds = [], 0.0
    for b in range(0, len(ids), batch):
        t0 = time.perf_counter()
        c = cap(torch.from_numpy(ids[b : b + batch]).long())
        seconds += time.perf_counter() - t0
        rows.append({"input_ids": ids[b : b + batch], "topk_ids": c.topk_ids, "topk_logits": c.topk_logits,
                     "lse": c.lse, "hidden": c.hidden})
    cap.close()
    return rows, seconds


def encoded_upstream(rows: list[dict], codec: str) -> list[dict]:
    """Rows as a GPU capture hands them over (encode_on: device): each layer through the codec's torch path,
    as the capture runs it, and each token's sum of squares; no float32 hidden states."""
    c = HIDDEN_CODECS.get(codec)
    out = []
    for r in rows:
        h = {i: torch.from_numpy(x) for i, x in r["hidden"].items()}
        out.append({k: v for k, v in r.items() if k != "hidden"}
                   | {"encoded": {i: {s: host_array(t) for s, t in c.encode_torch(x).items()} for i, x in h.items()},
                      "token_squares": {i: x.square().sum(-1).double().numpy() for i, x in h.items()}})
    return out


@dataclass
class Written:
    wall: float  # seconds
    cpu: float  # CPU seconds of the whole process (every thread)
    tokens: int
    nbytes: int  # the files written
    records: list[dict]  # the shard records


def write(root: Path, layout: ShardLayout, rows: list[dict], threads: int, shard: int | None = None) -> Written:
    """All rows through one CacheWriter into shards of `shard` sequences (one shard when None), captured
    batches split where a shard ends, into a fresh `root`."""
    shutil.rmtree(root, ignore_errors=True)
    (root / "shards").mkdir(parents=True)
    n = sum(len(r["input_ids"]) for r in rows)
    shard = shard or n
    layout = ShardLayout(**{**vars(layout), "train_sequences": n})
    w0, c0 = time.perf_counter(), time.process_time()
    with CacheWriter(root, layout, threads=threads) as w:
        queue = list(rows)
        for s in range(0, n, shard):
            m = min(shard, n - s)
            w.open_shard(s // shard, s, m)
            while m:
                r = queue.pop(0)
                take = min(m, len(r["input_ids"]))
                if take < len(r["input_ids"]):
                    queue.insert(0, slice_rows(r, take, len(r["input_ids"])))
                    r = slice_rows(r, 0, take)
                w.put_rows(s // shard, r)
                m -= take
            w.end_shard(s // shard)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    nbytes = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return Written(wall, cpu, n * layout.seq_len, nbytes, list(w.records))


def timed_write(root: Path, layout: ShardLayout, rows: list[dict], threads: int, replay: int,
                shard: int | None = None, repeats: int = 2) -> Written:
    """The fastest (wall time) of `repeats` writes of the rows `replay` times over. Each copy of the rows fills
    whole chunks when the captured batches do, so the copies compress like the original."""
    return min((write(root, layout, rows * replay, threads, shard) for _ in range(repeats)), key=lambda w: w.wall)
