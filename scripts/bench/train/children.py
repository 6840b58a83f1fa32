"""The training benchmarks' child steps, each run in its own process by scripts.harness.run_child (so each
peak memory is its own): `cache` and `online` (`run_train` from the cache / with the live teacher), `finetune`
(the stock transformers.Trainer, the reference of --vs-finetune) and `loader` (the cache DataLoader alone, then
the decode cost of each part of an item).

Every step takes the same keyword arguments: `settings` (the run's sizes, common.CHILD_SETTINGS), `work` (the
folder with the student, the teacher and the cache), `loss` (config overrides) and `breakdown` (profile the
timed steps by phase: phases.py), and returns a JSON-able dict.

Step time = wall time between consecutive optimizer steps (data + teacher + student), median over the steps
after the warm-up; on CUDA the clock synchronises the device at each step boundary. Peak memory is the child's
own VmHWM on CPU (imports and the loaded model included) or torch.cuda.max_memory_allocated on CUDA.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import TrainerCallback

from pipeline.resources import peak_memory, rss_now_mib
from scripts.bench.train import common
from scripts.bench.train.phases import PhaseProfile


class StepClock(TrainerCallback):
    """Wall time between optimizer steps; with `breakdown`, the profiler over the timed steps and its time per
    phase; and the autocast dtype the student's forward ran under (None: none), which shows that --bf16 took
    effect. `result()` once training is done."""

    def __init__(self, args, breakdown: bool):
        self.cuda = torch.cuda.is_available()
        self.profile = PhaseProfile() if breakdown else None
        self.first, self.last = args.warmup, args.warmup + args.steps  # the step boundaries around the timed steps
        self.ends: list[float] = []
        self.seen: dict = {}

    def on_train_begin(self, *a, model=None, **k):
        model.get_input_embeddings().register_forward_pre_hook(self._record_autocast)
        if self.profile is not None:
            self.profile.label_student(model)
        self._boundary()

    def on_step_end(self, *a, **k):
        self._boundary()

    def _boundary(self) -> None:
        """The profiler runs from boundary `first` to boundary `last`, its start and stop outside that window."""
        if self.profile is not None and len(self.ends) == self.first:
            self.profile.start()
        if self.cuda:
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())
        if self.profile is not None and len(self.ends) - 1 == self.last:
            self.profile.stop()

    def _record_autocast(self, module, inputs) -> None:
        # inside the model's forward (the input embedding): accelerate's autocast wraps forward, not the hooks
        if "autocast" not in self.seen:
            device = module.weight.device.type
            self.seen["autocast"] = (str(torch.get_autocast_dtype(device)).removeprefix("torch.")
                                     if torch.is_autocast_enabled(device) else None)

    def result(self) -> dict:
        steps = [b - a for a, b in zip(self.ends, self.ends[1:])][self.first:self.last]
        out = {"step_s": statistics.median(steps), "steps": steps, "autocast": self.seen.get("autocast")}
        if self.profile is not None:
            out["breakdown"] = self.profile.breakdown(steps)
            out["labels"] = self.profile.label_seconds(len(steps))
        return out


# ----------------------------------------------------------------------------- training children


def _train(settings: dict, work: str, online: bool, loss: list[str], breakdown: bool) -> dict:
    from pipeline.config import load_config
    from pipeline.recipes.train import run_train

    args, work = SimpleNamespace(**settings), Path(work)
    base = rss_now_mib()
    clock = StepClock(args, breakdown)
    mode = "online" if online else "cache"
    cfg = load_config(common.DEMO, common.overrides(args, work, args.teacher_path)
                      + common.training(args, work / f"run-{mode}") + list(loss))
    run_train(cfg, online=online, callbacks=[clock], echo=lambda m: None)
    return {**clock.result(), **peak_memory(), "rss_after_imports_mib": base}


def cache(settings: dict, work: str, loss: list[str] = (), breakdown: bool = False) -> dict:
    """`run_train` from the cache."""
    return _train(settings, work, False, loss, breakdown)


def online(settings: dict, work: str, loss: list[str] = (), breakdown: bool = False) -> dict:
    """`run_train --online`: the live teacher in the collator."""
    return _train(settings, work, True, loss, breakdown)


def finetune(settings: dict, work: str, loss: list[str] = (), breakdown: bool = False) -> dict:
    """The reference: the stock transformers.Trainer fine-tuning the student with plain CE (labels =
    input_ids) on the cache's train sequences, with the TrainingArguments `run_train` would build."""
    import numpy as np
    from transformers import Trainer

    from pipeline.config import load_config
    from pipeline.sources import models
    from pipeline.train.arguments import training_arguments
    from pipeline.train.dataset import CacheDataset

    args, work = SimpleNamespace(**settings), Path(work)
    base = rss_now_mib()
    clock = StepClock(args, breakdown)
    cfg = load_config(common.DEMO, common.overrides(args, work, args.teacher_path)
                      + common.training(args, work / "run-finetune"))
    ds = CacheDataset(cfg.cache.dir, "train", [], cfg.loss.temperature, logits=False)  # token ids only
    rows = [{k: np.asarray(v) for k, v in ds[i].items()} for i in range(len(ds))]
    del ds

    def collate_lm(items: list[dict]) -> dict:
        ids = torch.from_numpy(np.stack([it["input_ids"] for it in items])).long()
        batch = {"input_ids": ids, "labels": ids.clone()}
        if "length" in items[0]:  # padded cache: mask the padding out of attention and labels
            length = torch.tensor([int(it["length"]) for it in items])
            valid = torch.arange(ids.shape[1])[None, :] < length[:, None]
            batch["attention_mask"] = valid.long()
            batch["labels"][~valid] = -100
        return batch

    # the same loader as distill train's student (hub kernels off: offline on a GPU, model.train() would
    # otherwise fetch them), so both sides run the same model code
    student = models.load_weights(cfg.student.model, cfg.student.dtype, what="student")
    trainer = Trainer(model=student, args=training_arguments(cfg.training), train_dataset=rows,
                      data_collator=collate_lm, callbacks=[clock])
    trainer.train()
    return {**clock.result(), **peak_memory(), "rss_after_imports_mib": base}


