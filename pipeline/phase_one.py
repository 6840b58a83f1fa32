"""Phase one: run the teacher once over the corpus and write the cache.

Reads as its steps: check what can be checked before anything loads (where the cache goes, the
teacher's config against data and layers), build the sequences, load the teacher, resolve the spec,
claim the directory, then the capture loop feeding the background writer, then the manifest.

The capture loop keeps the teacher busy: batch i+1 is launched before batch i's results are handed to
the writer, so on a GPU the copies of batch i to the host overlap batch i+1's forward
(teacher/capture.py), and the writer's threads encode, compress and write behind both (writer.py).

Under `torchrun`/`accelerate launch` the world is groups of teacher.tensor_parallel = N ranks (N = 1: one rank
per group); group g takes shards s with s % groups == g, its N ranks share one teacher split by transformers'
TP plan and the vocabulary-parallel head (teacher/vocab_parallel.py), and its first rank writes. Rank 0 owns
the lock, the claim and the manifest, so the result equals a single-process build (docs/scale.md, section 5).

Disk space: where the storage can tell (a local folder), a build that is clearly short of space says so in one
warning line before its first shard; a full disk ends it with one error line (what the finished shards hold,
what the rest needs, that a rerun resumes), with this process's unfinished shards removed and no manifest.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import click
import numpy as np
import torch
from tqdm import tqdm

from pipeline import targets
from pipeline.blocks import is_sharded, text_config, whole
from pipeline.cache.codecs import frequency_order, id_dtype
from pipeline.cache.directory import (
    build_lock,
    claim,
    finalize,
    finished_record,
    remove_if_empty_claim,
)
from pipeline.cache.manifest import HEAD_FILE, shard_paths
from pipeline.cache.reader import open_cache
from pipeline.cache.spec import CacheSpec, TeacherInfo
from pipeline.cache.storage import Storage
from pipeline.cache.writer import CacheWriter, writer_threads
from pipeline.data.sequences import sequences_from_config
from pipeline.errors import PipelineError
from pipeline.resources import free_bytes, no_space_left, size_text
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
    tp = cfg.teacher.tensor_parallel
    rank, world = _dist(tp)
    root = checked_root(cfg.cache, rank)
    tcfg = text_config(models.load_config(cfg.teacher.model, cfg.teacher.revision))
    check_teacher_config(cfg, tcfg)
    check_tensor_parallel(tp, world, tcfg)
    ranks = Ranks(rank, world, tp)
    layers = resolve_layers(cfg.cache.layers, cfg.mapping, cfg.student.model, tcfg.num_hidden_layers)
    if targets.stores(cfg.cache.logits, targets.EXACT):  # exact targets rebuild the logits from the last block's output, layer n
        layers = sorted(set(layers) | {tcfg.num_hidden_layers})

    tokenizer = models.load_tokenizer(cfg.teacher.model, cfg.teacher.revision)
    seqs = sequences_from_config(cfg.data, tokenizer)

    teacher = models.load_weights(cfg.teacher.model, cfg.teacher.dtype, cfg.teacher.revision, tensor_parallel=tp)
    weights_digest = model_digest(teacher)  # before the weights move to a GPU: no copy back to hash them
    head_file, exact = exact_head(cfg.cache, teacher, tcfg.num_hidden_layers)
    shard = None
    if tp > 1:  # transformers placed this rank's part on its device (LOCAL_RANK's GPU, else the CPU)
        from pipeline.teacher.vocab_parallel import head_shard

        device = teacher.get_output_embeddings().weight.device
        shard = head_shard(teacher.get_output_embeddings().weight, ranks.tp_group())
    else:
        device = models.pick_device(cfg.teacher.device)
        teacher.to(device)
    # block outputs are the same on every rank of a group (the plan all-reduces the row-parallel outputs):
    # only the writing rank captures them
    capture = make_capture(cfg.cache, teacher, layers, device, shard, keep_hidden=ranks.writes)
    try:
        spec = CacheSpec.from_config(
            cfg, TeacherInfo(cfg.teacher.model, tcfg.model_type, tcfg.num_hidden_layers, tcfg.hidden_size,
                             capture.vocab_size, cfg.teacher.dtype),
            layers, seqs, weights_digest, tokenizer_digest(tokenizer),
            frequency_order(seqs.input_ids, capture.vocab_size, id_dtype(capture.vocab_size)), exact=exact)
        return _build(cfg, root, spec, seqs, capture, overwrite, ranks, progress, timings, head_file)
    finally:
        capture.close()


@dataclass(frozen=True)
class Ranks:
    """Who does what in a launch of `world` processes with tensor-parallel size `tp`: consecutive groups of tp
    ranks (transformers' mesh puts the TP axis innermost), group g = rank // tp running shards s with
    s % groups == g; the group's first rank writes them. Rank 0 owns the lock, the claim and the manifest."""

    rank: int
    world: int
    tp: int = 1

    @property
    def groups(self) -> int:
        return self.world // self.tp

    @property
    def group(self) -> int:
        return self.rank // self.tp

    @property
    def writes(self) -> bool:
        return self.rank % self.tp == 0

    def record(self) -> dict:
        """The manifest's `build` record: how the cache was built (not part of its fingerprint)."""
        return {"world": self.world, "tensor_parallel": self.tp}

    def tp_group(self):
        """This rank's tensor-parallel process group (None: the default group, when it is the whole world).
        Every rank creates every group, in the same order, as torch.distributed.new_group requires."""
        if self.tp == self.world:
            return None
        mine = None
        for g in range(self.groups):
            group = torch.distributed.new_group(list(range(g * self.tp, (g + 1) * self.tp)))
            if g == self.group:
                mine = group
        return mine


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


def check_tensor_parallel(tp: int, world: int, tcfg) -> None:
    """What teacher.tensor_parallel refuses before any weight loads: a size that does not divide the teacher's
    attention heads or KV heads, an architecture without a tensor-parallel plan in transformers, a size that
    does not divide the launch's processes, or TP without a distributed launch."""
    if tp == 1:
        return
    for key in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(tcfg, key, None)
        if isinstance(heads, int) and heads % tp:
            raise PipelineError(f"teacher.tensor_parallel: {tp} does not divide the teacher's {key} ({heads})")
    if not getattr(tcfg, "base_model_tp_plan", None):
        raise PipelineError(f"teacher.tensor_parallel: {tp} needs a tensor-parallel plan, and transformers has none "
                            f"for the teacher's architecture ({tcfg.model_type}); use teacher.tensor_parallel: 1")
    if world == 1:
        raise PipelineError(f"teacher.tensor_parallel: {tp} needs a distributed launch of a multiple of {tp} "
                            f"processes (torchrun --nproc_per_node {tp} -m pipeline.cli cache build ...)")
    if world % tp:
        raise PipelineError(f"teacher.tensor_parallel: {tp} does not divide the {world} processes of this launch")


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
    if any(is_sharded(t) for t in (head.norm.weight, head.head.weight)):
        head = _gathered(head)  # a tensor-parallel teacher: the whole head, gathered once (a collective)
    data = safetensors.torch.save(head.tensors())
    return data, {"file": HEAD_FILE, "checksum": digest_bytes(data), "bytes": len(data), "layer": n_layers,
                  **head.record()}


def _gathered(head):
    """A TeacherHead whose DTensor weights (a tensor-parallel teacher's) are gathered into whole tensors."""
    from pipeline.head import FinalNorm, HeadSpec, TeacherHead

    n, h = head.norm, head.head
    return TeacherHead(FinalNorm(n.kind, whole(n.weight), n.eps, whole(n.bias)), HeadSpec(whole(h.weight), h.scale, h.softcap))


def make_capture(cc, teacher, layers: list[int], device, head_shard=None, keep_hidden: bool = True):
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
                          layer_codecs={n: cc.exact_codec} if targets.stores(cc.logits, targets.EXACT) else None,
                          head_shard=head_shard, keep_hidden=keep_hidden)


