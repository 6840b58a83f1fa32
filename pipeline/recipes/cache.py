"""Phase one: run the teacher once over the corpus and write the cache. Also `verify` and `info`.

Reads top to bottom: check everything that can be checked cheaply, build the sequences, load the
teacher, claim the directory, then the capture loop feeding the background writer, then the manifest.
Under `torchrun`/`accelerate launch` each rank takes shards s with s % world == rank; rank 0 owns the
lock, the claim and the manifest, so the result equals a single-process build.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import click
import torch
from tqdm import tqdm

from pipeline.cache.codecs import HIDDEN_CODECS, SIDE_LEVELS, frequency_order, pack_order
from pipeline.cache.directory import build_lock, claim, finalize, finished_record, remove_if_empty_claim
from pipeline.cache.manifest import FINGERPRINT_DEFAULTS, FORMAT_VERSION, fingerprint_digest, id_table_record
from pipeline.cache.reader import open_cache
from pipeline.cache.storage import Storage
from pipeline.cache.writer import CacheWriter, ShardLayout, writer_threads
from pipeline.data.sequences import sequences_from_config
from pipeline.errors import PipelineError
from pipeline.sources import models
from pipeline.sources.digest import model_digest, tokenizer_digest
from pipeline.student.layer_map import build_layer_map, read_kept_layers
from pipeline.teacher.capture import TeacherCapture, id_dtype
from pipeline.teacher.sampling import count_dtype

LOGITS_LEVEL = 9  # zstd level of the Arrow record batches (input ids, lse; the top-k blobs are brotli already)


# ----------------------------------------------------------------------------- helpers


def resolve_layers(layers, mapping, student_model: str | None, n_teacher: int) -> list[int]:
    """cache.layers -> sorted teacher layer indices to store."""
    if layers == "all":
        return list(range(0, n_teacher + 1))
    if isinstance(layers, list):
        bad = [i for i in layers if not 0 <= i <= n_teacher]
        if bad:
            raise PipelineError(f"cache.layers: layer {bad[0]} is beyond the teacher's depth (0..{n_teacher})")
        return sorted(set(layers))
    # auto: what mapping.strategy needs for the configured student's depth
    if student_model is None:
        raise PipelineError("cache.layers=auto needs student.model (or set cache.layers to a list or all)")
    n_student = models.text_config(models.load_config(student_model)).num_hidden_layers
    kept = read_kept_layers(student_model) if Path(student_model).is_dir() else None
    layer_map = build_layer_map(mapping.strategy, n_student, n_teacher, mapping.stride, kept)
    return sorted(set(layer_map.values()))


def _dist() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    return (torch.distributed.get_rank(), world) if world > 1 else (0, 1)


def _agree(rank: int, world: int, value):
    """Rank 0's value on every rank (an exception object is re-raised everywhere)."""
    if world > 1:
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        value = box[0]
    if isinstance(value, BaseException):
        raise value
    return value


def _all_ok(world: int, ok: bool) -> bool:
    if world == 1:
        return ok
    flag = torch.tensor([0 if ok else 1])
    torch.distributed.all_reduce(flag)
    return int(flag) == 0


def stored_targets(cc) -> tuple[int, int]:
    """(top-k, draws per position) that cache.logits stores; 0 = none of that kind."""
    return (cc.topk if "topk" in cc.logits else 0), (cc.samples if "sampled" in cc.logits else 0)


def sampling_record(cc) -> dict:
    """The sampled targets' settings, in the fingerprint and the manifest (pipeline/teacher/sampling.py)."""
    return {"samples": cc.samples, "proposal_temperature": float(cc.proposal_temperature), "seed": cc.sample_seed}


# ----------------------------------------------------------------------------- build