# ----------------------------------------------------------------------------- the loader child


class FreshReaderEachEpoch:
    """A CacheDataset indexed by (epoch, position): each process (the main one or a DataLoader worker) opens a
    fresh reader when the epoch changes. On a cache this small a kept reader would serve the next epoch's
    chunks from its few decoded chunks, which a real-sized cache never does; the workers still start once,
    as a long epoch's (or persistent) workers do."""

    def __init__(self, ds):
        self.ds, self.epoch = ds, None

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, pos = key
        if epoch != self.epoch:
            self.ds._cache, self.epoch = None, epoch
        return self.ds[pos]


def loader(settings: dict, work: str, loss: list[str] = (), breakdown: bool = False) -> dict:
    """The cache DataLoader alone, as the Trainer builds it for a kd run (the same dataset, sampler, collate
    and the DataLoader settings of the TrainingArguments run_train resolves), in tokens/s over >= 2 epochs
    and >= loader_seconds; then the decode cost of each part of an item (decode_costs)."""
    from torch.utils.data import DataLoader

    from pipeline.config import load_config
    from pipeline.train.arguments import training_arguments
    from pipeline.train.dataset import CacheDataset, ChunkShuffleSampler, collate
    from pipeline.train.trainer import SHUFFLE_WINDOW

    args, work = SimpleNamespace(**settings), Path(work)
    cfg = load_config(common.DEMO, common.overrides(args, work, args.teacher_path)
                      + common.training(args, work / "run-loader"))
    targs = training_arguments(cfg.training)
    layers = sorted(set(common.layer_map_of(args, work, cfg).values()))
    # the Trainer's own DataLoader arguments (transformers.Trainer._get_dataloader)
    dl = {"num_workers": targs.dataloader_num_workers, "pin_memory": targs.dataloader_pin_memory,
          "persistent_workers": targs.dataloader_persistent_workers,
          "multiprocessing_context": targs.dataloader_multiprocessing_context,
          "prefetch_factor": targs.dataloader_prefetch_factor, "drop_last": targs.dataloader_drop_last}
    ds = CacheDataset(cfg.cache.dir, "train", layers, cfg.loss.temperature)
    done = {"epochs": 0}
    t0 = time.perf_counter()

    def epochs():  # the Trainer's order, epoch after epoch; read in the main process as batches are requested
        while done["epochs"] < 2 or time.perf_counter() - t0 < args.loader_seconds:  # every chunk read twice
            sampler = ChunkShuffleSampler(ds.groups, seed=targs.seed, window=SHUFFLE_WINDOW)
            sampler.set_epoch(done["epochs"])
            yield from ((done["epochs"], pos) for pos in sampler)
            done["epochs"] += 1

    batches = DataLoader(FreshReaderEachEpoch(ds), batch_size=targs.train_batch_size, sampler=epochs(),
                         collate_fn=collate, **dl)
    tokens = sum(batch["input_ids"].numel() for batch in batches)
    seconds = time.perf_counter() - t0
    del batches  # its workers end before the decode timing below
    dl["batch_size"] = targs.train_batch_size
    return {"tokens_per_s": tokens / seconds, "epochs": done["epochs"], "seconds": seconds, "dataloader": dl,
            "decode": decode_costs(cfg, layers, targs.train_batch_size), **peak_memory()}


