"""Logit side data: bytes/token of candidate layouts on real text, and how faithful their logits are.

The teacher (packaged SmolLM2-135M-Instruct) runs once over N packed sequences of the packaged Wikipedia
leads; its fp32 top-k logits, ids and lse are then stored every way below, each column compressed per
chunk of 8 sequences (as the Arrow shards do), and the sizes summed per token:

- input ids (uint16) and the lse at each cached temperature (fp32) are the same in every layout;
- ids and logits are what the layouts change: the order of the k entries (by value as today, by id, or by
  corpus frequency rank), how ids are written (byte planes, or gaps between sorted ids), how logits are
  written (fp16 / bf16 bit patterns as order-preserving keys and neighbour differences, or the gap below
  the position's largest logit in fixed point), and the compressor (zstd at two levels, brotli, lzma).
  "brotli10-seq" compresses each sequence on its own at brotli level 10: format 2's layout, with the
  frequency ranks of the ids (the cache counts them over its whole corpus; here over other rows).
- format 3 (the last row) is the writer's own codecs (codecs.encode_topk_ids / encode_topk_logits /
  encode_lse): per chunk one brotli 10 blob of the ranks' byte planes and one of the fp16 delta keys laid
  out slot by slot, and the lse as byte planes (zstd per chunk, as the Arrow file stores it).

The loss needs only the set {(id, logit)} of each position, so any order is lossless for training.
Faithfulness: the largest error of a stored logit against the fp32 forward, relative to |z| (as the
issue measures fp16: <= 2e-3) and absolute (what log p = z / T - lse inherits).

    python -m scripts.studies.side_data [--sequences 32] [--topk 64] [--out FILE.jsonl]
"""

from __future__ import annotations

import argparse
import lzma
from dataclasses import dataclass

from scripts import harness  # first: its environment comes before transformers

import numpy as np
import pyarrow as pa
import torch

from pipeline.cache.codecs import _float_keys, encode_lse, encode_topk_ids, encode_topk_logits, to_planes
from pipeline.config import load_config
from pipeline.data.sequences import sequences_from_config
from pipeline.sources.models import load_model
from pipeline.teacher.capture import TeacherCapture
from scripts.harness import Results, table_header, table_row

CHUNK = 8  # sequences per compressed chunk, as cache.chunk_sequences
FIXED_STEP = 2.0**-10  # fixed-point step of the "gap below the max" logits: |error| <= 2^-11
CODECS = ("zstd9", "zstd19", "brotli", "lzma", "brotli10-seq")


def compress(data: bytes, how: str) -> int:
    if how.startswith("zstd"):
        return len(pa.Codec("zstd", compression_level=int(how[4:])).compress(data, asbytes=True))
    if how.startswith("brotli"):
        return len(pa.Codec("brotli", compression_level=int(how[6:] or 11)).compress(data, asbytes=True))
    if how == "lzma":
        return len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    raise ValueError(how)


def column_bytes(per_chunk: list[np.ndarray], how: str) -> int:
    """Compressed bytes of each chunk; "...-seq" compresses each sequence (row) on its own instead."""
    if how.endswith("-seq"):
        return sum(compress(np.ascontiguousarray(row).tobytes(), how[:-4]) for a in per_chunk for row in a)
    return sum(compress(np.ascontiguousarray(a).tobytes(), how) for a in per_chunk)


def chunks(a: np.ndarray) -> list[np.ndarray]:
    """[R, T, ...] -> per-chunk [rows, T * ...] arrays."""
    return [a[i : i + CHUNK].reshape(len(a[i : i + CHUNK]), -1) for i in range(0, len(a), CHUNK)]


