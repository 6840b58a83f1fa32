"""Measured inputs for the plan past one machine (docs/scale.md): a Llama-3.2-1B-class teacher.

Method
------
Teacher: a Llama-3.2-1B-class model with random weights, built in-process from a LlamaConfig (hidden
2048, 16 blocks, 32 heads / 8 KV heads, MLP 8192, vocabulary 128,256, tied embeddings, rope theta
500,000: 1.24B parameters), float32 on the CPU, weights drawn from normal(0, 0.02) as transformers'
own initialisation does. Nothing is downloaded.

Text: the packaged Wikipedia leads packed into --sequences rows of --seq-len tokens by the packaged
SmolLM2 tokenizer, so every input id is < 49,152. A Llama-3 tokenizer has 128,256 ids: input ids and
top-k ids need uint32 (2 bytes more per id before compression than SmolLM2's uint16), and they are
measured as uint32 here, with the 128,256-row head. The id table (ids by corpus frequency) comes from
the first --table-sequences rows, which include the measured ones, as a build's table comes from its
whole corpus.

1. Forward rate on this CPU: the capture (pipeline.teacher.capture.TeacherCapture: forward, LM head in
   token chunks, top-k, lse at each temperature) over every sequence; then, on one sequence, the decoder
   alone, the LM head alone, and the capture's own work on the head's logits (top-k, lse) alone.
2. Bytes/token: the captured batches replayed through the real writer (pipeline.cache.writer.CacheWriter),
   once per hidden codec (bf16, fp16, int8) and Blosc compressor (zstd, lz4), with --layers cached layers;
   bytes per layer from the shard record. The side data split into its columns with the writer's own
   codecs: top-k ids and logits as one brotli blob of byte planes per chunk, input ids and lse (as byte
   planes) zstd per chunk (the Arrow file's compression); the Arrow file's remaining bytes are its schema
   and framing, a fixed cost per shard file. The id table is stored once per cache, in the manifest.
3. Writer alone (no forward) at this shape, one encode thread and every core: side data only, and with
   the cached layers, hidden states handed over encoded as `cache.encode_on: device` does (the writer
   only compresses, writes and checksums), and encoded by the writer (the CPU path). Each timed write
   puts the captured rows REPLAY times into one shard (each chunk one copy, so compression is unchanged),
   and the side-data-only shard is also written once, which separates the fixed cost per shard.
4. Reader: open_cache(dir, layers=[...]) decoding every sequence of two written caches, as a training
   data-loader worker does.
5. Trained reference: random weights give hidden states and logits that compress unlike a trained
   model's (a random head spreads its top-k ids over the whole vocabulary; random block outputs are
   near-Gaussian). The packaged, trained SmolLM2-135M teacher (d = 576, vocabulary 49,152) runs over
   the same text: its hidden bytes as a fraction of raw bf16 per codec and compressor, and its side
   data per k with ids as uint16 and widened to uint32. The plan uses these ratios, scaled to d = 2048;
   the random-weight values are printed beside them.
6. Plan for --tokens tokens: bytes/token and storage per configuration; the teacher forward's FLOPs
   (2 x the matmul parameters, LM head included, plus causal attention at --plan-seq-len) in H100-hours
   at --mfu of --peak-tflops (an estimate: no GPU was measured); CPU cores per GPU that the writer
   needs at that forward rate, from the writer's measured per-core rate.

    python -m scripts.plan.scale [--sequences 4] [--seq-len 256] [--batch-size 2] [--layers 8] [--topk 64]
    python -m scripts.plan.scale --smoke   # a 2-block, d = 256 teacher of the same vocabulary: checks the
                                           # script end to end in seconds; its numbers mean nothing
"""

from __future__ import annotations

import argparse
import gc
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from scripts import harness  # first: its environment comes before transformers

import numpy as np
import pyarrow as pa
import torch

from pipeline.cache import open_cache
from pipeline.cache.codecs import (
    SIDE_LEVELS, encode_lse, encode_topk_ids, encode_topk_logits, frequency_order, pack_order, rank_table,
)
from pipeline.cache.directory import finalize
from pipeline.cache.manifest import FORMAT_VERSION, id_table_record
from pipeline.cache.spec import LOGITS_LEVEL
from pipeline.cache.storage import Storage
from pipeline.cache.writer import ShardLayout, writer_threads
from pipeline.config import load_config
from pipeline.data.sequences import sequences_from_config
from pipeline.sources.models import load_model, load_tokenizer
from pipeline.teacher.capture import stored_lse
from scripts.replay import capture, encoded_upstream, timed_write, write