# ----------------------------------------------------------------------------- the build


def _build(cfg, root: Storage, spec: CacheSpec, seqs, capture, overwrite: bool, ranks: Ranks, progress: bool,
           timings: dict, head_file: bytes | None = None):
    rank, world = ranks.rank, ranks.world
    lock = build_lock(root)
    state = _claim(root, lock, spec, overwrite, rank, world)
    todo: list[tuple[int, int, int]] = []
    try:
        if state == "complete":
            if rank == 0:
                click.echo(f"{root}: already complete with this config; nothing to do", err=True)
            return open_cache(root).manifest
        if head_file is not None and rank == 0:  # exact targets: the teacher's head, once (rewritten on resume)
            root.write_bytes(HEAD_FILE, head_file)
        shards = spec.shards()
        mine = [s for s in shards if s[0] % ranks.groups == ranks.group]
        todo = [s for s in mine if finished_record(root, *s) is None]
        if rank == 0 and state == "resume":
            click.echo(f"{root}: resuming, {len(mine) - len(todo)} of {len(mine)} shards already written", err=True)
        if rank == 0:
            warn_if_short(root, spec)
        ok = True
        try:
            timings["setup"] = time.perf_counter() - timings.pop("start")
            timings.update(write_shards(root, spec, seqs, capture, todo, cfg.cache, progress and rank == 0,
                                        writes=ranks.writes))
        except BaseException:
            ok = False
            # a tensor-parallel rank's partners may be inside a forward's collectives: no vote, this process
            # ends and the launcher ends the others
            if world > 1 and ranks.tp == 1:
                _all_ok(world, ok)
            raise
        if not _all_ok(world, ok):
            raise PipelineError("another process of this build failed; rerun to resume")
        manifest, t0 = None, time.perf_counter()
        if rank == 0:
            manifest = finalize(root, dict(spec.header(), build=ranks.record()), len(shards))
            timings["manifest"] = time.perf_counter() - t0
            click.echo(f"{root}: {spec.num_sequences} sequences, {len(shards)} shards, manifest written", err=True)
        if world > 1:
            torch.distributed.barrier()
        return manifest
    except Exception as e:
        # a full disk: one line that says what is written and what the rest needs, and this process's
        # unfinished shards removed (a rerun rewrites them from their start anyway)
        if isinstance(e, PipelineError) or not no_space_left(e, root.path if root.local else None):
            raise
        if ranks.writes:
            drop_unfinished(root, todo)
        raise PipelineError(no_space_message(root, spec)) from None
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
        except Exception as e:
            full = not isinstance(e, PipelineError) and no_space_left(e, root.path if root.local else None)
            if not (isinstance(e, PipelineError) or full):
                raise
            if lock.held:
                lock.release()
                remove_if_empty_claim(root, created)
            state = PipelineError(no_space_message(root, spec)) if full else e
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
                 progress: bool = True, writes: bool = True) -> dict[str, float]:
    """The capture loop: every batch of the shards in `todo` through the teacher and into the writer. Batch
    i+1 is launched before batch i is handed over, so the host side of one overlaps the next's forward.
    Returns the seconds of the loop, of the teacher waiting on the writer in it, and of the writer's drain."""
    plan = [(s, start, rows, b, min(b + cc.batch_size, start + rows))
            for s, start, rows in todo for b in range(start, start + rows, cc.batch_size)]
    bar = tqdm(total=sum(r for _, _, r in todo) * spec.seq_len, unit="tok", unit_scale=True,
               desc=f"cache {root.name}", disable=not progress)
    t0 = time.perf_counter()
    # a rank of a tensor-parallel group other than its first runs the same batches (its share of every
    # forward and head) and writes nothing
    writer = CacheWriter(root, spec.layout(), threads=writer_threads(cc.writer_threads)) if writes else _NoWriter()
    with bar, writer:  # the bar ends its line on an error too, so the error's own line starts clean
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
    return {"loop": t1 - t0, "writer_wait": waited, "drain": time.perf_counter() - t1}


