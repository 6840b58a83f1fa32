"""Phase one: run the teacher once over the corpus and write the cache.

Reads as its steps: check what can be checked before anything loads (where the cache goes, the
teacher's config against data and layers), build the sequences, load the teacher, resolve the spec,
claim the directory, then the capture loop feeding the background writer, then the manifest.

The capture loop keeps the teacher busy: batch i+1 is launched before batch i's results are handed to
the writer, so on a GPU the copies of batch i to the host overlap batch i+1's forward
(teacher/capture.py), and the writer's threads encode, compress and write behind both (writer.py).

Under `torchrun`/`accelerate launch` each rank takes shards s with s % world == rank; rank 0 owns the
lock, the claim and the manifest, so the result equals a single-process build.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import click
import torch
from tqdm import tqdm

from pipeline import targets
from pipeline.blocks import text_config
from pipeline.cache.codecs import frequency_order, id_dtype
from pipeline.cache.directory import (
    build_lock,
    claim,
    finalize,
    finished_record,
    remove_if_empty_claim,
)
from pipeline.cache.manifest import HEAD_FILE
from pipeline.cache.reader import open_cache
from pipeline.cache.spec import CacheSpec, TeacherInfo
from pipeline.cache.storage import Storage
from pipeline.cache.writer import CacheWriter, writer_threads
from pipeline.data.sequences import sequences_from_config
from pipeline.errors import PipelineError
from pipeline.sources import models
from pipeline.sources.digest import model_digest, tokenizer_digest
from pipeline.student.layer_map import resolve_layers


def build_cache(cfg, overwrite: bool = False, progress: bool = True, timings: dict | None = None) -> dict | None:
    """Build (or resume, or find complete) the cache cfg.cache describes; returns its manifest on rank 0.
    `timings`, when given, receives the seconds of each step: setup (checks, corpus, teacher, spec, claim),
    loop (the capture loop), writer_wait (of it, the teacher blocked on a full writer queue), drain (the
    writer finishing after the last batch) and manifest."""
    timings = {} if timings is None else timings
    timings["start"] = time.perf_counter()
    rank, world = _dist()
    root = checked_root(cfg.cache, rank)
    tcfg = text_config(models.load_config(cfg.teacher.model, cfg.teacher.revision))
    check_teacher_config(cfg, tcfg)
    layers = resolve_layers(cfg.cache.layers, cfg.mapping, cfg.student.model, tcfg.num_hidden_layers)
    if targets.stores(cfg.cache.logits, targets.EXACT):  # exact targets rebuild the logits from the last block's output, layer n
        layers = sorted(set(layers) | {tcfg.num_hidden_layers})

    tokenizer = models.load_tokenizer(cfg.teacher.model, cfg.teacher.revision)
    seqs = sequences_from_config(cfg.data, tokenizer)

    teacher = models.load_weights(cfg.teacher.model, cfg.teacher.dtype, cfg.teacher.revision)
    weights_digest = model_digest(teacher)  # before the weights move to a GPU: no copy back to hash them
    head_file, exact = exact_head(cfg.cache, teacher, tcfg.num_hidden_layers)
    device = models.pick_device(cfg.teacher.device)
    teacher.to(device)
    capture = make_capture(cfg.cache, teacher, layers, device)
    try:
        spec = CacheSpec.from_config(
            cfg, TeacherInfo(cfg.teacher.model, tcfg.model_type, tcfg.num_hidden_layers, tcfg.hidden_size,
                             capture.vocab_size, cfg.teacher.dtype),
            layers, seqs, weights_digest, tokenizer_digest(tokenizer),
            frequency_order(seqs.input_ids, capture.vocab_size, id_dtype(capture.vocab_size)), exact=exact)
        return _build(cfg, root, spec, seqs, capture, overwrite, rank, world, progress, timings, head_file)
    finally:
        capture.close()


# ----------------------------------------------------------------------------- checks before anything loads


def checked_root(cc, rank: int) -> Storage:
    """cache.dir as a Storage: a known protocol with its backend installed, an existing bucket, and not an
    existing file (nothing loaded or written yet)."""
    root = Storage(cc.dir, cc.storage_options, what="cache.dir")
    if root.local and root.path.exists() and not root.path.is_dir():
        raise PipelineError(f"cache.dir: {root.path} is a file, not a folder; choose another cache.dir")
    if rank == 0:
        root.check_bucket("cache.dir")
    return root


def check_teacher_config(cfg, tcfg) -> None:
    """What the teacher's config alone refuses: sequences longer than its positions, a top-k beyond its
    vocabulary."""
    max_positions = getattr(tcfg, "max_position_embeddings", None)
    if isinstance(max_positions, int) and cfg.data.seq_len > max_positions:
        raise PipelineError(f"data.seq_len: {cfg.data.seq_len} is beyond the teacher's max_position_embeddings "
                            f"({max_positions})")
    vocab = getattr(tcfg, "vocab_size", None)
    if targets.stores(cfg.cache.logits, targets.TOPK) and isinstance(vocab, int) and not 1 <= cfg.cache.topk <= vocab:
        raise PipelineError(f"cache.topk: {cfg.cache.topk} must be between 1 and the vocabulary size {vocab}")


def exact_head(cc, teacher, n_layers: int) -> tuple[bytes | None, dict | None]:
    """Exact targets: (the head file's bytes, its manifest record), the teacher's final norm and head that
    rebuild its logits from layer n; (None, None) without exact targets. A teacher whose norm or head we do
    not reproduce is refused in one line, before anything is written."""
    if not targets.stores(cc.logits, targets.EXACT):
        return None, None
    import safetensors.torch

    from pipeline.cache.checksum import digest_bytes
    from pipeline.head import teacher_head

    head, why = teacher_head(teacher)
    if head is None:
        raise PipelineError(f"cache.logits {cc.logits}: the teacher's logits cannot be rebuilt from its last block "
                            f"output: {why}")
    data = safetensors.torch.save(head.tensors())
    return data, {"file": HEAD_FILE, "checksum": digest_bytes(data), "bytes": len(data), "layer": n_layers,
                  **head.record()}


def make_capture(cc, teacher, layers: list[int], device):
    """The teacher's capture hooks. Hidden states are encoded where the teacher runs when that is a GPU
    (only the encoded bytes cross to the host) or by the writer's threads: the same shard data files either
    way (the records' sums of squares agree to float32 rounding)."""
    from pipeline.blocks import decoder_layers
    from pipeline.teacher.capture import TeacherCapture

    on_device = cc.encode_on == "device" or (cc.encode_on == "auto" and torch.device(device).type == "cuda")
    topk, samples = targets.stored_counts(cc.logits, cc.topk, cc.samples)
    n = len(decoder_layers(teacher))
    return TeacherCapture(teacher, layers, topk, cc.temperatures, cc.logit_dtype,
                          hidden_codec=cc.hidden_codec if on_device else None, samples=samples,
                          proposal_temperature=cc.proposal_temperature, sample_seed=cc.sample_seed,
                          layer_codecs={n: cc.exact_codec} if targets.stores(cc.logits, targets.EXACT) else None)


# ----------------------------------------------------------------------------- the build


def _build(cfg, root: Storage, spec: CacheSpec, seqs, capture, overwrite: bool, rank: int, world: int,
           progress: bool, timings: dict, head_file: bytes | None = None):
    lock = build_lock(root)
    state = _claim(root, lock, spec, overwrite, rank, world)
    try:
        if state == "complete":
            if rank == 0:
                click.echo(f"{root}: already complete with this config; nothing to do", err=True)
            return open_cache(root).manifest
        if head_file is not None and rank == 0:  # exact targets: the teacher's head, once (rewritten on resume)
            root.write_bytes(HEAD_FILE, head_file)
        shards = spec.shards()
        mine = [s for s in shards if s[0] % world == rank]
        todo = [s for s in mine if finished_record(root, *s) is None]
        if rank == 0 and state == "resume":
            click.echo(f"{root}: resuming, {len(mine) - len(todo)} of {len(mine)} shards already written", err=True)
        ok = True
        try:
            timings["setup"] = time.perf_counter() - timings.pop("start")
            timings.update(write_shards(root, spec, seqs, capture, todo, cfg.cache, progress and rank == 0))
        except BaseException:
            ok = False
            if world > 1:
                _all_ok(world, ok)
            raise
        if not _all_ok(world, ok):
            raise PipelineError("another process of this build failed; rerun to resume")
        manifest, t0 = None, time.perf_counter()
        if rank == 0:
            manifest = finalize(root, spec.header(), len(shards))
            timings["manifest"] = time.perf_counter() - t0
            click.echo(f"{root}: {spec.num_sequences} sequences, {len(shards)} shards, manifest written", err=True)
        if world > 1:
            torch.distributed.barrier()
        return manifest
    finally:
        if rank == 0:
            lock.release()


def _claim(root: Storage, lock, spec: CacheSpec, overwrite: bool, rank: int, world: int) -> str:
    """Rank 0 takes the lock (held for the whole build) and claims the directory; every rank gets the state."""
    created = not root.exists()
    state: object = None
    if rank == 0:
        try:
            lock.acquire()
            state = claim(root, spec.fingerprint(), overwrite)
        except PipelineError as e:
            if lock.held:
                lock.release()
                remove_if_empty_claim(root, created)
            state = e
    return _agree(rank, world, state)


@dataclass
class _Launched:
    """One batch in flight: where it goes (shard s holds rows [start, start + rows); this batch is [b, e)),
    its inputs and the capture's handle."""

    shard: int
    start: int
    rows: int
    b: int
    e: int
    ids: torch.Tensor
    mask: torch.Tensor | None
    handle: object


def write_shards(root: Storage, spec: CacheSpec, seqs, capture, todo: list[tuple[int, int, int]], cc,
                 progress: bool = True) -> dict[str, float]:
    """The capture loop: every batch of the shards in `todo` through the teacher and into the writer. Batch
    i+1 is launched before batch i is handed over, so the host side of one overlaps the next's forward.
    Returns the seconds of the loop, of the teacher waiting on the writer in it, and of the writer's drain."""
    plan = [(s, start, rows, b, min(b + cc.batch_size, start + rows))
            for s, start, rows in todo for b in range(start, start + rows, cc.batch_size)]
    bar = tqdm(total=sum(r for _, _, r in todo) * spec.seq_len, unit="tok", unit_scale=True,
               desc=f"cache {root.name}", disable=not progress)
    t0 = time.perf_counter()
    writer = CacheWriter(root, spec.layout(), threads=writer_threads(cc.writer_threads))
    with writer:
        pending: _Launched | None = None
        for s, start, rows, b, e in plan:
            ids, mask = batch_inputs(seqs, b, e)
            launched = _Launched(s, start, rows, b, e, ids, mask, capture.submit(ids, mask, sequences=list(range(b, e))))
            if pending is not None:
                _hand_over(writer, seqs, capture, pending, check=pending.b == plan[0][3])
                bar.update(pending.ids.numel())
            pending = launched
        if pending is not None:
            _hand_over(writer, seqs, capture, pending, check=pending.b == plan[0][3])
            bar.update(pending.ids.numel())
        t1, waited = time.perf_counter(), writer.waited
    bar.close()
    return {"loop": t1 - t0, "writer_wait": waited, "drain": time.perf_counter() - t1}


def batch_inputs(seqs, b: int, e: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sequences [b, e) as the teacher's input ids and attention mask (None when packed)."""
    ids = torch.from_numpy(seqs.input_ids[b:e]).long()
    if seqs.lengths is None:
        return ids, None
    lengths = torch.from_numpy(seqs.lengths[b:e]).long()
    return ids, (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()


def _hand_over(writer: CacheWriter, seqs, capture, x: _Launched, check: bool) -> None:
    """A launched batch's results to the writer; with `check`, first against the model's own forward."""
    s, start, rows, b, e = x.shard, x.start, x.rows, x.b, x.e
    cap = x.handle.result()
    if check:
        capture.check(cap, x.ids, x.mask)
    if b == start:
        writer.open_shard(s, start, rows)
    batch = {"input_ids": seqs.input_ids[b:e], "lse": cap.lse}
    if seqs.lengths is not None:
        batch["length"] = seqs.lengths[b:e]
    for column in targets.COLUMNS:  # the captured arrays of every kind the cache stores, by column name
        if getattr(cap, column) is not None:
            batch[column] = getattr(cap, column)
    if cap.encoded is not None:
        batch.update(encoded=cap.encoded, token_squares=cap.token_squares)
    else:
        batch["hidden"] = cap.hidden
    writer.put_rows(s, batch)
    if e == start + rows:
        writer.end_shard(s)


# ----------------------------------------------------------------------------- several processes


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