def _timed(fn) -> tuple[float, float, object]:
    """(wall s, this process's CPU s over every thread, fn())."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def _train_chunks(cache) -> list[tuple[int, int]]:
    return sorted({cache.locate(i)[:2] for i in cache.indices("train")})


def read_pass(cache_dir: str, only: list[int], logits: bool) -> tuple[float, float, int]:
    """(wall s, CPU s, token positions) of reading and decoding every train chunk with a fresh reader that
    decodes input_ids, + the top-k targets and lse when `logits`, + the hidden layers `only`."""
    from pipeline.cache.reader import open_cache

    cache = open_cache(cache_dir, layers=only, logits=logits)
    chunks = _train_chunks(cache)
    wall, cpu, rows = _timed(lambda: sum(cache.read_chunk(pos, c)["input_ids"].shape[0] for pos, c in chunks))
    return wall, cpu, rows * cache.seq_len


def lse_pass(cache_dir: str) -> tuple[float, float]:
    """(wall s, CPU s) of the reader's lse work alone over every train chunk: each lse column of the chunk's
    (already read) Arrow record batch to its float32 values, as Cache.read_chunk decodes them."""
    import numpy as np
    import pyarrow as pa

    from pipeline.cache.codecs import decode_lse
    from pipeline.cache.manifest import lse_column, shard_paths
    from pipeline.cache.reader import open_cache

    cache = open_cache(cache_dir, layers=[])
    files = {}
    batches = []
    for pos, c in _train_chunks(cache):
        if pos not in files:
            arrow = shard_paths(cache.manifest["shards"][pos]["index"])[0]
            files[pos] = pa.ipc.open_file(cache.storage.arrow_source(arrow))
        batches.append(files[pos].get_batch(c))

    def decode():
        for batch in batches:
            for j in range(len(cache.temperatures)):
                planes = batch.column(lse_column(j)).flatten().to_numpy(zero_copy_only=False)
                decode_lse(planes.astype(np.uint8, copy=False).reshape(batch.num_rows, -1))

    wall, cpu, _ = _timed(decode)
    return wall, cpu


def item_pass(cfg, layers: list[int], batch_size: int) -> tuple[float, float, int]:
    """(wall s, CPU s, tokens) of the whole item as training reads it: CacheDataset + collate, no workers."""
    from torch.utils.data import DataLoader

    from pipeline.train.dataset import CacheDataset, collate

    ds = CacheDataset(cfg.cache.dir, "train", layers, cfg.loss.temperature)
    batches = DataLoader(ds, batch_size=batch_size, collate_fn=collate)
    return _timed(lambda: sum(b["input_ids"].numel() for b in batches))


def decode_costs(cfg, layers: list[int], batch_size: int, rounds: int = 3) -> dict:
    """Microseconds per cached token position (wall and this process's CPU, every thread) to decode each part
    of a cache chunk, here, without workers: reader passes over the train split's chunks that decode
    input_ids only (the base), + the top-k targets and lse, + one mapped hidden layer each; a part costs its
    pass minus the base. The lse decode is timed on its own (lse_pass); top-k is the rest of the logits pass
    (its Arrow column reads included). Then the whole item as training reads it (CacheDataset + collate, every
    part at once). Best of `rounds` (the machine only ever adds time); each pass opens its reader untimed."""
    from pipeline.cache.reader import open_cache

    passes = {"base": ([], False), "logits": ([], True), **{f"hidden {t}": ([t], False) for t in layers}}
    best: dict[str, tuple] = {}

    def keep(name: str, r: tuple) -> None:
        if name not in best or r[0] < best[name][0]:
            best[name] = r

    for _ in range(rounds):
        for name, (only, logits) in passes.items():
            keep(name, read_pass(cfg.cache.dir, only, logits))
        keep("lse", lse_pass(cfg.cache.dir))
        keep("item", item_pass(cfg, layers, batch_size))
    tokens = best["base"][2]

    def per_token(wall: float, cpu: float, n: int = tokens) -> dict:
        return {"wall_us": 1e6 * wall / n, "cpu_us": 1e6 * cpu / n}

    (base_w, base_c, _), (logits_w, logits_c, _), (lse_w, lse_c) = best["base"], best["logits"], best["lse"]
    parts = {"base": per_token(base_w, base_c), "topk": per_token(logits_w - base_w - lse_w, logits_c - base_c - lse_c),
             "lse": per_token(lse_w, lse_c)}
    for t in layers:
        w, c, _ = best[f"hidden {t}"]
        parts[f"hidden {t}"] = per_token(w - base_w, c - base_c)
    cache = open_cache(cfg.cache.dir, layers=[])
    return {"tokens": tokens, "rounds": rounds, "topk": cache.topk, "lse_planes": len(cache.temperatures),
            "hidden_codec": cache.manifest["hidden_codec"], "parts": parts, "item": per_token(*best["item"]),
            "notes": []}