def build_cache(cfg, overwrite: bool = False) -> dict | None:
    rank, world = _dist()
    cc, data = cfg.cache, cfg.data
    # 0. where the cache goes: a known protocol with its backend installed, an existing bucket (nothing loaded
    # or written yet)
    root = Storage(cc.dir, cc.storage_options, what="cache.dir")
    if rank == 0:
        root.check_bucket("cache.dir")
    codec = HIDDEN_CODECS.get(cc.hidden_codec)

    # 1. cheap checks on the teacher's config, before anything is written
    tcfg = models.text_config(models.load_config(cfg.teacher.model, cfg.teacher.revision))
    n_teacher = tcfg.num_hidden_layers
    layers = resolve_layers(cc.layers, cfg.mapping, cfg.student.model, n_teacher)

    # 2. sequences, with the teacher's tokenizer
    tokenizer = models.load_tokenizer(cfg.teacher.model, cfg.teacher.revision)
    seqs = sequences_from_config(data, tokenizer)

    # 3. teacher and capture hooks (validates topk against the real head, layers against the depth)
    teacher, _ = models.load_model(cfg.teacher.model, cfg.teacher.dtype, cfg.teacher.revision)
    device = models.pick_device(cfg.teacher.device)
    teacher.to(device)
    # hidden states encoded where the teacher runs (a GPU: only the encoded bytes cross to the host, and the
    # CPU writer only compresses) or on the writer's threads; the same bytes either way
    on_device = cc.encode_on == "device" or (cc.encode_on == "auto" and torch.device(device).type == "cuda")
    topk, samples = stored_targets(cc)
    capture = TeacherCapture(teacher, layers, topk, cc.temperatures, cc.logit_dtype,
                             hidden_codec=codec.name if on_device else None, samples=samples,
                             proposal_temperature=cc.proposal_temperature, sample_seed=cc.sample_seed)
    vocab = capture.vocab_size

    side = f"{cc.side_compressor}-{SIDE_LEVELS[cc.side_compressor]}"
    fingerprint = {
        "format_version": FORMAT_VERSION,
        "teacher_digest": model_digest(teacher),
        "tokenizer_digest": tokenizer_digest(tokenizer),
        "corpus_digest": seqs.digest(),
        "preprocessing": {
            "sources": [vars(s).copy() for s in data.sources], "text_field": data.text_field,
            "num_sequences": data.num_sequences, "heldout_fraction": data.heldout_fraction,
            "packing": data.packing, "seed": data.seed,
        },
        "seq_len": data.seq_len,
        "topk": topk,
        "temperatures": [float(t) for t in cc.temperatures],
        "layers": layers,
        "codecs": {
            "hidden": codec.name, "logits": f"{cc.logit_dtype}/delta-planes/{side}",
            "ids": f"{id_dtype(vocab).name}/frequency-rank-planes/{side}", "hidden_level": cc.compression_level,
            "hidden_compressor": cc.hidden_compressor,
        },
        "capture": {"teacher_dtype": cfg.teacher.dtype, "logits": cc.logits},
        "layout": {"shard_sequences": cc.shard_sequences, "chunk_sequences": cc.chunk_sequences},
    }
    if samples:
        fingerprint["sampling"] = sampling_record(cc)
    n = len(seqs)
    order = frequency_order(seqs.input_ids, vocab, id_dtype(vocab))  # the id table: a function of the corpus
    header = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "fingerprint_digest": fingerprint_digest(fingerprint),
        "teacher": {
            "model": cfg.teacher.model, "model_type": tcfg.model_type, "num_layers": n_teacher,
            "hidden_size": tcfg.hidden_size, "vocab_size": vocab, "dtype": cfg.teacher.dtype,
        },
        "seq_len": data.seq_len, "num_sequences": n, "packing": data.packing,
        "topk": topk, "temperatures": fingerprint["temperatures"], "layers": layers, "logits": cc.logits,
        "logit_dtype": cc.logit_dtype, "id_dtype": id_dtype(vocab).name, "hidden_codec": codec.name,
        "side_compressor": cc.side_compressor,
        "hidden_codec_bound": codec.bound,
        "split": {"train": [0, seqs.n_train], "heldout": [seqs.n_train, n]},
        "shard_sequences": cc.shard_sequences, "chunk_sequences": cc.chunk_sequences,
        "id_order": id_table_record(pack_order(order)),
    }
    if samples:
        header["sampling"] = {**sampling_record(cc), "count_dtype": count_dtype(samples).name}

    # 4. claim the directory (rank 0 holds the lock for the whole build)
    lock = build_lock(root)
    created = not root.exists()
    state: object = None
    if rank == 0:
        try:
            lock.acquire()
            state = claim(root, fingerprint, overwrite)
        except PipelineError as e:
            if lock.held:
                lock.release()
                remove_if_empty_claim(root, created)
            state = e
    state = _agree(rank, world, state)
    try:
        if state == "complete":
            if rank == 0:
                click.echo(f"{root}: already complete with this config; nothing to do", err=True)
            return open_cache(root).manifest

        # 5. which shards this rank still has to write
        n_shards = math.ceil(n / cc.shard_sequences)
        mine = [s for s in range(n_shards) if s % world == rank]
        todo = []
        for s in mine:
            start = s * cc.shard_sequences
            rows = min(cc.shard_sequences, n - start)
            if finished_record(root, s, start, rows) is None:
                todo.append((s, start, rows))
        if rank == 0 and state == "resume":
            click.echo(f"{root}: resuming, {len(mine) - len(todo)} of {len(mine)} shards already written", err=True)

        layout = ShardLayout(
            seq_len=data.seq_len, topk=topk, samples=samples, layers=tuple(layers), n_temps=len(cc.temperatures),
            hidden_codec=codec.name, id_dtype=id_dtype(vocab).name, padded=not data.packing,
            chunk_sequences=cc.chunk_sequences, hidden_level=cc.compression_level, logits_level=LOGITS_LEVEL,
            hidden_compressor=cc.hidden_compressor,
            train_sequences=seqs.n_train,
            id_order=order.tobytes(),
            side_compressor=cc.side_compressor,
        )

        # 6. capture loop: the teacher runs here, encoding and writing on the writer thread
        ok = True
        try:
            total = sum(r for _, _, r in todo) * data.seq_len
            bar = tqdm(total=total, unit="tok", unit_scale=True, desc=f"cache {root.name}", disable=rank != 0)
            with CacheWriter(root, layout, threads=writer_threads(cc.writer_threads)) as writer:
                for s, start, rows in todo:
                    writer.open_shard(s, start, rows)
                    for b in range(start, start + rows, cc.batch_size):
                        e = min(b + cc.batch_size, start + rows)
                        ids = torch.from_numpy(seqs.input_ids[b:e]).long()
                        mask = None
                        batch = {"input_ids": seqs.input_ids[b:e]}
                        if seqs.lengths is not None:
                            lengths = torch.from_numpy(seqs.lengths[b:e]).long()
                            mask = (torch.arange(data.seq_len)[None, :] < lengths[:, None]).long()
                            batch["length"] = seqs.lengths[b:e]
                        cap = capture(ids, mask, sequences=list(range(b, e)))
                        batch.update(topk_ids=cap.topk_ids, topk_logits=cap.topk_logits, lse=cap.lse, hidden=cap.hidden)
                        if samples:
                            batch.update(sample_ids=cap.sample_ids, sample_counts=cap.sample_counts,
                                         sample_logits=cap.sample_logits)
                        if cap.encoded is not None:
                            batch.update(encoded=cap.encoded, token_squares=cap.token_squares)
                        writer.put_rows(s, batch)
                        bar.update(ids.numel())
                    writer.end_shard(s)
            bar.close()
        except BaseException:
            ok = False
            if world == 1:
                raise
            _all_ok(world, ok)
            raise
        if not _all_ok(world, ok):
            raise PipelineError("another process of this build failed; rerun to resume")

        # 7. the manifest, last
        if rank == 0:
            manifest = finalize(root, header, n_shards)
            click.echo(f"{root}: {n} sequences, {n_shards} shards, manifest written", err=True)
        if world > 1:
            torch.distributed.barrier()
        return manifest if rank == 0 else None
    finally:
        capture.close()
        if rank == 0:
            lock.release()


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
    id_bytes = 2 if m["id_dtype"] == "uint16" else 4
    logit_bytes = {"fp16": 2, "bf16": 2, "fp32": 4}[m["logit_dtype"]]
    sampling = m.get("sampling")  # sampled targets: K slots of id, logit and count per position
    sample_bytes = sampling["samples"] * (id_bytes + logit_bytes + (1 if sampling["count_dtype"] == "uint8" else 2)) if sampling else 0
    raw_side = m["topk"] * (id_bytes + logit_bytes) + sample_bytes + 4 * len(m["temperatures"]) + id_bytes
    d = m["teacher"]["hidden_size"]
    raw_codec = {"fp32": 4 * d, "bf16": 2 * d, "fp16": 2 * d, "int8": d + 2}[m["hidden_codec"]]
    per_layer = {
        str(layer): sum(s["bytes"]["hidden"][str(layer)] for s in m["shards"]) for layer in m["layers"]
    }
    hidden_total = sum(per_layer.values())
    codecs = m.get("fingerprint", {}).get("codecs", {})  # a key added later reads as its old value
    return {
        "format_version": m["format_version"],
        "teacher": m["teacher"],
        "fingerprint_digest": m.get("fingerprint_digest"),
        "hidden_compressor": codecs.get("hidden_compressor", FINGERPRINT_DEFAULTS["codecs", "hidden_compressor"]),
        "side_compressor": m["side_compressor"],
        "layers": m["layers"], "topk": m["topk"], "temperatures": m["temperatures"],
        "logits": m.get("logits", "topk"), "sampling": sampling,
        "logit_dtype": m["logit_dtype"], "hidden_codec": m["hidden_codec"],
        "sequences": m["num_sequences"], "tokens": tokens, "seq_len": m["seq_len"],
        "split": m["split"], "shards": len(m["shards"]),
        "bytes": {"side_data": side, "hidden": hidden_total, "total": side + hidden_total},
        "bytes_per_token": {
            "side_data": side / positions,
            "hidden_per_layer": {k: v / positions for k, v in per_layer.items()},
            "hidden_all_layers": hidden_total / positions,
        },
        "compression_ratio": {
            "side_data_vs_raw": side / positions / raw_side,
            "hidden_vs_raw_codec": hidden_total / positions / max(1, raw_codec * len(m["layers"])),
            "hidden_vs_fp32": hidden_total / positions / max(1, 4 * d * len(m["layers"])),
        },
    }


def cache_info(cache_dir: str, as_json: bool = False, storage_options: dict | None = None) -> dict:
    info = summarize(open_cache(cache_dir, storage_options=storage_options).manifest)
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
    if info["sampling"]:
        sp = info["sampling"]
        lines.append(f"sampled      K={sp['samples']} draws per position at T={sp['proposal_temperature']:g} "
                     f"(seed {sp['seed']}), logits {info['logit_dtype']}")
    lines += [
        f"layers       {info['layers']} ({info['hidden_codec']}, Blosc {info['hidden_compressor']})",
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
