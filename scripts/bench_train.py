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
the variants run in the order listed, twice each (ABAB), and the median of both runs' medians is used.

    python scripts/bench_train.py --objectives [--steps 6]

`--teacher-size 360m|1.7b` swaps in a random-init teacher of that SmolLM2 shape (same tokenizer): the
numbers measure time and memory, not quality, and show how the ratios move as the teacher outgrows
the student.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEMO = ROOT / "configs" / "demo.yaml"
# SmolLM2 family shapes (vocab 49,152, tied embeddings) for random-init teachers
TEACHER_SHAPES = {
    "360m": {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 15,
             "num_key_value_heads": 5},
    "1.7b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
             "num_key_value_heads": 32},
}


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


def peak_rss_mib() -> float:
    """This process's own peak resident set. Linux's ru_maxrss carries the parent's RSS across fork+exec (a
    child spawned by a parent holding a 7 GB teacher would report >= 7 GB); VmHWM belongs to the exec'd image."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux; other systems: approximate


def peak_memory() -> dict:
    import torch

    out = {"peak_rss_mib": peak_rss_mib()}
    if torch.cuda.is_available():
        out["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


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


def child_train(args, work: Path, online: bool, loss: list[str] | None = None) -> dict:
    from transformers import TrainerCallback

    from pipeline.config import load_config
    from pipeline.recipes.train import run_train

    ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            ends.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

    mode = "online" if online else "cache"
    cfg = load_config(DEMO, overrides(args, work, args.teacher_path) + training(args, work / f"run-{mode}")
                      + list(loss or []))
    run_train(cfg, online=online, callbacks=[StepClock()], echo=lambda m: None)
    steps = [b - a for a, b in zip(ends, ends[1:])][args.warmup : args.warmup + args.steps]
    return {"step_s": statistics.median(steps), "steps": steps, **peak_memory()}


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


def make_teacher(size: str, work: Path) -> str:
    """A random-init SmolLM2-shaped teacher of `size`, with the packaged tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.sources.models import load_config as model_config, load_tokenizer

    base = model_config("smollm2-135m-instruct")
    cfg = base.__class__.from_dict({**base.to_dict(), **TEACHER_SHAPES[size]})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    path = work / f"teacher-{size}"
    model.save_pretrained(path)
    load_tokenizer("smollm2-135m-instruct").save_pretrained(path)
    return str(path)


def run_child(mode: str, args, work: Path, loss: list[str] | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--work", str(work), "--teacher-path", args.teacher_path,
           *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
             if k in ("sequences", "seq_len", "batch_size", "steps", "warmup", "stride", "mapping")],
           *[f"--child-loss={x}" for x in loss or []]]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{mode} child failed:\n{r.stderr[-4000:]}")
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=40, help="cached sequences (>= batch x (steps + warm-up + 1) keeps the timed steps in one epoch)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6, help="timed optimizer steps (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--stride", type=int, default=3, help="mapping.stride: map every stride-th student block")
    ap.add_argument("--mapping", default="selected", help="mapping.strategy (selected needs the packaged teacher)")
    ap.add_argument("--teacher-size", choices=["135m", *TEACHER_SHAPES], default="135m",
                    help="135m: the packaged SmolLM2 teacher; others: a random-init teacher of that shape")
    ap.add_argument("--objectives", action="store_true",
                    help="time FDD and each divergence against the plain kl step (cache mode only)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--child-loss", action="append", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=["cache", "online", "loader"], help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--teacher-path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    if args.child:
        work = Path(args.work)
        if args.child == "loader":
            result = child_loader(args, work)
        else:
            result = child_train(args, work, args.child == "online", args.child_loss)
        print("RESULT " + json.dumps(result))
        return

    from pipeline.config import load_config
    from pipeline.recipes.cache import build_cache
    from pipeline.recipes.prune import run_prune

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        if args.teacher_size == "135m":
            args.teacher_path = "smollm2-135m-instruct"
        else:
            args.teacher_path = make_teacher(args.teacher_size, work)
            if args.mapping == "selected":
                args.mapping = "uniform"  # the student's kept blocks index the packaged teacher, not this one
        # the student is always the packaged SmolLM2 minus its 6 least important blocks
        run_prune("smollm2-135m-instruct", str(work / "student"), method="importance", remove="6",
                  calibration_sequences=16, heldout_sequences=0, progress=False, echo=lambda m: None)
        build_cache(load_config(DEMO, overrides(args, work, args.teacher_path)))
        import torch

        print(f"teacher {args.teacher_size} ({args.teacher_path}), student = SmolLM2-135M minus 6 blocks; "
              f"{args.sequences} x {args.seq_len} tokens, batch {args.batch_size}, mapping {args.mapping} "
              f"stride {args.stride}; {args.steps} timed steps after {args.warmup} warm-up; "
              f"torch threads {torch.get_num_threads()}; device {'cuda' if _cuda() else 'cpu'}", flush=True)
        if args.objectives:
            runs: dict[str, list[dict]] = {name: [] for name, _ in OBJECTIVES}
            for _ in range(2):
                for name, loss in OBJECTIVES:
                    runs[name].append(run_child("cache", args, work, loss))
                    print(f"  {name}: {runs[name][-1]['step_s']:.2f} s", flush=True)
        else:
            res = {mode: run_child(mode, args, work) for mode in ("cache", "online", "loader")}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    if args.objectives:
        step = {name: statistics.median([r["step_s"] for r in rs]) for name, rs in runs.items()}
        mem = "cuda_peak_allocated_mib" if "cuda_peak_allocated_mib" in runs[OBJECTIVES[0][0]][0] else "peak_rss_mib"
        peak = {name: max(r[mem] for r in rs) for name, rs in runs.items()}
        ref = OBJECTIVES[0][0]
        print(f"\n| objective | step s (median) | vs {ref} | {mem.replace('_', ' ')} | vs {ref} |")
        print("|---|---:|---:|---:|---:|")
        for name, _ in OBJECTIVES:
            print(f"| {name} | {step[name]:.2f} | {step[name] / step[ref]:.3f} | {peak[name]:.0f} | "
                  f"{peak[name] / peak[ref]:.2f} |")
        print("steps (s): " + "; ".join(f"{name}: " + " ".join(f"{s:.2f}" for r in rs for s in r["steps"])
                                         for name, rs in runs.items()))
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