# --smoke's teacher: LLAMA_1B's vocabulary, 2 blocks of d = 256
SMOKE = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
TRAINED = harness.PACKAGED_TEACHER
CODECS = ("bf16", "fp16", "int8")
COMPRESSORS = ("zstd", "lz4")
TEMPERATURES = [1.0, 2.0]
HIDDEN_LEVEL = 3  # cache.compression_level's default
REPEATS = 2  # timed writer/reader passes; the fastest counts (the cores are shared)
REPLAY = 4  # writer timings write the captured rows this many times into one shard (fixed per-shard costs)


# ----------------------------------------------------------------------------- teacher and text


def matmul_params(model: torch.nn.Module) -> int:
    """Weights a forward multiplies by, per token: every Linear (the LM head included, tied or not)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def packaged_text(n_rows: int, seq_len: int):
    """[n_rows, seq_len] int32 token rows of the packaged Wikipedia leads (SmolLM2 tokenizer), and the
    tokenizer's rate on this CPU (tokens/s)."""
    cfg = load_config(harness.DEMO_CONFIG, [f"data.num_sequences={n_rows}", f"data.seq_len={seq_len}",
                                            "data.heldout_fraction=0"])
    tok = load_tokenizer(TRAINED)
    t0 = time.perf_counter()
    rows = sequences_from_config(cfg.data, tok).input_ids
    return rows, rows.size / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------- capture


def forward_parts(model, ids: np.ndarray, topk: int) -> tuple[float, float, float]:
    """Seconds of the decoder alone, the LM head alone, and the capture's top-k + lse (capture.stored_lse)
    on the same rows (the head's fp32 logits in one chunk of at most 1024 tokens, as the capture does)."""
    x = torch.from_numpy(ids).long()
    with torch.inference_mode():
        t0 = time.perf_counter()
        h = model.get_decoder()(input_ids=x, use_cache=False).last_hidden_state
        t1 = time.perf_counter()
        z = model.get_output_embeddings()(h.reshape(-1, h.shape[-1])[:1024]).float()
        t2 = time.perf_counter()
        v, i = torch.topk(z, topk, dim=-1)
        stored_lse(z, v, i, v.half().float(), TEMPERATURES)
        t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def with_topk(batches: list[dict], k: int) -> list[dict]:
    """The captured top-K (sorted by value) cut to its first k entries: the top-k."""
    return [dict(b, topk_ids=np.ascontiguousarray(b["topk_ids"][..., :k]),
                 topk_logits=np.ascontiguousarray(b["topk_logits"][..., :k])) for b in batches]


def joined(batches: list[dict], key: str) -> np.ndarray:
    return np.concatenate([b[key] for b in batches], axis=1 if key == "lse" else 0)


def side_bytes(batches: list[dict], order: np.ndarray, chunk: int) -> dict[str, float]:
    """Bytes/token of each side-data column as the writer stores it (order's dtype = the id width)."""
    ids, topk_ids, logits, lse = (joined(batches, k) for k in ("input_ids", "topk_ids", "topk_logits", "lse"))
    codec = pa.Codec("brotli", compression_level=SIDE_LEVELS["brotli"])  # the default cache.side_compressor
    zstd = pa.Codec("zstd", compression_level=LOGITS_LEVEL)
    rank_of = rank_table(order)

    def blobs(encode, a: np.ndarray) -> int:  # one blob per chunk
        return sum(len(codec.compress(encode(a[s : s + chunk]), asbytes=True)) for s in range(0, len(a), chunk))

    def chunks(a: np.ndarray) -> int:
        return sum(len(zstd.compress(np.ascontiguousarray(a[s : s + chunk]).tobytes(), asbytes=True))
                   for s in range(0, len(a), chunk))

    out = {
        "top-k ids": blobs(lambda a: encode_topk_ids(a, rank_of), topk_ids.astype(order.dtype)),
        "top-k logits": blobs(encode_topk_logits, logits),
        "lse": sum(chunks(encode_lse(lse[j])) for j in range(len(lse))),
        "input ids": chunks(ids.astype(order.dtype)),
    }
    return {k: v / ids.size for k, v in out.items()}