class _NoWriter:
    """CacheWriter's calls, doing nothing (the ranks of a tensor-parallel group that do not write)."""

    waited = 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def open_shard(self, *a, **k):
        pass

    def put_rows(self, *a, **k):
        pass

    def end_shard(self, *a, **k):
        pass


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


# ----------------------------------------------------------------------------- disk space


def estimated_bytes_per_token(spec: CacheSpec) -> float:
    """The cache's bytes per token before compression, from its config alone: the input id, one lse per
    temperature, k top-k ids and logits, K sampled ids, counts and logits, every cached layer at its codec
    (and int8's per-token scale). Compression takes some off: about 60% of the side data and 25% of trained
    hidden states, little of random ones (docs/scale.md)."""
    from pipeline.cache.codecs import HIDDEN_CODECS, count_dtype
    from pipeline.dtypes import STORED_LOGIT_DTYPES

    ids, logit = spec.id_dtype.itemsize, STORED_LOGIT_DTYPES[spec.logit_dtype].itemsize
    per_token = ids + 4 * len(spec.temperatures) + spec.topk * (ids + logit)
    if spec.samples:
        per_token += spec.samples * (ids + count_dtype(spec.samples).itemsize + logit)
    one = np.zeros((1, 1, spec.teacher.hidden_size), dtype=np.float32)
    codecs = dict(spec.layer_codecs)
    for layer in spec.layers:
        encoded = HIDDEN_CODECS.get(codecs.get(layer, spec.hidden_codec)).encode(one)
        per_token += sum(a.nbytes for a in encoded.values())
    return float(per_token)


