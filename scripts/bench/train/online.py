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

    python -m scripts.bench.train.online [--sequences 40] [--steps 6] [--warmup 2] [--batch-size 4]
    python -m scripts.bench.train.online --teacher-size 360m   # a larger (random-init, SmolLM2-360M shape) teacher

`--teacher-size 360m|1.7b` swaps in a random-init teacher of that SmolLM2 shape (same tokenizer): the
numbers measure time and memory, not quality, and show how the ratios move as the teacher outgrows
the student. `--student-vocab N` swaps both models for random-init ones with an N-token vocabulary (see
finetune.py). `--bf16` trains every child with bf16 mixed precision.

Each child's result is printed as soon as it returns (a run cut off by a time limit keeps what finished),
and a child that fails prints the tail of its stderr and is recorded as failed; the run goes on with the
next child. `--out FILE.jsonl` appends a header line (the run's settings, the device name) and then one
JSON line per finished child (its name, mode, settings and result dict, or its error).
"""

from __future__ import annotations

from scripts.bench.train import common
from scripts.bench.train.common import mem_key, ok


def run(args, runner: common.Runner) -> None:
    """Cache and online training, then the loader; the table once both trained."""
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
        common.print_loader(ld, "cache training", res["cache"], tok_step)
    if ok(res["cache"]) and ok(res["online"]):
        print_table(res["cache"], res["online"], tok_step)


def print_table(c: dict, o: dict, tok_step: int) -> None:
    mem = mem_key(c)
    print(f"\n| mode | step s (median) | tokens/s | {mem.replace('_', ' ')} | step vs online | memory vs online |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in (("online (live teacher)", o), ("cache", c)):
        print(f"| {name} | {r['step_s']:.2f} | {tok_step / r['step_s']:.0f} | {r[mem]:.0f} | "
              f"{r['step_s'] / o['step_s']:.2f} | {r[mem] / o[mem]:.2f} |")
    print("steps (s): cache " + " ".join(f"{s:.2f}" for s in c["steps"]) + "; online "
          + " ".join(f"{s:.2f}" for s in o["steps"]))


def main(argv: list[str] | None = None) -> None:
    common.main(argv, "compare", __doc__)


if __name__ == "__main__":
    main()