def side_levels(batches: list[dict], order: np.ndarray, chunk: int) -> list[tuple[str, float, float]]:
    """(compressor, B/token of top-k ids + logits, tokens/s on one core) for a few codecs and levels."""
    topk_ids, logits = joined(batches, "topk_ids").astype(order.dtype), joined(batches, "topk_logits")
    rank_of = rank_table(order)
    planes = [p for s in range(0, len(logits), chunk)
              for p in (encode_topk_ids(topk_ids[s : s + chunk], rank_of), encode_topk_logits(logits[s : s + chunk]))]
    tokens = topk_ids.shape[0] * topk_ids.shape[1]
    out = []
    for name, level in (("brotli", 5), ("brotli", 9), ("brotli", 10), ("brotli", 11), ("zstd", 9), ("zstd", 19)):
        codec = pa.Codec(name, compression_level=level)
        t0 = time.perf_counter()
        n = sum(len(codec.compress(p, asbytes=True)) for p in planes)
        out.append((f"{name} {level}", n / tokens, tokens / (time.perf_counter() - t0)))
    return out


def layout_for(seq_len: int, topk: int, layers, codec: str, compressor: str, order: np.ndarray, n_rows: int,
               chunk: int) -> ShardLayout:
    return ShardLayout(
        seq_len=seq_len, topk=topk, layers=tuple(layers), n_temps=len(TEMPERATURES), hidden_codec=codec,
        id_dtype=order.dtype.name, padded=False, chunk_sequences=chunk, hidden_level=HIDDEN_LEVEL,
        logits_level=LOGITS_LEVEL, train_sequences=n_rows, hidden_compressor=compressor, id_order=order.tobytes(),
    )


def finish_cache(root: Path, layout: ShardLayout, n_rows: int, d: int, vocab: int) -> None:
    """A manifest over the one written shard, so open_cache can read it."""
    header = {
        "format_version": FORMAT_VERSION, "fingerprint": {"measurement": "scripts/plan/scale.py"},
        "teacher": {"model": "random", "model_type": "llama", "num_layers": 0, "hidden_size": d,
                    "vocab_size": vocab, "dtype": "float32"},
        "seq_len": layout.seq_len, "num_sequences": n_rows, "packing": True, "topk": layout.topk,
        "temperatures": TEMPERATURES, "layers": list(layout.layers), "logit_dtype": "fp16",
        "id_dtype": layout.id_dtype, "hidden_codec": layout.hidden_codec, "hidden_codec_bound": "",
        "side_compressor": layout.side_compressor,
        "split": {"train": [0, n_rows], "heldout": [n_rows, n_rows]},
        "shard_sequences": n_rows, "chunk_sequences": layout.chunk_sequences,
        "id_order": id_table_record(pack_order(layout.order())),
    }
    finalize(root, header, 1)


def read_rate(root: Path, layers: list[int], logits: bool = True) -> float:
    """Tokens/s of decoding every sequence (fresh reader: every chunk read and decoded once)."""
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        c = open_cache(root, layers=layers, logits=logits)
        for i in range(len(c)):
            c[i]
        best = min(best, time.perf_counter() - t0)
    return len(c) * c.seq_len / best


# ----------------------------------------------------------------------------- the measurements, in order


@dataclass
class Plan:
    """What the measurements share: the command line, the text and what each section measured."""

    args: argparse.Namespace
    work: Path
    cores: int
    table_rows: np.ndarray  # the id table's rows; the first `n` are the measured ones
    trained: dict = field(default_factory=dict)  # the SmolLM2 reference: td, tv, side, hidden, levels
    random: dict = field(default_factory=dict)  # the 1B-class teacher: d, vocab, depth, mm_params, layers, side, hidden
    seconds: dict = field(default_factory=dict)  # one encode thread's seconds per token: ("side",) | (codec, compressor, n)

    @property
    def n(self) -> int:
        return self.args.sequences

    @property
    def ids(self) -> np.ndarray:
        return self.table_rows[: self.n]

    @property
    def chunk(self) -> int:
        return min(8, self.n)  # cache.chunk_sequences (8 by default): one chunk here, no padded edge chunk

    @property
    def tokens(self) -> int:
        return self.n * self.args.seq_len

    def layout(self, layers, codec: str, compressor: str, order: np.ndarray) -> ShardLayout:
        return layout_for(self.args.seq_len, self.args.topk, layers, codec, compressor, order, self.n, self.chunk)