@dataclass(frozen=True)
class SpaceNeed:
    """What a cache takes on its storage so far and what the rest of it needs."""

    written: int  # bytes of the finished shards (allocated blocks on a local disk)
    finished: int  # shards with a record
    shards: int
    remaining: int  # sequences not in a finished shard
    per_sequence: float  # bytes: measured on the finished shards, else the config's uncompressed estimate
    measured: bool

    @property
    def more(self) -> float:
        return self.per_sequence * self.remaining

    def basis(self) -> str:
        return ("measured on the finished shards" if self.measured
                else "an uncompressed estimate from the config")


def space_need(root: Storage, spec: CacheSpec) -> SpaceNeed:
    """The finished shards' bytes (their records' files and the records) and, per sequence, what the others
    will take: measured on the finished shards when there are any, else estimated_bytes_per_token."""
    written = sequences = finished = 0
    for index, _, _ in spec.shards():
        record_path = shard_paths(index)[2]
        if not root.isfile(record_path):
            continue
        try:
            record = root.read_json(record_path)
        except PipelineError:
            continue
        finished += 1
        sequences += int(record.get("sequences", 0))
        written += sum(_stored_bytes(root, name) for name in [*record.get("files", {}), record_path])
    remaining = spec.num_sequences - sequences
    if sequences:
        return SpaceNeed(written, finished, len(spec.shards()), remaining, written / sequences, True)
    per_sequence = estimated_bytes_per_token(spec) * spec.seq_len
    return SpaceNeed(0, 0, len(spec.shards()), remaining, per_sequence, False)


def _stored_bytes(root: Storage, name: str) -> int:
    """What one file takes: its allocated blocks on a local disk (a small file still takes a block), its size
    elsewhere; 0 when it is gone."""
    try:
        if root.local:
            return (root.path / name).stat().st_blocks * 512
        return root.size(name)
    except (OSError, KeyError):
        return 0


def warn_if_short(root: Storage, spec: CacheSpec) -> None:
    """One line on stderr when the storage can tell its free space (a local folder; object stores cannot) and it
    is clearly short of what the rest of the build needs: below the finished shards' measure, or, before any
    shard is finished, below half the config's uncompressed estimate (compression takes 10-60% off)."""
    if not root.local:
        return
    free = free_bytes(root.path)
    if free is None:
        return
    need = space_need(root, spec)
    if need.remaining <= 0 or free >= (need.more if need.measured else need.more / 2):
        return
    what = "the rest needs" if need.finished else "the cache needs"
    click.echo(f"warning: cache.dir {root}: {size_text(free)} free, {what} about {size_text(need.more)} "
               f"({size_text(need.per_sequence)} per sequence x {need.remaining} sequences, {need.basis()}); "
               f"the build may stop on a full disk (rerunning it then resumes)", err=True)


def no_space_message(root: Storage, spec: CacheSpec) -> str:
    """The one line a full disk ends a build with: what is written, what the rest needs, and that a rerun
    resumes."""
    need = space_need(root, spec)
    done = f"{size_text(need.written)} written, {need.finished} of {need.shards} shards finished"
    if need.remaining <= 0:
        rest = "only the manifest is left to write (a few KiB)"
    else:
        rest = (f"the other {need.remaining} sequences need about {size_text(need.more)} more "
                f"({size_text(need.per_sequence)} per sequence, {need.basis()})")
    return (f"cache.dir {root}: no space left on device: {done}; {rest}; free that much and rerun the same "
            f"command: it resumes from the finished shards")


def drop_unfinished(root: Storage, todo: list[tuple[int, int, int]]) -> None:
    """Remove the files of the shards in `todo` that have no record: what a failed write left of them (a
    shard's writer removes them too before it starts again)."""
    for index, _, _ in todo:
        arrow, zdir, record = shard_paths(index)
        if root.isfile(record):
            continue
        for name in (arrow + ".tmp", zdir + ".tmp") if root.atomic_rename else (arrow, zdir):
            try:
                root.remove(name)
            except Exception:  # best effort on a failing store: the next attempt removes them anyway
                pass


# ----------------------------------------------------------------------------- several processes


def _dist(tp: int = 1) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        # a tensor-parallel teacher on GPUs runs its collectives on NCCL; the build's own (the claim, the vote,
        # the barrier) stay on gloo over CPU tensors
        gpu_tp = tp > 1 and torch.cuda.is_available()
        torch.distributed.init_process_group("cpu:gloo,cuda:nccl" if gpu_tp else "gloo")
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
