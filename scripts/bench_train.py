"""Phase-two benchmark: training from the cache vs training from the live teacher (--online), side by side
in one run, with the same student, the same batches and the same loss.

1. Student: the teacher pruned by `distill prune` (6 least important blocks removed).
2. Cache: the same sequences, the layers the map needs (mapping selected, stride 3).
3. Three child processes, one at a time (so each peak RSS is its own):
     cache   - `run_train` from the cache           (step time, peak RSS / CUDA peak allocated)
     online  - `run_train --online`                 (same)
     loader  - the cache DataLoader alone           (tokens/s it can deliver)
   Step time = wall time between consecutive optimizer steps (data + teacher + student), median over the
   steps after the warm-up. The DataLoader fetches one batch ahead (accelerate's end-of-data lookahead),
   so the online collator's teacher forward for step i+1 runs inside step i; one extra final step,
   which has no batch left to fetch, is run but not timed.

    python scripts/bench_train.py [--sequences 40] [--steps 6] [--warmup 2] [--batch-size 4]
    python scripts/bench_train.py --teacher-size 360m   # a larger (random-init, SmolLM2-360M shape) teacher

`--objectives` times the loss objectives instead, all from the same cache, one child per variant: the
demo loss (kl, gamma 0.2 cosine) with and without FDD (delta 0.2; goal <= 1.05x), and each divergence
in place of kl (`loss.logits`), side by side with the plain kl step. The step-time ratios are the point;
the variants run in the order listed, three rounds (ABC ABC ABC), and each variant's step time is the
fastest round's median (anything else on the machine only ever adds time).

    python scripts/bench_train.py --objectives [--steps 6]

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
   It prints median step time and peak memory with both ratios against finetune (goals: KD step <= 1.05x,
   KD memory <= 1.10x, CE-only memory < 1.00x), then where the time of a step goes, as mean seconds per
   optimizer step over the timed steps, measured by wrapping pipeline and Trainer functions inside each
   child (no pipeline change; on CUDA torch.cuda.synchronize() at every boundary, in every child alike):
     batch read          Trainer.get_batch_samples (cache read + decode + collate; online: the teacher)
     student forward     forward pre-hook / hook on the student model (exclusive of what follows)
     head + vocab losses chunked_head_loss, logits_loss, cross_entropy as pipeline.train.trainer calls
                         them, the output-embedding module (the dense path's and the fine-tune's head
                         matmul run inside the forward) and, for the fine-tune, the model's loss_function.
                         The chunked loss computes the head's gradients here, in its forward.
     hidden + projectors hidden_loss, dynamics_loss and the projectors' forward
     backward            the Trainer's accelerator.backward
     optimizer           between the on_pre_optimizer_step and on_optimizer_step callbacks
     rest                everything else (gradient clipping, zero_grad, scheduler, callbacks, masks, ...)
   Phases are exclusive (a nested phase's time is not counted in the outer one), so they sum to the step.
   Peak memory is the child's own VmHWM on CPU (imports and the loaded model included; the table notes
   the RSS after imports) or torch.cuda.max_memory_allocated on CUDA.

    python scripts/bench_train.py --vs-finetune [--sequences 24 --steps 3 --warmup 1] [--chunk-tokens 512]

`--teacher-size 360m|1.7b` swaps in a random-init teacher of that SmolLM2 shape (same tokenizer): the
numbers measure time and memory, not quality, and show how the ratios move as the teacher outgrows
the student.

`--student-vocab N` (e.g. 262144, a Gemma-3-sized vocabulary) swaps both models for random-init ones of
SmolLM2-135M width with an N-token vocabulary: an 8-block teacher and a 4-block student (mapping uniform),
the packaged SmolLM2 tokenizer (its ids are < 49,152, so they fit), the cache built from that teacher.
The vocabulary head then dominates the step; seq len and batch size default to 128 and 2 in this mode
(the same for every child). Works with every mode.

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


def overrides(args, work: Path, teacher: str) -> list[str]:
    stride = args.stride
    return [
        f"teacher.model={teacher}", f"student.model={work / 'student'}", f"cache.dir={work / 'cache'}",
        f"data.num_sequences={args.sequences}", f"data.seq_len={args.seq_len}", "data.heldout_fraction=0",
        "cache.layers=auto", f"cache.batch_size={args.batch_size}", "cache.shard_sequences=32",
        "cache.chunk_sequences=8", f"mapping.strategy={args.mapping}", f"mapping.stride={stride}",
    ]


def training(args, out: Path) -> list[str]:
    t = {
        "output_dir": str(out), "per_device_train_batch_size": args.batch_size, "max_steps": args.warmup + args.steps + 1,
        "learning_rate": 1e-4, "logging_steps": 1000, "save_strategy": "no", "eval_strategy": "no", "warmup_steps": 0,
        "seed": 0,
        "use_cpu": not _cuda(), "dataloader_num_workers": 0,
    }
    return [f"training.{k}={json.dumps(v)}" for k, v in t.items()]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


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
        T.get_batch_samples = self.wrap("batch", T.get_batch_samples)
        accelerate.Accelerator.backward = self.wrap("backward", accelerate.Accelerator.backward)
        for name in ("chunked_head_loss", "logits_loss", "cross_entropy"):
            setattr(tr, name, self.wrap("head", getattr(tr, name)))
        for name in ("hidden_loss", "dynamics_loss"):
            setattr(tr, name, self.wrap("hidden", getattr(tr, name)))
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
    """(callback, result()): wall time between optimizer steps; with `breakdown`, per-phase times too."""
    from transformers import TrainerCallback

    bd = Breakdown()
    if breakdown:
        bd.install()

    class StepClock(TrainerCallback):
        def on_train_begin(self, *a, **k):
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
        out = {"step_s": statistics.median(steps), "steps": steps}
        if breakdown:
            timed = bd.steps[window]
            out["breakdown"] = {p: statistics.fmean(s[p] for s in timed) for p in PHASES}
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
    from transformers import AutoModelForCausalLM, Trainer

    from pipeline.config import load_config
    from pipeline.recipes.train import training_arguments
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

    student = AutoModelForCausalLM.from_pretrained(models.resolve_model(cfg.student.model),
                                                   dtype=models.TORCH_DTYPES[cfg.student.dtype])
    trainer = Trainer(model=student, args=training_arguments(cfg.training), train_dataset=rows,
                      data_collator=collate_lm, callbacks=[clock])
    trainer.train()
    return {**result(), **peak_memory(), "rss_after_imports_mib": base}


def child_loader(args, work: Path) -> dict:
    from torch.utils.data import DataLoader

    from pipeline.config import load_config
    from pipeline.student.layer_map import build_layer_map, read_kept_layers
    from pipeline.sources.models import load_config as model_config
    from pipeline.train.dataset import CacheDataset, ChunkShuffleSampler, collate
    from pipeline.train.trainer import SHUFFLE_WINDOW

    cfg = load_config(DEMO, overrides(args, work, args.teacher_path))
    n_student = model_config(str(work / "student")).num_hidden_layers
    n_teacher = model_config(args.teacher_path).num_hidden_layers
    layer_map = build_layer_map(cfg.mapping.strategy, n_student, n_teacher, cfg.mapping.stride,
                                read_kept_layers(work / "student"))
    ds = CacheDataset(cfg.cache.dir, "train", sorted(set(layer_map.values())), cfg.loss.temperature)
    tokens, t0 = 0, time.perf_counter()
    epoch = 0
    while time.perf_counter() - t0 < 10 or epoch < 2:  # >= 2 epochs, >= 10 s: every chunk decoded at least twice
        sampler = ChunkShuffleSampler(ds.groups, seed=0, window=SHUFFLE_WINDOW)
        sampler.set_epoch(epoch)
        loader = DataLoader(ds, batch_size=args.batch_size, sampler=sampler, collate_fn=collate)
        for batch in loader:
            tokens += batch["input_ids"].numel()
        epoch += 1
        ds._cache = None  # a fresh reader each epoch: no decoded chunk carried over
    seconds = time.perf_counter() - t0
    return {"tokens_per_s": tokens / seconds, "epochs": epoch, **peak_memory()}


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
    from pipeline.student.layer_map import build_layer_map, read_kept_layers

    cfg = load_config(DEMO, overrides(args, work, args.teacher_path))
    n_student = model_config(str(work / "student")).num_hidden_layers
    tcfg = model_config(args.teacher_path)
    layer_map = build_layer_map(cfg.mapping.strategy, n_student, tcfg.num_hidden_layers, cfg.mapping.stride,
                                read_kept_layers(work / "student"))
    n, d = args.batch_size * args.seq_len, tcfg.hidden_size
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


def run_child(mode: str, args, work: Path, loss: list[str] | None = None, breakdown: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--work", str(work), "--teacher-path", args.teacher_path,
           *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
             if k in ("sequences", "seq_len", "batch_size", "steps", "warmup", "stride", "mapping")],
           *[f"--child-loss={x}" for x in loss or []], *(["--child-breakdown"] if breakdown else [])]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{mode} child failed:\n{r.stderr[-4000:]}")
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def print_vs_finetune(args, vs: dict[str, dict]) -> None:
    runs = vs_finetune_runs(args.chunk_tokens)
    ref = vs["finetune"]
    mem = "cuda_peak_allocated_mib" if "cuda_peak_allocated_mib" in ref else "peak_rss_mib"
    goals = {"kd-dense": (1.05, 1.10, "<="), "kd-chunked": (1.05, 1.10, "<="), "ce-only": (None, 1.00, "<")}

    def goal(ratio: float, limit: float | None, op: str) -> str:
        if limit is None:
            return ""
        met = ratio <= limit if op == "<=" else ratio < limit
        return f"{op} {limit:.2f}x: {'met' if met else 'missed'}"

    print(f"\n| run | step s (median) | step vs finetune | goal | {mem.replace('_', ' ')} | memory vs finetune | goal |")
    print("|---|---:|---:|---|---:|---:|---|")
    for name, _, _, what in runs:
        r = vs[name]
        step, peak = r["step_s"] / ref["step_s"], r[mem] / ref[mem]
        gs, gm, op = goals.get(name, (None, None, ""))
        if name == "finetune":
            g_step = g_mem = "reference"
        else:
            g_step, g_mem = goal(step, gs, "<="), goal(peak, gm, op)
        print(f"| {name} ({what}) | {r['step_s']:.3f} | {step:.3f} | {g_step} | {r[mem]:.0f} | {peak:.3f} | {g_mem} |")
    if mem == "peak_rss_mib":
        print(f"(peak RSS includes the child's imports: {ref['rss_after_imports_mib']:.0f} MiB right after them)")

    print("\nper optimizer step, mean s over the timed steps (share of the step):")
    print("| run | " + " | ".join(PHASE_NAMES[p] for p in PHASES) + " | step (mean) |")
    print("|---|" + "---:|" * (len(PHASES) + 1))
    for name, _, _, _ in runs:
        b = vs[name]["breakdown"]
        total = sum(b.values())
        print(f"| {name} | " + " | ".join(f"{b[p]:.3f} ({100 * b[p] / total:.0f}%)" for p in PHASES)
              + f" | {total:.3f} |")
    print("steps (s): " + "; ".join(f"{name}: " + " ".join(f"{s:.2f}" for s in vs[name]["steps"])
                                     for name, _, _, _ in runs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=40, help="cached sequences (>= batch x (steps + warm-up + 1) keeps the timed steps in one epoch)")
    ap.add_argument("--seq-len", type=int, default=None, help="default 256 (128 with --student-vocab)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 4 (2 with --student-vocab)")
    ap.add_argument("--steps", type=int, default=6, help="timed optimizer steps (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--stride", type=int, default=3, help="mapping.stride: map every stride-th student block")
    ap.add_argument("--mapping", default="selected", help="mapping.strategy (selected needs the packaged teacher)")
    ap.add_argument("--teacher-size", choices=["135m", *TEACHER_SHAPES], default="135m",
                    help="135m: the packaged SmolLM2 teacher; others: a random-init teacher of that shape")
    ap.add_argument("--objectives", action="store_true",
                    help="time FDD and each divergence against the plain kl step (cache mode only)")
    ap.add_argument("--vs-finetune", action="store_true",
                    help="finetune (stock Trainer, CE) vs kd-dense, kd-chunked, ce-only and online: step time, "
                         "peak memory, ratios against finetune, per-phase step breakdown")
    ap.add_argument("--chunk-tokens", type=int, default=None,
                    help="--vs-finetune: loss.chunk_tokens of the chunked children (default: the config's)")
    ap.add_argument("--student-vocab", type=int, default=None, metavar="N",
                    help=f"random-init teacher ({RANDOM_TEACHER_BLOCKS} blocks) and student ({RANDOM_STUDENT_BLOCKS} "
                         f"blocks) of SmolLM2-135M width with an N-token vocabulary (N >= {PACKAGED_VOCAB}), "
                         "instead of the packaged models")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--child-loss", action="append", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=["cache", "online", "loader", "finetune"], help=argparse.SUPPRESS)
    ap.add_argument("--child-breakdown", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--teacher-path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.objectives and args.vs_finetune:
        ap.error("--objectives and --vs-finetune are separate runs")
    if args.student_vocab is not None and args.student_vocab < PACKAGED_VOCAB:
        ap.error(f"--student-vocab must be >= {PACKAGED_VOCAB} (the packaged tokenizer's ids)")
    if args.student_vocab is not None and args.teacher_size != "135m":
        ap.error("--student-vocab builds its own teacher: leave --teacher-size out")
    if args.chunk_tokens is not None and args.chunk_tokens < 1:
        ap.error("--chunk-tokens must be >= 1 (kd-dense is the chunk 0 run)")
    small = args.student_vocab is not None
    args.seq_len = args.seq_len or (128 if small else 256)
    args.batch_size = args.batch_size or (2 if small else 4)
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

    from pipeline.config import load_config
    from pipeline.recipes.cache import build_cache
    from pipeline.recipes.prune import run_prune

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
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
        build_cache(load_config(DEMO, overrides(args, work, args.teacher_path)))
        import torch

        print(f"{models}; "
              f"{args.sequences} x {args.seq_len} tokens, batch {args.batch_size}, mapping {args.mapping} "
              f"stride {args.stride}; {args.steps} timed steps after {args.warmup} warm-up; "
              f"torch threads {torch.get_num_threads()}; device {'cuda' if _cuda() else 'cpu'}", flush=True)
        if args.objectives:
            runs: dict[str, list[dict]] = {name: [] for name, _ in OBJECTIVES}
            for _ in range(3):
                for name, loss in OBJECTIVES:
                    runs[name].append(run_child("cache", args, work, loss))
                    print(f"  {name}: {runs[name][-1]['step_s']:.2f} s", flush=True)
            fdd_s, cosine_s, n_mapped, d_teacher = term_cost(args, work)
        elif args.vs_finetune:
            vs = {}
            for name, child, loss, _ in vs_finetune_runs(args.chunk_tokens):
                t0 = time.perf_counter()
                vs[name] = run_child(child, args, work, loss, breakdown=True)
                print(f"  {name}: {vs[name]['step_s']:.2f} s/step ({time.perf_counter() - t0:.0f} s child)",
                      flush=True)
        else:
            res = {mode: run_child(mode, args, work) for mode in ("cache", "online", "loader")}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    if args.objectives:
        step = {name: min(r["step_s"] for r in rs) for name, rs in runs.items()}
        mem = "cuda_peak_allocated_mib" if "cuda_peak_allocated_mib" in runs[OBJECTIVES[0][0]][0] else "peak_rss_mib"
        peak = {name: max(r[mem] for r in rs) for name, rs in runs.items()}
        ref = OBJECTIVES[0][0]
        print(f"\n| objective | step s (best of 3 medians) | vs {ref} | {mem.replace('_', ' ')} | vs {ref} |")
        print("|---|---:|---:|---:|---:|")
        for name, _ in OBJECTIVES:
            print(f"| {name} | {step[name]:.2f} | {step[name] / step[ref]:.3f} | {peak[name]:.0f} | "
                  f"{peak[name] / peak[ref]:.2f} |")
        print("steps (s): " + "; ".join(f"{name}: " + " ".join(f"{s:.2f}" for r in rs for s in r["steps"])
                                         for name, rs in runs.items()))
        print(f"\nthe terms alone (forward + backward on this step's tensors: {args.batch_size * args.seq_len} tokens, "
              f"{n_mapped} mapped layers, d_teacher {d_teacher}; median of 20):\n"
              f"  fdd    {fdd_s * 1e3:.1f} ms = {fdd_s / step[ref]:.4f} of the {ref} step -> "
              f"fdd step / plain step = {1 + fdd_s / step[ref]:.3f} (goal <= 1.05)\n"
              f"  cosine hidden loss {cosine_s * 1e3:.1f} ms = {cosine_s / step[ref]:.4f} of the step")
        return

    if args.vs_finetune:
        print_vs_finetune(args, vs)
        return

    c, o, ld = res["cache"], res["online"], res["loader"]
    tok_step = args.batch_size * args.seq_len
    mem = "cuda_peak_allocated_mib" if "cuda_peak_allocated_mib" in c else "peak_rss_mib"
    print(f"\n| mode | step s (median) | tokens/s | {mem.replace('_', ' ')} | step vs online | memory vs online |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in (("online (live teacher)", o), ("cache", c)):
        print(f"| {name} | {r['step_s']:.2f} | {tok_step / r['step_s']:.0f} | {r[mem]:.0f} | "
              f"{r['step_s'] / o['step_s']:.2f} | {r[mem] / o[mem]:.2f} |")
    consumed = tok_step / c["step_s"]
    print(f"\ncache loader alone (1 process, no workers): {ld['tokens_per_s']:.0f} tokens/s over {ld['epochs']} "
          f"epochs = {ld['tokens_per_s'] / consumed:.1f}x what cache training consumes ({consumed:.0f} tokens/s)")
    print("steps (s): cache " + " ".join(f"{s:.2f}" for s in c["steps"]) + "; online "
          + " ".join(f"{s:.2f}" for s in o["steps"]))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