def trained_reference(p: Plan) -> None:
    """The packaged, trained SmolLM2-135M over the same text: its side data per k (ids as uint16 and widened
    to uint32), its hidden bytes per codec and compressor, its top-k blobs per compressor level."""
    k = p.args.topk
    model, _ = load_model(TRAINED)
    td, tv, tn = model.config.hidden_size, model.config.vocab_size, model.config.num_hidden_layers
    layers = sorted({round(tn * (i + 1) / p.args.layers) for i in range(p.args.layers)})
    batches, _ = capture(model, p.ids, layers, 2 * k, TEMPERATURES, p.args.batch_size)
    del model
    order16 = frequency_order(p.table_rows, tv, np.uint16)
    side = {(kk, w): side_bytes(with_topk(batches, kk), order16.astype(w), p.chunk)
            for kk in (k // 2, k, 2 * k) for w in (np.uint16, np.uint32)}
    hidden = {}  # (codec, compressor) -> mean B/token per layer
    for codec in CODECS:
        for cname in COMPRESSORS:
            rec = write(p.work / "trained", p.layout(layers, codec, cname, order16), with_topk(batches, k), p.cores).records[0]
            hidden[codec, cname] = sum(rec["bytes"]["hidden"].values()) / len(layers) / p.tokens
    levels = side_levels(with_topk(batches, k), order16.astype(np.uint32), p.chunk)
    p.trained = {"td": td, "tv": tv, "side": side, "hidden": hidden, "levels": levels}


def random_forward(p: Plan) -> list[dict]:
    """The 1B-class teacher with random weights: the capture over every sequence, then the decoder, the head and
    the capture's own work alone on one sequence. Returns the captured rows (top-2k)."""
    args, k = p.args, p.args.topk
    t0 = time.perf_counter()
    config = harness.llama1b_config(**(SMOKE if args.smoke else {}))
    model = harness.random_model(config)
    d, vocab, depth = config.hidden_size, config.vocab_size, config.num_hidden_layers
    params, mm_params = sum(x.numel() for x in model.parameters()), matmul_params(model)
    print(f"teacher: random Llama, d {d}, {depth} blocks, vocabulary {vocab}, {params / 1e9:.3f}B parameters "
          f"({mm_params / 1e9:.3f}B in matmuls per token), built in {time.perf_counter() - t0:.0f} s")
    layers = sorted({max(1, round(depth * (i + 1) / args.layers)) for i in range(args.layers)})
    batches, t_capture = capture(model, p.ids, layers, 2 * k, TEMPERATURES, args.batch_size)
    t_dec, t_head, t_epi = forward_parts(model, p.ids[:1], 2 * k)
    del model
    gc.collect()
    p.random = {"d": d, "vocab": vocab, "depth": depth, "mm_params": mm_params, "layers": layers,
                "order": frequency_order(p.table_rows, vocab, np.uint32)}
    t_len = args.seq_len
    print("\n## Forward on this CPU (fp32)\n\n| pass | tokens/s | ms/token |\n|---|---:|---:|")
    for name, sec, ntok in (("decoder (blocks + final norm), one sequence", t_dec, t_len),
                            ("LM head matmul, one sequence", t_head, t_len),
                            (f"top-{2 * k} + lse at {len(TEMPERATURES)} T over the head's logits, one sequence",
                             t_epi, t_len),
                            ("capture (all of the above), all batches", t_capture, p.tokens)):
        print(f"| {name} | {ntok / sec:.1f} | {1e3 * sec / ntok:.1f} |")
    return batches


def side_tables(p: Plan, batches: list[dict]) -> None:
    """Side data per column and k, both teachers; the top-k blobs per compressor level."""
    k, vocab, tv, order32 = p.args.topk, p.random["vocab"], p.trained["tv"], p.random["order"]
    print(f"\n## Side data, B/token (fp16 logits, {len(TEMPERATURES)} fp32 lse, input ids)\n")
    print("| teacher | ids | k | top-k ids | top-k logits | lse | input ids | total |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    p.random["side"] = {}
    for kk in (k // 2, k, 2 * k):
        p.random["side"][kk] = side_bytes(with_topk(batches, kk), order32, p.chunk)
        rows = [(f"random 1B-class (V={vocab})", "uint32", p.random["side"][kk])]
        rows += [(f"trained SmolLM2-135M (V={tv})", np.dtype(w).name, p.trained["side"][kk, w])
                 for w in (np.uint16, np.uint32)]
        for name, width, s in rows:
            print(f"| {name} | {width} | {kk} | " + " | ".join(f"{v:.1f}" for v in s.values())
                  + f" | {sum(s.values()):.1f} |")
    r_levels = side_levels(with_topk(batches, k), order32, p.chunk)
    print(f"\ntop-k ids + logits (k={k}, uint32 ids) per compressor, one core:\n")
    print("| compressor | trained SmolLM2 B/token | tokens/s | random 1B-class B/token | tokens/s |")
    print("|---|---:|---:|---:|---:|")
    for (name, per_tok, rate), (_, r_tok, r_rate) in zip(p.trained["levels"], r_levels):
        mark = " (the default)" if name == f"brotli {SIDE_LEVELS['brotli']}" else ""
        print(f"| {name}{mark} | {per_tok:.1f} | {rate:.0f} | {r_tok:.1f} | {r_rate:.0f} |")


def hidden_table(p: Plan, b64: list[dict]) -> None:
    """Hidden bytes per codec and compressor, both teachers; the Arrow file's fixed cost; the checksum rate."""
    d, td, layers, order32 = p.random["d"], p.trained["td"], p.random["layers"], p.random["order"]
    print(f"\n## Hidden states, B/token per layer (Blosc, level {HIDDEN_LEVEL}; raw bf16 = 2 x d)\n")
    print(f"| codec | compressor | random 1B-class (d={d}) | vs raw bf16 | trained SmolLM2 (d={td}) | vs raw bf16 "
          f"| plan: trained ratio x {2 * d} |\n|---|---|---:|---:|---:|---:|---:|")
    p.random["hidden"], arrow_bytes = {}, None
    for codec in CODECS:
        for cname in COMPRESSORS:
            lay = p.layout(layers, codec, cname, order32)
            root = p.work / f"w-{codec}-{cname}"
            rec = write(root, lay, b64, p.cores).records[0]
            if cname == "zstd" and codec in ("bf16", "int8"):
                finish_cache(root, lay, p.n, d, p.random["vocab"])
            r = p.random["hidden"][codec, cname] = sum(rec["bytes"]["hidden"].values()) / len(layers) / p.tokens
            arrow_bytes = rec["bytes"]["arrow"]
            t = p.trained["hidden"][codec, cname]
            ratio_t = t / (2 * td)
            print(f"| {codec} | {cname} | {r:.0f} | {r / (2 * d):.3f} | {t:.0f} | {ratio_t:.3f} | {ratio_t * 2 * d:.0f} |")
    cols = sum(p.random["side"][p.args.topk].values()) * p.tokens
    print(f"\nArrow file of the side data: {arrow_bytes} bytes for {p.tokens} tokens; the columns above account for "
          f"{cols:.0f}; the rest, {arrow_bytes - cols:.0f} bytes, is the file's schema and framing: a fixed cost per "
          f"shard file. The packed id table, {len(pack_order(order32))} bytes, is stored once per cache (manifest)")
    blob = max((p.work / "w-int8-zstd" / "shards").rglob("*"), key=lambda x: x.stat().st_size if x.is_file() else 0)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        Storage(blob.parent).checksum(blob.name)
        best = min(best, time.perf_counter() - t0)
    print(f"checksum (blake2b) rate: {blob.stat().st_size / best / 1e6:.0f} MB/s on one core "
          f"({blob.stat().st_size} bytes, the shard's largest file)")


def seconds_per_token(p: Plan, root: Path, lay: ShardLayout, rows: list[dict], threads: int, replay: int = REPLAY) -> float:
    w = timed_write(root, lay, rows, threads, replay, repeats=REPEATS)
    return w.wall / w.tokens


def writer_table(p: Plan, b64: list[dict]) -> None:
    """The writer alone at this shape: side data only, then half and all the layers, encoded upstream (per
    compressor) or by the writer; one encode thread and every core."""
    layers, order32, cores = p.random["layers"], p.random["order"], p.cores
    print(f"\n## Writer alone at this shape (d={p.random['d']}, k={p.args.topk}, uint32 ids), tokens/s\n")
    print(f"| hidden states | compressor | layers | 1 encode thread | {cores} threads |\n|---|---|---:|---:|---:|")
    side_lay = p.layout([], "bf16", "zstd", order32)
    rates = [1 / seconds_per_token(p, p.work / "w-side", side_lay, b64, threads) for threads in sorted({1, cores})]
    p.seconds["side",] = 1 / rates[0]
    print("| none (side data only) | | 0 | " + " | ".join(f"{r:.0f}" for r in rates) + " |")
    once = seconds_per_token(p, p.work / "w-side", side_lay, b64, 1, replay=1)
    fixed = (once - p.seconds["side",]) * p.tokens * REPLAY / (REPLAY - 1)  # t(1) = fixed + c, t(R) = fixed + R c
    for codec in ("int8", "bf16"):
        up = encoded_upstream(b64, codec)
        for cname in COMPRESSORS:
            for sel in (layers[1::2], layers):
                lay = p.layout(sel, codec, cname, order32)
                rows = [dict(b, encoded={i: b["encoded"][i] for i in sel},
                             token_squares={i: b["token_squares"][i] for i in sel}) for b in up]
                rates = [1 / seconds_per_token(p, p.work / "w-time", lay, rows, threads)
                         for threads in (sorted({1, cores}) if sel is layers else [1])]
                p.seconds[codec, cname, len(sel)] = 1 / rates[0]
                print(f"| {codec}, encoded upstream (encode_on: device) | {cname} | {len(sel)} | "
                      + " | ".join(f"{r:.0f}" for r in rates) + (" | |" if len(rates) == 1 else " |"))
        lay = p.layout(layers, codec, "zstd", order32)
        print(f"| {codec}, encoded by the writer (CPU path) | zstd | {len(layers)} | "
              f"{1 / seconds_per_token(p, p.work / 'w-time', lay, b64, 1):.0f} | |")
    fixed_text = (f"a fixed cost of about {1e3 * fixed:.0f} ms per shard (thread start, the schema, checksums)"
                  if fixed > 0 else "no fixed cost per shard above the timing noise")
    print(f"\n(each write: the {p.tokens} captured tokens {REPLAY} times over as one shard. The side-data-only shard "
          f"written once instead takes {1e3 * once * p.tokens:.0f} ms: {fixed_text}, spread over the tokens above)")


def reader_table(p: Plan) -> None:
    layers = p.random["layers"]
    half = layers[1::2]
    print("\n## Reader (open_cache, one process), tokens/s decoded\n\n| cache | read | tokens/s |\n|---|---|---:|")
    for codec in ("int8", "bf16"):
        root = p.work / f"w-{codec}-zstd"
        for name, sel, logits in ((f"side data + {len(half)} of {len(layers)} layers", half, True),
                                  (f"side data + all {len(layers)} layers", layers, True),
                                  ("side data only", [], True)):
            print(f"| {len(layers)} x {codec}, zstd | {name} | {read_rate(root, sel, logits):.0f} |")


def plan_table(p: Plan) -> None:
    """Bytes, storage, GPU-hours and writer cores for --tokens tokens, from the trained ratios at d = 2048."""
    args, k, r = p.args, p.args.topk, p.random
    d, depth, td = r["d"], r["depth"], p.trained["td"]
    attn = 2 * depth * args.plan_seq_len * d  # causal QK^T and AV, averaged over positions: 2 * 2 * (T/2) * d per block
    flops = 2 * r["mm_params"] + attn
    side_plan, side_random = sum(p.trained["side"][k, np.uint32].values()), sum(r["side"][k].values())
    print(f"\n## Plan: {args.tokens:.3g} tokens, k={k}, fp16 logits, {len(TEMPERATURES)} temperatures, uint32 ids\n")
    print(f"teacher forward: 2 x {r['mm_params'] / 1e9:.3f}B matmul weights + attention 2 x {depth} x "
          f"{args.plan_seq_len} x {d} = {flops / 1e9:.3f} GFLOP/token ({attn / flops:.1%} attention)")
    for mfu in args.mfu:
        rate = args.peak_tflops * 1e12 * mfu / flops
        print(f"  at MFU {mfu:g} of {args.peak_tflops:g} TFLOP/s: {rate:.0f} tokens/s per GPU, "
              f"{args.tokens / rate / 3600:.2f} GPU-hours for {args.tokens:.3g} tokens")
    fwd = args.peak_tflops * 1e12 * args.mfu[0] / flops
    print(f"side data: {side_plan:.1f} B/token (trained SmolLM2 at k={k}, ids widened to uint32; random-weight "
          f"1B-class: {side_random:.1f}), plus the per-shard schema\n")
    print(f"| layers | codec | B/token (hidden + side) | TB | random-weight B/token | writer cores per GPU at MFU "
          f"{args.mfu[0]:g}, zstd (lz4) |\n|---:|---|---:|---:|---:|---:|")
    sec = p.seconds
    for n_layers in sorted({len(r["layers"][1::2]), len(r["layers"]), depth}):
        for codec in ("int8", "bf16", "fp16"):
            total = p.trained["hidden"][codec, "zstd"] / (2 * td) * 2 * d * n_layers + side_plan
            random_total = r["hidden"][codec, "zstd"] * n_layers + side_random
            need = ""
            if (codec, "zstd", n_layers) in sec:
                need = f"{fwd * sec[codec, 'zstd', n_layers]:.0f} ({fwd * sec[codec, 'lz4', n_layers]:.0f})"
            print(f"| {n_layers} | {codec} | {total:.0f} | {args.tokens * total / 1e12:.2f} | {random_total:.0f} "
                  f"| {need} |")
    print(f"| 0 | side data only | {side_plan:.0f} | {args.tokens * side_plan / 1e12:.2f} | {side_random:.0f} "
          f"| {fwd * sec['side',]:.0f} |")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=4, help="sequences run through both teachers")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8, help="cached layers (evenly spaced, the last block included)")
    ap.add_argument("--topk", type=int, default=64, help="k of the written caches; side data is also shown at k/2, 2k")
    ap.add_argument("--table-sequences", type=int, default=512, help="rows the id frequency table is counted over")
    ap.add_argument("--tokens", type=float, default=1e9, help="plan: cache size in tokens")
    ap.add_argument("--plan-seq-len", type=int, default=2048, help="plan: sequence length (attention FLOPs)")
    ap.add_argument("--peak-tflops", type=float, default=989.4, help="plan: dense bf16 peak of one GPU (H100 SXM)")
    ap.add_argument("--mfu", type=float, nargs="+", default=[0.4, 0.2], help="plan: model FLOPs utilisation(s)")
    ap.add_argument("--smoke", action="store_true", help="a tiny teacher of the same vocabulary (numbers meaningless)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    harness.quiet_transformers()
    cores = writer_threads(0)
    print(f"torch threads {torch.get_num_threads()}, cores {cores}; {args.sequences} x {args.seq_len} tokens, batch "
          f"{args.batch_size}, k {args.topk}, temperatures {TEMPERATURES}")
    table_rows, tok_rate = packaged_text(max(args.table_sequences, args.sequences), args.seq_len)
    print(f"tokenizer (SmolLM2, packaged Wikipedia leads): {tok_rate:.0f} tokens/s on this CPU, "
          f"{table_rows.size} tokens for the id table")
    p = Plan(args, Path(tempfile.mkdtemp(prefix="plan-scale-")), cores, table_rows)
    trained_reference(p)
    batches = random_forward(p)
    side_tables(p, batches)
    b64 = with_topk(batches, args.topk)
    del batches
    hidden_table(p, b64)
    writer_table(p, b64)
    del b64
    reader_table(p)
    plan_table(p)
    shutil.rmtree(p.work, ignore_errors=True)


if __name__ == "__main__":
    main()