def fp_keys(x: np.ndarray, dtype: str) -> np.ndarray:
    """Stored logits as uint16 bit patterns (fp16 or bf16)."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    if dtype == "fp16":
        return t.half().numpy().view(np.uint16)
    return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def fp_values(bits: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "fp16":
        return bits.view(np.float16).astype(np.float32)
    return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()


def key_planes(bits: np.ndarray, delta: bool) -> np.ndarray:
    """uint16 bit patterns [R, T, k] -> per-row byte planes, as order-preserving keys (and neighbour
    differences, position by position, as format 2 stored them)."""
    keys = _float_keys(bits)
    if delta:
        deltas = keys.copy()
        deltas[..., 1:] = keys[..., :-1] - keys[..., 1:]  # modulo 2^16
        keys = deltas
    return to_planes(keys.reshape(len(keys), -1))


def id_gap_planes(ids_sorted: np.ndarray) -> np.ndarray:
    """Ascending ids [R, T, k] -> first id and gaps, as byte planes."""
    gaps = ids_sorted.copy()
    gaps[..., 1:] = ids_sorted[..., 1:] - ids_sorted[..., :-1]
    return to_planes(gaps.reshape(len(gaps), -1))


def reorder(order: np.ndarray, *arrays: np.ndarray) -> list[np.ndarray]:
    return [np.take_along_axis(a, order, axis=-1) for a in arrays]


@dataclass
class Captured:
    """The teacher's fp32 top-k over the measured rows, and the corpus frequency ranks of ids."""

    ids_all: np.ndarray  # [R', T] every row read (the measured ones first)
    n: int  # measured rows
    z: np.ndarray  # [R, T, k] fp32 logits, by value
    ids: np.ndarray  # [R, T, k] uint16
    lse: np.ndarray  # [2, R, T]
    rank_of: np.ndarray  # id -> frequency rank (uint16)

    @property
    def tokens(self) -> int:
        return self.ids_all[: self.n].size

    def common(self, how: str) -> int:
        """Bytes of what every layout stores the same way: input ids and the lse planes."""
        return column_bytes(chunks(self.ids_all[: self.n].astype(np.uint16)), how) + sum(
            column_bytes(chunks(self.lse[j]), how) for j in range(self.lse.shape[0]))


def capture(sequences: int, seq_len: int, topk: int) -> Captured:
    cfg = load_config(harness.DEMO_CONFIG, [f"data.num_sequences={sequences * 5}", f"data.seq_len={seq_len}",
                                            "data.heldout_fraction=0"])
    model, tok = load_model(cfg.teacher.model)
    ids_all = sequences_from_config(cfg.data, tok).input_ids
    # corpus frequency ranks from the other 4/5 of the rows (not the measured ones): id -> rank
    counts = np.bincount(ids_all[sequences:].reshape(-1), minlength=model.config.vocab_size)
    rank_of = np.empty(len(counts), dtype=np.uint16)
    rank_of[np.argsort(-counts, kind="stable")] = np.arange(len(counts), dtype=np.uint16)
    x = torch.from_numpy(ids_all[:sequences]).long()
    cap = TeacherCapture(model, [], topk, [1.0, 2.0], "fp32")
    parts = [cap(x[b : b + 8]) for b in range(0, len(x), 8)]
    cap.close()
    return Captured(ids_all, sequences, np.concatenate([p.topk_logits for p in parts]).astype(np.float32),
                    np.concatenate([p.topk_ids for p in parts]).astype(np.uint16),
                    np.concatenate([p.lse for p in parts], axis=1), rank_of)


def float_layouts(c: Captured) -> list[tuple[str, list, np.ndarray]]:
    """Layouts that keep the logits as fp16 / bf16 bit patterns: (name, columns, logits read back)."""
    z, ids, rank_of = c.z, c.ids, c.rank_of
    out = []
    for dt in ("fp16", "bf16"):
        bits = fp_keys(z, dt)
        out.append((f"by value: ids planes, {dt} delta keys (format 1 at {dt})",
                    [to_planes(ids.reshape(len(ids), -1)), key_planes(bits, True)], fp_values(bits, dt)))
    bits = fp_keys(z, "fp16")
    fp16_back = fp_values(bits, "fp16")
    out.append(("by value: frequency-rank planes, fp16 delta keys",
                [to_planes(rank_of[ids].reshape(len(ids), -1)), key_planes(bits, True)], fp16_back))
    i_sorted, z_sorted = reorder(np.argsort(ids, axis=-1, kind="stable"), ids, z)
    out.append(("by id: id gaps, fp16 keys", [id_gap_planes(i_sorted), key_planes(fp_keys(z_sorted, "fp16"), False)],
                fp16_back))
    zr = np.take_along_axis(z, np.argsort(rank_of[ids], axis=-1, kind="stable"), axis=-1)
    out.append(("by frequency rank: rank gaps, fp16 keys",
                [id_gap_planes(np.sort(rank_of[ids], axis=-1)), key_planes(fp_keys(zr, "fp16"), False)], fp16_back))
    return out


