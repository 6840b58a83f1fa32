"""Phase-two benchmark: training from the cache vs training from the live teacher (--online), side by side
in one run, with the same student, the same batches and the same loss.

1. Student: the teacher pruned by `distill prune` (6 least important blocks removed).
2. Cache: the same sequences, the layers the map needs (mapping selected, stride 3).
3. Three child processes, one at a time (so each peak RSS is its own):
     cache   - `run_train` from the cache           (step time, peak RSS / CUDA peak allocated)
     online  - `run_train --online`                 (same)
     loader  - the cache DataLoader alone           (tokens/s it can deliver; decode cost of each part)
   Step time = wall time between consecutive optimizer steps (data + teacher + student), median over the
   steps after the warm-up. The DataLoader fetches one batch ahead (accelerate's end-of-data lookahead),
   so the online collator's teacher forward for step i+1 runs inside step i; one extra final step,
   which has no batch left to fetch, is run but not timed.

    python scripts/bench_train.py [--sequences 40] [--steps 6] [--warmup 2] [--batch-size 4]
    python scripts/bench_train.py --teacher-size 360m   # a larger (random-init, SmolLM2-360M shape) teacher

Every mode prints what each child measured as soon as that child returns (a run cut off by a time limit
keeps what finished), and a child that fails prints the tail of its stderr and is recorded as failed; the
run goes on with the next child. The summary tables at the end repeat the rows. `--out FILE.jsonl`
appends a header line (the run's settings, the device name) and then one JSON line per finished child
(its name, mode, settings and result dict, or its error), each written and flushed when it happens.

`--bf16` trains every child, the stock fine-tune included, with bf16 mixed precision (training.bf16=true:
torch autocast, on the CPU too); the cache and the teacher stay as they are.

`--objectives` times the loss objectives instead, all from the same cache, one child per variant: the
demo loss (kl, gamma 0.2 cosine) with and without FDD (delta 0.2; goal <= 1.05x), and each divergence
in place of kl (`loss.logits`), side by side with the plain kl step. The step-time ratios are the point;
the variants run in the order listed, three rounds (ABC ABC ABC), and each variant's step time is the
fastest round's median (anything else on the machine only ever adds time).

    python scripts/bench_train.py --objectives [--steps 6]

`--targets` times logits KD (alpha .4, beta .4, gamma 0, kl at T = 2) on each kind of teacher target, from
one cache that holds all three (cache.logits=topk+sampled+exact): the top-64 logits with the exact tail
bucket, exact full-distribution targets (the teacher's head applied to its cached last layer, the dense
divergence over the whole vocabulary), and K = 64 sampled draws. Three rounds as --objectives, the step
time and peak memory against the top-k step, and each kind's bytes per token in that cache.

    python scripts/bench_train.py --targets [--bf16] [--steps 6]

`--vs-finetune` puts distillation next to a plain fine-tune of the same student: one child per
configuration, one at a time, the same student, batches (batch size x seq len), dtype, number of steps
and optimizer settings (the same TrainingArguments):
     finetune    - the stock `transformers.Trainer`, labels = input_ids (the cache's train sequences,
                   held in memory), the model's own CE; no distillation. The reference of every ratio.
     kd-dense    - `run_train` from the cache, demo loss (alpha .4, beta .4, gamma .2), loss.chunk_tokens=0
                   (the full [tokens, vocab] logits)
     kd-chunked  - the same with the chunked vocabulary loss (the default chunk, or --chunk-tokens N)
     ce-only     - `run_train`, alpha 1, beta 0, gamma 0 (chunked): CE only, nothing read but input_ids
     online      - `run_train --online` (live teacher, demo loss, chunked), for the memory column
     loader      - the cache DataLoader alone, built with the DataLoader settings of the training runs
                   (dataloader_num_workers, _pin_memory, _prefetch_factor, ... of the TrainingArguments
                   pipeline.recipes.train.training_arguments resolves, CUDA defaults included), a fresh
                   reader each epoch, batches left on the host, in tokens/s against what kd-chunked consumed
                   (tokens per step / step s; goal >= 3x); then, in the same process without workers, the
                   decode cost per token position of each part of a cached item: the top-k ids + logits, the
                   lse planes, each mapped hidden layer (a reader pass that decodes the part minus one that
                   decodes input_ids only), in wall and CPU microseconds and tokens/s per core
   It prints median step time and peak memory with both ratios against finetune (goals: KD step <= 1.05x,
   KD memory <= 1.05x, CE-only memory < 1.00x), then where the time of a step goes, as mean seconds per
   optimizer step over the timed steps, measured by wrapping pipeline and Trainer functions inside each
   child (no pipeline change; on CUDA torch.cuda.synchronize() at every boundary, in every child alike):
     batch read          Trainer.get_batch_samples (cache read + decode + collate; online: the teacher)
     student forward     forward pre-hook / hook on the student model (exclusive of what follows)
     head + vocab losses chunked_head_loss, dense_vocab_loss, logits_loss, cross_entropy,
                         sampled_logits_loss as pipeline.train.trainer calls them, the output-embedding module
                         (the dense path's and the fine-tune's head matmul run inside the forward) and, for the
                         fine-tune, the model's loss_function. The chunked loss computes the head's gradients
                         here, in its forward.
     hidden + projectors hidden_loss, dynamics_loss and the projectors' forward
     backward            the Trainer's accelerator.backward
     optimizer           between the on_pre_optimizer_step and on_optimizer_step callbacks
     rest                everything else (gradient clipping, zero_grad, scheduler, callbacks, masks, ...)
   Phases are exclusive (a nested phase's time is not counted in the outer one), so they sum to the step.
   A function missing from pipeline.train.trainer is skipped with a note (its time falls in the enclosing
   phase: rest); the others still time the phase.
   Peak memory is the child's own VmHWM on CPU (imports and the loaded model included; the table notes
   the RSS after imports) or torch.cuda.max_memory_allocated on CUDA.

    python scripts/bench_train.py --vs-finetune [--sequences 24 --steps 3 --warmup 1] [--chunk-tokens 512]

`--quick` (with --vs-finetune) is the one-shot GPU size: seq len 1024, batch 8, 3 timed steps after 2
warm-up, 48 sequences (batch x (warm-up + steps + 1): one epoch covers every step), the loader timed for
>= 3 s; sized for the whole run (models, cache build, the six children) to end within 4 minutes on one
H100. An explicit --seq-len, --batch-size, --steps, --warmup, --sequences or --loader-seconds overrides
its value (with small ones it runs on a CPU too).

    python scripts/bench_train.py --vs-finetune --quick [--student-vocab 262144] [--bf16] --out run.jsonl

`--teacher-size 360m|1.7b` swaps in a random-init teacher of that SmolLM2 shape (same tokenizer): the
numbers measure time and memory, not quality, and show how the ratios move as the teacher outgrows
the student.

`--student-vocab N` (e.g. 262144, a Gemma-3-sized vocabulary) swaps both models for random-init ones of
SmolLM2-135M width with an N-token vocabulary: an 8-block teacher and a 4-block student (mapping uniform),
the packaged SmolLM2 tokenizer (its ids are < 49,152, so they fit), the cache built from that teacher.
The vocabulary head then dominates the step; seq len and batch size default to 128 and 2 in this mode
(the same for every child; --quick's sizes win). Works with every mode.

    python scripts/bench_train.py --vs-finetune --student-vocab 262144
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.resources import peak_memory, rss_now_mib  # noqa: E402

DEMO = ROOT / "configs" / "demo.yaml"
# SmolLM2 family shapes (vocab 49,152, tied embeddings) for random-init teachers
TEACHER_SHAPES = {
    "360m": {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 15,
             "num_key_value_heads": 5},
    "1.7b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
             "num_key_value_heads": 32},
}
# --student-vocab N: random-init teacher and student of SmolLM2-135M width with this many blocks
RANDOM_TEACHER_BLOCKS, RANDOM_STUDENT_BLOCKS = 8, 4
PACKAGED_VOCAB = 49152  # the packaged SmolLM2 tokenizer's ids are below this
# --quick (--vs-finetune): one epoch of 48 sequences covers the 2 + 3 (+ 1 untimed) steps
QUICK = {"seq_len": 1024, "batch_size": 8, "steps": 3, "warmup": 2, "loader_seconds": 3.0}
DEFAULTS = {"steps": 6, "warmup": 2, "sequences": 40, "loader_seconds": 10.0}
# the settings every child gets on its command line (the parent resolves them once)
CHILD_ARGS = ("sequences", "seq_len", "batch_size", "steps", "warmup", "stride", "mapping", "loader_seconds")
ERROR_TAIL = 4000  # characters of a failed child's stderr that are printed and recorded


def overrides(args, work: Path, teacher: str) -> list[str]:
    stride = args.stride
    return [
        f"teacher.model={teacher}", f"student.model={work / 'student'}", f"cache.dir={work / 'cache'}",
        f"data.num_sequences={args.sequences}", f"data.seq_len={args.seq_len}", "data.heldout_fraction=0",
        "cache.layers=auto", f"cache.batch_size={args.batch_size}", "cache.shard_sequences=32",
        "cache.chunk_sequences=8", f"mapping.strategy={args.mapping}", f"mapping.stride={stride}",
    ]


def training(args, out: Path) -> list[str]:
    """training.* overrides shared by every child. The DataLoader settings are left to the defaults of
    pipeline.recipes.train.training_arguments, so the cache children, the fine-tune and the loader child
    all follow them (and the online child gets what run_train gives an online run)."""
    t = {
        "output_dir": str(out), "per_device_train_batch_size": args.batch_size, "max_steps": args.warmup + args.steps + 1,
        "learning_rate": 1e-4, "logging_steps": 1000, "save_strategy": "no", "eval_strategy": "no", "warmup_steps": 0,
        "seed": 0, "use_cpu": not _cuda(), "bf16": args.bf16,
    }
    return [f"training.{k}={json.dumps(v)}" for k, v in t.items()]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def layer_map_of(args, work: Path, cfg) -> dict[int, int]:
    """The student -> teacher layer map every run_train child builds (student depth and kept blocks from
    its folder, teacher depth from its config)."""
    from pipeline.sources.models import load_config as model_config
    from pipeline.student.layer_map import build_layer_map, read_kept_layers

    n_student = model_config(str(work / "student")).num_hidden_layers
    n_teacher = model_config(args.teacher_path).num_hidden_layers
    return build_layer_map(cfg.mapping.strategy, n_student, n_teacher, cfg.mapping.stride,
                           read_kept_layers(work / "student"))


# ----------------------------------------------------------------------------- children


# --objectives: (name, loss overrides) over the demo loss; the first is the reference of the ratios
OBJECTIVES = [
    ("kl (demo loss)", []),
    ("kl + fdd (delta 0.2)", ["loss.delta=0.2", "loss.dynamics=fdd"]),
    ("reverse_kl", ["loss.logits=reverse_kl"]),
    ("skew_kl (lambda 0.1)", ["loss.logits=skew_kl"]),
    ("skew_reverse_kl (lambda 0.1)", ["loss.logits=skew_reverse_kl"]),
    ("jsd", ["loss.logits=jsd"]),
    ("gjsd (beta 0.5)", ["loss.logits=gjsd"]),
]


# --targets: (name, overrides) of logits KD on each kind of target of one cache holding all three; the first
# is the reference of the ratios
TARGET_CACHE = ["cache.logits=topk+sampled+exact", "cache.samples=64"]
TARGET_KINDS = (("top-64 + tail bucket", "topk"), ("exact (full distribution)", "exact"), ("sampled, K = 64", "sampled"))
TARGETS = [(name, [*TARGET_CACHE, "loss.gamma=0.0", f"loss.logits_source={kind}"]) for name, kind in TARGET_KINDS]


# --vs-finetune: (name, child, loss overrides, description); the first is the reference of the ratios
def vs_finetune_runs(chunk: int | None) -> list[tuple[str, str, list[str], str]]:
    ch = [f"loss.chunk_tokens={chunk}"] if chunk else []
    c = f"chunk {chunk or _default_chunk()}"
    return [
        ("finetune", "finetune", [], "stock Trainer, CE on input_ids"),
        ("kd-dense", "cache", ["loss.chunk_tokens=0"], "demo loss, dense logits"),
        ("kd-chunked", "cache", ch, f"demo loss, {c}"),
        ("ce-only", "cache", ["loss.alpha=1", "loss.beta=0", "loss.gamma=0", *ch], f"alpha 1 beta 0 gamma 0, {c}"),
        ("online", "online", ch, f"live teacher, demo loss, {c}"),
    ]


def _default_chunk() -> int:
    from pipeline.config import load_config

    return load_config(DEMO).loss.chunk_tokens


PHASES = ("batch", "forward", "head", "hidden", "backward", "optimizer", "rest")
PHASE_NAMES = {"batch": "batch read", "forward": "student forward", "head": "head + vocab losses",
               "hidden": "hidden + projectors", "backward": "backward", "optimizer": "optimizer", "rest": "rest"}
# the loss functions pipeline.train.trainer calls, by the phase their time goes to (looked up by name there)
TRAINER_FUNCTIONS = {"head": ("chunked_head_loss", "dense_vocab_loss", "logits_loss", "cross_entropy",
                              "sampled_logits_loss"),
                     "hidden": ("hidden_loss", "dynamics_loss")}


class Breakdown:
    """Exclusive phase timers: the time between two boundaries goes to the innermost open phase ("rest"
    when none is open). `step()` closes one optimizer step (its phases sum to the step's wall time)."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        self.stack: list[str] = []
        self.acc = dict.fromkeys(PHASES, 0.0)
        self.steps: list[dict] = []
        self.ends: list[float] = []
        self.last: float | None = None
        self.notes: list[str] = []  # what could not be wrapped (its time falls in the enclosing phase)

    def _now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def _charge(self) -> float:
        now = self._now()
        if self.last is not None:
            self.acc[self.stack[-1] if self.stack else "rest"] += now - self.last
        self.last = now
        return now

    def enter(self, phase: str) -> None:
        self._charge()
        self.stack.append(phase)

    def exit(self) -> None:
        self._charge()
        if self.stack:
            self.stack.pop()

    def begin(self) -> None:  # on_train_begin
        self.acc = dict.fromkeys(PHASES, 0.0)
        self.last = None
        self.ends.append(self._charge())

    def step(self) -> None:  # on_step_end
        self.ends.append(self._charge())
        self.steps.append(self.acc)
        self.acc = dict.fromkeys(PHASES, 0.0)

    def wrap(self, phase: str, fn):
        @functools.wraps(fn)
        def timed(*a, **k):
            self.enter(phase)
            try:
                return fn(*a, **k)
            finally:
                self.exit()

        return timed

    def wrap_attr(self, owner, name: str, phase: str, where: str) -> None:
        """owner.name = the timed owner.name; a name the installed version lacks is noted and skipped, so a
        renamed function costs a breakdown column, not the run."""
        fn = getattr(owner, name, None)
        if callable(fn):
            setattr(owner, name, self.wrap(phase, fn))
        else:
            self.notes.append(f"{where}.{name} not found: not timed (its time falls in the enclosing phase)")

    def hook(self, module, phase: str) -> None:
        module.register_forward_pre_hook(lambda *a: self.enter(phase))
        module.register_forward_hook(lambda *a: self.exit(), always_call=True)

    def install(self) -> None:
        """Monkeypatch, in this process only: the Trainer's batch fetch, accelerate's backward, the loss
        functions pipeline.train.trainer calls, and (when train() starts) hooks on the student, its output
        embedding, the projectors and, for a stock Trainer, the model's loss_function."""
        import accelerate
        import transformers

        import pipeline.train.trainer as tr

        T = transformers.Trainer
        self.wrap_attr(T, "get_batch_samples", "batch", "transformers.Trainer")
        self.wrap_attr(accelerate.Accelerator, "backward", "backward", "accelerate.Accelerator")
        for phase, names in TRAINER_FUNCTIONS.items():
            for name in names:
                self.wrap_attr(tr, name, phase, "pipeline.train.trainer")
        train, bd = T.train, self

        @functools.wraps(train)
        def train_hooked(trainer, *a, **k):
            model = trainer.model
            bd.hook(model, "forward")
            if model.get_output_embeddings() is not None:
                bd.hook(model.get_output_embeddings(), "head")
            for module in getattr(trainer, "projectors", {}).values():
                bd.hook(module, "hidden")
            if not hasattr(trainer, "loss_spec"):  # the stock Trainer: the model computes its own CE
                model.loss_function = bd.wrap("head", model.loss_function)
            return train(trainer, *a, **k)

        T.train = train_hooked


def step_clock(args, breakdown: bool):
    """(callback, result()): wall time between optimizer steps; with `breakdown`, per-phase times too; and
    the autocast dtype the student's forward ran under (None: none), which shows that --bf16 took effect."""
    import torch
    from transformers import TrainerCallback

    bd = Breakdown()
    if breakdown:
        bd.install()
    seen: dict = {}

    def record_autocast(module, inputs):
        # inside the model's forward (the input embedding): accelerate's autocast wraps forward, not the hooks
        if "autocast" not in seen:
            device = module.weight.device.type
            seen["autocast"] = (str(torch.get_autocast_dtype(device)).removeprefix("torch.")
                                if torch.is_autocast_enabled(device) else None)

    class StepClock(TrainerCallback):
        def on_train_begin(self, *a, model=None, **k):
            model.get_input_embeddings().register_forward_pre_hook(record_autocast)
            bd.begin()

        def on_pre_optimizer_step(self, *a, **k):
            if breakdown:
                bd.enter("optimizer")

        def on_optimizer_step(self, *a, **k):
            if breakdown:
                bd.exit()

        def on_step_end(self, *a, **k):
            bd.step()

    def result() -> dict:
        window = slice(args.warmup, args.warmup + args.steps)
        steps = [b - a for a, b in zip(bd.ends, bd.ends[1:])][window]
        out = {"step_s": statistics.median(steps), "steps": steps, "autocast": seen.get("autocast")}
        if breakdown:
            timed = bd.steps[window]
            out["breakdown"] = {p: statistics.fmean(s[p] for s in timed) for p in PHASES}
        if bd.notes:
            out["notes"] = bd.notes
        return out

    return StepClock(), result


def child_train(args, work: Path, online: bool, loss: list[str] | None = None, breakdown: bool = False) -> dict:
    from pipeline.config import load_config
    from pipeline.recipes.train import run_train

    base = rss_now_mib()
    clock, result = step_clock(args, breakdown)
    mode = "online" if online else "cache"
    cfg = load_config(DEMO, overrides(args, work, args.teacher_path) + training(args, work / f"run-{mode}")
                      + list(loss or []))
    run_train(cfg, online=online, callbacks=[clock], echo=lambda m: None)
    return {**result(), **peak_memory(), "rss_after_imports_mib": base}


def child_finetune(args, work: Path, breakdown: bool = False) -> dict:
    """The reference: the stock transformers.Trainer fine-tuning the student with plain CE (labels =
    input_ids) on the cache's train sequences, with the TrainingArguments `run_train` would build."""
    import numpy as np
    import torch
    from transformers import Trainer

    from pipeline.config import load_config
    from pipeline.train.arguments import training_arguments
    from pipeline.sources import models
    from pipeline.train.dataset import CacheDataset

    base = rss_now_mib()
    clock, result = step_clock(args, breakdown)
    cfg = load_config(DEMO, overrides(args, work, args.teacher_path) + training(args, work / "run-finetune"))
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
    return {**result(), **peak_memory(), "rss_after_imports_mib": base}


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


def child_loader(args, work: Path) -> dict:
    """The cache DataLoader alone, as the Trainer builds it for a kd run (the same dataset, sampler, collate
    and the DataLoader settings of the TrainingArguments run_train resolves), in tokens/s over >= 2 epochs
    and >= --loader-seconds; then the decode cost of each part of an item (decode_costs)."""
    from torch.utils.data import DataLoader

    from pipeline.config import load_config
    from pipeline.train.arguments import training_arguments
    from pipeline.train.dataset import CacheDataset, ChunkShuffleSampler, collate
    from pipeline.train.trainer import SHUFFLE_WINDOW

    cfg = load_config(DEMO, overrides(args, work, args.teacher_path) + training(args, work / "run-loader"))
    targs = training_arguments(cfg.training)
    layers = sorted(set(layer_map_of(args, work, cfg).values()))
    # the Trainer's own DataLoader arguments (transformers.Trainer._get_dataloader)
    settings = {"num_workers": targs.dataloader_num_workers, "pin_memory": targs.dataloader_pin_memory,
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

    loader = DataLoader(FreshReaderEachEpoch(ds), batch_size=targs.train_batch_size, sampler=epochs(),
                        collate_fn=collate, **settings)
    tokens = sum(batch["input_ids"].numel() for batch in loader)
    seconds = time.perf_counter() - t0
    del loader  # its workers end before the decode timing below
    settings["batch_size"] = targs.train_batch_size
    return {"tokens_per_s": tokens / seconds, "epochs": done["epochs"], "seconds": seconds, "dataloader": settings,
            "decode": decode_costs(cfg, layers, targs.train_batch_size), **peak_memory()}


def decode_costs(cfg, layers: list[int], batch_size: int, rounds: int = 3) -> dict:
    """Microseconds per cached token position (wall and this process's CPU, every thread) to decode each part
    of a cache chunk, here, without workers: reader passes over the train split's chunks that decode
    input_ids only (the base), + the top-k targets and lse, + one mapped hidden layer each; a part costs its
    pass minus the base. Within the logits pass the reader's decode_lse calls are timed on their own: lse;
    top-k is the rest of that pass (its Arrow column reads included). Then the whole item as training reads
    it (CacheDataset + collate, every part at once). Best of `rounds` (the machine only ever adds time);
    each pass opens its reader outside the timed window."""
    from torch.utils.data import DataLoader

    import pipeline.cache.reader as reader
    from pipeline.train.dataset import CacheDataset, collate

    lse = {"wall": 0.0, "cpu": 0.0}
    notes = []
    decode_lse = getattr(reader, "decode_lse", None)
    if callable(decode_lse):
        @functools.wraps(decode_lse)
        def timed_lse(*a, **k):
            w, c = time.perf_counter(), time.process_time()
            try:
                return decode_lse(*a, **k)
            finally:
                lse["wall"] += time.perf_counter() - w
                lse["cpu"] += time.process_time() - c

        reader.decode_lse = timed_lse
    else:
        notes.append("pipeline.cache.reader.decode_lse not found: top-k and lse are one part")

    def read_pass(only: list[int], logits: bool) -> tuple[float, float, int, dict]:
        cache = reader.open_cache(cfg.cache.dir, layers=only, logits=logits)
        chunks = sorted({cache.locate(i)[:2] for i in cache.indices("train")})
        lse.update(wall=0.0, cpu=0.0)
        rows, w, c = 0, time.perf_counter(), time.process_time()
        for pos, chunk in chunks:
            rows += cache.read_chunk(pos, chunk)["input_ids"].shape[0]
        return time.perf_counter() - w, time.process_time() - c, rows * cache.seq_len, dict(lse)

    def item_pass() -> tuple[float, float, int]:
        ds = CacheDataset(cfg.cache.dir, "train", layers, cfg.loss.temperature)
        tokens, w, c = 0, time.perf_counter(), time.process_time()
        for batch in DataLoader(ds, batch_size=batch_size, collate_fn=collate):
            tokens += batch["input_ids"].numel()
        return time.perf_counter() - w, time.process_time() - c, tokens

    passes = {"base": ([], False), "logits": ([], True), **{f"hidden {t}": ([t], False) for t in layers}}
    best: dict[str, tuple] = {}
    for _ in range(rounds):
        for name, (only, logits) in passes.items():
            r = read_pass(only, logits)
            if name not in best or r[0] < best[name][0]:
                best[name] = r
        r = item_pass()
        if "item" not in best or r[0] < best["item"][0]:
            best["item"] = r
    tokens = best["base"][2]

    def per_token(wall: float, cpu: float) -> dict:
        return {"wall_us": 1e6 * wall / tokens, "cpu_us": 1e6 * cpu / tokens}

    base_w, base_c = best["base"][:2]
    logits_w, logits_c, _, lse_t = best["logits"]
    cache = reader.open_cache(cfg.cache.dir, layers=[])
    parts = {"base": per_token(base_w, base_c)}
    if callable(decode_lse):
        parts["topk"] = per_token(logits_w - base_w - lse_t["wall"], logits_c - base_c - lse_t["cpu"])
        parts["lse"] = per_token(lse_t["wall"], lse_t["cpu"])
    else:
        parts["topk+lse"] = per_token(logits_w - base_w, logits_c - base_c)
    for t in layers:
        w, c = best[f"hidden {t}"][:2]
        parts[f"hidden {t}"] = per_token(w - base_w, c - base_c)
    item_w, item_c, item_tokens = best["item"]
    return {"tokens": tokens, "rounds": rounds, "topk": cache.topk, "lse_planes": len(cache.temperatures),
            "hidden_codec": cache.manifest["hidden_codec"], "parts": parts,
            "item": {"wall_us": 1e6 * item_w / item_tokens, "cpu_us": 1e6 * item_c / item_tokens}, "notes": notes}


# ----------------------------------------------------------------------------- parent


def random_model(path: Path, shape: dict, seed: int = 0) -> str:
    """A random-init SmolLM2-135M-based model with `shape` overriding its config, with the packaged tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.sources.models import load_config as model_config, load_tokenizer

    base = model_config("smollm2-135m-instruct")
    cfg = base.__class__.from_dict({**base.to_dict(), **shape})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    load_tokenizer("smollm2-135m-instruct").save_pretrained(path)
    return str(path)


def make_teacher(size: str, work: Path) -> str:
    """A random-init SmolLM2-shaped teacher of `size`, with the packaged tokenizer."""
    return random_model(work / f"teacher-{size}", TEACHER_SHAPES[size])


def term_cost(args, work: Path) -> tuple[float, float, int, int]:
    """Seconds for the FDD term and for the cosine hidden loss alone (forward + backward) on tensors of one
    step's shape: the mapped student blocks' projected outputs and the teacher's layers, every token valid.
    The step-time ratio between runs carries the machine's noise (~5-10%); this is the term's own cost."""
    import torch

    from pipeline.config import load_config
    from pipeline.losses.dynamics import dynamics_loss
    from pipeline.losses.hidden import hidden_loss
    from pipeline.sources.models import load_config as model_config

    cfg = load_config(DEMO, overrides(args, work, args.teacher_path))
    layer_map = layer_map_of(args, work, cfg)
    n, d = args.batch_size * args.seq_len, model_config(args.teacher_path).hidden_size
    g = torch.Generator().manual_seed(0)
    students = [torch.randn(n, d, generator=g, requires_grad=True) for _ in layer_map]
    teachers = [torch.randn(n, d, generator=g) for _ in layer_map]
    mask = torch.ones(n, dtype=torch.bool)

    def timed(fn) -> float:
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            fn().backward()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    fdd = timed(lambda: dynamics_loss("fdd", students, teachers, mask))
    cosine = timed(lambda: torch.stack([hidden_loss("cosine", s_, t_, mask) for s_, t_ in zip(students, teachers)]).mean())
    return fdd, cosine, len(layer_map), d


class Runner:
    """Runs the children one at a time and keeps the run's record: each child's result (or its error, with
    the tail of its stderr printed at once), and with --out one JSON line per event, appended and closed
    (so flushed) before the next child starts."""

    def __init__(self, args, work: Path, run: str):
        from pipeline.config import load_config

        self.args, self.work, self.run = args, work, run
        self.out = Path(args.out) if args.out else None
        demo = load_config(DEMO)
        self.dtype, self.default_chunk = demo.student.dtype, demo.loss.chunk_tokens
        self.device = device_name()
        self.notes: set[str] = set()  # printed once per run, not once per child

    def record(self, line: dict) -> None:
        if self.out is not None:
            with open(self.out, "a") as f:
                f.write(json.dumps(line) + "\n")

    def settings(self, mode: str, loss: list[str]) -> dict:
        """The settings of one child; chunk_tokens is the vocabulary chunk of a run_train child (0: dense)."""
        chunk = None
        if mode in ("cache", "online"):
            given = [int(x.split("=", 1)[1]) for x in loss if x.startswith("loss.chunk_tokens=")]
            chunk = given[-1] if given else self.default_chunk
        a = self.args
        return {"vocab": a.student_vocab or PACKAGED_VOCAB, "dtype": self.dtype, "bf16": a.bf16, "seq_len": a.seq_len,
                "batch_size": a.batch_size, "chunk_tokens": chunk, "device": self.device}

    def header(self, models: str, setup_s: float) -> None:
        import torch

        a = self.args
        print(f"{models}; {a.sequences} x {a.seq_len} tokens, batch {a.batch_size}, mapping {a.mapping} stride "
              f"{a.stride}; {a.steps} timed steps after {a.warmup} warm-up; bf16 {a.bf16}; torch threads "
              f"{torch.get_num_threads()}; device {self.device}; setup (models + cache build) {setup_s:.0f} s")
        self.record({"kind": "header", "run": self.run, "device": self.device, "models": models, "setup_s": setup_s,
                     "torch_threads": torch.get_num_threads(), "argv": sys.argv[1:],
                     "settings": {**self.settings("", []), "chunk_tokens": a.chunk_tokens or self.default_chunk,
                                  **{k: getattr(a, k) for k in CHILD_ARGS},
                                  "teacher_size": a.teacher_size, "quick": a.quick}})

    def child(self, name: str, mode: str, loss: list[str] | None = None, breakdown: bool = False) -> dict:
        """The child's result dict, or {"error": its stderr tail, "returncode": ...} when it failed."""
        a, loss = self.args, list(loss or [])
        cmd = [sys.executable, __file__, "--child", mode, "--work", str(self.work), "--teacher-path", a.teacher_path,
               *[f"--{k.replace('_', '-')}={getattr(a, k)}" for k in CHILD_ARGS],
               *(["--bf16"] if a.bf16 else []), *[f"--child-loss={x}" for x in loss],
               *(["--child-breakdown"] if breakdown else [])]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        if r.returncode == 0 and lines:
            result = json.loads(lines[-1][len("RESULT "):])
        else:
            result = {"error": (r.stderr or r.stdout)[-ERROR_TAIL:], "returncode": r.returncode}
            print(f"  {name}: FAILED (exit {r.returncode}, {wall:.0f} s); stderr tail:\n{result['error']}")
        result["child_s"] = wall
        for note in result.get("notes", []):
            if note not in self.notes:
                self.notes.add(note)
                print(f"  note: {note}")
        line = {"kind": "child", "run": self.run, "name": name, "mode": mode, "loss": loss,
                "settings": self.settings(mode, loss), "result": result}
        self.record(line)
        return result


def ok(r: dict | None) -> bool:
    return r is not None and "error" not in r


def mem_key(r: dict) -> str:
    return "cuda_peak_allocated_mib" if "cuda_peak_allocated_mib" in r else "peak_rss_mib"


# ----------------------------------------------------------------------------- --vs-finetune


GOALS = {"kd-dense": (1.05, 1.05, "<="), "kd-chunked": (1.05, 1.05, "<="), "ce-only": (None, 1.00, "<")}
LOADER_GOAL = 3.0  # the cache DataLoader delivers >= 3x the tokens/s kd-chunked consumes


def goal_text(ratio: float, limit: float | None, op: str) -> str:
    if limit is None:
        return ""
    met = ratio <= limit if op == "<=" else ratio < limit
    return f"{op} {limit:.2f}x: {'met' if met else 'missed'}"


def step_table_header(mem: str) -> str:
    return (f"| run | step s (median) | step vs finetune | goal | {mem.replace('_', ' ')} | memory vs finetune | goal |\n"
            "|---|---:|---:|---|---:|---:|---|")


def step_row(name: str, what: str, r: dict, ref: dict | None) -> str:
    if not ok(r):
        return f"| {name} ({what}) | failed | | | | | |"
    mem = mem_key(r)
    if name == "finetune":
        return f"| {name} ({what}) | {r['step_s']:.3f} | 1.000 | reference | {r[mem]:.0f} | 1.000 | reference |"
    if not ok(ref) or mem not in ref:
        return f"| {name} ({what}) | {r['step_s']:.3f} | n/a | | {r[mem]:.0f} | n/a | |"
    step, peak = r["step_s"] / ref["step_s"], r[mem] / ref[mem]
    gs, gm, op = GOALS.get(name, (None, None, ""))
    return (f"| {name} ({what}) | {r['step_s']:.3f} | {step:.3f} | {goal_text(step, gs, '<=')} | {r[mem]:.0f} | "
            f"{peak:.3f} | {goal_text(peak, gm, op)} |")


PHASE_TABLE_HEADER = ("| run | " + " | ".join(PHASE_NAMES[p] for p in PHASES) + " | step (mean) |\n"
                      + "|---|" + "---:|" * (len(PHASES) + 1))


def phase_row(name: str, r: dict) -> str:
    if not ok(r):
        return f"| {name} | failed |" + " |" * len(PHASES)
    b = r["breakdown"]
    total = sum(b.values())
    return (f"| {name} | " + " | ".join(f"{b[p]:.3f} ({100 * b[p] / total:.0f}%)" for p in PHASES)
            + f" | {total:.3f} |")


def print_loader(ld: dict, consumer: str, r: dict | None, tok_step: int) -> None:
    """The loader's tokens/s against what `consumer` (a finished training child, or None) consumed, then the
    decode cost of each part."""
    dl = ld["dataloader"]
    line = (f"cache DataLoader with the training run's settings (batch {dl['batch_size']}, {dl['num_workers']} "
            f"workers, pin_memory {dl['pin_memory']}, prefetch_factor {dl['prefetch_factor']}): "
            f"{ld['tokens_per_s']:.0f} tokens/s over {ld['epochs']} epochs ({ld['seconds']:.1f} s)")
    if ok(r):
        consumed = tok_step / r["step_s"]
        ratio = ld["tokens_per_s"] / consumed
        line += (f" = {ratio:.1f}x what {consumer} consumes ({consumed:.0f} tokens/s = {tok_step} tokens / "
                 f"{r['step_s']:.3f} s per step); goal >= {LOADER_GOAL:.0f}x: "
                 f"{'met' if ratio >= LOADER_GOAL else 'missed'}")
    else:
        line += f" ({consumer} failed: no consumption to compare)"
    print(line)
    print_decode(ld["decode"])


def print_decode(d: dict) -> None:
    labels = {"base": "input_ids + Arrow record batch (every item)", "topk": f"top-k ids + logits (k {d['topk']})",
              "lse": f"lse ({d['lse_planes']} temperature planes)", "topk+lse": f"top-k ids + logits (k {d['topk']}) + lse"}

    def row(label: str, p: dict) -> str:
        per_core = f"{1e6 / p['cpu_us']:.0f}" if p["cpu_us"] > 0 else "n/a"
        return f"| {label} | {p['wall_us']:.2f} | {p['cpu_us']:.2f} | {per_core} |"

    print(f"decode cost per cached token position, this process, no workers (best of {d['rounds']} passes over the "
          f"train split's {d['tokens']} positions; a part = its reader pass minus the input_ids-only pass):")
    print("| part | µs/token (wall) | µs/token (CPU) | tokens/s per core (CPU) |\n|---|---:|---:|---:|")
    for key, p in d["parts"].items():
        label = labels.get(key, f"hidden layer {key.split()[-1]} ({d['hidden_codec']}, zarr)")
        print(row(label, p))
    total = {k: sum(p[k] for p in d["parts"].values()) for k in ("wall_us", "cpu_us")}
    print(row("sum: what a kd item decodes", total))
    print(row("whole item: CacheDataset + collate, DataLoader without workers", d["item"]))
    for note in d["notes"]:
        print(f"note: {note}")


def run_vs_finetune(args, runner: Runner) -> None:
    runs = vs_finetune_runs(args.chunk_tokens)
    vs: dict[str, dict] = {}
    for name, child, loss, what in runs:
        vs[name] = r = runner.child(name, child, loss, breakdown=True)
        if ok(r):
            print(f"\n{name} ({what}): {r['child_s']:.0f} s child; autocast {r['autocast']}; steps (s) "
                  + " ".join(f"{s:.3f}" for s in r["steps"]))
            print(f"{step_table_header(mem_key(r))}\n{step_row(name, what, r, vs.get('finetune'))}\n"
                  f"{PHASE_TABLE_HEADER}\n{phase_row(name, r)}")
    tok_step = args.batch_size * args.seq_len
    ld = runner.child("loader", "loader")
    if ok(ld):
        print(f"\nloader: {ld['child_s']:.0f} s child")
        print_loader(ld, "kd-chunked", vs.get("kd-chunked"), tok_step)

    print("\nsummary")
    done = [r for r in vs.values() if ok(r)]
    if not done:
        print("every training child failed")
        return
    ref = vs["finetune"]
    print(step_table_header(mem_key(done[0])))
    for name, _, _, what in runs:
        print(step_row(name, what, vs[name], ref))
    if ok(ref) and mem_key(ref) == "peak_rss_mib":
        print(f"(peak RSS includes the child's imports: {ref['rss_after_imports_mib']:.0f} MiB right after them)")
    print("\nper optimizer step, mean s over the timed steps (share of the step):")
    print(PHASE_TABLE_HEADER)
    for name, _, _, _ in runs:
        print(phase_row(name, vs[name]))
    print("steps (s): " + "; ".join(f"{name}: " + " ".join(f"{s:.2f}" for s in vs[name]["steps"])
                                     for name, _, _, _ in runs if ok(vs[name])))
    if ok(ld):
        print()
        print_loader(ld, "kd-chunked", vs.get("kd-chunked"), tok_step)


# ----------------------------------------------------------------------------- --objectives, default


def run_rounds(runner: Runner, variants: list[tuple[str, list[str]]], column: str,
               extra: tuple[str, dict[str, str]] | None = None) -> dict[str, float]:
    """Each variant in three rounds (ABC ABC ABC), one cache child at a time; prints each child as it ends,
    then a table of the best of the three median step times and the largest peak memory, both against the
    first variant (anything else on the machine only ever adds time). `extra`: one more column (its header,
    its cell by variant).
    Returns the step times of the variants that finished."""
    runs: dict[str, list[dict]] = {name: [] for name, _ in variants}
    for i in range(1, 4):
        for name, loss in variants:
            r = runner.child(f"{name}, round {i}", "cache", loss)
            if ok(r):
                runs[name].append(r)
                print(f"  {name}, round {i}: {r['step_s']:.2f} s/step, {r[mem_key(r)]:.0f} MiB peak "
                      f"({r['child_s']:.0f} s child)")
    ref = variants[0][0]
    done = [r for rs in runs.values() for r in rs]
    if not done:
        print("every child failed")
        return {}
    mem = mem_key(done[0])
    step = {name: min(r["step_s"] for r in rs) for name, rs in runs.items() if rs}
    peak = {name: max(r[mem] for r in rs) for name, rs in runs.items() if rs}
    more = f" {extra[0]} |" if extra else ""
    print(f"\n| {column} | step s (best of 3 medians) | vs {ref} | {mem.replace('_', ' ')} | vs {ref} |{more}")
    print("|---|---:|---:|---:|---:|" + ("---:|" if extra else ""))
    for name, _ in variants:
        cell = f" {extra[1].get(name, '')} |" if extra else ""
        if name not in step:
            print(f"| {name} | failed | | | |{cell}")
        elif ref not in step:
            print(f"| {name} | {step[name]:.2f} | n/a | {peak[name]:.0f} | n/a |{cell}")
        else:
            print(f"| {name} | {step[name]:.2f} | {step[name] / step[ref]:.3f} | {peak[name]:.0f} | "
                  f"{peak[name] / peak[ref]:.2f} |{cell}")
    print("steps (s): " + "; ".join(f"{name}: " + " ".join(f"{s:.2f}" for r in rs for s in r["steps"])
                                     for name, rs in runs.items() if rs))
    return step


def run_objectives(args, runner: Runner) -> None:
    step = run_rounds(runner, OBJECTIVES, "objective")
    fdd_s, cosine_s, n_mapped, d_teacher = term_cost(args, runner.work)
    ref = OBJECTIVES[0][0]
    if ref in step:
        print(f"\nthe terms alone (forward + backward on this step's tensors: {args.batch_size * args.seq_len} tokens, "
              f"{n_mapped} mapped layers, d_teacher {d_teacher}; median of 20):\n"
              f"  fdd    {fdd_s * 1e3:.1f} ms = {fdd_s / step[ref]:.4f} of the {ref} step -> "
              f"fdd step / plain step = {1 + fdd_s / step[ref]:.3f} (goal <= 1.05)\n"
              f"  cosine hidden loss {cosine_s * 1e3:.1f} ms = {cosine_s / step[ref]:.4f} of the step")


def target_bytes(cache_dir: Path) -> dict[str, str]:
    """Bytes per token of each kind of target in the cache, by TARGETS name (the exact targets' input is
    layer n among the hidden layers; the head is stored once per cache)."""
    from pipeline.cache.info import cache_facts, target_kind_bytes

    info = cache_facts(str(cache_dir))
    return {name: f"{target_kind_bytes(info, kind):.0f}" for name, kind in TARGET_KINDS}


def run_targets(args, runner: Runner) -> None:
    run_rounds(runner, TARGETS, "targets (logits KD, gamma 0)", ("bytes/token", target_bytes(runner.work / "cache")))


def run_compare(args, runner: Runner) -> None:
    """The default mode: cache and online training, then the loader."""
    tok_step = args.batch_size * args.seq_len
    res = {}
    for mode in ("cache", "online"):
        res[mode] = r = runner.child(mode, mode)
        if ok(r):
            mem = mem_key(r)
            print(f"  {mode}: {r['step_s']:.3f} s/step, {tok_step / r['step_s']:.0f} tokens/s, {mem.replace('_', ' ')} "
                  f"{r[mem]:.0f} ({r['child_s']:.0f} s child); steps (s) " + " ".join(f"{s:.2f}" for s in r["steps"]))
    res["loader"] = ld = runner.child("loader", "loader")
    if ok(ld):
        print_loader(ld, "cache training", res["cache"], tok_step)

    c, o = res["cache"], res["online"]
    if not (ok(c) and ok(o)):
        return
    mem = mem_key(c)
    print(f"\n| mode | step s (median) | tokens/s | {mem.replace('_', ' ')} | step vs online | memory vs online |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in (("online (live teacher)", o), ("cache", c)):
        print(f"| {name} | {r['step_s']:.2f} | {tok_step / r['step_s']:.0f} | {r[mem]:.0f} | "
              f"{r['step_s'] / o['step_s']:.2f} | {r[mem] / o[mem]:.2f} |")
    print("steps (s): cache " + " ".join(f"{s:.2f}" for s in c["steps"]) + "; online "
          + " ".join(f"{s:.2f}" for s in o["steps"]))


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the sizes resolved: an explicit value, else --quick's, else the default."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=None,
                    help=f"cached sequences, default {DEFAULTS['sequences']} (--quick: batch x (warm-up + steps + 1)); "
                         ">= batch x (steps + warm-up + 1) keeps the timed steps in one epoch")
    ap.add_argument("--seq-len", type=int, default=None,
                    help=f"default 256 (128 with --student-vocab; --quick: {QUICK['seq_len']})")
    ap.add_argument("--batch-size", type=int, default=None,
                    help=f"default 4 (2 with --student-vocab; --quick: {QUICK['batch_size']})")
    ap.add_argument("--steps", type=int, default=None,
                    help=f"timed optimizer steps (after the warm-up), default {DEFAULTS['steps']} (--quick: {QUICK['steps']})")
    ap.add_argument("--warmup", type=int, default=None,
                    help=f"untimed first steps, default {DEFAULTS['warmup']} (--quick: {QUICK['warmup']})")
    ap.add_argument("--stride", type=int, default=3, help="mapping.stride: map every stride-th student block")
    ap.add_argument("--mapping", default="selected", help="mapping.strategy (selected needs the packaged teacher)")
    ap.add_argument("--teacher-size", choices=["135m", *TEACHER_SHAPES], default="135m",
                    help="135m: the packaged SmolLM2 teacher; others: a random-init teacher of that shape")
    ap.add_argument("--objectives", action="store_true",
                    help="time FDD and each divergence against the plain kl step (cache mode only)")
    ap.add_argument("--targets", action="store_true",
                    help="time logits KD on top-k, exact and sampled targets of one cache (cache mode only)")
    ap.add_argument("--vs-finetune", action="store_true",
                    help="finetune (stock Trainer, CE) vs kd-dense, kd-chunked, ce-only and online: step time, "
                         "peak memory, ratios against finetune, per-phase step breakdown; then the cache loader "
                         "against kd-chunked's consumption and the decode cost of each cached part")
    ap.add_argument("--quick", action="store_true",
                    help=f"--vs-finetune at the one-shot GPU size: seq len {QUICK['seq_len']}, batch "
                         f"{QUICK['batch_size']}, {QUICK['steps']} timed steps after {QUICK['warmup']} warm-up, "
                         f"sequences = batch x (warm-up + steps + 1), loader >= {QUICK['loader_seconds']:.0f} s "
                         "(the whole run, cache build included, sized for < 4 minutes on one H100); explicit "
                         "sizes override it")
    ap.add_argument("--chunk-tokens", type=int, default=None,
                    help="--vs-finetune: loss.chunk_tokens of the chunked children (default: the config's)")
    ap.add_argument("--student-vocab", type=int, default=None, metavar="N",
                    help=f"random-init teacher ({RANDOM_TEACHER_BLOCKS} blocks) and student ({RANDOM_STUDENT_BLOCKS} "
                         f"blocks) of SmolLM2-135M width with an N-token vocabulary (N >= {PACKAGED_VOCAB}), "
                         "instead of the packaged models")
    ap.add_argument("--bf16", action="store_true",
                    help="training.bf16=true (bf16 autocast) in every child, the stock fine-tune included")
    ap.add_argument("--loader-seconds", type=float, default=None,
                    help=f"the loader child reads >= 2 epochs and at least this long, default "
                         f"{DEFAULTS['loader_seconds']:.0f} (--quick: {QUICK['loader_seconds']:.0f})")
    ap.add_argument("--out", metavar="FILE.jsonl",
                    help="append a header line and one JSON line per finished child (written as each child ends)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--child-loss", action="append", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=["cache", "online", "loader", "finetune"], help=argparse.SUPPRESS)
    ap.add_argument("--child-breakdown", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--teacher-path", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.objectives + args.vs_finetune + args.targets > 1:
        ap.error("--objectives, --targets and --vs-finetune are separate runs")
    if args.quick and not args.vs_finetune:
        ap.error("--quick is a --vs-finetune size")
    if args.student_vocab is not None and args.student_vocab < PACKAGED_VOCAB:
        ap.error(f"--student-vocab must be >= {PACKAGED_VOCAB} (the packaged tokenizer's ids)")
    if args.student_vocab is not None and args.teacher_size != "135m":
        ap.error("--student-vocab builds its own teacher: leave --teacher-size out")
    if args.chunk_tokens is not None and args.chunk_tokens < 1:
        ap.error("--chunk-tokens must be >= 1 (kd-dense is the chunk 0 run)")
    small = args.student_vocab is not None
    preset = QUICK if args.quick else {**DEFAULTS, "seq_len": 128 if small else 256, "batch_size": 2 if small else 4}
    for key in ("seq_len", "batch_size", "steps", "warmup", "loader_seconds"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if args.sequences is None:
        args.sequences = args.batch_size * (args.warmup + args.steps + 1) if args.quick else DEFAULTS["sequences"]
    if args.out:
        args.out = str(Path(args.out).resolve())
    return args


def setup(args, work: Path) -> str:
    """The student, the teacher path (args.teacher_path) and the cache in `work`; returns the models' description."""
    from pipeline.config import load_config
    from pipeline.recipes.cache import build_cache
    from pipeline.recipes.prune import run_prune

    if args.student_vocab is not None:
        vocab = {"vocab_size": args.student_vocab}
        args.teacher_path = random_model(work / "teacher", {**vocab, "num_hidden_layers": RANDOM_TEACHER_BLOCKS})
        random_model(work / "student", {**vocab, "num_hidden_layers": RANDOM_STUDENT_BLOCKS}, seed=1)
        args.mapping = "uniform"  # no pruning.json: nothing for `selected` to read
        models = (f"teacher random-init SmolLM2-135M width, {RANDOM_TEACHER_BLOCKS} blocks, vocab "
                  f"{args.student_vocab}; student random-init, {RANDOM_STUDENT_BLOCKS} blocks, same vocab")
    else:
        if args.teacher_size == "135m":
            args.teacher_path = "smollm2-135m-instruct"
        else:
            args.teacher_path = make_teacher(args.teacher_size, work)
            if args.mapping == "selected":
                args.mapping = "uniform"  # the student's kept blocks index the packaged teacher, not this one
        # the student is the packaged SmolLM2 minus its 6 least important blocks
        run_prune("smollm2-135m-instruct", str(work / "student"), method="importance", remove="6",
                  calibration_sequences=16, heldout_sequences=0, progress=False, echo=lambda m: None)
        models = f"teacher {args.teacher_size} ({args.teacher_path}), student = SmolLM2-135M minus 6 blocks"
    build_cache(load_config(DEMO, overrides(args, work, args.teacher_path) + (TARGET_CACHE if args.targets else [])))
    return models


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    if args.child:
        work = Path(args.work)
        if args.child == "loader":
            result = child_loader(args, work)
        elif args.child == "finetune":
            result = child_finetune(args, work, args.child_breakdown)
        else:
            result = child_train(args, work, args.child == "online", args.child_loss, args.child_breakdown)
        print("RESULT " + json.dumps(result))
        return

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        models = setup(args, work)
        run = ("objectives" if args.objectives else "targets" if args.targets else "vs-finetune" if args.vs_finetune
               else "compare")
        runner = Runner(args, work, run)
        runner.header(models, time.perf_counter() - started)
        {"objectives": run_objectives, "targets": run_targets, "vs-finetune": run_vs_finetune,
         "compare": run_compare}[run](args, runner)
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.stdout.reconfigure(line_buffering=True)  # a run cut off by a time limit has printed all it finished
    main()