def fixed_layouts(c: Captured) -> tuple[list[tuple[str, list, np.ndarray]], bool]:
    """Layouts that store each logit as its fixed-point gap below the position's largest; and whether every gap
    fit in 16 bits."""
    z, ids, rank_of = c.z, c.ids, c.rank_of
    zmax = z[..., :1]
    gap_q = np.rint((zmax - z) / FIXED_STEP).astype(np.uint32)
    fits = bool(gap_q.max() < 2**16)
    gap_q = np.minimum(gap_q, 2**16 - 1).astype(np.uint16)
    z_fixed = zmax - gap_q.astype(np.float32) * FIXED_STEP
    by_id = np.argsort(ids, axis=-1, kind="stable")
    i_sorted, q_sorted = reorder(by_id, ids, gap_q)
    qd = gap_q.copy()
    qd[..., 1:] = gap_q[..., 1:] - gap_q[..., :-1]  # by value: non-decreasing gaps -> small differences
    maxes = zmax.reshape(len(z), -1)
    return [
        ("by id: id gaps, fixed-point gap below max (u16) + max fp32",
         [id_gap_planes(i_sorted), to_planes(q_sorted.reshape(len(q_sorted), -1)), maxes], z_fixed),
        ("by value: ids planes, fixed-point gap deltas (u16) + max fp32",
         [to_planes(ids.reshape(len(ids), -1)), to_planes(qd.reshape(len(qd), -1)), maxes], z_fixed),
        ("by value: rank planes, fixed-point gap deltas (u16) + max fp32",
         [to_planes(rank_of[ids].reshape(len(ids), -1)), to_planes(qd.reshape(len(qd), -1)), maxes], z_fixed),
    ], fits


def codecs_for(name: str) -> list[str]:
    """zstd 9 for every layout; the other compressors for the two frequency/fp16 contenders only."""
    if name.startswith("by value: frequency-rank"):
        return list(CODECS)
    if name.startswith("by value: ids planes, fp16"):
        return [h for h in CODECS if h != "brotli10-seq"]
    return ["zstd9"]


def errors(back: np.ndarray, z: np.ndarray) -> tuple[float, float]:
    """(largest error relative to |z|, largest absolute error) of logits read back."""
    return float(np.max(np.abs(back - z) / np.maximum(np.abs(z), 1e-6))), float(np.max(np.abs(back - z)))


def format3(c: Captured) -> tuple[int, int, np.ndarray]:
    """The writer's own codecs, one blob per chunk and column, lse as byte planes: (ids + logits bytes, total
    bytes, logits read back)."""
    rows = range(0, len(c.ids), CHUNK)
    fp16 = c.z.astype(np.float16)
    side = sum(len(pa.Codec("brotli", compression_level=10).compress(p, asbytes=True)) for a in rows
               for p in (encode_topk_ids(c.ids[a : a + CHUNK], c.rank_of), encode_topk_logits(fp16[a : a + CHUNK])))
    total = side + column_bytes(chunks(c.ids_all[: c.n].astype(np.uint16)), "zstd9") + sum(
        column_bytes([encode_lse(c.lse[j][a : a + CHUNK]) for a in rows], "zstd9") for j in range(c.lse.shape[0]))
    return side, total, fp16.astype(np.float32)


def report(results: Results, name: str, how: str, side: int, total: int, err: tuple[float, float], tokens: int) -> None:
    results.add({"case": f"{name} / {how}", "layout": name, "codec": how, "side_bytes_per_token": side / tokens,
                 "bytes_per_token": total / tokens, "max_rel_err": err[0], "max_abs_err": err[1],
                 "headline": {"ids + logits B/token": side / tokens, "total B/token": total / tokens}})
    print(table_row(name, how, f"{side / tokens:.1f}", f"{total / tokens:.1f}", f"{err[0]:.1e}", f"{err[1]:.1e}"),
          flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--out", metavar="FILE.jsonl", help="append one JSON line per row as it finishes")
    args = ap.parse_args(argv)
    harness.quiet_transformers()
    results = Results("side_data", args.out)
    c = capture(args.sequences, args.seq_len, args.topk)
    print(f"{args.sequences} x {args.seq_len} tokens of wiki-vital, k = {args.topk}, T in {{1, 2}}; "
          f"per-chunk compression ({CHUNK} sequences)\n")
    fixed, fits = fixed_layouts(c)
    print(table_header("layout", "codec", ">ids + logits B/token", ">total B/token", ">max rel err", ">max abs err"))
    floats = float_layouts(c)
    for name, cols, back in floats[:4] + fixed[:1] + floats[4:] + fixed[1:]:  # the table's order
        for how in codecs_for(name):
            side = sum(column_bytes([col[i : i + CHUNK] for i in range(0, len(col), CHUNK)], how) for col in cols)
            report(results, name, how, side, side + c.common(how), errors(back, c.z), c.tokens)
    side, total, back = format3(c)
    report(results, "format 3: rank planes, fp16 delta keys slot-major, one blob per chunk; lse planes",
           "brotli10-chunk", side, total, errors(back, c.z), c.tokens)
    if not fits:
        print("\nnote: some gaps below the max exceeded the u16 fixed-point range and were clipped")


if __name__ == "__main__":
    main()
